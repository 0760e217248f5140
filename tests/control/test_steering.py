"""Steering: equals a hand-written hook, per-row emotions, defaults, α sweep selection."""
import math

import pytest
import torch

from emokernels import patch
from emokernels.control import steering as steer_mod
from emokernels.control.steering import Steering, alpha_sweep, default_alpha, parse_layers
from emokernels.discover.directions import EmotionDirections, unit_directions
from emokernels.models import Adapter
from tests.helpers import prompt_batch, tiny


def _dirs(model, seed=0):
    a = Adapter.of(model)
    g = torch.Generator().manual_seed(seed)
    v, n = unit_directions(torch.randn(2, a.num_layers, 6, a.hidden_size, generator=g))
    return EmotionDirections(directions=v, sigma=torch.ones(2, a.num_layers), norms=n, model="tiny")


def _hand_hooks(model, dirs, emotion_ids, alpha, layers):
    """The paper's stage-03 hook: on each window layer's output, the last position of every
    forward call (t* in the left-padded prefill, the new token in each decode step) gets
    h += α·sqrt(mean h² + 1e-12)·v_e."""
    a = Adapter.of(model)
    hooks = []
    for l in layers:
        V = dirs.directions[1, l][emotion_ids]  # [B, d]

        def hook(mod, args, out, V=V):
            h = out[0] if isinstance(out, tuple) else out
            last = h[:, -1:].float()
            r = last.pow(2).mean(-1, keepdim=True).add(1e-12).sqrt()
            h = torch.cat([h[:, :-1], (last + alpha * r * V[:, None]).to(h.dtype)], 1)
            return (h, *out[1:]) if isinstance(out, tuple) else h

        hooks.append(a.layers[l].register_forward_hook(hook))
    return hooks


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_steering_equals_hand_written_hook(family):
    model, tok = tiny(family)
    dirs = _dirs(model)
    batch = prompt_batch(tok, emotions=(None, None, None))
    ids = torch.tensor([0, 3, 5])
    st = Steering(dirs, alpha=6.0)
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=8, do_sample=False)
    with torch.no_grad(), patch(model, st, emotion=ids):
        ours = model.generate(**kw, output_scores=True, return_dict_in_generate=True)
    hooks = _hand_hooks(model, dirs, ids, 6.0, st.layers)
    try:
        with torch.no_grad():
            ref = model.generate(**kw, output_scores=True, return_dict_in_generate=True)
    finally:
        for h in hooks:
            h.remove()
    plain = model.generate(**kw)
    assert torch.equal(ours.sequences, ref.sequences)
    for s1, s2 in zip(ours.scores, ref.scores):
        torch.testing.assert_close(s1, s2, rtol=1e-4, atol=1e-4)
    assert not torch.equal(ours.sequences, plain)


def test_per_row_emotions_in_one_batch_equal_one_by_one():
    model, tok = tiny("llama")
    dirs = _dirs(model, seed=1)
    batch = prompt_batch(tok, emotions=(None, None, None))
    emotions = ["fear", "anger", "disgust"]
    st = Steering(dirs, alpha=5.0)
    kw = dict(max_new_tokens=6, do_sample=False)
    with torch.no_grad(), patch(model, st, emotion=emotions):
        batched = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kw)
    T = batch["input_ids"].shape[1]
    for i, e in enumerate(emotions):
        m = batch["attention_mask"][i].bool()
        one = batch["input_ids"][i: i + 1, m]
        with torch.no_grad(), patch(model, Steering(dirs, e, alpha=5.0)):
            single = model.generate(input_ids=one, attention_mask=torch.ones_like(one), **kw)
        assert torch.equal(batched[i, T:], single[0, one.shape[1]:]), e
    # per-row strength: α = 0 on a row leaves it unsteered
    with torch.no_grad(), patch(model, st, emotion=emotions, strength=torch.tensor([0.0, 5.0, 5.0])):
        mixed = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kw)
    plain = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kw)
    assert torch.equal(mixed[0], plain[0]) and torch.equal(mixed[1:], batched[1:])


