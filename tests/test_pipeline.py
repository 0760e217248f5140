"""`emokernels run` end to end on a tiny random model: every stage writes its artifact, the report
exists, and a rerun resumes (skips finished stages)."""
import json

import pytest

from emokernels.cli import main


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gemma2"])
def test_run_end_to_end_and_resume(tmp_path, capsys, model):
    """Discovery first; then a rerun with another judge judges the train replies again, keeps the
    discovery (the source choice did not change) and finishes; a third run has nothing to do."""
    out = tmp_path / "run"
    common = ["run", "--model", model, "--dtype", "fp32", "--train-limit", "1", "--test-limit", "1",
              "--select-limit", "1", "--max-new-tokens", "6", "--texts-per-emotion", "1", "--out", str(out)]
    assert main(common + ["--judge", "minilm-probe", "--second-judge", "minilm", "--stop-after", "circuits"]) == 0
    state = json.loads((out / "state.json").read_text())
    assert state["done"] == ["generate", "judge", "directions", "components", "influence", "circuits"]
    directions_mtime = (out / "directions").stat().st_mtime_ns
    args = common + ["--judge", "minilm", "--select-judge", "minilm-probe", "--second-judge", "minilm-probe"]
    assert main(args) == 0
    assert "judge changed ('minilm-probe' -> 'minilm')" in capsys.readouterr().out
    state = json.loads((out / "state.json").read_text())
    assert state["done"] == ["generate", "judge", "directions", "components", "influence", "circuits", "select", "compare"]
    assert (out / "directions").stat().st_mtime_ns == directions_mtime
    assert json.loads((out / "judge" / "train_prompt.jsonl").read_text().splitlines()[0])["judge"]["name"] == "minilm"
    comp = json.loads((out / "compare" / "comparison.json").read_text())
    assert set(comp) == {"prompt", "steering", "circuit"}
    for c in comp.values():
        assert c["report"]["accuracy"]["overall"]["n"] == 18  # 1 skeleton x 3 valences x 6 emotions
        assert 0.0 <= c["naturalness"]["natural_accuracy"] <= c["report"]["accuracy"]["overall"]["accuracy"]
        assert c["report"]["judge"]["name"] == "minilm" and c["report"]["second"]["judge"]["name"] == "minilm-probe"
        assert c["report"]["agreement"]["label"]["n"] == 18
    assert json.loads((out / "select" / "selection.json").read_text())["judge"]["name"] == "minilm-probe"
    report = (out / "report.md").read_text()
    assert report.startswith("# emokernels run") and "minilm-probe: accuracy [95 % CI]" in report
    assert (out / "comparison.png").stat().st_size > 1000
    assert (out / "circuit" / "circuit.safetensors").exists()
    capsys.readouterr()
    assert main(args) == 0  # resume: nothing left to do
    assert capsys.readouterr().out.count("done earlier, skipped") == 8


def test_run_rejects_changed_settings_of_finished_stages(tmp_path, capsys):
    """A finished stage made with other settings is an error naming each changed key and the stage
    to restart from; --restart-from deletes that stage's outputs and every later one."""
    from emokernels.cli import build_parser
    from emokernels.pipeline import FIRST_AFFECTED, Run

    def build_parser_args(argv):
        return build_parser().parse_args(["run", "--dtype", "fp32", "--select-judge", "minilm-probe", *argv])

    out = tmp_path / "run"
    (out / "gen").mkdir(parents=True)
    (out / "select").mkdir()
    (out / "gen" / "train_prompt.jsonl").write_text("{}\n")
    old = build_parser_args(["--model", "tiny-llama", "--select-limit", "2", "--out", str(out)])
    done = {"done": ["generate", "judge", "directions", "components", "influence", "circuits", "select"],
            "config": {k: getattr(old, k) for k in FIRST_AFFECTED}}
    (out / "state.json").write_text(json.dumps(done))
    assert main(["run", "--model", "smollm2-135m", "--dtype", "fp32", "--select-judge", "minilm-probe", "--select-limit", "2",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "(model: 'tiny-llama' -> 'smollm2-135m')" in err and "--restart-from generate" in err
    args = build_parser_args(["--model", "tiny-llama", "--select-limit", "3", "--out", str(out)])
    with pytest.raises(ValueError, match=r"\(select_limit: 2 -> 3\).*--restart-from select"):
        Run(args)
    args = build_parser_args(["--model", "tiny-llama", "--select-limit", "3", "--out", str(out), "--restart-from", "select"])
    run = Run(args)
    assert run.state["done"] == ["generate", "judge", "directions", "components", "influence", "circuits"]
    assert not (out / "select").exists() and (out / "gen" / "train_prompt.jsonl").exists()
    assert run.state["config"]["select_limit"] == 3


def test_run_rejects_bad_limits_and_judges(tmp_path):
    assert main(["run", "--model", "tiny-llama", "--train-limit", "0", "--out", str(tmp_path)]) == 2
    assert main(["run", "--model", "tiny-llama", "--judge", "minilm", "--second-judge", "minilm", "--out", str(tmp_path)]) == 2
