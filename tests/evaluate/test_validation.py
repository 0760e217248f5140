"""Ablation / enhancement validation: selection, batched conditions == one-by-one, exact links."""
import json

import pytest
import torch

from emokernels import patch
from emokernels.data.sev import load_split
from emokernels.discover.diffs import DiffAccumulator
from emokernels.discover.heads import HeadAccumulator, head_deltas
from emokernels.discover.collect import forward, run_collectors, sev_units, unit_batches
from emokernels.discover.neurons import NeuronAccumulator
from emokernels.evaluate.validation import (ValidationResult, batched_edit, cohens_d, plot_validation, random_like,
                                            reference_direction, top_components, validate_components)
from emokernels.models import Adapter
from tests.helpers import random_directions, tiny

pytestmark = pytest.mark.usefixtures("one_thread")



_dirs = random_directions


@pytest.fixture(scope="module")
def discovered():
    model, tok = tiny("llama")
    dirs_attn, dirs_mlp = _dirs(model, 0), _dirs(model, 1)
    units = sev_units(load_split("train", 1))
    cols = [NeuronAccumulator(model, dirs_mlp), HeadAccumulator(model, dirs_attn), DiffAccumulator(model)]
    run_collectors(model, unit_batches(tok, units, 6), cols, progress=False)
    n, h, d = (c.result() for c in cols)
    return model, tok, dirs_attn, dirs_mlp, n, h, d


def test_top_and_random_selection(discovered):
    model, _, _, _, neurons, heads, _ = discovered
    a = Adapter.of(model)
    top = top_components(neurons, "neurons", 2, 10, layers=(1, 2))
    assert set(top) <= {1, 2} and sum(len(v) for v in top.values()) == 10
    chosen = torch.cat([neurons.C_mean[l, 2, ids] for l, ids in top.items()])
    others = torch.cat([neurons.C_mean[l, 2][~torch.isin(torch.arange(a.intermediate_size), top.get(l, torch.tensor([], dtype=torch.long)))]
                        for l in (1, 2)])
    assert float(chosen.min()) >= float(others.max())
    g = torch.Generator().manual_seed(0)
    rnd = random_like(top, a.intermediate_size, g)
    assert {l: len(v) for l, v in rnd.items()} == {l: len(v) for l, v in top.items()}
    for l in top:
        assert not torch.isin(rnd[l], top[l]).any() and len(set(rnd[l].tolist())) == len(rnd[l])
    htop = top_components(heads, "heads", 0, 3)
    assert sum(len(v) for v in htop.values()) == 3
    with pytest.raises(ValueError, match="out of range"):
        top_components(heads, "heads", 0, 1000)


@pytest.mark.parametrize("kind,mode", [("neurons", "ablate"), ("heads", "ablate"), ("neurons", "enhance"), ("heads", "enhance")])
def test_batched_conditions_equal_one_by_one(discovered, kind, mode):
    model, tok, _, _, neurons, heads, diffs = discovered
    a = Adapter.of(model)
    scores = neurons if kind == "neurons" else heads
    width = a.intermediate_size if kind == "neurons" else a.num_heads
    g = torch.Generator().manual_seed(1)
    top = top_components(scores, kind, 1, 3)
    sels = [top, random_like(top, width, g), random_like(top, width, g)]
    if kind == "neurons":
        vals = lambda l, ids: diffs.da[l, 1, ids] * 50  # noqa: E731
    else:
        vals = lambda l, ids: diffs.dz[l, 1].view(-1, a.head_dim)[ids] * 50  # noqa: E731
    units = sev_units(load_split("train", 1))[:2]
    batch = next(unit_batches(tok, units, 2, neutral=mode == "enhance"))
    iv = batched_edit(kind, mode, sels, a.head_dim, vals if mode == "enhance" else None, 1.0)
    iv.rows = torch.arange(3).repeat_interleave(2)
    rep = {k: batch[k].repeat(3, 1) for k in ("input_ids", "attention_mask")}
    with torch.no_grad(), patch(model, iv):
        together = forward(model, rep).last_hidden_state
    with torch.no_grad():
        plain = forward(model, batch).last_hidden_state
    for c, sel in enumerate(sels):
        one = batched_edit(kind, mode, [sel], a.head_dim, vals if mode == "enhance" else None, 1.0)
        with torch.no_grad(), patch(model, one):
            alone = forward(model, batch).last_hidden_state
        torch.testing.assert_close(together[2 * c : 2 * c + 2], alone, rtol=1e-5, atol=1e-5)
        assert (alone - plain).abs().max() > 1e-4  # the edit did something


