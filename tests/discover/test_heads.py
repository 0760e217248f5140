"""One-pass head ablation scores equal the paper's brute-force re-runs (one forward per head)."""
import csv

import pytest
import torch

from emokernels.discover.heads import (HeadScores, head_deltas, head_deltas_bruteforce, head_scores,
                                       head_scores_bruteforce)
from emokernels.models import Adapter
from tests.helpers import emotion_batch, prompt_batch, random_directions, smollm, tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def _close(one, brute):
    torch.testing.assert_close(one, brute, rtol=1e-4, atol=1e-4 * float(brute.abs().max()))


@pytest.mark.parametrize("family", ["llama", "phi3", "gemma2", "gemma3"])
@pytest.mark.parametrize("reading", ["residual", "normed"])
def test_one_pass_equals_brute_force(family, reading):
    model, tok = tiny(family)
    dirs, batch = random_directions(model), emotion_batch(tok)
    one = head_deltas(model, batch, dirs, reading=reading)
    brute, _ = head_deltas_bruteforce(model, batch, dirs, reading=reading)
    assert one.shape == (3, 4, 4)
    assert brute.abs().max() > 1e-3  # the heads do move the score
    _close(one, brute)


def test_residual_reading_is_direct_effect_of_the_head():
    """Without a post-attention norm, s − s^(−k) = ⟨W_O^(k) z^(k), v⟩."""
    from emokernels import Intervention, patch
    from emokernels.discover.collect import forward

    model, tok = tiny("qwen2")
    a = Adapter.of(model)
    dirs, batch = random_directions(model), emotion_batch(tok)
    iv = Intervention("heads", "capture", (2,), positions="readout", name="z")
    with torch.no_grad(), patch(model, iv) as h:
        forward(model, batch)
    z = h.captures["z"][2][0].view(3, a.num_heads, a.head_dim)
    W = a.sites(2).o_proj.weight.view(a.hidden_size, a.num_heads, a.head_dim)
    u = torch.einsum("dhk,bhk->bhd", W, z)
    ref = (u * dirs[2][batch["emotion"]][:, None]).sum(-1)
    torch.testing.assert_close(head_deltas(model, batch, dirs, layers=(2,))[:, 0], ref, rtol=1e-5, atol=1e-7)


def test_dataset_scores_match_brute_force_and_group_by_target(tmp_path):
    model, tok = tiny("llama")
    dirs = random_directions(model, 2)
    batches = [emotion_batch(tok, (0, 0, 4)), emotion_batch(tok, (4, 1, 0))]
    one = head_scores(model, batches, dirs, layers=(1, 3), progress=False)
    brute = head_scores_bruteforce(model, batches, dirs, layers=(1, 3), progress=False)
    assert one.counts.tolist() == [3, 1, 0, 0, 2, 0] == brute.counts.tolist()
    _close(one.mean, brute.mean)
    torch.testing.assert_close(one.std, brute.std, rtol=1e-3, atol=1e-4 * float(brute.std.abs().max()))
    torch.testing.assert_close(one.baseline, brute.baseline, rtol=1e-5, atol=1e-6)
    per = torch.cat([head_deltas(model, b, dirs, layers=(1, 3)) for b in batches])
    emo = torch.cat([b["emotion"] for b in batches])
    torch.testing.assert_close(one.mean[:, 0], per[emo == 0].mean(0), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(one.std[:, 0], per[emo == 0].std(0, unbiased=False), rtol=1e-4, atol=1e-7)
    # artifacts
    one.save(tmp_path / "heads")
    back = HeadScores.load(tmp_path / "heads")
    assert torch.equal(back.mean, one.mean) and back.layers == (1, 3) and back.reading == "residual"
    one.write_csv(tmp_path, ["anger"])
    rows = list(csv.DictReader(open(tmp_path / "heads_anger.csv")))
    assert len(rows) == 2 * 4 and rows[0]["samples"] == "3"
    assert list(rows[0]) == ["layer", "head", "mean_importance", "std_importance", "samples", "baseline_mean"]
    top = one.top_global("anger", 3)
    assert [t[2] for t in top] == sorted((t[2] for t in top), reverse=True)


def test_bad_reading_raises():
    model, tok = tiny("llama")
    with pytest.raises(ValueError, match="unknown reading"):
        head_deltas(model, emotion_batch(tok), random_directions(model), reading="post")


@pytest.mark.slow
def test_smollm2_one_pass_equals_brute_force():
    """Real SmolLM2 fp32, 2 prompts: residual reading at the last layer, normed at a middle one
    (1 + 9 forwards per layer for the brute force)."""
    model, tok = smollm()
    dirs = random_directions(model)
    batch = prompt_batch(tok, emotions=("anger", "fear"))
    batch["emotion"] = torch.tensor([0, 3])
    for reading, layers in (("residual", (29,)), ("normed", (14,))):
        one = head_deltas(model, batch, dirs, layers=layers, reading=reading)
        brute, _ = head_deltas_bruteforce(model, batch, dirs, layers=layers, reading=reading)
        _close(one, brute)
