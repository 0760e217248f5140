"""The reference intervention engine: per-row tables, KV cache, restoration, gradients."""
import pytest
import torch

from emokernels import Intervention, patch
from emokernels.models import Adapter
from tests.helpers import position_ids, prompt_batch, tiny


def _forward(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 position_ids=position_ids(batch["attention_mask"])).logits


def _steer(model, rows, strength, positions=("readout", "generated"), op="add_rms"):
    a = Adapter.of(model)
    g = torch.Generator().manual_seed(0)
    vecs = {l: torch.randn(3, a.hidden_size, generator=g) for l in (1, 2)}
    return Intervention(site="resid_post", op=op, layers=(1, 2), positions=positions, vectors=vecs,
                        rows=rows, strength=strength)


def _single(batch, i):
    m = batch["attention_mask"][i].bool()
    return {"input_ids": batch["input_ids"][i : i + 1, m], "attention_mask": batch["attention_mask"][i : i + 1, m]}


@pytest.mark.parametrize("site,op", [("resid_post", "add_rms"), ("resid_mid", "add"), ("mlp_out", "add")])
def test_per_row_batch_equals_rows_one_by_one(site, op):
    model, tok = tiny("llama")
    batch = prompt_batch(tok)
    rows, strength = torch.tensor([2, 0, 1]), torch.tensor([0.5, -1.0, 2.0])
    iv = _steer(model, rows, strength, positions="all", op=op)
    iv.site = site
    with torch.no_grad(), patch(model, iv):
        batched = _forward(model, batch)
    for i in range(3):
        one = _single(batch, i)
        with torch.no_grad(), patch(model, iv.with_rows(rows[i : i + 1], strength[i : i + 1])):
            logits = _forward(model, one)
        n = one["input_ids"].shape[1]
        torch.testing.assert_close(batched[i, -n:], logits[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("positions", [("readout", "generated"), "all", "prompt"])
def test_generate_with_cache_equals_without(positions):
    model, tok = tiny("qwen2")
    batch = prompt_batch(tok)
    iv = _steer(model, torch.tensor([0, 1, 2]), 4.0, positions=positions)
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=6, do_sample=False)
    # Without a cache every step is a fresh full forward: t* must be pinned with readout=,
    # else each step would take its last token as the readout.
    with patch(model, iv, readout=batch["readout"]):
        cached = model.generate(**kw, use_cache=True)
        uncached = model.generate(**kw, use_cache=False)
    plain = model.generate(**kw)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, plain)  # the patch changed something


def test_unpatch_restores_bitwise_even_after_exception():
    model, tok = tiny("gemma2")
    batch = prompt_batch(tok)
    with torch.no_grad():
        before = _forward(model, batch)
        with pytest.raises(RuntimeError, match="boom"):
            with patch(model, _steer(model, None, 3.0, positions="all")):
                assert not torch.equal(_forward(model, batch), before)
                raise RuntimeError("boom")
        assert torch.equal(_forward(model, batch), before)
        h = patch(model, _steer(model, None, 3.0, positions="all"))
        h.remove()
        assert torch.equal(_forward(model, batch), before)


def test_neuron_zero_ablation_equals_zeroed_weights():
    model, tok = tiny("llama")
    batch = prompt_batch(tok)
    idx = torch.tensor([3, 17, 100])
    iv = Intervention(site="neurons", op="edit", layers=(1,), positions="all", index={1: idx},
                      scale={1: torch.zeros(1, 3)})
    with torch.no_grad(), patch(model, iv):
        ablated = _forward(model, batch)
    W = Adapter.of(model).sites(1).down_proj.weight
    saved = W.data.clone()
    try:
        W.data[:, idx] = 0
        with torch.no_grad():
            ref = _forward(model, batch)
    finally:
        W.data.copy_(saved)
    torch.testing.assert_close(ablated, ref, rtol=1e-5, atol=1e-5)