def test_head_ablation_local_delta_is_minus_head_score(discovered):
    """Ablating the top-1 head moves ⟨m_ℓ, v^attn⟩ by exactly −(s − s^(−k)) (residual reading)."""
    model, tok, dirs_attn, dirs_mlp, neurons, heads, diffs = discovered
    units = sev_units(load_split("train", 1))
    res = validate_components(model, tok, units, neurons, heads, diffs, dirs_attn, dirs_mlp, kinds=("heads",),
                              modes=("ablate",), ks_heads=(1,), n_random=2, emotions=("fear",), progress=False)
    row = next(r for r in res.rows if r["metric"] == "local")
    (l, ids), = top_components(heads, "heads", 3, 1).items()
    fear = [u for u in units if u.emotion == "fear"]
    batch = next(unit_batches(tok, fear, len(fear)))
    d = head_deltas(model, batch, dirs_attn, layers=(l,))[:, 0, int(ids[0])]
    assert row["top_mean"] == pytest.approx(-float(d.mean()), rel=1e-4, abs=1e-7)
    assert row["top_layers"] == f"{l}:1"


def test_validate_end_to_end_rows_and_plots(discovered, tmp_path):
    model, tok, dirs_attn, dirs_mlp, neurons, heads, diffs = discovered
    units = sev_units(load_split("test", 1))
    res = validate_components(model, tok, units, neurons, heads, diffs, dirs_attn, dirs_mlp, ks_neurons=(1, 8),
                              ks_heads=(1, 2), n_random=2, emotions=("anger",), progress=False)
    assert len(res.rows) == 1 * 2 * 2 * 2 * 2  # emotions x kinds x modes x ks x metrics
    for r in res.rows:
        assert r["n_prompts"] == 3 and torch.isfinite(torch.tensor([r["top_mean"], r["random_mean"]])).all()
    res.save(tmp_path)
    back = json.loads((tmp_path / "validation.json").read_text())
    assert len(back["rows"]) == len(res.rows) and (tmp_path / "validation.csv").exists()
    paths = plot_validation(res, tmp_path)
    assert [p.name for p in paths] == ["validation_local.png", "validation_final.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
    summ = res.summary("final")
    assert {(s["kind"], s["mode"]) for s in summ} == {(k, m) for k in ("neurons", "heads") for m in ("ablate", "enhance")}


def test_judge_scores_generations_per_condition(discovered):
    model, tok, dirs_attn, dirs_mlp, neurons, heads, diffs = discovered
    seen = []

    class FakeJudge:
        def classify(self, texts, targets):
            from emokernels.judge.base import Judgement

            seen.append(list(texts))
            return [Judgement(label=t, match=i == 0) for i, t in enumerate(targets)]

    units = sev_units(load_split("test", 1))
    res = validate_components(model, tok, units, neurons, heads, diffs, dirs_attn, dirs_mlp, kinds=("heads",),
                              modes=("ablate",), ks_heads=(2,), n_random=1, emotions=("fear",), judge=FakeJudge(),
                              judge_max_new_tokens=2, progress=False)
    assert [j["condition"] for j in res.judged] == ["none", "top", "random"]
    assert all(j["accuracy"] == pytest.approx(1 / 3) and j["n"] == 3 for j in res.judged)
    assert len(seen) == 3 and all(len(t) == 3 for t in seen)


def test_reference_direction_and_cohens_d():
    L, d = 28, 16
    v = torch.randn(L, 6, d)
    v = v / v.norm(dim=-1, keepdim=True)
    ref = reference_direction(v, v)  # window 21..25 of 28
    manual = sum(v[l] for l in range(21, 26))
    stack = torch.stack([v[l] for l in range(21, 26) for _ in range(2)])
    signs = torch.where((stack * v[21]).sum(-1) < 0, -1.0, 1.0)
    manual = (signs[..., None] * stack).sum(0)
    torch.testing.assert_close(ref, manual / manual.norm(dim=-1, keepdim=True))
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 1.0, 2.0])
    assert cohens_d(a, b) == pytest.approx(1.0)
    assert cohens_d(b, a) == pytest.approx(-1.0)


def test_bad_arguments_raise(discovered):
    model, tok, dirs_attn, dirs_mlp, neurons, heads, diffs = discovered
    units = sev_units(load_split("test", 1))
    with pytest.raises(ValueError, match="unknown kind"):
        validate_components(model, tok, units, neurons, heads, diffs, dirs_attn, dirs_mlp, kinds=("mlp",))
    with pytest.raises(ValueError, match="needs the component difference vectors"):
        validate_components(model, tok, units, neurons, heads, None, dirs_attn, dirs_mlp)
    assert isinstance(ValidationResult().summary(), list)
