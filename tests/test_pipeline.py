"""`emokernels run` end to end on a tiny random model: every stage writes its artifact, the report
exists, and a rerun resumes (skips finished stages)."""
import json

import pytest

from emokernels.cli import main


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gemma2"])
def test_run_end_to_end_and_resume(tmp_path, capsys, model):
    out = tmp_path / "run"
    args = ["run", "--model", model, "--dtype", "fp32", "--train-limit", "1", "--test-limit", "1",
            "--select-limit", "1", "--max-new-tokens", "6", "--texts-per-emotion", "1", "--out", str(out)]
    assert main(args) == 0
    state = json.loads((out / "state.json").read_text())
    assert state["done"] == ["generate", "judge", "directions", "components", "influence", "circuits", "select", "compare"]
    comp = json.loads((out / "compare" / "comparison.json").read_text())
    assert set(comp) == {"prompt", "steering", "circuit"}
    for c in comp.values():
        assert c["report"]["accuracy"]["overall"]["n"] == 18  # 1 skeleton x 3 valences x 6 emotions
        assert 0.0 <= c["naturalness"]["natural_accuracy"] <= c["report"]["accuracy"]["overall"]["accuracy"]
    assert (out / "report.md").read_text().startswith("# emokernels run")
    assert (out / "comparison.png").stat().st_size > 1000
    assert (out / "circuit" / "circuit.safetensors").exists()
    capsys.readouterr()
    assert main(args) == 0  # resume: nothing left to do
    assert capsys.readouterr().out.count("done earlier, skipped") == 8


def test_run_rejects_a_folder_of_another_config(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "state.json").write_text(json.dumps({"done": [], "config": {"model": "smollm2-135m"}}))
    assert main(["run", "--model", "tiny-llama", "--out", str(out)]) == 2


def test_run_rejects_bad_limits(tmp_path):
    assert main(["run", "--model", "tiny-llama", "--train-limit", "0", "--out", str(tmp_path)]) == 2
