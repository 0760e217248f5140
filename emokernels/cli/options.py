"""Shared command-line options and their validators (imports no torch).

Every subcommand builds its common flags (``--model``, ``--dtype``, ``--out``, ``--limit``,
``--emotions``, ``--backend``, ``--batch-size``, ...) with the ``add_*`` helpers below, so a
flag has one spelling, one parser and one help text (with its default) in every command. The
``check_*`` helpers validate paths and input files; commands call them *before* the model loads,
so a typo costs a second, not a 20 s model load.

The dtype spellings (``--dtype``) are parsed by :mod:`emokernels.dtypes`, the one parser that
``models.load(dtype=...)`` uses too.
"""
from __future__ import annotations

import argparse
import functools
import os
from pathlib import Path

from ..dtypes import dtype_name, resolved_dtype_name  # noqa: F401 (resolved_dtype_name: opt.resolved_dtype_name in the commands)

BACKENDS = ("fused", "reference")


# -- argparse value types ------------------------------------------------------------------------
def arg_type(fn):
    """An argparse ``type=`` whose ValueError message is shown as is (argparse otherwise prints
    only 'invalid <function name> value')."""
    def parse(text):
        try:
            return fn(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    parse.__name__ = fn.__name__
    return parse


@arg_type
def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise ValueError(f"expected a whole number >= 1, got {text!r}") from None
    if v < 1:
        raise ValueError(f"must be >= 1, got {v}")
    return v


@arg_type
def nonnegative_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise ValueError(f"expected a whole number >= 0, got {text!r}") from None
    if v < 0:
        raise ValueError(f"must be >= 0, got {v}")
    return v


@arg_type
def finite_float(text: str) -> float:
    import math

    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"must be a finite number, got {text!r}")
    return v


@arg_type
def dtype_arg(text: str) -> str:
    return dtype_name(text)


@arg_type
def emotions_arg(text: str) -> tuple[str, ...]:
    """A comma list of emotions: not empty, each known, no duplicates."""
    from ..data.labels import EMOTIONS, check_emotions

    names = [x.strip() for x in text.split(",")]
    if not any(names):
        raise ValueError(f"is empty: give a comma list of {', '.join(EMOTIONS)}, or leave the flag out for all six")
    if "" in names:
        raise ValueError(f"has an empty item in {text!r}")
    return check_emotions(names)


@arg_type
def valences_arg(text: str) -> tuple[str, ...]:
    from ..data.labels import VALENCES, check_valences

    names = [x.strip() for x in text.split(",")]
    if not any(names):
        raise ValueError(f"is empty: give a comma list of {', '.join(VALENCES)}, or leave the flag out for all three")
    if "" in names:
        raise ValueError(f"has an empty item in {text!r}")
    return check_valences(names)


def parse_layers(text: str) -> list[int]:
    """``'a-b'`` (inclusive, a ≤ b) or ``'a,b,c'`` (distinct) -> sorted 0-based layer indices."""
    text = text.strip()
    try:
        if "-" in text and "," not in text:
            lo, hi = (int(x) for x in text.split("-"))
            if lo > hi:
                raise ValueError(f"range {text!r} runs backwards: write the lower layer first ('{hi}-{lo}')")
            layers = list(range(lo, hi + 1))
        else:
            layers = [int(x) for x in text.split(",")]
    except ValueError as e:
        if "backwards" in str(e):
            raise
        raise ValueError(f"expected layers as 'a-b' or 'a,b,c' (0-based), got {text!r}") from None
    if any(l < 0 for l in layers):
        raise ValueError(f"layers are 0-based and >= 0, got {text!r}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layer given twice in {text!r}")
    return sorted(layers)


layers_arg = arg_type(parse_layers)


# -- help ----------------------------------------------------------------------------------------
class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout and appends ``(default: X)`` to every option that has a
    default worth showing (not None / False, not already in the text)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or "default" in text.lower() or action.default in (None, False, argparse.SUPPRESS):
            return text
        if not action.option_strings:
            return text
        return text + " (default: %(default)s)"


@functools.lru_cache(maxsize=None)
def split_size(split: str) -> int | None:
    """Number of skeletons of a packaged split (counts lines; no parsing), None for other names."""
    from ..data.sev import SPLITS, split_path

    if split not in SPLITS:
        return None
    return sum(1 for line in split_path(split).read_text(encoding="utf-8").splitlines() if line.strip())


def _whole_split(split: str, per_skeleton: int | None) -> str:
    n = split_size(split)
    if n is None:
        return "the whole split"
    if per_skeleton:
        return f"the whole {split} split = {n} skeletons = {n * per_skeleton:,} prompts"
    return f"the whole {split} split = {n} skeletons"


