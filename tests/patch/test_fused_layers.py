"""Fused decoder layers (backend="fused") against the hook path (backend="reference", the oracle)."""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import pytest
import torch

from emokernels import Intervention, patch
from emokernels.models import Adapter, load
from emokernels.patch.fused_layers import FUSABLE_FAMILIES
from tests.helpers import FAMILIES, position_ids, prompt_batch, tiny
ROWS = torch.tensor([2, 0, 1])
STRENGTH = torch.tensor([0.5, -1.0, 2.0])


def _kw(batch):
    return dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=position_ids(batch["attention_mask"]))


def _vecs(seed, n=4, E=3, width=64, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {l: scale * torch.randn(E, width, generator=g) for l in range(n)}


def _circuit(rows=ROWS, strength=STRENGTH):
    """Every fusable kind: the compiled-bias circuit (attn_out / mlp_out adds with per-row tables),
    steering (add_rms at both residual points), projections and captures at the readout."""
    D = {l: torch.randn(5, 64, generator=torch.Generator().manual_seed(10 + l)) for l in range(4)}
    return [
        Intervention(site="attn_out", op="add", layers=range(4), positions="all", vectors=_vecs(1, scale=0.3),
                     rows=rows),
        Intervention(site="mlp_out", op="add", layers=range(4), positions=("readout", "generated"),
                     vectors=_vecs(2, scale=0.3), rows=rows, strength=strength),
        Intervention(site="resid_mid", op="add_rms", layers=(1, 3), positions=("readout", "generated"),
                     vectors=_vecs(3, scale=0.1), rows=rows, strength=strength),
        Intervention(site="resid_post", op="add_rms", layers=(1, 2), positions="all", vectors=_vecs(4, scale=0.1),
                     rows=rows, strength=2.0),
        Intervention(site="resid_mid", op="project", layers=range(4), positions="readout", directions=D, name="p_mid"),
        Intervention(site="resid_post", op="project", layers=range(4), positions="readout", directions=D, name="p_post"),
        Intervention(site="resid_post", op="capture", layers=(0, 3), positions="readout", name="c_post"),
    ]


def _fused_layers(model):
    return [i for i, L in enumerate(Adapter.of(model).layers) if "forward" in L.__dict__]


def _run(model, batch, ivs, backend):
    with torch.no_grad(), patch(model, *ivs, backend=backend) as h:
        if backend == "fused":
            assert _fused_layers(model) == [0, 1, 2, 3]
        logits = model(**_kw(batch)).logits
    return logits, h.captures


def _assert_captures_close(a, b, **tol):
    assert set(a) == set(b)
    for key in a:
        assert set(a[key]) == set(b[key]), key
        for l in a[key]:
            assert len(a[key][l]) == len(b[key][l])
            for x, y in zip(a[key][l], b[key][l]):
                torch.testing.assert_close(x.float(), y.float(), **tol)


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_fp32_equals_reference(family):
    model, tok = tiny(family)
    batch = prompt_batch(tok)
    ref, cref = _run(model, batch, _circuit(), "reference")
    fus, cfus = _run(model, batch, _circuit(), "fused")
    plain = model(**_kw(batch)).logits
    assert not torch.allclose(ref, plain, atol=1e-2)  # the circuit does something
    torch.testing.assert_close(fus, ref, rtol=1e-4, atol=1e-4)
    _assert_captures_close(cfus, cref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_bf16_within_error_rule(family):
    """bf16: the fused path's error against the fp32 model is within 2x the hook path's."""
    m32, tok = tiny(family)
    m16, _ = tiny(family, torch.bfloat16)
    batch = prompt_batch(tok)
    exact, c_exact = _run(m32, batch, _circuit(), "reference")
    ref, c_ref = _run(m16, batch, _circuit(), "reference")
    fus, c_fus = _run(m16, batch, _circuit(), "fused")
    err_ref = (ref.double() - exact.double()).abs().max().item()
    err_fus = (fus.double() - exact.double()).abs().max().item()
    assert err_fus <= 2 * err_ref + 1e-3, (err_fus, err_ref)
    # captures: few values per layer, so pool them (all keys and layers) and compare rms errors
    pool = lambda c: torch.cat([c[k][l][0].double().flatten() for k in sorted(c) for l in sorted(c[k])])
    e = pool(c_exact)
    er = (pool(c_ref) - e).square().mean().sqrt().item()
    ef = (pool(c_fus) - e).square().mean().sqrt().item()
    assert ef <= 2 * er + 1e-4, (ef, er)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_cache_fp32_equals_reference(family):
    model, tok = tiny(family)
    batch = prompt_batch(tok)
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=6,
              do_sample=False, use_cache=True)
    with patch(model, *_circuit(), backend="reference") as hr:
        ref = model.generate(**kw)
    with patch(model, *_circuit(), backend="fused") as hf:
        fus = model.generate(**kw)
    assert torch.equal(fus, ref)
    assert not torch.equal(ref, model.generate(**kw))
    # projections are read at the prefill only (decode steps hold no readout row)
    assert len(hf.captures["p_mid"][0]) == len(hr.captures["p_mid"][0]) == 1
    _assert_captures_close(hf.captures, hr.captures, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2"])
def test_decode_steps_bf16_within_error_rule(family):
    """KV-cached decode in bf16, teacher-forced (same tokens for every path)."""
    m32, tok = tiny(family)
    m16, _ = tiny(family, torch.bfloat16)
    batch = prompt_batch(tok)
    steps = torch.randint(10, 400, (3, 4), generator=torch.Generator().manual_seed(0))

    def decode(model, backend):
        outs = []
        mask = batch["attention_mask"]
        with torch.no_grad(), patch(model, *_circuit(), backend=backend):
            out = model(input_ids=batch["input_ids"], attention_mask=mask, use_cache=True)
            cache = out.past_key_values
            outs.append(out.logits[:, -1])
            for t in range(steps.shape[1]):
                mask = torch.cat([mask, mask.new_ones(3, 1)], 1)
                out = model(input_ids=steps[:, t:t + 1], attention_mask=mask, past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                outs.append(out.logits[:, -1])
        return torch.stack(outs, 1).double()

    exact = decode(m32, "reference")
    err_ref = (decode(m16, "reference") - exact).abs().max().item()
    err_fus = (decode(m16, "fused") - exact).abs().max().item()
    assert err_fus <= 2 * err_ref + 1e-3, (err_fus, err_ref)
    torch.testing.assert_close(decode(m32, "fused"), exact, rtol=1e-4, atol=1e-4)


def test_per_row_batch_equals_rows_one_by_one():
    model, tok = tiny("llama")
    batch = prompt_batch(tok)
    with torch.no_grad(), patch(model, *_circuit(), backend="fused"):
        batched = model(**_kw(batch)).logits
    for i in range(3):
        m = batch["attention_mask"][i].bool()
        one = {"input_ids": batch["input_ids"][i:i + 1, m], "attention_mask": batch["attention_mask"][i:i + 1, m]}
        ivs = [iv.with_rows(ROWS[i:i + 1], STRENGTH[i:i + 1] if torch.is_tensor(iv.strength) else None)
               if iv.op in ("add", "add_rms") else iv for iv in _circuit()]
        with torch.no_grad(), patch(model, *ivs, backend="fused"):
            logits = model(**_kw(one)).logits
        n = one["input_ids"].shape[1]
        torch.testing.assert_close(batched[i, -n:], logits[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "phi3", "gemma3"])
def test_restores_bitwise_after_exit_and_exception(family):
    model, tok = tiny(family)
    batch = prompt_batch(tok)
    layers = Adapter.of(model).layers
    with torch.no_grad():
        before = model(**_kw(batch)).logits
        with pytest.raises(RuntimeError, match="boom"):
            with patch(model, *_circuit(), backend="fused"):
                assert _fused_layers(model) == [0, 1, 2, 3]
                assert not torch.equal(model(**_kw(batch)).logits, before)
                raise RuntimeError("boom")
        assert _fused_layers(model) == []
        assert all(type(L).forward is L.forward.__func__ for L in layers)
        assert torch.equal(model(**_kw(batch)).logits, before)
        h = patch(model, *_circuit(), backend="fused")
        h.remove()
        h.remove()  # idempotent
        assert _fused_layers(model) == []
        assert torch.equal(model(**_kw(batch)).logits, before)


def test_restores_a_preexisting_instance_forward():
    model, tok = tiny("qwen2")
    batch = prompt_batch(tok)
    L = Adapter.of(model).layers[1]
    calls = []
    cls_forward = L.forward

    def custom(*a, **k):
        calls.append(1)
        return cls_forward(*a, **k)

    L.forward = custom
    try:
        with torch.no_grad(), patch(model, *_circuit(), backend="fused"):
            model(**_kw(batch))
        assert L.__dict__["forward"] is custom
        with torch.no_grad():
            model(**_kw(batch))
        assert calls == [1]
    finally:
        del L.forward


def test_install_failure_leaves_model_untouched(monkeypatch):
    model, tok = tiny("llama")
    fl = importlib.import_module("emokernels.patch.fused_layers")

    real = fl._make_forward
    n = []

    def flaky(*a, **k):
        n.append(1)
        if len(n) == 3:
            raise RuntimeError("install failed")
        return real(*a, **k)

    def hook_count():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    before = hook_count()
    monkeypatch.setattr(fl, "_make_forward", flaky)
    with pytest.raises(RuntimeError, match="install failed"):
        patch(model, *_circuit(), backend="fused")
    assert _fused_layers(model) == []
    assert hook_count() == before


def test_nested_patches_and_out_of_order_removal():
    model, tok = tiny("mistral")
    batch = prompt_batch(tok)
    a_ivs = _circuit()[:2]
    b_ivs = [Intervention(site="resid_post", op="add", layers=(1, 2), positions="all", vectors=_vecs(7, scale=0.2))]
    with torch.no_grad():
        before = model(**_kw(batch)).logits
        with patch(model, *a_ivs, backend="reference"), patch(model, *b_ivs, backend="reference"):
            ref = model(**_kw(batch)).logits
        ref_b = _run_plain_patch(model, batch, b_ivs)
        outer = patch(model, *a_ivs, backend="fused")
        inner = patch(model, *b_ivs, backend="fused")  # layers 1, 2 are taken: hooks there
        assert _fused_layers(model) == [0, 1, 2, 3] and not inner._fused.keys
        fus = model(**_kw(batch)).logits
        outer.remove()  # the inner patch's hooks keep working on the restored HF forward
        torch.testing.assert_close(model(**_kw(batch)).logits, ref_b, rtol=1e-4, atol=1e-4)
        inner.remove()
        after = model(**_kw(batch)).logits
    torch.testing.assert_close(fus, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(after, before)
    assert _fused_layers(model) == []


def _run_plain_patch(model, batch, ivs):
    with torch.no_grad(), patch(model, *ivs, backend="reference"):
        return model(**_kw(batch)).logits


def test_ineligible_points_stay_on_hooks():
    """add_rms at attn_out (rms of A, not of m), and an edit after a capture, keep hooks."""
    model, tok = tiny("llama")
    batch = prompt_batch(tok)
    ivs = [
        Intervention(site="attn_out", op="add_rms", layers=(0,), positions="all", vectors=_vecs(1, scale=0.2), rows=ROWS),
        Intervention(site="resid_post", op="capture", layers=(1,), positions="all", name="c"),
        Intervention(site="resid_post", op="add", layers=(1,), positions="all", vectors=_vecs(2, scale=0.2)),
        Intervention(site="resid_mid", op="add", layers=(2,), positions="all", vectors=_vecs(3, scale=0.2)),
    ]
    with torch.no_grad(), patch(model, *ivs, backend="reference") as hr:
        ref = model(**_kw(batch)).logits
    with torch.no_grad(), patch(model, *ivs, backend="fused") as hf:
        assert _fused_layers(model) == [2]
        assert (("attn_out", 0) not in hf._fused.keys) and (("resid_post", 1) not in hf._fused.keys)
        fus = model(**_kw(batch)).logits
    torch.testing.assert_close(fus, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(hf.captures["c"][1][0], hr.captures["c"][1][0])


def test_summed_and_sequential_edits_and_in_place_table_updates():
    model, tok = tiny("qwen3")
    batch = prompt_batch(tok)
    va, vb, vc = _vecs(1, scale=0.2), _vecs(2, scale=0.2), _vecs(3, scale=0.2)
    ivs = [  # attn_out + resid_mid adds with equal rows/strength: one summed table
        Intervention(site="attn_out", op="add", layers=(1,), positions="all", vectors=va, rows=ROWS),
        Intervention(site="resid_mid", op="add", layers=(1,), positions="all", vectors=vb, rows=ROWS),
        # resid_post: add, then add_rms, then an add with other positions: three sequential edits
        Intervention(site="resid_post", op="add", layers=(1,), positions="all", vectors=vc, rows=ROWS),
        Intervention(site="resid_post", op="add_rms", layers=(1,), positions="all", vectors=va, rows=ROWS, strength=STRENGTH),
        Intervention(site="resid_post", op="add", layers=(1,), positions="prompt", vectors=vb),
        Intervention(site="resid_post", op="project", layers=(1,), positions="readout", directions={1: torch.randn(3, 64)}),
    ]

    def both():
        with torch.no_grad(), patch(model, *ivs, backend="reference") as hr:
            ref = model(**_kw(batch)).logits
        with torch.no_grad(), patch(model, *ivs, backend="fused") as hf:
            pts = hf._fused
            fus = model(**_kw(batch)).logits
        torch.testing.assert_close(fus, ref, rtol=1e-4, atol=1e-4)
        _assert_captures_close(hf.captures, hr.captures, rtol=1e-4, atol=1e-4)
        return pts, fus

    pts, first = both()
    assert _fused_layers(model) == []
    vb[1].mul_(3.0)  # an in-place change of a summed source table is picked up
    _, second = both()
    assert not torch.allclose(first, second)


def test_every_tiny_family_is_fusable():
    assert {Adapter.of(tiny(f)[0]).family for f in FAMILIES} <= set(FUSABLE_FAMILIES)


def test_reference_backend_never_fuses():
    model, tok = tiny("llama")
    with patch(model, *_circuit(), backend="reference") as h:
        assert _fused_layers(model) == [] and h._fused is None


# ---------------------------------------------------------------------------------------------
# gradients: a few optimizer steps with a fused patch give the reference path's gradients
# ---------------------------------------------------------------------------------------------
def _train(backend, steps=3):
    model, tok = load("tiny-llama", dtype=torch.float32)  # a fresh model (weights get updated)
    model.train()
    batch = prompt_batch(tok)
    g = torch.Generator().manual_seed(0)
    direction = torch.nn.Parameter(0.1 * torch.randn(3, 64, generator=g))
    strength = torch.nn.Parameter(torch.tensor([0.5, 1.0, -0.5]))
    trained = list(model.model.layers[2].parameters())  # LoRA-free fine-tuning of one layer
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trained:
        p.requires_grad_(True)
    opt = torch.optim.SGD([direction, strength, *trained], lr=0.05)
    ivs = [
        Intervention(site="resid_post", op="add_rms", layers=(1, 2), positions="all",
                     vectors={1: direction, 2: direction}, rows=ROWS, strength=strength),
        Intervention(site="attn_out", op="add", layers=(2,), positions=("readout", "generated"),
                     vectors={2: direction}, rows=ROWS, strength=strength),
        Intervention(site="resid_mid", op="project", layers=(2, 3), positions="readout",
                     directions={2: direction, 3: direction}, name="p"),
    ]
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    history = []
    with patch(model, *ivs, backend=backend) as h:
        for _ in range(steps):
            opt.zero_grad()
            out = model(**_kw(batch), labels=labels)
            proj = torch.stack([h.captures["p"][l][-1] for l in (2, 3)]).square().mean()
            loss = out.loss + 0.01 * proj
            loss.backward()
            history.append((loss.item(), direction.grad.clone(), strength.grad.clone(),
                            [p.grad.clone() for p in trained]))
            opt.step()
    return history


def test_optimizer_steps_give_reference_gradients():
    ref = _train("reference")
    fus = _train("fused")
    for (lr_, dr, sr, wr), (lf, df, sf, wf) in zip(ref, fus):
        assert abs(lr_ - lf) <= 1e-5 * max(1.0, abs(lr_))
        torch.testing.assert_close(df, dr, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(sf, sr, rtol=1e-4, atol=1e-6)
        for a, b in zip(wf, wr):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert ref[0][0] != ref[-1][0]  # the optimizer did move


def test_example_train_with_patch_runs():
    path = Path(__file__).resolve().parents[2] / "examples" / "train_with_patch.py"
    spec = importlib.util.spec_from_file_location("train_with_patch", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    losses = mod.main(steps=3, log=False)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
