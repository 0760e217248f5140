r"""Discovery on several processes with ``torch.distributed`` (``torchrun``; gloo on CPU, NCCL on GPU).

The capture of :func:`.capture.capture` is sharded by **context group**: group i (in the
first-seen order of :func:`.capture.order_by_group`) goes to rank ``i mod W``, so every group is
closed on one rank with all its emotions. This matters because a group's centring
``x_{g,e} - μ_g`` needs all of them. Each rank streams its groups into its own
:class:`.capture.GroupAccumulator`, and the accumulators are then all-reduced:

    S   = Σ_r S_r          (fp64 [P, L, E, d]; also the per-valence and per-theme sums)
    n   = Σ_r n_r          (complete groups), σ_sum, σ_n likewise

``S / n`` is then the centroid of the single-process run, up to the order of the fp64 sums. Kept
per-unit states (``keep_states``) are gathered and put back in the single-process unit order.
Every rank returns the same :class:`.capture.CaptureResult`.

Component scores work the same way. Each rank streams its shard through
:func:`.collect.run_collectors`, then :func:`all_reduce_collectors` sums the collectors' states
(neuron contribution sums, head Δ sums). ``emokernels components`` does not call it yet.

Run it with ``torchrun --nproc-per-node N -m emokernels.cli directions ...``. The command calls
:func:`init_from_env`, which joins the process group that ``torchrun`` describes in the
environment (``WORLD_SIZE`` > 1); a plain ``python`` run stays single-process.
"""
from __future__ import annotations

import atexit
import hashlib
import os
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import torch

__all__ = ["init_from_env", "rank_world", "is_main", "shard_by_group", "all_reduce_accumulator",
           "all_reduce_collectors", "capture_sharded"]


def rank_world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group, or ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on rank 0 (and in a single-process run): the rank that writes outputs."""
    return rank_world()[0] == 0


def init_from_env() -> bool:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1 in the environment).

    Backend: NCCL when CUDA is available (each rank on ``cuda:LOCAL_RANK``), else gloo. Returns
    True when this process is one of several ranks. Without ``WORLD_SIZE`` (a plain run), or
    with one rank, nothing is initialised and it returns False. A group that is already
    initialised is used as it is.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return dist.get_world_size() > 1


def shard_by_group(units: Sequence, rank: int, world: int) -> list:
    """The units of the groups ``rank`` owns: group i (first-seen order) goes to rank ``i mod world``."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} out of range for world size {world}")
    owner: dict[str, int] = {}
    for u in units:
        owner.setdefault(u.group, len(owner) % world)
    return [u for u in units if owner[u.group] == rank]


def _reduce_device() -> torch.device:
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    buf = t.to(_reduce_device(), copy=True)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    return buf.to(t.device)


def _gather(obj) -> list:
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_accumulator(acc, group_order: Sequence[str] = ()):
    """Merge every rank's finished :class:`.capture.GroupAccumulator` into ``acc`` (in place).

    The sums and counts are all-reduced. The per-valence and per-theme sums are reduced over the
    union of the ranks' keys, with zeros where a rank saw none. ``dropped`` becomes every rank's
    list, ordered by ``group_order`` when given. Every rank must call this; pending (unclosed)
    groups are an error, because their units may be split across ranks.
    """
    if acc.pending:
        raise ValueError(f"all_reduce_accumulator: groups still open on this rank: {list(acc.pending)[:5]}; "
                         "call finish() first")
    metas = _gather(dict(shape=list(acc.shape), n_groups=acc.n_groups, sigma_n=acc.sigma_n,
                         n_valence=acc.n_valence, n_theme=acc.n_theme, dropped=acc.dropped))
    shapes = {tuple(m["shape"]) for m in metas}
    if len(shapes) != 1:
        raise ValueError(f"all_reduce_accumulator: ranks hold accumulators of different shapes {sorted(shapes)}")
    acc.sum = _all_reduce_sum(acc.sum)
    acc.sigma_sum = _all_reduce_sum(acc.sigma_sum)
    acc.n_groups = sum(m["n_groups"] for m in metas)
    acc.sigma_n = sum(m["sigma_n"] for m in metas)
    for sums, counts, key in ((acc.by_valence, acc.n_valence, "n_valence"), (acc.by_theme, acc.n_theme, "n_theme")):
        names = sorted({k for m in metas for k in m[key]})
        for k in names:  # the same order on every rank: one collective per name
            sums[k] = _all_reduce_sum(sums.get(k, torch.zeros(acc.shape, dtype=torch.float64)))
            counts[k] = sum(m[key].get(k, 0) for m in metas)
    rank_of = {g: i for i, g in enumerate(group_order)}
    acc.dropped = sorted((g for m in metas for g in m["dropped"]), key=lambda g: rank_of.get(g, len(rank_of)))
    return acc


