"""Trained judges: the probe's fit, calibration and file format, a judge trained on a small
fixture split of the corpus, the packaged default judge, and the evaluation metrics."""
import json
import math

import pytest
import torch

from emokernels.data.corpus import load_judge_corpus
from emokernels.judge import DEFAULT, JUDGES, LABELS, SECOND, get_judge
from emokernels.judge.evaluate import classification_metrics, evaluate_rows, wilson
from emokernels.judge.probe import Probe, ProbeJudge, fit_probe, fit_temperature, macro_f1, select_and_fit, train_judge


def _clusters(n_per, d=12, sep=3.0, noise_seed=0):
    """Seven Gaussian clusters around fixed centres; ``noise_seed`` draws another sample of them."""
    centres = torch.randn(7, d, generator=torch.Generator().manual_seed(0)) * sep
    y = torch.arange(7).repeat_interleave(n_per)
    return centres[y] + torch.randn(len(y), d, generator=torch.Generator().manual_seed(1 + noise_seed)), y


def test_fit_probe_separates_clusters_and_temperature_calibrates():
    X, y = _clusters(40, sep=1.0)  # overlapping clusters: neither certain nor random
    Xd, yd = _clusters(20, sep=1.0, noise_seed=1)
    probe, info = select_and_fit(X, y, Xd, yd, lambdas=(1e-3, 1e-1))
    assert macro_f1(probe.logits(Xd).argmax(-1), yd) > 0.6 and info["lambda"] in (1e-3, 1e-1)
    P = probe.probs(Xd)
    assert torch.allclose(P.sum(-1), torch.ones(len(yd)), atol=1e-5)
    # temperature scaling never changes the argmax, and is fitted to the data's confidence
    assert torch.equal(P.argmax(-1), probe.logits(Xd).argmax(-1))
    assert 0.01 < probe.temperature < 100  # inside the search grid, not at its edge
    noisy = torch.randn(70, 7)
    assert fit_temperature(noisy, torch.randint(0, 7, (70,))) > 1.0  # random logits: flatten them


def test_fit_probe_is_class_balanced():
    """A rare class is still found: the loss weights each class equally."""
    X, y = _clusters(40)
    keep = (y != 3) | (torch.arange(len(y)) % 10 == 0)  # class 3 keeps 4 of 40 rows
    p = fit_probe(X[keep], y[keep], lam=1e-2)
    assert (p.logits(X[y == 3]).argmax(-1) == 3).float().mean() > 0.8


def test_probe_file_roundtrip_and_corrupt(tmp_path):
    X, y = _clusters(10)
    p = fit_probe(X, y, 1e-2)
    p.temperature = 0.7
    p.save(tmp_path / "j", {"labels": list(LABELS), "features": {"kind": "minilm"}})
    q, meta = Probe.load(tmp_path / "j")
    assert torch.equal(q.W, p.W) and q.temperature == 0.7 and meta["features"] == {"kind": "minilm"}
    Probe(p.W, p.b[:3], p.mu, p.sigma).save(tmp_path / "k", {})
    with pytest.raises(ValueError, match="inconsistent probe shapes"):
        Probe.load(tmp_path / "k")
    with pytest.raises(ValueError, match="features must be"):
        p.logits(X[:, :5])
    meta_path = tmp_path / "j.json"
    m = json.loads(meta_path.read_text())
    m["temperature"] = -1
    meta_path.write_text(json.dumps(m))
    with pytest.raises(ValueError, match="non-positive"):
        Probe.load(tmp_path / "j")
    with pytest.raises(FileNotFoundError, match="emokernels judge --train"):
        ProbeJudge("minilm-probe", path=tmp_path / "missing")


def test_metrics_and_wilson():
    assert wilson(0, 0) is None
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and math.isclose(hi, 0.2775, abs_tol=1e-3)
    lo, hi = wilson(50, 100)
    assert math.isclose(lo, 0.4038, abs_tol=1e-3) and math.isclose(hi, 0.5962, abs_tol=1e-3)
    m = classification_metrics(["anger", "anger", "fear", "neutral"], ["anger", "fear", "fear", "neutral"])
    assert m["accuracy"]["k"] == 3 and m["per_label"]["anger"]["precision"] == 0.5 and m["per_label"]["fear"]["recall"] == 0.5
    # macro-F1 over anger (2/3), fear (2/3), neutral (1)
    assert math.isclose(m["macro_f1"], (2 / 3 + 2 / 3 + 1) / 3, abs_tol=1e-3)
    assert sum(map(sum, m["confusion"]["counts"])) == 4


@pytest.fixture(scope="module")
def minilm_features():
    from emokernels.judge.features import MiniLMEncoder

    return MiniLMEncoder()


