"""Circuit assembly: the paper's allocation rule (checked against the official anger log) and selection."""
import csv
from pathlib import Path

import pytest
import torch

from emokernels.discover.circuits import Circuit, allocate, assemble_circuit

HERE = Path(__file__).resolve()
LOG_NAME = "official_anger_alloc_log.csv"


def _official_log() -> Path:
    local = HERE.parents[1] / "data_files" / LOG_NAME
    if local.exists():
        return local
    shared = HERE.parents[2] / ".." / "shared" / "reference" / LOG_NAME
    if shared.exists():
        return shared
    pytest.fail(f"{LOG_NAME} is missing from tests/data_files/ (and from ../shared/reference/)")


def _rows(kind):
    with open(_official_log(), newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["kind"] == kind]
    return sorted(rows, key=lambda r: int(r["layer"]))


@pytest.mark.parametrize("kind,budget,floor,available", [("attention", 168, 2, 24), ("mlp", 392, 4, 8192)])
def test_allocation_reproduces_official_anger_log(kind, budget, floor, available):
    rows = _rows(kind)
    assert len(rows) == 28
    alloc = allocate([float(r["w"]) for r in rows], budget, min_per_layer=floor, cap_ratio=0.4, available=available)
    assert alloc.k_used == [int(r["k_used"]) for r in rows]
    assert alloc.k_base == [int(r["k_base"]) for r in rows]
    assert alloc.k_add == [int(r["k_add"]) for r in rows]
    assert alloc.k_assigned == [int(r["k_assigned"]) for r in rows]
    assert alloc.total == budget
    torch.testing.assert_close(torch.tensor(alloc.w_norm, dtype=torch.float64), torch.tensor([float(r["w_norm"]) for r in rows], dtype=torch.float64))


def test_allocation_cap_and_deficit_redistribution():
    # floor 1 each, R = 7 all to layer 2, cap ⌊0.5·10⌋ = 5 -> deficit 3 to the next largest planned quota
    a = allocate([0.0, 1.0, 10.0], 10, min_per_layer=1, cap_ratio=0.5)
    assert a.k_assigned == [1, 2, 7] and a.k_used == [1, 4, 5] and a.total == 10
    a = allocate([0.0, 0.0, 10.0], 10, min_per_layer=1, cap_ratio=0.3)  # cap 3: fill layer 0 (tie -> lower) then 1
    assert a.k_assigned == [1, 1, 8] and a.k_used == [3, 3, 3] and a.total == 9
    # availability binds (heads per layer): the rest moves to the layer with room
    b = allocate([3.0, 1.0], 30, min_per_layer=2, cap_ratio=1.0, available=[10, 24])
    assert b.k_used == [10, 20] and b.total == 30
    # not enough room anywhere: the total falls short instead of overfilling
    c = allocate([1.0, 1.0], 10, cap_ratio=1.0, available=[3, 4])
    assert c.k_used == [3, 4] and c.total == 7


def test_allocation_leftovers_go_to_largest_fractions_and_zero_weights_are_uniform():
    a = allocate([1.0, 1.0, 1.0], 10, min_per_layer=0, cap_ratio=1.0)
    assert a.k_used == [4, 3, 3]  # 10/3 each, one leftover: tie -> lowest layer
    b = allocate([0.0, 0.0], 5, min_per_layer=1, cap_ratio=1.0)
    assert b.k_used == [3, 2]


def test_allocation_rejects_bad_input():
    with pytest.raises(ValueError, match="non-negative"):
        allocate([1.0, -0.5], 10)
    with pytest.raises(ValueError, match="smaller than the per-layer floors"):
        allocate([1.0, 1.0], 3, min_per_layer=2)
    with pytest.raises(ValueError, match="available has"):
        allocate([1.0, 1.0], 3, available=[5])


SHAPE = dict(family="llama", num_layers=4, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=176)


