r"""Shared capture helpers of the component stage: the pieces neuron scores, head scores, the
per-context diffs and the causal validation all build on.

- :func:`direction_tensors` / :func:`check_dirs`: any accepted form of emotion directions →
  fp32 ``[L, 6, d]`` tensors (attn point = resid_mid, mlp point = resid_post).
- :func:`resolve_layers`: a layer selection checked against the model.
- :func:`sev_units` / :func:`unit_batches`: SEV prompt units → chat-templated, left-padded
  batches with the readout token t*.
- :func:`forward`: one backbone forward with padding-aware positions.
- :class:`Collector` / :func:`run_collectors`: one pass over the batches with every collector's
  ``patch`` interventions installed together.
- :func:`readout_rows`: the readout-token rows of a captured ``[B, T, n]`` site tensor.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import torch

from ..data.labels import EMOTIONS, VALENCES
from ..models.adapters import Adapter
from ..patch import Intervention, patch

__all__ = [
    "direction_tensors", "check_dirs", "resolve_layers", "sev_units", "unit_batches", "forward", "Collector",
    "run_collectors", "readout_rows",
]


# ---------------------------------------------------------------------------------------------
# directions
# ---------------------------------------------------------------------------------------------
def direction_tensors(directions) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(dirs_attn, dirs_mlp)``, each fp32 ``[L, 6, d]``, from any accepted form.

    Accepts a tensor ``[2, L, 6, d]`` (point 0 = attn = resid_mid, point 1 = mlp = resid_post),
    a pair ``(dirs_attn, dirs_mlp)``, a dict with keys ``attn``/``mlp``, or an object (such as
    ``EmotionDirections``) exposing ``.directions`` / ``.tensor`` / ``.vectors`` ``[2, L, 6, d]``
    or ``.attn`` / ``.mlp`` attributes.
    """
    d = directions
    if hasattr(d, "point_index") and isinstance(getattr(d, "directions", None), torch.Tensor):  # EmotionDirections
        d = d.select(EMOTIONS)  # map rows by emotion name (raises naming any missing emotion)
        d = (d.directions[d.point_index("attn")], d.directions[d.point_index("mlp")])
    elif not isinstance(d, (torch.Tensor, tuple, list, dict)):
        for name in ("directions", "tensor", "vectors", "dirs"):
            t = getattr(d, name, None)
            if isinstance(t, torch.Tensor):
                d = t
                break
        else:
            if hasattr(d, "attn") and hasattr(d, "mlp"):
                d = (getattr(d, "attn"), getattr(d, "mlp"))
            else:
                raise TypeError(f"cannot read emotion directions from {type(directions).__name__}: expected a "
                                "[2, L, 6, d] tensor, (dirs_attn, dirs_mlp), {'attn', 'mlp'} or an EmotionDirections")
    if isinstance(d, dict):
        missing = [k for k in ("attn", "mlp") if k not in d]
        if missing:
            raise KeyError(f"direction dict lacks {missing}; it needs 'attn' and 'mlp' ([L, 6, d] each)")
        d = (d["attn"], d["mlp"])
    if isinstance(d, torch.Tensor):
        if d.dim() != 4 or d.shape[0] != 2:
            raise ValueError(f"a direction tensor must be [2, L, 6, d] (attn, mlp), got {tuple(d.shape)}")
        d = (d[0], d[1])
    attn, mlp = (torch.as_tensor(x).float() for x in d)
    for name, t in (("dirs_attn", attn), ("dirs_mlp", mlp)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be [L, 6, d], got {tuple(t.shape)}")
    if attn.shape != mlp.shape:
        raise ValueError(f"dirs_attn {tuple(attn.shape)} and dirs_mlp {tuple(mlp.shape)} differ in shape")
    return attn, mlp


def check_dirs(dirs, adapter: Adapter, name: str) -> torch.Tensor:
    """``[L, 6, d]`` fp32 for this model; an EmotionDirections / [2, L, 6, d] / pair is reduced to
    its attn point (``name == "dirs_attn"``) or mlp point (``"dirs_mlp"``). Raises ValueError
    (naming ``name``) on a shape other than ``[num_layers, 6, hidden_size]`` or non-finite values."""
    if not isinstance(dirs, torch.Tensor) or dirs.dim() == 4:
        attn, mlp = direction_tensors(dirs)
        dirs = attn if name == "dirs_attn" else mlp
    dirs = torch.as_tensor(dirs).float()
    want = (adapter.num_layers, len(EMOTIONS), adapter.hidden_size)
    if tuple(dirs.shape) != want:
        raise ValueError(f"{name} must be [L, 6, d] = {list(want)} for this model, got {list(dirs.shape)}")
    if not torch.isfinite(dirs).all():
        raise ValueError(f"{name} holds non-finite values")
    return dirs


def resolve_layers(adapter: Adapter, layers) -> tuple[int, ...]:
    """The layer indices ``layers`` (``None``: all ``adapter.num_layers``) as a tuple, in the given
    order; IndexError on one outside ``[0, num_layers)``, ValueError on a duplicate."""
    if layers is None:
        return tuple(range(adapter.num_layers))
    out = tuple(int(l) for l in layers)
    bad = [l for l in out if not 0 <= l < adapter.num_layers]
    if bad:
        raise IndexError(f"layers {bad} out of range for a {adapter.num_layers}-layer model")
    if len(set(out)) != len(out):
        raise ValueError(f"duplicate layers in {list(out)}")
    return out


# ---------------------------------------------------------------------------------------------
# samples and batches
# ---------------------------------------------------------------------------------------------
def sev_units(skeletons, emotions: Sequence[str] = EMOTIONS, valences: Sequence[str] = VALENCES,
              keep: Iterable[str] | None = None) -> list:
    """Emotion-prompt units (:class:`~.capture.CaptureUnit`) in group-major order (skeleton,
    valence, emotion), so a context's six prompts are adjacent. ``keep``: optional set of unit
    keys (e.g. judge-accepted ones, :func:`~.capture.load_accepted_keys`) to retain."""
    from .capture import prompt_units

    return prompt_units(skeletons, emotions, valences, accepted=None if keep is None else set(keep))


def _emotion_id(e) -> int:
    """Index into ``EMOTIONS`` of an emotion name or id."""
    if isinstance(e, str):
        if e not in EMOTIONS:
            raise ValueError(f"unknown emotion {e!r}: use one of {EMOTIONS}")
        return EMOTIONS.index(e)
    return int(e)


def unit_batches(tokenizer, units: Sequence, batch_size: int = 6, config=None, neutral: bool = False,
                 device=None) -> Iterator[dict]:
    """Chat-templated, left-padded batches of ``units`` (``key``, ``group``, ``emotion`` name or
    id, ``user``; e.g. :func:`sev_units`): the emotion prompt of each unit's target
    (``neutral=True``: the neutral system prompt for every row; ``emotion`` still names the
    target the row is scored for).

    Yields dicts ``input_ids``/``attention_mask`` [B, T], ``readout`` [B] (t*), ``emotion``
    int64 [B], ``groups``/``keys`` (lists of str).
    """
    from ..data.prompts import PromptConfig, chat_messages, encode, render

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    config = config or PromptConfig()
    bad = [u.key for u in units if getattr(u, "reply", None) is not None]
    if bad:
        raise ValueError(f"component scores read the prompt's readout token; text units (with a reply) are not "
                         f"supported: {bad[:3]}")
    for i in range(0, len(units), batch_size):
        chunk = units[i : i + batch_size]
        ids = [_emotion_id(u.emotion) for u in chunk]
        texts = [render(tokenizer, chat_messages(u.user, None if neutral else EMOTIONS[e], config), config)
                 for u, e in zip(chunk, ids)]
        batch = encode(tokenizer, texts, padding_side="left", device=device)
        batch["emotion"] = torch.tensor(ids, dtype=torch.long, device=device)
        batch["groups"] = [u.group for u in chunk]
        batch["keys"] = [u.key for u in chunk]
        yield batch


def forward(model, batch: dict):
    """One prompt forward of the backbone (no LM head, no cache) with padding-aware position ids.
    Returns the backbone output (``last_hidden_state`` = final-norm state ĥ)."""
    mask = batch["attention_mask"]
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    backbone = Adapter.of(model).backbone
    dev = next(model.parameters()).device
    return backbone(input_ids=batch["input_ids"].to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                    use_cache=False)


# ---------------------------------------------------------------------------------------------
# one-pass runner
# ---------------------------------------------------------------------------------------------
class Collector:
    """Something that reads the forward pass of every batch through ``patch`` interventions.

    ``interventions()`` is called once; ``begin(batch)`` before and ``end(batch)`` after each
    forward. ``state_dict()`` / ``load_state_dict()`` make a run resumable.
    """

    def interventions(self) -> list[Intervention]:
        return []

    def begin(self, batch: dict) -> None:
        pass

    def end(self, batch: dict) -> None:
        pass

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass


def run_collectors(model, batches: Iterable[dict], collectors: Sequence[Collector], total: int | None = None,
                   progress: bool = True, backend: str = "reference", on_batch=None, desc: str = "components") -> int:
    """Run every batch through ``model`` once with all collectors' interventions; returns #rows.

    ``on_batch(n_rows_done)`` is called after each batch (checkpointing)."""
    from tqdm.auto import tqdm

    ivs = [iv for c in collectors for iv in c.interventions()]
    done = 0
    bar = tqdm(total=total, desc=desc, unit="prompt", disable=not progress)
    with torch.no_grad(), patch(model, *ivs, backend=backend):
        for batch in batches:
            for c in collectors:
                c.begin(batch)
            forward(model, batch)
            for c in collectors:
                c.end(batch)
            n = int(batch["input_ids"].shape[0])
            done += n
            bar.update(n)
            if on_batch is not None:
                on_batch(done)
    bar.close()
    return done


def readout_rows(x: torch.Tensor, state) -> torch.Tensor:
    """Row b of ``x`` ``[B, T, n]`` at its readout token ``state.readout[b]`` (t*): fp32 ``[B, n]``.
    ``state`` is the capture state a ``patch`` capture ``fn`` receives."""
    return x[torch.arange(x.shape[0], device=x.device), state.readout].float()