def all_reduce_collectors(collectors: Sequence) -> Sequence:
    """Sum every tensor of each collector's ``state_dict()`` over the ranks and load it back (in place).

    This is right for collectors whose state is sums and counts over rows:
    :class:`.neurons.NeuronAccumulator` (C, C_pos, C_neg, H sums and counts) and
    :class:`.heads.HeadAccumulator` (Δ, Δ² and baseline sums and counts). After it, ``result()``
    equals the single-process one, whatever rows each rank streamed. Every rank must pass the
    same kinds of collectors in the same order.
    """
    for c in collectors:
        state = c.state_dict()
        c.load_state_dict({k: _all_reduce_sum(state[k]) for k in sorted(state)})
    return collectors


def _units_digest(units: Sequence) -> str:
    h = hashlib.sha256()
    for u in units:
        h.update(repr((u.key, u.group, u.emotion, u.user, u.reply)).encode())
    return h.hexdigest()


def capture_sharded(model, tokenizer, units: Sequence, *, checkpoint=None, progress: bool = True, **kwargs):
    """:func:`.capture.capture` with the groups sharded over the ranks; every rank gets the merged result.

    Every rank must pass the same ``units`` (checked: a clear error names the ranks that differ).
    ``checkpoint``: each rank keeps its own ``<checkpoint>-rank<r>of<W>`` while it captures, so a
    rerun with the same world size resumes. The per-rank checkpoints are removed once the
    shards are merged. Only rank 0 shows a progress bar.
    """
    from ..models.adapters import Adapter
    from .capture import POINTS, CaptureResult, GroupAccumulator, capture, order_by_group

    rank, world = rank_world()
    if world == 1:
        return capture(model, tokenizer, units, checkpoint=checkpoint, progress=progress, **kwargs)
    digests = _gather(_units_digest(units))
    if len(set(digests)) != 1:
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        raise ValueError(f"capture_sharded: ranks {differ} were given other units than rank 0; every rank must "
                         "pass the same units (the shards are taken from them)")
    if not units or len({u.reply is None for u in units}) != 1:
        # no units, or prompt and text units mixed: capture() raises the same error on every rank
        return capture(model, tokenizer, units, checkpoint=checkpoint, progress=progress, **kwargs)
    mode = "prompt" if units[0].reply is None else "text"
    units = order_by_group(units)
    mine = shard_by_group(units, rank, world)
    ck = None
    if checkpoint is not None:  # capture() writes <ck>.safetensors / .json: keep the rank in the stem
        base = Path(checkpoint).with_suffix("")
        ck = base.with_name(f"{base.name}-rank{rank}of{world}")
    if mine:
        res = capture(model, tokenizer, mine, checkpoint=ck, progress=progress and rank == 0, **kwargs)
    else:  # more ranks than groups: this rank contributes nothing, but joins every collective
        a = Adapter.of(model)
        acc = GroupAccumulator(len(POINTS), a.num_layers, a.hidden_size) if kwargs.get("accumulate", True) else None
        res = CaptureResult(mode=mode, accumulator=acc, num_layers=a.num_layers, hidden_size=a.hidden_size,
                            paper_final_norm=kwargs.get("paper_final_norm", False))
    group_order = list(dict.fromkeys(u.group for u in units))
    if res.accumulator is not None:
        all_reduce_accumulator(res.accumulator, group_order)
    parts = _gather((res.keys, None if res.states is None else res.states.cpu(), res.state_layers))
    states = None
    if any(p[1] is not None for p in parts):
        row = {k: (r, i) for r, (keys, _, _) in enumerate(parts) for i, k in enumerate(keys)}
        states = torch.stack([parts[row[u.key][0]][1][row[u.key][1]] for u in units])
    state_layers = next((p[2] for p in parts if p[2]), res.state_layers)
    if ck is not None:
        for f in (ck.with_suffix(".safetensors"), ck.with_suffix(".json")):
            f.unlink(missing_ok=True)
    return replace(res, mode=mode, keys=[u.key for u in units],
                   emotions=[u.emotion for u in units], groups=[u.group for u in units],
                   valences=[u.valence for u in units], themes=[u.theme for u in units],
                   states=states, state_layers=state_layers)