# -- option builders -----------------------------------------------------------------------------
def add_model(p, required: bool = True, default: str | None = None) -> None:
    p.add_argument("--model", required=required, default=default,
                   help="zoo name (smollm2-135m, qwen2.5-coder-0.5b, qwen2.5-coder-1.5b), tiny-<family>, a local "
                        "Hugging Face folder or .gguf file, or a Hub id org/name"
                        + (f" (default: {default})" if default else ""))


def add_dtype(p, default: str) -> None:
    p.add_argument("--dtype", type=dtype_arg, default=default, metavar="{auto,fp32,bf16,fp16}",
                   help="weights and compute precision; also float32/bfloat16/float16. auto: bf16 on CUDA and on CPUs "
                        f"with native bf16 matmuls, else fp32 (default: {default})")


def add_out(p, kind: str, required: bool = True, default: str | None = None, help: str = "") -> None:
    what = {"file": "output file", "dir": "output folder"}[kind]
    p.add_argument("--out", required=required, default=default, help=help or what)


def add_split(p, default: str, help: str = "") -> None:
    p.add_argument("--split", default=default, help=help or "SEV split: train | test | a SEV JSONL path")


def add_limit(p, split: str, flag: str = "--limit", per_skeleton: int | None = 18, default: int | None = None,
              help: str = "") -> None:
    dflt = f"default: {default}" if default is not None else f"default: {_whole_split(split, per_skeleton)}"
    p.add_argument(flag, type=positive_int, default=default, metavar="N",
                   help=(help or "the first N skeletons of the split") + f" ({dflt})")


def add_emotions(p) -> None:
    p.add_argument("--emotions", type=emotions_arg, default=None,
                   help="comma list of anger, sadness, happiness, fear, surprise, disgust (default: all six)")


def add_backend(p, default: str = "fused") -> None:
    p.add_argument("--backend", choices=BACKENDS, default=default,
                   help="patch backend: fused kernels or the pure-PyTorch reference hooks")


def add_batch_size(p, default: int, help: str = "sequences per forward") -> None:
    p.add_argument("--batch-size", type=positive_int, default=default, metavar="N", help=help)


def add_max_new_tokens(p, default: int | None, help: str = "") -> None:
    p.add_argument("--max-new-tokens", type=positive_int, default=default, metavar="N",
                   help=help or "tokens generated per reply")


def add_judge(p, flag: str = "--judge", default: str | None = "DEFAULT", extra_choices: tuple = (), help: str = "") -> None:
    """A judge name of ``emokernels.judge.JUDGES`` (default: the measured best, ``judge.DEFAULT``)."""
    from ..judge.base import DEFAULT, JUDGES

    p.add_argument(flag, default=DEFAULT if default == "DEFAULT" else default,
                   choices=list(JUDGES) + list(extra_choices), help=help or "emotion judge")


def add_progress(p) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


# -- path checks (before the model loads) --------------------------------------------------------
def _check_parent(path: Path, flag: str) -> None:
    """The nearest existing ancestor of ``path`` must be a writable folder."""
    anc = path.parent
    while not anc.exists():
        if anc == anc.parent:
            break
        anc = anc.parent
    if anc.exists() and not anc.is_dir():
        raise ValueError(f"{flag} {path}: {anc} is a file, not a folder")
    if anc.exists() and not os.access(anc, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: the folder {anc} is not writable")


def check_out_file(path, flag: str = "--out") -> Path:
    """An output file path: not an existing folder, its folder creatable and writable."""
    path = Path(path)
    if str(path).endswith(os.sep) or path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file path (e.g. {path / 'out.jsonl'})")
    _check_parent(path, flag)
    return path


def check_out_dir(path, flag: str = "--out") -> Path:
    """An output folder: not an existing file, creatable and writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file; give a folder")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"{flag} {path}: the folder is not writable")
        return path
    _check_parent(path, flag)
    return path


def check_in_file(path, flag: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{flag} {path}: no such file")
    if not path.is_file():
        raise ValueError(f"{flag} {path} is a folder; give a file")
    return path


def check_artifact(path, flag: str, name: str, written_by: str) -> Path:
    """A safetensors + JSON artifact given as ``x.safetensors`` / ``x.json`` or as a folder holding
    ``<name>.safetensors``; both files must exist."""
    path = Path(path)
    base = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path / name
    missing = [str(f) for f in (base.with_suffix(".safetensors"), base.with_suffix(".json")) if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{flag} {path}: missing {' and '.join(missing)} (written by `{written_by}`)")
    return path


def check_limit(split, limit: int | None, flag: str = "--limit") -> None:
    """``limit`` must not exceed the split's skeleton count (it was silently cut before)."""
    if limit is None:
        return
    from ..data.sev import load_split

    n = len(load_split(split))
    if limit > n:
        raise ValueError(f"{flag} {limit} exceeds the {n} skeletons of the {split} split (use {n} or less, or leave it out)")


def wrote(path, detail: str = "") -> None:
    """The last line of every command: what it wrote."""
    print(f"wrote {path}" + (f" ({detail})" if detail else ""), flush=True)
