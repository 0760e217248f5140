"""Neuron decomposition: Σ_j c_j = ⟨F[t*], v⟩ exactly, streaming == per-sample, artifacts."""
import csv

import pytest
import torch

from emokernels import Intervention, patch
from emokernels.discover.collect import direction_tensors, forward, run_collectors, sev_units, unit_batches
from emokernels.discover.neurons import NeuronAccumulator, NeuronScores, neuron_betas, neuron_contributions
from emokernels.models import Adapter
from tests.helpers import emotion_batch, prompt_batch, random_directions, smollm, tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp_out_at_readout(model, batch, layers):
    """F_ℓ[t*] via the patch capture at the ``mlp_out`` site (independent of the decomposition)."""
    iv = Intervention("mlp_out", "capture", layers, positions="readout", name="F")
    with torch.no_grad(), patch(model, iv) as h:
        forward(model, batch)
    return {l: h.captures["F"][l][0].float() for l in layers}


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "phi3"])
def test_contributions_sum_to_mlp_output_projection(family):
    model, tok = tiny(family)
    dirs, batch = random_directions(model), emotion_batch(tok)
    layers = tuple(range(Adapter.of(model).num_layers))
    out = neuron_contributions(model, batch, dirs, layers)
    F = _mlp_out_at_readout(model, batch, layers)
    for i, l in enumerate(layers):
        ref = (F[l] * dirs[l][batch["emotion"]]).sum(-1)
        scale = F[l].norm(dim=-1).max()
        torch.testing.assert_close(out["c"][:, i].sum(-1), ref, rtol=0, atol=2e-6 * float(scale))


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gemma_decomposition_is_exact_for_pre_norm_mlp_output(family):
    """Gemma: F = post_ffw_norm(W_D a); the c_j sum to ⟨W_D a, v⟩ (down_proj output), not ⟨F, v⟩."""
    model, tok = tiny(family)
    a = Adapter.of(model)
    dirs, batch = random_directions(model), emotion_batch(tok)
    got = {}
    hooks = [a.sites(l).down_proj.register_forward_hook(lambda m, i, o, l=l: got.__setitem__(l, o))
             for l in range(a.num_layers)]
    try:
        with torch.no_grad():
            forward(model, batch)
    finally:
        for h in hooks:
            h.remove()
    out = neuron_contributions(model, batch, dirs)
    rows = torch.arange(3)
    for l in range(a.num_layers):
        WDa = got[l][rows, batch["readout"]]
        ref = (WDa * dirs[l][batch["emotion"]]).sum(-1)
        torch.testing.assert_close(out["c"][:, l].sum(-1), ref, rtol=0, atol=2e-6 * float(WDa.norm(dim=-1).max()))


