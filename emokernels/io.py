"""Artifact I/O: atomic writes, safetensors + JSON metadata, append-only JSONL that survives crashes.

Artifacts are ``<name>.safetensors`` (tensors) with ``<name>.json`` (metadata) beside them;
nothing is ever unpickled. Every file is written to a temp name in the same folder and then
``os.replace``d, so a crash leaves either the old file or the new one, never half of one.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import torch


class CorruptArtifactError(ValueError):
    pass


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; artifacts are ordinary readable files
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json(path, obj) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n").encode())


def read_json(path):
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CorruptArtifactError(f"{path} is not valid JSON (line {e.lineno}): {e.msg}") from e


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"cannot serialise {type(o).__name__}")


def save_tensors(path, tensors: dict[str, torch.Tensor], metadata: dict) -> Path:
    """Write ``path`` (.safetensors) and ``path`` with suffix .json (metadata), both atomically."""
    from safetensors.torch import save

    path = Path(path).with_suffix(".safetensors")
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    # safetensors' own header metadata holds strings only; the full metadata goes in the JSON.
    atomic_write_bytes(path, save(flat, metadata={"format": "pt", "emokernels": json.dumps(metadata, default=_json_default)}))
    write_json(path.with_suffix(".json"), metadata)
    return path


def load_tensors(path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path).with_suffix(".safetensors")
    if not path.exists():
        raise FileNotFoundError(f"no artifact at {path}")
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CorruptArtifactError(f"{path} is not a readable safetensors file: {e}") from e
    meta_path = path.with_suffix(".json")
    meta = read_json(meta_path) if meta_path.exists() else {}
    return tensors, meta


def append_jsonl(path, rows: Iterable[dict]) -> None:
    """Append rows as whole lines with one write + fsync, so a crash never leaves half a row
    that a later read would take for data (``read_jsonl`` also drops a torn last line)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r, default=_json_default) + "\n" for r in rows)
    if not data:
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path) -> list[dict]:
    return list(iter_jsonl(path))


def iter_jsonl(path) -> Iterator[dict]:
    """Rows of a JSONL file; a torn final line (crash mid-write) is skipped, any other bad line raises."""
    path = Path(path)
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").split("\n")
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) and not path.read_text(encoding="utf-8").endswith("\n"):
                return  # torn last line from an interrupted append
            raise CorruptArtifactError(f"{path}:{i}: not valid JSON ({e.msg})") from e
