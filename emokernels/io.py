"""Artifact I/O: atomic writes, safetensors + JSON metadata, append-only JSONL that survives crashes.

Artifacts are ``<name>.safetensors`` (tensors) with ``<name>.json`` (metadata) beside them;
nothing is ever unpickled. Every file is written to a temp name in the same folder and then
``os.replace``d, so a crash leaves either the old file or the new one, never half of one.
The metadata is also stored in the safetensors header (written in the same atomic step as the
tensors) with a write id shared with the sidecar, so a kill between the two files can never
pair new tensors with old metadata. Checkpoints are the safetensors file alone.

Appendable / resumable outputs have one writer at a time: :func:`exclusive_output` holds a
non-blocking ``flock`` on ``<out>.lock`` and a second writer gets :class:`OutputLockedError`.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import torch


class CorruptArtifactError(ValueError):
    """An artifact or data file cannot be read as what it claims to be; the message names the file."""


class DuplicateKeyError(CorruptArtifactError):
    """A JSONL output holds the same key twice (two writers appended to it at once)."""


class OutputLockedError(ValueError):
    """Another process is writing the same output file."""


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
        return json.loads(read_text_utf8(path))
    except json.JSONDecodeError as e:
        raise CorruptArtifactError(f"{path} is not valid JSON (line {e.lineno}): {e.msg}") from e


def decode_utf8(data: bytes, where: str, error: type[ValueError] = CorruptArtifactError) -> str:
    """``data`` as UTF-8 text; invalid bytes raise ``error`` naming ``where``, the line and the byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise error(f"{where}: line {line}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start}); "
                    "re-save the file as UTF-8") from None


def read_text_utf8(path, error: type[ValueError] = CorruptArtifactError) -> str:
    """The text of ``path`` (strict UTF-8; see :func:`decode_utf8`)."""
    path = Path(path)
    return decode_utf8(path.read_bytes(), str(path), error)


def require_finite(tensors: Mapping[str, torch.Tensor], where, keys: Iterable[str] | None = None) -> None:
    """Raise :class:`CorruptArtifactError` naming ``where`` and the first tensor key holding NaN/inf."""
    for k in (tensors if keys is None else keys):
        t = tensors[k]
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            n = int((~torch.isfinite(t)).sum())
            raise CorruptArtifactError(f"{where}: tensor {k!r} holds {n} non-finite value(s) (NaN or inf)")


def require_keys(tensors: Mapping, meta: Mapping, where, tensor_keys=(), meta_keys=()) -> None:
    """Raise :class:`CorruptArtifactError` naming ``where`` and every missing tensor / metadata key."""
    lost_t = [k for k in tensor_keys if k not in tensors]
    lost_m = [k for k in meta_keys if k not in meta]
    parts = ([f"tensors {lost_t}"] if lost_t else []) + ([f"metadata keys {lost_m}"] if lost_m else [])
    if parts:
        raise CorruptArtifactError(f"{where} lacks " + " and ".join(parts))


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"cannot serialise {type(o).__name__}")


_HEADER_KEY = "emokernels"
_PAIR_KEY = "_tensors_id"  # the same random id in the header and the JSON sidecar of one write


def save_tensors(path, tensors: dict[str, torch.Tensor], metadata: dict, sidecar: bool = True) -> Path:
    """Write ``path`` (.safetensors, the metadata also in its header) atomically and, with
    ``sidecar``, the metadata as ``path`` with suffix .json (editable by hand). Both carry one
    random write id, so :func:`load_tensors` can tell a sidecar from another write (a kill
    between the two files) from an edited one. A checkpoint passes ``sidecar=False``: it is then
    one file, replaced in one ``os.replace``."""
    import uuid

    from safetensors.torch import save

    path = Path(path).with_suffix(".safetensors")
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_id = uuid.uuid4().hex
    # safetensors' header metadata holds strings only: the metadata goes in as one JSON string.
    atomic_write_bytes(path, save(flat, metadata={"format": "pt", _PAIR_KEY: write_id,
                                                  _HEADER_KEY: json.dumps(metadata, default=_json_default)}))
    if sidecar:
        write_json(path.with_suffix(".json"), {**metadata, _PAIR_KEY: write_id})
    return path


def load_tensors(path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of an artifact written by :meth:`save_tensors`.

    The metadata is the ``.json`` sidecar's when it belongs to these tensors (same write id, or
    a file written before write ids); a sidecar left from another write (a kill between the
    two files) yields to the copy in the safetensors header, written atomically with the
    tensors. Unreadable files raise :class:`CorruptArtifactError` naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    path = Path(path).with_suffix(".safetensors")
    if not path.exists():
        raise FileNotFoundError(f"no artifact at {path}")
    data = path.read_bytes()
    try:
        tensors = load(data)
        stored = _safetensors_header(data).get("__metadata__") or {}
    except (SafetensorError, OSError, ValueError, UnicodeDecodeError) as e:
        raise CorruptArtifactError(f"{path} is not a readable safetensors file (truncated or corrupt): {e}") from e
    header_meta = None
    if _HEADER_KEY in stored:
        try:
            header_meta = json.loads(stored[_HEADER_KEY])
        except json.JSONDecodeError as e:
            raise CorruptArtifactError(f"{path}: the metadata in its header is not valid JSON ({e.msg})") from e
    meta_path = path.with_suffix(".json")
    if meta_path.exists():
        meta = read_json(meta_path)
        if not isinstance(meta, dict):
            raise CorruptArtifactError(f"{meta_path}: expected a JSON object")
        sidecar_id = meta.pop(_PAIR_KEY, None)
        if header_meta is None or sidecar_id is None or sidecar_id == stored.get(_PAIR_KEY):
            return tensors, meta
    return tensors, header_meta or {}


