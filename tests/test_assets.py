"""The shipped artifacts load, fit the default model's identity, and refuse other models."""
import pytest
import torch

from emokernels.assets import READY_MODELS, ready_circuit, ready_directions, ready_path
from emokernels.models.identity import ModelMismatchError
from emokernels.models.tiny import tiny_model


@pytest.mark.parametrize("kind", ["directions", "circuit"])
def test_ready_artifacts_load_with_their_chosen_strengths(kind):
    obj = ready_directions() if kind == "directions" else ready_circuit()
    assert obj.model_identity["name"] == "smollm2-135m" and obj.model_identity["config"]["hidden_size"] == 576
    if kind == "directions":
        assert obj.directions.dtype == torch.float32 and obj.directions.shape == (1, 30, 6, 576)
        norms = obj.directions.norm(dim=-1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=2e-3)  # unit rows, stored in fp16
        assert obj.extra["steering_alpha"] > 0
    else:
        assert set(obj.strengths) == set(obj.emotions) and all(s > 0 for s in obj.strengths.values())


@pytest.mark.parametrize("kind", ["directions", "circuit"])
def test_ready_artifacts_refuse_another_model(kind):
    model, _ = tiny_model("llama", with_tokenizer=False)
    load = ready_directions if kind == "directions" else ready_circuit
    with pytest.raises((ModelMismatchError, ValueError), match="layers|smollm2-135m"):
        load(model=model)


@pytest.mark.parametrize("args, match", [(("weights",), "unknown ready artifact"),
                                         (("circuit", "qwen2.5-coder-1.5b"), "no ready artifacts")])
def test_ready_path_names_what_exists(args, match):
    with pytest.raises(ValueError, match=match):
        ready_path(*args)
    assert READY_MODELS == ("smollm2-135m",)


def test_identity_survives_a_gguf_rounded_epsilon():
    """A GGUF stores rms_norm_eps as fp32: the same model loaded from a HF folder must agree."""
    from emokernels.models.identity import config_hash

    fields = dict(ready_directions().model_identity["config"])
    assert config_hash({**fields, "rms_norm_eps": 1e-05}) == config_hash({**fields, "rms_norm_eps": 9.999999747378752e-06})


def test_identity_of_a_file_hashed_before_the_rounding_still_matches():
    """A file written with the unrounded eps and its old hash is the same model."""
    from emokernels.models.identity import mismatch

    new = ready_directions().model_identity
    old = {**new, "config": {**new["config"], "rms_norm_eps": 9.999999747378752e-06}, "config_hash": "0123456789abcdef"}
    assert mismatch(old, new) == []
    other = {**new, "config": {**new["config"], "hidden_size": 577}}
    assert mismatch(other, new) and "hidden_size" in mismatch(other, new)[0]