def test_judge_trained_on_a_small_fixture_split_beats_chance(tmp_path, minilm_features):
    """12 train + 6 dev replies per label from the corpus train split; scored on 10 per label of the
    corpus test split (chance 1/7)."""
    rows = load_judge_corpus("train")
    fixture = []
    for lab in LABELS:
        mine = [r for r in rows if r.label == lab][:18]
        fixture += [{**r.to_dict(), "split": "train" if i < 12 else "dev", "scenario_id": f"{r.scenario_id}-{'t' if i < 12 else 'd'}"}
                    for i, r in enumerate(mine)]
    path = tmp_path / "fixture.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in fixture))
    meta = train_judge("minilm-probe", out=tmp_path / "probe", corpus_path=path, features=minilm_features,
                       lambdas=(1e-2, 1e-1), progress=False)
    assert meta["n_train"] == 84 and meta["n_dev"] == 42
    judge = ProbeJudge("minilm-probe", path=tmp_path / "probe", features=minilm_features)
    test = [r for lab in LABELS for r in [x for x in load_judge_corpus("test") if x.label == lab][:10]]
    res = evaluate_rows(judge, test)
    assert res["accuracy"]["rate"] >= 0.4, res["accuracy"]  # chance is 0.14
    out = judge.classify([test[0].text, test[-1].text], [test[0].label, "anger"])
    assert all(abs(sum(j.scores.values()) - 1) < 1e-4 for j in out)


def test_default_judge_is_registered_and_packaged():
    assert DEFAULT in JUDGES and SECOND in JUDGES and DEFAULT != SECOND
    judge = get_judge("minilm-probe")
    assert judge.describe()["corpus"] and judge.meta["labels"] == list(LABELS)
    out = judge.classify(["You could call the office tomorrow and ask them to reschedule.",
                          "Ugh, the fridge is full of rotten, slimy leftovers. Gross!"])
    assert [j.label for j in out] == ["neutral", "disgust"]


def test_llm_hidden_states_are_the_residual_stream_whatever_layers_run():
    """h_ℓ from a run of all layers equals h_ℓ from a run cut after layer ℓ (no final norm leaks in),
    equals transformers' hidden_states[ℓ] for ℓ < L, and does not depend on the batch."""
    from emokernels.judge.features import LLMHiddenStates
    from tests.helpers import tiny

    model, tok = tiny("qwen2")
    f = LLMHiddenStates(model=model, tokenizer=tok, model_name="tiny-qwen2", batch_size=2)
    texts = ["hello there friend", "a much longer text with many words in it, to pad the batch", "x", ""]
    A = f.all_layers(texts)
    assert A.shape == (4, f.num_layers + 1, f.dim)
    for l in range(f.num_layers + 1):
        assert torch.equal(f.all_layers(texts, upto=l), A[:, : l + 1])
    enc = tok(texts[:1], return_tensors="pt", add_special_tokens=False)
    hs = model.model(**enc, output_hidden_states=True).hidden_states
    for l in range(f.num_layers):
        assert torch.allclose(hs[l][0].float().mean(0), A[0, l], atol=1e-5)
    one = LLMHiddenStates(model=model, tokenizer=tok, model_name="tiny-qwen2", batch_size=1, layer=2)
    assert torch.allclose(one(texts), A[:, 2], atol=1e-5)
    with pytest.raises(ValueError, match="layer must be"):
        LLMHiddenStates(model=model, tokenizer=tok, layer=99)


@pytest.mark.slow
def test_default_judge_on_clear_replies():
    """The packaged default (an LLM hidden-state probe) on one clear reply per label."""
    from emokernels.models import ModelNotInstalledError

    try:
        judge = get_judge(DEFAULT)
    except ModelNotInstalledError as e:
        pytest.skip(str(e))
    texts = {"anger": "How dare they cancel my order and keep the money? This is outrageous!",
             "sadness": "I'm so sorry, losing him like that is heartbreaking. I wish things had gone differently.",
             "happiness": "That's wonderful news, congratulations! I'm so happy for you!",
             "fear": "Oh no, what if the results are bad? I'd be terrified waiting for that call.",
             "surprise": "Wait, really? They answered in ten minutes? I never saw that coming!",
             "disgust": "Ugh, mould all over the bread and the fridge smells rotten. Revolting.",
             "neutral": "You could call the clinic tomorrow morning and ask for the next free appointment."}
    out = judge.classify(list(texts.values()), list(texts))
    assert sum(j.match for j in out) >= 6, [j.label for j in out]
    assert all(abs(sum(j.scores.values()) - 1) < 1e-4 for j in out)