def test_head_zero_ablation_equals_zeroed_weights():
    model, tok = tiny("qwen3")
    a = Adapter.of(model)
    batch = prompt_batch(tok)
    iv = Intervention(site="heads", op="edit", layers=(2,), positions="all", index={2: torch.tensor([1, 3])},
                      scale={2: torch.zeros(1, 2)})
    with torch.no_grad(), patch(model, iv):
        ablated = _forward(model, batch)
    W = a.sites(2).o_proj.weight
    saved = W.data.clone()
    try:
        for h in (1, 3):
            W.data[:, h * a.head_dim : (h + 1) * a.head_dim] = 0
        with torch.no_grad():
            ref = _forward(model, batch)
    finally:
        W.data.copy_(saved)
    torch.testing.assert_close(ablated, ref, rtol=1e-5, atol=1e-5)


def test_project_equals_captured_rows_times_directions():
    model, tok = tiny("mistral")
    batch = prompt_batch(tok)
    D = {l: torch.randn(5, 64) for l in range(4)}
    ivs = [Intervention(site="resid_mid", op="project", layers=range(4), positions="readout", directions=D, name="p"),
           Intervention(site="resid_mid", op="capture", layers=range(4), positions="readout", name="c")]
    with torch.no_grad(), patch(model, *ivs) as h:
        _forward(model, batch)
    for l in range(4):
        torch.testing.assert_close(h.captures["p"][l][0], h.captures["c"][l][0] @ D[l].T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_pop_captures_stacks_layers_and_concatenates_calls(backend):
    model, tok = tiny("llama")
    batch = prompt_batch(tok)
    D = {l: torch.randn(5, 64) for l in (1, 3)}
    ivs = [Intervention(site="resid_post", op="project", layers=(3, 1), positions="readout", directions=D, name="p"),
           Intervention(site="resid_mid", op="capture", layers=(1, 3), positions="readout", name="c")]
    with torch.no_grad(), patch(model, *ivs, backend=backend) as h:
        for _ in range(2):
            _forward(model, batch)
        kept = {k: {l: list(v) for l, v in per.items()} for k, per in h.captures.items()}
        got = h.pop_captures()
        assert not h.captures and h.pop_captures() == {}
        _forward(model, batch)  # captures again after a drain
        assert h.pop_captures()["p"].shape == got["p"][:, :batch["input_ids"].shape[0]].shape
    B = batch["input_ids"].shape[0]
    assert got["p"].shape == (2, 2 * B, 5) and got["c"].shape == (2, 2 * B, 64)
    for name in ("p", "c"):
        for i, l in enumerate((1, 3)):
            assert torch.equal(got[name][i], torch.cat(kept[name][l]))


def test_gradients_flow_to_vectors_and_weights():
    model, tok = tiny("llama")
    batch = prompt_batch(tok)
    v = torch.zeros(1, 64, requires_grad=True)
    iv = Intervention(site="resid_post", op="add", layers=(1,), positions="all", vectors={1: v})
    with patch(model, iv):
        loss = _forward(model, batch).float().logsumexp(-1).mean()
    loss.backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    assert model.model.layers[0].mlp.down_proj.weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_bad_inputs_get_clear_errors():
    model, _ = tiny("llama")
    with pytest.raises(ValueError, match="unknown site"):
        Intervention(site="nowhere", op="add", layers=(0,), vectors={0: torch.zeros(64)})
    with pytest.raises(ValueError, match="width"):
        patch(model, Intervention(site="resid_post", op="add", layers=(0,), vectors={0: torch.zeros(1, 65)}))
    with pytest.raises(IndexError, match="out of range"):
        patch(model, Intervention(site="resid_post", op="add", layers=(9,), vectors={9: torch.zeros(1, 64)}))
    with pytest.raises(ValueError, match="no entry for layers"):
        Intervention(site="resid_post", op="add", layers=(0, 1), vectors={0: torch.zeros(64)})
    with pytest.raises(IndexError, match="outside"):
        patch(model, Intervention(site="heads", op="edit", layers=(0,), index={0: torch.tensor([7])},
                                  scale={0: torch.zeros(1, 1)}))
