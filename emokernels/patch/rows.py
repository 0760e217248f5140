r"""One resolver for *who gets what*: layers, table rows, strengths and emotion names.

Every entry point of the control layer (``Intervention``, ``patch()``, :class:`Steering`,
circuits and compiled circuits) funnels its per-row arguments through these functions, so the
rules below hold identically for every backend (they run before any kernel is chosen):

* **layers**: an int ``ℓ`` or an iterable of ints; empty, duplicates (an edit would apply
  twice), bools and floats (``1.7``, also ``2.0``: a layer is an index, not a number) are errors.
* **rows** (which table row each batch row reads): ``None`` (row 0), an int, or an integer
  tensor / list [B]; every value must lie in ``[0, E)`` for a table of ``E`` rows. No negative
  indexing: ``-1`` is an error, not the last row. Floats and bools are errors, not truncated.
* **strength** ``s``: a finite real number, or a finite float tensor / list [B] (a 0-d tensor
  broadcasts over the batch). Strings, bools, NaN and ±inf are errors.
* **emotions**: a name or an id into a tuple of emotion names, or one per batch row.
  :func:`emotion_rows` turns them into a table ``(emotions the table holds, rows)``; an unknown
  name is a ValueError that lists the valid ones.

``patch()`` adds the checks that need the model (``PatchHandle._prepare``): layers in range,
tables finite with the site's width, edit ids integer / distinct / in range, rows < E. A
steering table (``op="add_rms"``) whose row used by some batch row is all zeros at some layer is
an **error**, not a warning: that row would be steered by nothing and the output would look
like a valid result. Zero rows no batch row uses are fine (a directions file with one emotion
missing still steers the others), and ``add`` tables may hold zero rows (a circuit's biases are
zero where an emotion selects nothing at a layer).

Tensors are checked here once (a host read at ``patch()`` time); what depends on the batch (B)
is checked per forward call in :func:`per_row` from shapes only, with no host sync, so a patched
decode step still compiles with ``fullgraph=True``.
"""
from __future__ import annotations

import math
import numbers
import operator
from typing import Sequence

import torch

__all__ = ["as_layers", "check_layers", "emotion_index", "emotion_rows", "resolve_rows", "resolve_strength",
           "check_finite", "per_row"]


def _int_like(x) -> int | None:
    """``x`` as an int if it is an integer scalar (int, numpy integer, 0-d integer tensor), else None."""
    if isinstance(x, bool) or (isinstance(x, torch.Tensor) and x.dtype == torch.bool):
        return None
    try:
        return operator.index(x)
    except TypeError:
        return None


def as_layers(layers, what: str = "layers") -> tuple[int, ...]:
    """``layers`` -> a tuple of distinct ints (an int ``ℓ`` means ``(ℓ,)``); the order is kept."""
    if isinstance(layers, (str, bytes)):
        raise TypeError(f"{what}= must be an int or a sequence of ints, got the string {layers!r}")
    one = _int_like(layers)
    if one is not None:
        return (one,)
    if isinstance(layers, bool) or isinstance(layers, numbers.Number):
        raise TypeError(f"{what}= must be integer layer indices, got {layers!r}")
    try:
        items = list(layers)
    except TypeError:
        raise TypeError(f"{what}= must be an int or a sequence of ints, got {type(layers).__name__}") from None
    out = []
    for x in items:
        i = _int_like(x)
        if i is None:
            raise TypeError(f"{what}= must be integer layer indices, got {x!r} ({type(x).__name__}); "
                            "layers are not rounded")
        out.append(i)
    if not out:
        raise ValueError(f"{what}= is empty: name at least one layer (an intervention on no layer does nothing)")
    dup = sorted({l for l in out if out.count(l) > 1})
    if dup:
        raise ValueError(f"{what}= lists layers {dup} more than once (the edit would be applied twice)")
    return tuple(out)


def check_layers(layers: Sequence[int], num_layers: int, what: str = "layers") -> None:
    """IndexError naming the first layer outside ``[0, num_layers)``."""
    for l in layers:
        if not 0 <= l < num_layers:
            raise IndexError(f"{what}: layer {l} out of range: the model has {num_layers} layers (0..{num_layers - 1})")


# -- emotions -------------------------------------------------------------------------------------
def emotion_index(emotions: Sequence[str], emotion, owner: str = "") -> int:
    """The id of ``emotion`` (a name, or an id) in ``emotions``; ValueError naming the valid ones."""
    where = f" in {owner}" if owner else ""
    if isinstance(emotion, str):
        if emotion not in emotions:
            raise ValueError(f"unknown emotion {emotion!r}{where}: use one of {', '.join(emotions)}")
        return list(emotions).index(emotion)
    i = _int_like(emotion)
    if i is None:
        raise TypeError(f"an emotion is a name ({', '.join(emotions)}) or an id, got {emotion!r} "
                        f"({type(emotion).__name__})")
    if not 0 <= i < len(emotions):
        raise ValueError(f"emotion id {i} out of range 0..{len(emotions) - 1}{where} ({', '.join(emotions)})")
    return i


