import json

import pytest

from emokernels.cli import main as cli_main
from emokernels.io import append_jsonl, read_jsonl
from emokernels.judge.base import Judge, Judgement
from emokernels.judge.rows import judge_rows
from emokernels.judge.report import accuracy_table, agreement, build_report, confusion_matrix, markdown, write_report


def _row(key, emotion, valence, label, second=None):
    r = {"key": key, "emotion": emotion, "valence": valence, "text": f"text {key}", "label": label,
         "scores": {}, "match": label == emotion, "judge": {"name": "a"}}
    if second is not None:
        r["second"] = {"label": second, "scores": {}, "match": second == emotion, "judge": {"name": "b"}}
    return r


ROWS = [
    _row("s0__positive__anger", "anger", "positive", "anger", "anger"),
    _row("s0__negative__anger", "anger", "negative", "neutral", "sadness"),
    _row("s0__positive__fear", "fear", "positive", "fear", "fear"),
    _row("s0__negative__fear", "fear", "negative", "fear", "surprise"),
    _row("s1__negative__fear", "fear", "negative", "sadness", "sadness"),
]


def test_accuracy_table():
    t = accuracy_table(ROWS)
    assert t["overall"] == {"n": 5, "hits": 3, "accuracy": 0.6}
    assert t["by_emotion"]["anger"]["accuracy"] == 0.5 and t["by_emotion"]["fear"]["hits"] == 2
    assert t["by_valence"]["negative"] == {"n": 3, "hits": 1, "accuracy": 1 / 3}
    assert t["by_emotion_valence"]["fear"]["negative"]["accuracy"] == 0.5
    assert list(t["by_emotion"]) == ["anger", "fear"]  # paper order, only emotions present


def test_confusion_matrix_shape_and_counts():
    rows, cols, counts = confusion_matrix([r["label"] for r in ROWS], [r["emotion"] for r in ROWS])
    assert len(rows) == 7 and len(cols) == 6 and rows[-1] == "neutral"
    assert counts[rows.index("fear")][cols.index("fear")] == 2
    assert counts[rows.index("neutral")][cols.index("anger")] == 1
    assert sum(map(sum, counts)) == 5
    rows2, _, _ = confusion_matrix(["other", "anger"], ["anger", "anger"])
    assert rows2[-1] == "other"


def test_agreement_and_kappa():
    assert agreement(["a", "b", "a", "b"], ["a", "b", "a", "b"]) == {"n": 4, "rate": 1.0, "kappa": 1.0}
    # p_o = 0.5, p_e = 0.5 -> kappa 0
    assert agreement(["a", "a", "b", "b"], ["a", "b", "a", "b"])["kappa"] == pytest.approx(0.0)
    # textbook example: 20/5/10/15 table -> p_o 0.7, p_e 0.5, kappa 0.4
    a = ["y"] * 25 + ["n"] * 25
    b = ["y"] * 20 + ["n"] * 5 + ["y"] * 10 + ["n"] * 15
    assert agreement(a, b)["kappa"] == pytest.approx(0.4)
    assert agreement([], [])["rate"] is None


def test_build_and_write_report(tmp_path):
    rep = build_report(ROWS)
    assert rep["agreement"]["label"]["rate"] == pytest.approx(3 / 5)
    assert rep["second"]["accuracy"]["overall"]["hits"] == 2
    assert rep["agreement"]["both_match"] == pytest.approx(2 / 5)
    md = markdown(rep)
    assert "| anger |" in md and "Cohen" in md and "predicted \\ target" in md
    write_report(ROWS, tmp_path / "rep")
    for f in ("report.json", "report.md", "confusion.png", "confusion_second.png"):
        assert (tmp_path / "rep" / f).stat().st_size > 100
    assert json.loads((tmp_path / "rep" / "report.json").read_text())["n_rows"] == 5
    with pytest.raises(ValueError, match="no judged rows"):
        build_report([])


class KeywordJudge(Judge):
    """Deterministic stand-in judge that counts its calls."""

    name = "kw"

    def __init__(self):
        self.n = 0

    def classify(self, texts, targets=None):
        self.n += len(texts)
        out = []
        for t, y in zip(texts, targets):
            lab = "anger" if "angry" in t else "neutral"
            out.append(Judgement(lab, {lab: 1.0}, lab == y))
        return out


GENS = [{"key": f"s{i}__negative__anger", "emotion": "anger", "valence": "negative",
         "text": "I am angry" if i % 2 else "Call them."} for i in range(5)]


def test_judge_rows_resumes_by_key(tmp_path):
    out = tmp_path / "judged.jsonl"
    append_jsonl(out, [{**GENS[0], "label": "anger", "scores": {}, "match": True, "judge": {"name": "kw"}}])
    with open(out, "a") as f:
        f.write('{"key": "torn')  # crash mid-append
    j = KeywordJudge()
    rows = judge_rows(GENS, j, out, batch_size=2, progress=False)
    assert j.n == 4 and [r["key"] for r in rows] == [g["key"] for g in GENS]
    assert rows[0]["match"] is True and rows[1]["label"] == "anger" and rows[2]["label"] == "neutral"
    assert len(read_jsonl(out)) == 5
    j2 = KeywordJudge()
    assert judge_rows(GENS, j2, out, progress=False) == rows and j2.n == 0


def test_judge_rows_with_second_judge_and_mismatch(tmp_path):
    out = tmp_path / "j.jsonl"
    rows = judge_rows(GENS, KeywordJudge(), out, second=KeywordJudge(), progress=False)
    assert all(r["second"]["label"] == r["label"] for r in rows)
    with pytest.raises(ValueError, match="other settings"):
        judge_rows(GENS, KeywordJudge(), out, progress=False)  # file was judged with a second judge


def test_judge_cli_minilm(tmp_path, capsys):
    gens = tmp_path / "gens.jsonl"
    append_jsonl(gens, [
        {"key": "a__negative__anger", "emotion": "anger", "valence": "negative", "text": "I'm furious, this is outrageous!"},
        {"key": "a__negative__happiness", "emotion": "happiness", "valence": "negative", "text": "Yay, I'm so happy and thrilled!"},
        {"key": "a__negative__fear", "emotion": "fear", "valence": "negative", "text": "Please call the office tomorrow."},
    ])
    out = tmp_path / "judged.jsonl"
    assert cli_main(["judge", "--in", str(gens), "--judge", "minilm", "--out", str(out), "--no-progress"]) == 0
    rows = read_jsonl(out)
    assert [r["match"] for r in rows] == [True, True, False] and rows[0]["judge"]["name"] == "minilm"
    rep = json.loads((tmp_path / "judged_report" / "report.json").read_text())
    assert rep["accuracy"]["overall"]["hits"] == 2
    assert (tmp_path / "judged_report" / "confusion.png").exists()
    assert "accuracy 2/3" in capsys.readouterr().out


def test_judge_cli_errors(tmp_path, capsys):
    assert cli_main(["judge", "--in", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "no generations file" in capsys.readouterr().err
    (tmp_path / "g.jsonl").write_text('{"key": "k", "emotion": "anger", "text": "x"}\n')
    assert cli_main(["judge", "--in", str(tmp_path / "g.jsonl"), "--judge", "minilm", "--second-judge", "minilm",
                     "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "differ" in capsys.readouterr().err


def test_judge_cli_reference_mode(tmp_path, capsys):
    out = tmp_path / "ref.json"
    assert cli_main(["judge", "--reference", "--judge", "minilm", "--out", str(out)]) == 0
    res = json.loads(out.read_text())["minilm"]
    assert res["n"] >= 168 and res["accuracy"] > 0.5 and "errors" not in res