def _safetensors_header(data: bytes) -> dict:
    """The JSON header of a safetensors blob: 8-byte little-endian length, then that many bytes."""
    n = int.from_bytes(data[:8], "little")
    if len(data) < 8 or n > len(data) - 8:
        raise ValueError("header length exceeds the file")
    header = json.loads(data[8 : 8 + n].decode("utf-8"))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return header


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


def read_jsonl(path, unique_key: str | None = None) -> list[dict]:
    """All rows of a JSONL file (see :func:`iter_jsonl`). With ``unique_key``, a value of that
    field seen twice raises :class:`DuplicateKeyError` naming the keys and the repair."""
    rows = list(iter_jsonl(path))
    if unique_key is not None:
        check_unique_keys(rows, path, unique_key)
    return rows


def iter_jsonl(path) -> Iterator[dict]:
    """Rows of a JSONL file; a torn final line (crash mid-write) is skipped, any other bad line
    (or bytes that are not UTF-8) raises :class:`CorruptArtifactError` naming the file and line."""
    path = Path(path)
    if not path.exists():
        return
    text = read_text_utf8(path)
    lines = text.split("\n")
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) and not text.endswith("\n"):
                return  # torn last line from an interrupted append
            raise CorruptArtifactError(f"{path}:{i}: not valid JSON ({e.msg})") from e
        if not isinstance(row, dict):
            raise CorruptArtifactError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
        yield row


def check_unique_keys(rows: Iterable[dict], path=None, key: str = "key") -> None:
    """Raise :class:`DuplicateKeyError` if two rows share ``row[key]``: the message names the first
    duplicated keys and, for rows read from the file ``path``, the two repairs (dedupe in place,
    or delete the file and rerun)."""
    seen, dup = set(), {}
    for r in rows:
        k = r.get(key)
        if k in seen:
            dup[k] = dup.get(k, 1) + 1
        seen.add(k)
    if not dup:
        return
    first = ", ".join(repr(k) for k in list(dup)[:5]) + (", ..." if len(dup) > 5 else "")
    if path is None:
        raise DuplicateKeyError(f"the rows hold {len(dup)} duplicated {key}(s): {first}")
    raise DuplicateKeyError(
        f"{path} holds {len(dup)} duplicated {key}(s) ({first}): two writers appended to it at once. Repair: "
        f"python -c \"from emokernels.io import dedupe_jsonl; dedupe_jsonl('{path}')\" (keeps the first row of "
        f"each {key}), or delete {path} and rerun the command that wrote it (it starts over)")


def dedupe_jsonl(path, key: str = "key") -> int:
    """Keep the first row of each ``row[key]`` in the JSONL ``path`` (rewritten atomically under
    its output lock). Returns the number of rows dropped."""
    path = Path(path)
    with exclusive_output(path):
        rows, seen, keep = read_jsonl(path), set(), []
        for r in rows:
            if r.get(key) not in seen:
                seen.add(r.get(key))
                keep.append(r)
        if len(keep) < len(rows):
            atomic_write_bytes(path, "".join(json.dumps(r, default=_json_default) + "\n" for r in keep).encode())
    return len(rows) - len(keep)


# ---------------------------------------------------------------------------------------------
# one writer per output
# ---------------------------------------------------------------------------------------------
_held: dict[str, list] = {}  # lock path -> [fd, depth]: re-entrant within this process
_held_guard = threading.Lock()


def lock_path(path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".lock")


@contextlib.contextmanager
def exclusive_output(path, what: str | None = None):
    """Hold an exclusive lock on the output ``path`` (a file or folder) while writing it.

    The lock is a non-blocking ``fcntl.flock`` on the sidecar ``<path>.lock``, which records the
    holder's PID; a second writer raises :class:`OutputLockedError` at once, naming the file and
    that PID. The kernel drops the lock when the holder dies (kill -9 included), so a stale
    sidecar never blocks a rerun. Re-entrant within one process. The sidecar is removed on
    release; after taking the lock the holder checks that the sidecar it locked is still the
    one on disk (a releasing holder may have just unlinked it), else it retries.
    """
    try:
        import fcntl
    except ImportError:  # no flock (Windows): no cross-process guard
        yield
        return
    lp = lock_path(path)
    lp.parent.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(lp)
    with _held_guard:
        if key in _held:
            _held[key][1] += 1
            entry = _held[key]
        else:
            entry = None
    if entry is None:
        while True:
            fd = os.open(lp, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise OutputLockedError(
                    f"{what or path} is being written by another process ({holder}; lock {lp}): two writers would "
                    "interleave rows. Wait for it to finish, stop it, or write to another --out") from None
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.stat(lp).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # locked a sidecar that its previous holder just removed: take the new one
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        entry = [fd, 1]
        with _held_guard:
            _held[key] = entry
    try:
        yield
    finally:
        with _held_guard:
            entry[1] -= 1
            last = entry[1] == 0
            if last:
                del _held[key]
        if last:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lp)
            os.close(entry[0])  # closing the descriptor releases the flock


def _read_holder(fd: int) -> str:
    try:
        pid = os.pread(fd, 64, 0).decode(errors="replace").split()[0]
        return f"PID {int(pid)}"
    except (OSError, ValueError, IndexError):
        return "PID unknown"