def emotion_rows(emotions: Sequence[str], emotion, distinct: bool = False, owner: str = ""):
    """Per-row emotions -> ``(table emotions, rows)``.

    ``emotion``: a name / id (rows is an int), or one per batch row (a list, or an integer tensor
    [B]; rows is int64 [B]). ``distinct=False``: the table holds all of ``emotions`` and rows are
    their ids. ``distinct=True``: the table holds only the requested emotions, in first-seen
    order (a circuit builds its edit tables for those alone), and rows index that list.
    """
    if emotion is None:
        raise ValueError(f"no emotion given: pass emotion= (one of {', '.join(emotions)}, or a list with one "
                         "name per batch row)")
    if isinstance(emotion, (str, bool)) or _int_like(emotion) is not None or not hasattr(emotion, "__iter__"):
        i = emotion_index(emotions, emotion, owner)
        return ([emotions[i]], 0) if distinct else (list(emotions), i)
    if isinstance(emotion, torch.Tensor):
        if emotion.is_floating_point() or emotion.dtype == torch.bool:
            raise TypeError(f"emotion ids must be an integer tensor, got {emotion.dtype}")
        emotion = emotion.flatten().tolist()
    ids = [emotion_index(emotions, e, owner) for e in emotion]
    if not ids:
        raise ValueError("emotion= is an empty list: give one emotion, or one per batch row")
    if not distinct:
        return list(emotions), torch.tensor(ids, dtype=torch.long)
    table = list(dict.fromkeys(ids))
    return [emotions[i] for i in table], torch.tensor([table.index(i) for i in ids], dtype=torch.long)


# -- rows and strengths ---------------------------------------------------------------------------
def resolve_rows(rows, num_rows: int, what: str = "rows", device=None):
    """Validated table rows: an int, or int64 [B] (on ``device``); ``None`` means row 0."""
    if rows is None:
        rows = 0
    i = _int_like(rows)
    if i is not None:
        if not 0 <= i < num_rows:
            raise IndexError(f"{what}={i} out of range: the table has {num_rows} rows (0..{num_rows - 1}); "
                             "negative rows are not allowed")
        return i
    if isinstance(rows, (bool, float, str)) or (isinstance(rows, torch.Tensor) and rows.dim() == 0):
        raise TypeError(f"{what}= must be an int or an integer tensor [B], got {rows!r}")
    if not isinstance(rows, torch.Tensor):
        try:
            rows = list(rows)
        except TypeError:
            raise TypeError(f"{what}= must be an int or an integer tensor [B], got {type(rows).__name__}") from None
        if any(_int_like(x) is None for x in rows):
            raise TypeError(f"{what}= must hold integers, got {rows!r} (rows are not rounded)")
        rows = torch.tensor([operator.index(x) for x in rows], dtype=torch.long)
    if rows.is_floating_point() or rows.is_complex() or rows.dtype == torch.bool:
        raise TypeError(f"{what}= must be an integer tensor, got {rows.dtype} (rows are not rounded)")
    if rows.dim() != 1:
        raise ValueError(f"{what}= must be one table row per batch row, shape [B]; got {tuple(rows.shape)}")
    if rows.numel():
        lo, hi = int(rows.min()), int(rows.max())
        if lo < 0 or hi >= num_rows:
            raise IndexError(f"{what}= holds {lo if lo < 0 else hi}, out of range: the table has {num_rows} rows "
                             f"(0..{num_rows - 1}); negative rows are not allowed")
    return rows.to(device=device, dtype=torch.long)


def check_finite(t: torch.Tensor, what: str) -> None:
    """ValueError if ``t`` holds NaN or ±inf (naming how many and where)."""
    if t.is_floating_point() and t.numel():
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            first = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(f"{what} holds {int(bad.sum())} non-finite value(s) (NaN or inf), first at index {first}")


def resolve_strength(strength, n: int | None = None, what: str = "strength", device=None):
    """Validated strength: a finite float, or a finite fp32 tensor (0-d, or [n] when ``n`` is given)."""
    if isinstance(strength, (str, bytes, bool)) or strength is None:
        raise TypeError(f"{what}= must be a real number or a float tensor [B], got {strength!r} "
                        f"({type(strength).__name__})")
    if isinstance(strength, numbers.Real):
        s = float(strength)
        if not math.isfinite(s):
            raise ValueError(f"{what}={s} is not finite")
        return s
    if not isinstance(strength, torch.Tensor):
        try:
            strength = torch.as_tensor(strength, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"{what}= must be a real number or a float tensor [B], got {strength!r}") from exc
    elif strength.dtype == torch.bool or strength.is_complex():
        raise TypeError(f"{what}= must be a real tensor, got {strength.dtype}")
    s = strength if strength.dtype == torch.float32 else strength.float()
    if s.dim() > 1:
        raise ValueError(f"{what}= must be one value per batch row, shape [B]; got {tuple(s.shape)}")
    if n is not None and s.dim() == 1 and s.numel() != n:
        raise ValueError(f"{what} has {s.numel()} entries, emotion has {n} rows")
    check_finite(s.detach(), f"{what}=")
    return s if device is None else s.to(device)


def per_row(value, B: int, what: str, dtype: torch.dtype, device) -> torch.Tensor:
    """A resolved row / strength value as a [B] tensor for one forward call (shape checks only:
    no host sync, so it traces under ``torch.compile``)."""
    if not isinstance(value, torch.Tensor):
        return torch.full((B,), value, dtype=dtype, device=device)
    if value.dim() == 0:
        return value.to(device=device, dtype=dtype).expand(B)
    if value.shape != (B,):
        raise ValueError(f"{what}= has shape {tuple(value.shape)}, the batch has {B} rows")
    return value if value.device == device else value.to(device)