def test_defaults_scale_with_the_model():
    assert default_alpha(3072) == pytest.approx(8.0)
    assert default_alpha(576) == pytest.approx(8 * math.sqrt(576 / 3072))
    # per-layer added-norm ratio α·rms(h)/‖h‖ = α/√d is the paper's 8/√3072 at any d
    for d in (576, 896, 1536):
        assert default_alpha(d) / math.sqrt(d) == pytest.approx(8 / math.sqrt(3072))
    model, _ = tiny("llama")
    st = Steering(_dirs(model), "anger")
    assert st.layers == [2, 3] and st.alpha == pytest.approx(default_alpha(64))
    assert Steering(_dirs(model), "anger", alpha="paper").alpha == 8.0
    assert parse_layers("1-2,0", 4) == [0, 1, 2]
    with pytest.raises(ValueError, match="invalid"):
        parse_layers("3-5", 4)
    with pytest.raises(ValueError, match="unknown emotion"):
        Steering(_dirs(model), "joy").to_interventions(model)
    with pytest.raises(ValueError, match="no emotion"):
        Steering(_dirs(model)).to_interventions(model)


def test_interventions_shape_and_model_check():
    model, _ = tiny("llama")
    dirs = _dirs(model)
    (iv,) = Steering(dirs, ["anger", "fear"], alpha=2.0, layers=[1, 3]).to_interventions(model)
    assert (iv.site, iv.op, iv.positions, iv.layers) == ("resid_post", "add_rms", ("readout", "generated"), (1, 3))
    assert iv.vectors[1].shape == (6, 64) and iv.rows.tolist() == [0, 3] and iv.strength == 2.0
    (iv,) = Steering(dirs, "sadness", point="attn").to_interventions(model)
    assert iv.site == "resid_mid" and iv.rows == 1
    other, _ = tiny("qwen3")
    short = EmotionDirections(directions=dirs.directions[:, :3], sigma=dirs.sigma[:, :3], norms=dirs.norms[:, :3])
    with pytest.raises(ValueError, match="3 layers"):
        Steering(short, "anger", layers=[1]).to_interventions(other)


class _KeywordJudge:
    name = "keyword"

    def classify(self, texts, targets):
        from emokernels.judge.base import Judgement

        return [Judgement(label=t if t in x else "neutral", match=t in x) for x, t in zip(texts, targets)]


def test_alpha_sweep_picks_best_natural_alpha(monkeypatch, tmp_path):
    from emokernels.data.sev import iter_units, load_split

    units = list(iter_units(load_split("train", 1), emotions=("anger", "fear")))
    texts = {  # α -> what the "model" says for a target emotion
        1.0: lambda e: "That is fine, thanks for telling me.",
        2.0: lambda e: f"I feel {e} about this outcome, honestly.",
        4.0: lambda e: f"{e.upper()} {e.upper()} {e.upper()} {e.upper()} {e.upper()}",  # degenerate, matches too
    }

    def fake_generate(model, tok, st, train_units, out_path, alpha=None, **kw):
        return [dict(key=f"{u[0].skeleton_id}__{u[1]}__{u[2]}", emotion=u[2], text=texts[alpha](u[2]))
                for u in train_units]

    monkeypatch.setattr(steer_mod, "steer_generate", fake_generate)
    model, tok = tiny("llama")
    res = alpha_sweep(model, tok, _dirs(model), units, [4.0, 1.0, 2.0], _KeywordJudge(), out_dir=tmp_path)
    by = {r["alpha"]: r for r in res["alphas"]}
    assert res["alpha"] == 2.0
    assert by[4.0]["rejected"] and by[4.0]["degenerate_rate"] == 1.0
    assert by[1.0]["accuracy"] == 0.0 and by[2.0]["accuracy"] == 1.0
    with pytest.raises(ValueError, match="naturalness guard"):
        alpha_sweep(model, tok, _dirs(model), units, [4.0], _KeywordJudge(), out_dir=tmp_path)
    test_units = list(iter_units(load_split("test", 1)))
    with pytest.raises(ValueError, match="train units only"):
        alpha_sweep(model, tok, _dirs(model), test_units, [1.0], _KeywordJudge())


@pytest.mark.slow
def test_steer_cli_on_tiny_model(tmp_path):
    import json

    from emokernels.cli import main

    model, _ = tiny("llama")
    _dirs(model).save(tmp_path / "dirs")
    out = tmp_path / "steer.jsonl"
    rc = main(["steer", "--model", "tiny-llama", "--directions", str(tmp_path / "dirs"), "--limit", "1",
               "--alpha", "2.5", "--max-new-tokens", "6", "--dtype", "float32", "--no-progress", "--out", str(out)])
    assert rc == 0
    summary = json.loads((tmp_path / "steer.summary.json").read_text())
    assert summary["n"] == 18 and summary["alpha"] == 2.5 and summary["steering"]["layers"] == [2, 3]
    assert (tmp_path / "steer.judged.jsonl").exists()
