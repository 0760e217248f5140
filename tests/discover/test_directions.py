"""Emotion directions: the estimator, the artifact (safetensors + GGUF), the consistency checks, the CLI."""
import json

import pytest
import torch

from emokernels.data.labels import EMOTIONS
from emokernels.discover.capture import GroupAccumulator
from emokernels.discover.consistency import (cross_valence, leave_one_theme_out, nearest_direction_accuracy,
                                             stability_report, train_probe, write_report)
from emokernels.discover.directions import (EmotionDirections, default_layers, directions_batch, from_accumulator,
                                            read_gguf_control_vector, unit_directions)
from tests.helpers import tiny

P, L, D = 2, 4, 48
THEMES = ("work", "travel", "health", "school")
VALENCES = ("positive", "neutral", "negative")


def _planted(seed=0, n_groups=36, signal=1.0, ctx_scale=8.0, noise=0.3):
    """x_{g,e} = context_g (large, shared by the 6 emotions) + valence offset_e + signal·u_e + noise."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(P, L, len(EMOTIONS), D, generator=g)
    val_off = {v: torch.randn(P, L, len(EMOTIONS), D, generator=g) * 0.1 for v in VALENCES}
    acc = GroupAccumulator(P, L, D)
    X, meta = [], []
    for gi in range(n_groups):
        v, t = VALENCES[gi % 3], THEMES[(gi // 3) % 4]
        ctx = torch.randn(P, L, D, generator=g) * ctx_scale
        xs = []
        for e in range(len(EMOTIONS)):
            x = ctx + signal * u[:, :, e] + val_off[v][:, :, e] + noise * torch.randn(P, L, D, generator=g)
            acc.add(f"g{gi}", EMOTIONS[e], x, x.pow(2).mean(-1).sqrt(), v, t)
            xs.append(x)
        acc.close(f"g{gi}")
        X.append(torch.stack(xs))
        meta.append((v, t))
    planted, _ = unit_directions(u)
    return acc, torch.stack(X), planted, meta


def _dirs(acc, **kw):
    return from_accumulator(acc, model="synthetic", **kw)


def test_estimator_recovers_planted_directions():
    acc, X, planted, _ = _planted()
    d = _dirs(acc)
    cos = (d.directions * planted).sum(-1)
    assert cos.min() > 0.99, cos.min()
    v_batch, _ = directions_batch(X)
    torch.testing.assert_close(d.directions, v_batch, rtol=0, atol=1e-6)
    # six-way centring: the centred centroids sum to 0 and unit rows have norm 1
    torch.testing.assert_close(d.directions.norm(dim=-1), torch.ones(P, L, 6))
    assert float((acc.centroids()).sum(2).abs().max()) < 1e-9


def test_six_way_centring_gives_mean_pairwise_cosine_minus_one_fifth():
    # orthogonal, equal-norm centroids -> after centring every pair has cosine exactly -1/5
    c = torch.zeros(1, 1, 6, 8, dtype=torch.float64)
    c[0, 0, torch.arange(6), torch.arange(6)] = 1.0
    v, _ = unit_directions(c)
    pair = v[0, 0] @ v[0, 0].T
    off = pair[~torch.eye(6, dtype=torch.bool)]
    torch.testing.assert_close(off, torch.full_like(off, -0.2), rtol=0, atol=1e-6)


def test_consistency_checks_on_planted_data():
    acc, X, planted, meta = _planted(seed=1)
    cv = cross_valence(acc)
    assert cv.shape == (P, L, 6) and cv.min() > 0.95
    loto = leave_one_theme_out(acc)
    assert loto["mean"].min() > 0.99 and set(loto["per_theme"]) == set(THEMES)
    # without signal the two valence halves disagree (cosines near 0, |cos| ~ 1/sqrt(d))
    acc0, *_ = _planted(seed=2, signal=0.0, noise=1.0)
    assert cross_valence(acc0).abs().mean() < 0.5


def test_probe_and_nearest_direction_on_held_out_contexts():
    acc, X, planted, _ = _planted(seed=3, n_groups=24)
    _, Xt, _, _ = _planted(seed=3, n_groups=12)  # same planted u (same seed), its own contexts
    tr = X.reshape(-1, P, L, D)
    te = Xt.reshape(-1, P, L, D)
    ytr = torch.arange(6).repeat(24)
    yte = torch.arange(6).repeat(12)
    res = train_probe(tr, ytr, te, yte, steps=80)
    assert res["test_acc"].shape == (P, L) and res["test_acc"].min() > 0.9
    d = _dirs(acc)
    groups = [f"t{i // 6}" for i in range(te.shape[0])]
    near = nearest_direction_accuracy(te, yte, groups, d.directions)
    assert near.shape == (P, L) and near.min() > 0.95
    # shuffled labels: the probe cannot generalise
    perm = ytr[torch.randperm(len(ytr), generator=torch.Generator().manual_seed(0))]
    assert train_probe(tr, perm, te, yte, steps=80)["test_acc"].mean() < 0.5


def test_report_ranks_layers_and_writes_files(tmp_path):
    acc, *_ = _planted(seed=4)
    d = _dirs(acc)
    rep = stability_report(d, acc)
    assert [r["layer"] for r in rep["ranking_mlp"]] and len(rep["ranking_mlp"]) == L
    assert rep["stability"]["basis"].startswith("mean_e min")
    j, md = write_report(rep, tmp_path)
    assert json.loads(j.read_text())["num_layers"] == L
    assert "Layers ranked" in md.read_text()


def _dirs_for(model, seed=0):
    from emokernels.models import Adapter

    a = Adapter.of(model)
    g = torch.Generator().manual_seed(seed)
    v, n = unit_directions(torch.randn(2, a.num_layers, 6, a.hidden_size, generator=g))
    return EmotionDirections(directions=v, sigma=torch.rand(2, a.num_layers, generator=g) + 0.5, norms=n,
                             model="tiny-llama", source="prompt", dataset_hash="abc", n_groups=3,
                             extra={"model_type": a.family})


def test_save_load_gguf_round_trip(tmp_path):
    model, _ = tiny("llama")
    d = _dirs_for(model)
    path = d.save(tmp_path / "dirs", emotion="fear")
    assert path.name == "directions.safetensors"
    back = EmotionDirections.load(tmp_path / "dirs", model=model)
    assert torch.equal(back.directions, d.directions) and torch.equal(back.sigma, d.sigma)
    assert (back.model, back.source, back.dataset_hash, back.n_groups) == ("tiny-llama", "prompt", "abc", 3)
    from safetensors.torch import load_file

    raw = load_file(path)
    assert torch.equal(raw["direction.2"], d.vector("fear", 2)) and "direction.0" not in raw
    assert torch.equal(raw["anger.direction.3"], d.vector("anger", 3))
    # GGUF control vector: direction.k = our 0-based layer k (llama.cpp adds it to block k's output)
    gg = d.export_gguf_control_vector(tmp_path / "fear.gguf", "fear", layers=[1, 2, 3], scale=2.0)
    vecs, fields = read_gguf_control_vector(gg)
    assert sorted(vecs) == [1, 2, 3]
    assert fields["general.architecture"] == "controlvector" and fields["controlvector.layer_count"] == 3
    assert fields["controlvector.model_hint"] == "llama"
    for k in (1, 2, 3):
        torch.testing.assert_close(vecs[k], 2.0 * back.vector("fear", k), rtol=0, atol=1e-7)
    dosed, _ = read_gguf_control_vector(d.export_gguf_control_vector(tmp_path / "f2.gguf", "fear", layers=[2], rms_dose=True))
    torch.testing.assert_close(dosed[2], d.vector("fear", 2) * d.sigma[1, 2], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="block 0"):
        d.export_gguf_control_vector(tmp_path / "x.gguf", "fear", layers=[0, 1])
    with pytest.raises(ValueError, match="no GGUF equivalent"):
        d.export_gguf_control_vector(tmp_path / "x.gguf", "fear", point="attn")
    assert not (tmp_path / "x.gguf").exists()


def test_load_with_mismatched_model_is_a_clear_error(tmp_path):
    model, _ = tiny("llama")
    d = _dirs_for(model)
    d.save(tmp_path)
    other = EmotionDirections(directions=d.directions[:, :3], sigma=d.sigma[:, :3], norms=d.norms[:, :3], model="x")
    other.save(tmp_path / "short")
    with pytest.raises(ValueError, match=r"3 layers x hidden 64, but this model has 4 layers x hidden 64"):
        EmotionDirections.load(tmp_path / "short", model=model)
    with pytest.raises(FileNotFoundError):
        EmotionDirections.load(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="unknown emotion"):
        d.vector("joy", 0)


def test_default_layers_scale_with_depth():
    assert default_layers(28) == list(range(11, 21))
    assert default_layers(30) == list(range(12, 22))
    assert default_layers(4) == [2, 3]


@pytest.mark.slow
def test_directions_cli_end_to_end_on_tiny_model(tmp_path):
    from emokernels.cli import main

    out = tmp_path / "run"
    rc = main(["directions", "--model", "tiny-llama", "--limit", "2", "--probe-limit", "1", "--probe-steps", "30",
               "--per-emotion-plots", "--out", str(out)])
    assert rc == 0
    d = EmotionDirections.load(out)
    assert d.n_groups == 6 and d.source == "prompt" and d.extra["limit"] == 2
    rep = json.loads((out / "consistency.json").read_text())
    assert len(rep["cross_valence"]["mean"][1]) == 4 and "probe" in rep and "nearest_direction_test_acc" in rep
    assert (out / "cross_layer_anger.png").stat().st_size > 0 and (out / "consistency.png").exists()
    assert not (out / "capture_checkpoint.safetensors").exists()
    rc = main(["directions", "--model", "tiny-llama", "--limit", "1", "--source", "text", "--probe-split", "none",
               "--no-plots", "--out", str(tmp_path / "text")])
    assert rc == 0 and EmotionDirections.load(tmp_path / "text").source == "text"
    assert main(["directions", "--model", "tiny-llama", "--split", "test", "--out", str(tmp_path / "t")]) == 2
