"""Circuit modulation: sparse edits, per-row emotions, compile-to-bias equivalence, save/load."""
import pytest
import torch

from emokernels import Intervention, patch
from emokernels.control.modulation import CompiledCircuit, compile_to_bias
from emokernels.discover.circuits import Circuit, assemble_circuit
from emokernels.models import Adapter, load
from tests.helpers import position_ids, prompt_batch, tiny

EMOS = ("anger", "sadness", "happiness", "fear", "surprise", "disgust")


def _circuit(model, seed=0, scale=3.0, **kw) -> Circuit:
    a = Adapter.of(model)
    L, H, hd, F, E = a.num_layers, a.num_heads, a.head_dim, a.intermediate_size, len(EMOS)
    g = torch.Generator().manual_seed(seed)
    Ibar = torch.rand(E, 2, L, generator=g)
    C, Ih = torch.randn(L, E, F, generator=g), torch.randn(L, E, H, generator=g)
    da, dz = scale * torch.randn(L, E, F, generator=g), scale * torch.randn(L, E, H * hd, generator=g)
    return assemble_circuit(Ibar, C, Ih, da, dz, shape=a.describe(), **{"K_total": 40, "min_mlp": 2, "min_attn": 1, **kw})


def _logits(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 position_ids=position_ids(batch["attention_mask"])).logits


def _generate(model, batch, n=8):
    return model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=n,
                          do_sample=False, use_cache=True)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_compiled_equals_sparse(family):
    model, tok = tiny(family)
    batch = prompt_batch(tok)
    circ = _circuit(model)
    comp = compile_to_bias(circ, model)
    emos, strength = ["fear", "anger", "fear"], [1.0, 0.8, 2.0]
    with torch.no_grad():
        plain = _logits(model, batch)
        with patch(model, circ, emotion=emos, strength=strength):
            sparse = _logits(model, batch)
            sparse_gen = _generate(model, batch)
        with patch(model, comp, emotion=emos, strength=strength):
            compiled = _logits(model, batch)
            compiled_gen = _generate(model, batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(compiled[real], sparse[real], rtol=1e-4, atol=1e-4)
    assert (sparse[real] - plain[real]).abs().max() > 1e-2  # the circuit does change the model
    assert torch.equal(sparse_gen, compiled_gen)


def test_per_row_emotions_equal_one_by_one():
    model, tok = tiny("llama")
    batch = prompt_batch(tok)
    circ = _circuit(model, seed=1)
    emos = ["sadness", "anger", "disgust"]
    with torch.no_grad(), patch(model, circ, emotion=emos):  # default strengths: anger 0.8
        batched = _logits(model, batch)
        batched_gen = _generate(model, batch)
    for i, e in enumerate(emos):
        m = batch["attention_mask"][i].bool()
        one = {"input_ids": batch["input_ids"][i : i + 1, m], "attention_mask": batch["attention_mask"][i : i + 1, m]}
        s = 0.8 if e == "anger" else 1.0
        with torch.no_grad(), patch(model, circ, emotion=e, strength=s):
            logits = _logits(model, one)
            gen = _generate(model, one)
        torch.testing.assert_close(batched[i, m], logits[0], rtol=1e-4, atol=1e-4)
        assert torch.equal(batched_gen[i, -8:], gen[0, -8:])


def test_sparse_edit_adds_strength_times_delta_at_paper_positions():
    model, tok = tiny("qwen2")
    batch = prompt_batch(tok)
    circ = _circuit(model, seed=2)
    l = min(circ.neurons["fear"])  # the first edited layer: no earlier edit reaches its activations
    ids = circ.neurons["fear"][l]
    cap = Intervention(site="neurons", op="capture", layers=(l,), positions="all", name="a")
    with torch.no_grad():
        with patch(model, cap) as h:
            _logits(model, batch)
        base = h.captures["a"][l][0]
        with patch(model, circ, cap, emotion="fear", strength=0.5, components=("neurons",)) as h:
            _logits(model, batch)
        edited = h.captures["a"][l][0]
    # captures hold the rows under the mask (all real + pad tokens, row-major); the readout is each row's last
    T = batch["input_ids"].shape[1]
    diff = (edited - base).view(3, T, -1)
    torch.testing.assert_close(diff[:, -1, ids], 0.5 * circ.delta_a["fear"][l].expand(3, -1), rtol=1e-4, atol=1e-4)
    assert diff[:, :-1].abs().max() < 1e-6  # prompt tokens before t* untouched (neurons: readout+generated)
    others = torch.ones(diff.shape[-1], dtype=torch.bool)
    others[ids] = False
    assert diff[:, -1, others].abs().max() < 1e-6  # only the selected neurons


def test_save_load_apply_to_fresh_model(tmp_path):
    model, tok = tiny("qwen2")
    batch = prompt_batch(tok)
    circ = _circuit(model, seed=3)
    circ.save(tmp_path / "c")
    compile_to_bias(circ, model).save(tmp_path / "b")
    with torch.no_grad(), patch(model, circ, emotion="happiness"):
        want = _generate(model, batch)
    fresh, _ = load("tiny-qwen2", dtype=torch.float32)
    with torch.no_grad():
        with patch(fresh, Circuit.load(tmp_path / "c"), emotion="happiness"):
            got = _generate(fresh, batch)
        with patch(fresh, CompiledCircuit.load(tmp_path / "b"), emotion="happiness"):
            got_b = _generate(fresh, batch)
    assert torch.equal(want, got) and torch.equal(want, got_b)


def test_ablation_targets_zeroed_and_not_compilable():
    model, tok = tiny("llama")
    batch = prompt_batch(tok)
    circ = _circuit(model, seed=4, include_negative=True, negative_frac=0.25)
    layer = next(l for l, v in circ.ablate_neurons["anger"].items() if v.numel())
    ids = circ.ablate_neurons["anger"][layer]
    cap = Intervention(site="neurons", op="capture", layers=(layer,), positions="readout", name="a")
    with torch.no_grad(), patch(model, circ, cap, emotion="anger") as h:
        _logits(model, batch)
    assert torch.equal(h.captures["a"][layer][0][:, ids], torch.zeros(3, ids.numel()))
    with pytest.raises(ValueError, match="ablation targets"):
        compile_to_bias(circ, model)


def test_errors_are_clear():
    model, tok = tiny("llama")
    circ = _circuit(model)
    with pytest.raises(ValueError, match="pass emotion="):
        circ.to_interventions(model)
    with pytest.raises(ValueError, match="unknown emotion 'joy'"):
        circ.to_interventions(model, emotion="joy")
    with pytest.raises(ValueError, match="strength has 1 entries"):
        circ.to_interventions(model, emotion=["anger", "fear"], strength=[1.0])
    circ.shape = dict(circ.shape, intermediate_size=999)
    with pytest.raises(ValueError, match="intermediate_size: circuit 999 vs model 176"):
        circ.to_interventions(model, emotion="anger")
    gemma, _ = tiny("gemma2")
    with pytest.raises(ValueError, match="post-norm"):
        compile_to_bias(_circuit(gemma), gemma)