def test_streaming_accumulator_equals_per_sample_statistics():
    model, tok = tiny("llama")
    dirs = random_directions(model, 1)
    b1, b2 = emotion_batch(tok, (0, 3, 0)), emotion_batch(tok, (2, 0, 3))
    acc = NeuronAccumulator(model, dirs)
    run_collectors(model, [b1, b2], [acc], progress=False)
    res = acc.result()
    c = torch.cat([neuron_contributions(model, b, dirs)["c"] for b in (b1, b2)])  # [6, L, d_ff]
    act = torch.cat([neuron_contributions(model, b, dirs)["a"] for b in (b1, b2)])
    emo = torch.cat([b1["emotion"], b2["emotion"]])
    assert res.counts.tolist() == [3, 0, 1, 2, 0, 0]
    for e in (0, 2, 3):
        sel = emo == e
        torch.testing.assert_close(res.C_mean[:, e], c[sel].mean(0), rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(res.C_pos[:, e], c[sel].clamp(min=0).mean(0), rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(res.C_neg[:, e], (-c[sel]).clamp(min=0).mean(0), rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(res.H_mean[:, e], act[sel].mean(0), rtol=1e-5, atol=1e-9)
    assert torch.equal(res.C_mean[:, 1], torch.zeros_like(res.C_mean[:, 1]))  # no sample of emotion 1
    torch.testing.assert_close(res.C_pos - res.C_neg, res.C_mean, rtol=1e-5, atol=1e-9)


def test_beta_is_down_proj_transpose_times_direction():
    model, _ = tiny("qwen2")
    dirs = random_directions(model)
    a = Adapter.of(model)
    beta = neuron_betas(model, dirs, (1, 3))
    assert beta.shape == (2, 6, a.intermediate_size)
    W = a.sites(3).down_proj.weight
    torch.testing.assert_close(beta[1, 4], W.T @ dirs[3, 4])


def test_rankings_csv_and_roundtrip(tmp_path):
    model, tok = tiny("llama")
    dirs = random_directions(model)
    acc = NeuronAccumulator(model, dirs)
    run_collectors(model, [emotion_batch(tok)], [acc], progress=False)
    res = acc.result()
    rank = res.ranking()
    for i in range(len(res.layers)):
        vals = res.C_mean[i, 0][rank[i, 0]]
        assert bool((vals[:-1] >= vals[1:]).all())
    assert torch.equal(res.top("anger", 2, 5), rank[2, 0, :5])
    res.save(tmp_path / "neurons", {"note": "x"})
    back = NeuronScores.load(tmp_path / "neurons")
    assert torch.equal(back.C_mean, res.C_mean) and back.layers == res.layers and back.meta["note"] == "x"
    res.write_csv(tmp_path, ["anger"])
    rows = list(csv.DictReader(open(tmp_path / "neurons_anger.csv")))
    a = Adapter.of(model)
    assert len(rows) == a.num_layers * a.intermediate_size
    assert list(rows[0]) == ["layer", "neuron", "rank", "C_mean", "C_pos", "C_neg", "beta", "H_mean"]
    top = rows[0]
    assert int(top["neuron"]) == int(rank[0, 0, 0]) and float(top["C_mean"]) == pytest.approx(float(res.C_mean[0, 0].max()), rel=1e-5)


def test_bad_inputs_raise_clear_errors():
    model, tok = tiny("llama")
    with pytest.raises(ValueError, match=r"dirs_mlp must be \[L, 6, d\]"):
        NeuronAccumulator(model, torch.zeros(4, 6, 10))
    with pytest.raises(IndexError, match="out of range"):
        NeuronAccumulator(model, random_directions(model), layers=(7,))
    with pytest.raises(ValueError, match="'emotion'"):
        acc = NeuronAccumulator(model, random_directions(model))
        run_collectors(model, [prompt_batch(tok)], [acc], progress=False)
    with pytest.raises(ValueError, match=r"\[2, L, 6, d\]"):
        direction_tensors(torch.zeros(3, 4, 6, 64))


def test_direction_tensors_accepts_emotion_directions():
    from emokernels.discover.directions import EmotionDirections

    v = torch.randn(2, 4, 6, 64)
    d = EmotionDirections(directions=v, sigma=torch.ones(2, 4), norms=torch.ones(2, 4, 6))
    attn, mlp = direction_tensors(d)
    assert torch.equal(attn, v[0]) and torch.equal(mlp, v[1])
    attn2, mlp2 = direction_tensors({"attn": v[0], "mlp": v[1]})
    assert torch.equal(attn2, v[0]) and torch.equal(mlp2, v[1])


def test_sev_unit_batches_are_group_major_with_targets():
    from emokernels.data.sev import load_split

    _, tok = tiny("llama")
    units = sev_units(load_split("train", 1))
    assert len(units) == 18 and [u.group for u in units[:6]] == [units[0].group] * 6
    b = next(unit_batches(tok, units, batch_size=6))
    assert b["emotion"].tolist() == list(range(6)) and len(set(b["groups"])) == 1
    neutral = next(unit_batches(tok, units, batch_size=6, neutral=True))
    assert torch.equal(neutral["input_ids"][0], neutral["input_ids"][5])  # same context, same neutral prompt


@pytest.mark.slow
def test_smollm2_fp32_contributions_sum_exactly():
    model, tok = smollm()
    dirs, batch = random_directions(model), emotion_batch(tok)
    layers = (0, 15, 29)
    out = neuron_contributions(model, batch, dirs, layers)
    F = _mlp_out_at_readout(model, batch, layers)
    for i, l in enumerate(layers):
        ref = (F[l] * dirs[l][batch["emotion"]]).sum(-1)
        torch.testing.assert_close(out["c"][:, i].sum(-1), ref, rtol=0, atol=2e-6 * float(F[l].norm(dim=-1).max()))


def test_functions_accept_an_emotion_directions_object():
    from emokernels.discover.directions import EmotionDirections

    model, tok = tiny("llama")
    v = torch.stack([random_directions(model, 0), random_directions(model, 1)])
    d = EmotionDirections(directions=v, sigma=torch.ones(2, 4), norms=torch.ones(2, 4, 6))
    torch.testing.assert_close(neuron_betas(model, d), neuron_betas(model, v[1]))
    torch.testing.assert_close(neuron_betas(model, v), neuron_betas(model, v[1]))


def _save_random_directions(model, folder):
    from emokernels.discover.directions import EmotionDirections

    a = Adapter.of(model)
    v = torch.stack([random_directions(model, 0), random_directions(model, 1)])
    EmotionDirections(directions=v, sigma=torch.ones(2, a.num_layers), norms=torch.ones(2, a.num_layers, 6),
                      model="tiny-llama").save(folder)
    return v


def test_components_cli_writes_artifacts_and_refuses_test_split(tmp_path, capsys):
    from emokernels.cli import main
    from emokernels.discover.diffs import ComponentDiffs
    from emokernels.discover.heads import HeadScores

    model, _ = tiny("llama")
    _save_random_directions(model, tmp_path / "dirs")
    out = tmp_path / "comp"
    rc = main(["components", "--model", "tiny-llama", "--directions", str(tmp_path / "dirs"), "--limit", "1",
               "--out", str(out), "--top", "2"])
    assert rc == 0
    for name in ("neurons.safetensors", "heads.safetensors", "diffs.safetensors", "summary.json",
                 "neurons_anger.csv", "heads_disgust.csv", "heads_fear.png", "neurons_sadness.png"):
        assert (out / name).exists(), name
    assert not (out / "components_checkpoint.safetensors").exists()
    h = HeadScores.load(out / "heads")
    assert h.counts.tolist() == [3] * 6 and h.mean.shape == (4, 6, 4)
    assert ComponentDiffs.load(out / "diffs").n_groups == 3
    import json

    summ = json.loads((out / "summary.json").read_text())
    assert len(summ["top"]["anger"]["heads"]) == 2 and summ["n_units"] == 18
    assert main(["components", "--model", "tiny-llama", "--directions", str(tmp_path / "dirs"), "--split", "test",
                 "--out", str(out)]) == 2
    assert "train split only" in capsys.readouterr().err
    assert main(["components", "--model", "tiny-llama", "--directions", str(tmp_path / "nowhere"), "--out", str(out)]) == 2


def test_discover_components_resumes_after_a_crash(tmp_path, monkeypatch, capsys):
    import emokernels.discover.collect as nmod  # run_collectors calls collect.forward
    from emokernels.data.sev import load_split
    from emokernels.discover.components import discover_components

    model, tok = tiny("llama")
    v = torch.stack([random_directions(model, 0), random_directions(model, 1)])
    units = sev_units(load_split("train", 1))
    kw = dict(batch_size=4, checkpoint_every=1, fingerprint="abc", progress=False)
    ref = discover_components(model, tok, units, v[0], v[1], **kw)
    real, calls = nmod.forward, [0]

    def crashing(model_, batch):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("killed")
        return real(model_, batch)

    monkeypatch.setattr(nmod, "forward", crashing)
    with pytest.raises(RuntimeError, match="killed"):
        discover_components(model, tok, units, v[0], v[1], checkpoint=tmp_path / "ck", **kw)
    assert (tmp_path / "ck.safetensors").exists()
    monkeypatch.setattr(nmod, "forward", real)
    capsys.readouterr()
    got = discover_components(model, tok, units, v[0], v[1], checkpoint=tmp_path / "ck", **kw)
    assert "resuming after 8 of 18" in capsys.readouterr().out  # 2 batches of 4 were saved
    torch.testing.assert_close(got[0].C_mean, ref[0].C_mean, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(got[1].mean, ref[1].mean, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(got[2].da, ref[2].da, rtol=1e-6, atol=1e-8)
    assert got[2].n_groups == 3 and not (tmp_path / "ck.safetensors").exists()
