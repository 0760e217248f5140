"""Component difference vectors: streaming == batch formula, Σ_e Δ = 0, (skeleton, valence) groups."""
import pytest
import torch

from emokernels import Intervention, patch
from emokernels.data.sev import load_split
from emokernels.discover.diffs import ComponentDiffs, DiffAccumulator, GroupContrast, component_diffs, contrast_batch
from emokernels.discover.collect import forward, run_collectors, sev_units, unit_batches
from emokernels.models import Adapter
from tests.helpers import tiny

pytestmark = pytest.mark.usefixtures("one_thread")



def test_streaming_equals_batch_on_interleaved_synthetic_groups():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(5, 6, 3, 7, generator=g)  # 5 complete groups
    order = [(gi, e) for gi in range(5) for e in range(6)]
    perm = torch.randperm(len(order), generator=g).tolist()  # fully interleaved arrival
    acc = GroupContrast((3, 7))
    for i in perm:
        gi, e = order[i]
        acc.add(f"g{gi}", e, X[gi, e])
    acc.add("lonely", 2, torch.randn(3, 7, generator=g))  # incomplete: dropped
    assert acc.n_groups == 5 and list(acc.pending) == ["lonely"]
    got = acc.result()
    torch.testing.assert_close(got.double(), contrast_batch(X), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got.sum(0), torch.zeros(3, 7), rtol=0, atol=1e-6)


def test_duplicates_and_shapes_raise():
    acc = GroupContrast((4,))
    acc.add("g", 0, torch.zeros(4))
    with pytest.raises(ValueError, match="twice"):
        acc.add("g", 0, torch.zeros(4))
    with pytest.raises(ValueError, match="shape"):
        acc.add("g", 1, torch.zeros(5))
    with pytest.raises(ValueError, match="no complete context"):
        acc.result()


def test_tiny_model_diffs_equal_batch_formula_over_skeleton_valence_groups():
    model, tok = tiny("qwen2")
    a = Adapter.of(model)
    units = sev_units(load_split("train", 2))  # 2 skeletons x 3 valences = 6 groups
    res = component_diffs(model, unit_batches(tok, units, batch_size=4), progress=False)  # batches straddle groups
    assert res.n_groups == 6 and res.n_incomplete == 0
    assert res.dz.shape == (a.num_layers, 6, a.num_heads * a.head_dim)
    assert res.da.shape == (a.num_layers, 6, a.intermediate_size)
    # oracle: capture every unit, stack [G, E, L, width], batch formula
    L = tuple(range(a.num_layers))
    ivs = [Intervention("heads", "capture", L, positions="readout", name="z"),
           Intervention("neurons", "capture", L, positions="readout", name="a")]
    z, act = [], []
    with torch.no_grad(), patch(model, *ivs) as h:
        for b in unit_batches(tok, units, batch_size=6):
            forward(model, b)
    z = torch.stack([torch.cat(h.captures["z"][l]) for l in L], 1).view(6, 6, a.num_layers, -1)
    act = torch.stack([torch.cat(h.captures["a"][l]) for l in L], 1).view(6, 6, a.num_layers, -1)
    torch.testing.assert_close(res.dz, contrast_batch(z).transpose(0, 1).float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(res.da, contrast_batch(act).transpose(0, 1).float(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(res.dz.sum(1), torch.zeros_like(res.dz[:, 0]), rtol=0, atol=1e-5)
    torch.testing.assert_close(res.da.sum(1), torch.zeros_like(res.da[:, 0]), rtol=0, atol=1e-5)
    # grouping by skeleton alone (the published bug) would give 2 groups, not 6
    assert len({u.group for u in units}) == 6
    assert res.head_norms().shape == (a.num_layers, 6, a.num_heads)


def test_state_dict_resume_matches_uninterrupted(tmp_path):
    model, tok = tiny("llama")
    units = sev_units(load_split("train", 1))
    full = component_diffs(model, unit_batches(tok, units, batch_size=4), progress=False)
    first = DiffAccumulator(model)
    batches = list(unit_batches(tok, units, batch_size=4))
    run_collectors(model, batches[:2], [first], progress=False)  # 8 units: one group pending
    assert len(first.z.pending) == 1
    state = first.state_dict()
    second = DiffAccumulator(model)
    second.load_state_dict(state)
    run_collectors(model, batches[2:], [second], progress=False)
    res = second.result()
    torch.testing.assert_close(res.dz, full.dz, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(res.da, full.da, rtol=1e-6, atol=1e-7)
    res.save(tmp_path / "diffs")
    back = ComponentDiffs.load(tmp_path / "diffs")
    assert torch.equal(back.dz, res.dz) and back.n_groups == 3 and back.meta["group_key"] == "skeleton__valence"