def _inputs(E=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    L, H, hd, F = 4, 4, 16, 176
    Ibar = torch.rand(E, 2, L, generator=g) * torch.tensor([0.0, 0.5, 1.0, 2.0])  # layer 0 ≈ no influence
    Ibar[0, 1, 1] = -0.3  # a negative sublayer
    C = torch.randn(L, E, F, generator=g)
    Ih = torch.randn(L, E, H, generator=g)
    da = torch.randn(L, E, F, generator=g)
    dz = torch.randn(L, E, H * hd, generator=g)
    return Ibar, C, Ih, da, dz


def test_assemble_paper_defaults_selects_top_components_per_layer():
    Ibar, C, Ih, da, dz = _inputs()
    c = assemble_circuit(Ibar, C, Ih, da, dz, shape=SHAPE, K_total=40, min_mlp=2, min_attn=1)
    assert c.strengths["anger"] == 0.8 and c.strengths["fear"] == 1.0
    for ei, e in enumerate(c.emotions):
        size = c.size(e)
        assert size["neurons"] == 28 and size["heads"] == 12  # round(0.7·40), the rest
        log = c.meta["allocation"][e]
        for l in range(4):
            k = log["mlp"][l]["k_used"]
            assert k >= 2 and c.neurons[e][l].numel() == k
            top = torch.topk(C[l, ei], k).indices
            assert set(c.neurons[e][l].tolist()) == set(top.tolist())
            torch.testing.assert_close(c.delta_a[e][l], da[l, ei][c.neurons[e][l]])
            kh = log["attention"][l]["k_used"]
            assert set(c.heads[e][l].tolist()) == set(torch.topk(Ih[l, ei], kh).indices.tolist())
            for j, h in enumerate(c.heads[e][l].tolist()):
                torch.testing.assert_close(c.delta_z[e][l][j], dz[l, ei, h * 16 : (h + 1) * 16])
    assert not c.has_ablation()


def test_assemble_options_beyond_paper():
    Ibar, C, Ih, da, dz = _inputs()
    c = assemble_circuit(Ibar, C, Ih, da, dz, shape=SHAPE, K_total=40, floors=False, cap_ratio=1.0)
    for e in c.emotions:  # layer 0 has zero influence: without floors it gets nothing
        assert 0 not in c.neurons[e] and 0 not in c.heads[e]
    auto = assemble_circuit(Ibar, C, Ih, da, dz, shape=SHAPE, K_total=40, ratio="auto", min_mlp=1, min_attn=1)
    for ei, e in enumerate(auto.emotions):
        wm, wa = Ibar[ei, 1].clamp(min=0).sum(), Ibar[ei, 0].clamp(min=0).sum()
        assert auto.meta["allocation"][e]["K_mlp"] == round(40 * float(wm / (wm + wa)))
    neg = assemble_circuit(Ibar, C, Ih, da, dz, shape=SHAPE, K_total=40, min_mlp=2, min_attn=1, include_negative=True,
                           negative_frac=0.25)
    assert neg.has_ablation()
    for ei, e in enumerate(neg.emotions):
        assert neg.size(e)["ablate_neurons"] + neg.size(e)["ablate_heads"] == 10
        for l, ids in neg.ablate_neurons[e].items():
            assert (C[l, ei][ids] < 0).all()
            others = torch.ones(176, dtype=torch.bool)
            others[ids] = False
            assert C[l, ei][ids].max() <= C[l, ei][others].min()  # the most negative ones
        for l, ids in neg.ablate_heads[e].items():
            assert (Ih[l, ei][ids] < 0).all()
        # positive selection unchanged by the option
        assert neg.size(e)["neurons"] == 28


def test_assemble_accepts_discovery_objects_and_checks_layout():
    from types import SimpleNamespace

    Ibar, C, Ih, da, dz = _inputs()
    ns = SimpleNamespace(C_mean=C[1:], layers=(1, 2, 3))  # scores for layers 1..3 only
    hs = SimpleNamespace(mean=Ih, layers=(0, 1, 2, 3))
    diffs = SimpleNamespace(da=da, dz=dz, layers=(0, 1, 2, 3))
    c = assemble_circuit(SimpleNamespace(Ibar=Ibar), ns, hs, diffs, shape=SHAPE, K_total=40, min_mlp=2, min_attn=1)
    for e in c.emotions:
        assert 0 not in c.neurons[e] and c.size(e)["neurons"] == 28  # layer 0's quota moved elsewhere
    with pytest.raises(ValueError, match="layer-major"):
        assemble_circuit(Ibar, C.transpose(0, 1), Ih, da, dz, shape=SHAPE, K_total=40)
    with pytest.raises(ValueError, match="Ibar must be"):
        assemble_circuit(Ibar[:, :, :2], C, Ih, da, dz, shape=SHAPE, K_total=40)


def test_circuit_save_load_roundtrip(tmp_path):
    Ibar, C, Ih, da, dz = _inputs()
    c = assemble_circuit(Ibar, C, Ih, da, dz, shape=SHAPE, K_total=40, min_mlp=2, min_attn=1, include_negative=True,
                         strengths={"fear": 1.5})
    c.save(tmp_path / "circ")
    back = Circuit.load(tmp_path / "circ")
    assert back.emotions == c.emotions and back.shape == c.shape and back.strengths == c.strengths
    assert back.strengths["fear"] == 1.5 and back.strengths["anger"] == 0.8
    for name in Circuit._TABLES:
        for e in c.emotions:
            a, b = getattr(c, name)[e], getattr(back, name)[e]
            assert sorted(a) == sorted(b)
            for l in a:
                assert torch.equal(a[l], b[l])
    assert back.meta["allocation"]["anger"]["mlp"][3]["k_used"] == c.meta["allocation"]["anger"]["mlp"][3]["k_used"]


def test_assemble_with_official_weights_gives_official_quotas():
    """Paper defaults (K=560, fixed 0.7:0.3, floors 4/2, cap 0.4) on the official anger Ī -> official k_used."""
    att, mlp = _rows("attention"), _rows("mlp")
    Ibar = torch.tensor([[[float(r["w"]) for r in att], [float(r["w"]) for r in mlp]]])  # [1, 2, 28]
    shape = dict(num_layers=28, hidden_size=8, num_heads=24, head_dim=2, intermediate_size=8192)
    g = torch.Generator().manual_seed(0)
    C, Ih = torch.randn(28, 1, 8192, generator=g), torch.randn(28, 1, 24, generator=g)
    c = assemble_circuit(Ibar, C, Ih, torch.randn(28, 1, 8192, generator=g), torch.randn(28, 1, 48, generator=g),
                         shape=shape, emotions=("anger",))
    assert [c.neurons["anger"][l].numel() for l in range(28)] == [int(r["k_used"]) for r in mlp]
    assert [c.heads["anger"][l].numel() for l in range(28)] == [int(r["k_used"]) for r in att]
    assert c.size("anger") == {"neurons": 392, "heads": 168, "ablate_neurons": 0, "ablate_heads": 0}
    assert c.strengths == {"anger": 0.8}
