"""``patch(model, *interventions)``: apply interventions inside a HF model's forward pass.

The engine places PyTorch hooks at the adapter's sites and calls the ops in ``emokernels.ops``
(``backend="reference"`` = pure torch, the oracle; ``"fused"`` = the fastest kernel for the
tensors' device). With a non-reference backend, edits and reads at the residual points ride
inside fused decoder layers instead of hooks (``emokernels.patch.fused_layers``: residual add +
edit + RMSNorm in one pass). It works with ``model(...)`` and ``model.generate(...)`` with a
KV cache, with batches that carry different table rows (emotions) and strengths per row, and
lets gradients flow (every op is out of place).

Position bookkeeping: a pre-hook on the backbone sees each forward call. With no cache (or an
empty one) the call is a *prefill*: t* per row is taken from the call's ``readout=`` override,
else from the attention mask (last real token: right for left and right padding). Later calls
(KV-cached decode) continue at absolute index ``past + arange(T)``. Position masks [B, T] are
built from tensors only (no host sync).

``torch.compile``: prefill eagerly under the patch, then compile the decode step with a static
cache (what transformers' ``generate`` does). A static cache keeps its length on the device; the
engine then keeps it a tensor (``abs_pos = past + arange(T)``, t* from the eager prefill), so the
patched step compiles with ``fullgraph=True`` and without a host sync that would cost CUDA graphs.

Exit restores the model exactly: hooks are removed and no parameter is ever written, so
outputs are bitwise identical to before, also when the block raised.
"""
from __future__ import annotations

from collections import defaultdict
from contextlib import ContextDecorator

import torch

from ..models.adapters import Adapter
from ..ops.backends import resolve_backend
from .rows import check_finite, check_layers, per_row, resolve_rows, resolve_strength
from .spec import Intervention

_BACKENDS = ("reference", "fused", "auto", "cpu", "triton", "cuda")
_TRACED_READOUT = ("readout captures need to know whether a call is the prefill; under torch.compile with a static "
                   "cache that is a device value: run the prefill eagerly (as transformers' generate does)")


class PatchState:
    """Per-forward-call position info shared by all hooks of one patch."""

    def __init__(self):
        self.readout: torch.Tensor | None = None  # int64 [B], absolute index of t* (this call)
        self._prefill_readout: torch.Tensor | None = None  # t* set by the last eager prefill
        self.readout_override: torch.Tensor | None = None
        self.readout_max: int | None = None  # max(readout_override), read once when it is set
        self.prefill = True
        self.past = 0
        self._masks: dict[tuple, torch.Tensor] = {}
        self.rows_cache: dict[int, tuple] = {}  # id(intervention) -> (rows [B], strength [B]) for this call
        self.abs_pos: torch.Tensor | None = None  # int64 [T]
        self.batch = 0

    def begin(self, batch: int, T: int, past, attention_mask, device):
        """Start a forward call. ``past`` is the cached length: an int, or a 0-d tensor (a static
        cache under ``torch.compile``, where reading it on the host would break the graph)."""
        self.batch = batch
        self._masks = {}
        self.rows_cache = {}
        if isinstance(past, torch.Tensor):  # traced: no host sync, no python branch on the value
            if self._prefill_readout is None or self._prefill_readout.shape[0] != batch:
                raise RuntimeError("under torch.compile with a static cache, run the prefill eagerly under the "
                                   "patch first (as transformers' generate does) and compile the decode steps")
            self.past, self.prefill = past, None
            self.abs_pos = past.to(device=device, dtype=torch.long) + torch.arange(T, device=device)
            # written for this call only (a CUDA-graph output must not be read by the next call)
            self.readout = torch.where(past == 0, self._fresh_readout(batch, T, attention_mask, device),
                                       self._prefill_readout)
            return
        self.past, self.prefill = past, past == 0
        self.abs_pos = torch.arange(past, past + T, device=device)
        if self.prefill:
            self.readout = self._prefill_readout = self._fresh_readout(batch, T, attention_mask, device)
        elif self._prefill_readout is None or self._prefill_readout.shape[0] != batch:
            raise RuntimeError("a cached forward call came before any prefill under this patch")
        else:
            self.readout = self._prefill_readout

    def _fresh_readout(self, batch: int, T: int, attention_mask, device) -> torch.Tensor:
        """t* of a prefill call: the ``readout=`` override, else the last real token of each row."""
        if self.readout_override is not None:
            r = self.readout_override.to(device=device, dtype=torch.long)
            if r.shape != (batch,):
                raise ValueError(f"readout= must have shape [{batch}], got {tuple(r.shape)}")
            if self.readout_max >= T:
                raise IndexError(f"readout= holds {self.readout_max}, outside this call's sequence of {T} tokens "
                                 f"(0..{T - 1})")
            return r
        if attention_mask is not None:
            from ..data.prompts import readout_positions

            return readout_positions(attention_mask[:, :T])  # a prefill: past = 0
        return torch.full((batch,), T - 1, device=device, dtype=torch.long)

    def mask(self, positions: tuple[str, ...]) -> torch.Tensor:
        m = self._masks.get(positions)
        if m is None:
            pos = self.abs_pos[None, :]
            r = self.readout[:, None]
            m = torch.zeros((self.batch, pos.shape[1]), dtype=torch.bool, device=pos.device)
            for p in positions:
                if p == "all":
                    m = m | True
                elif p == "readout":
                    m = m | (pos == r)
                elif p == "prompt":
                    m = m | (pos <= r)
                elif p == "generated":
                    m = m | (pos > r)
            self._masks[positions] = m
        return m


def _past_length(kwargs) -> "int | torch.Tensor":
    cache = kwargs.get("cache", None)
    if cache is None:
        cache = kwargs.get("past_key_values", None)
    if cache is None:
        return 0
    try:
        n = cache.get_seq_length()
    except Exception:  # legacy tuple caches
        return int(cache[0][0].shape[-2])
    if isinstance(n, torch.Tensor):  # static caches keep the length on the device
        return n if torch.compiler.is_compiling() else int(n)
    return int(n)


class PatchHandle(ContextDecorator):
    """Returned by :func:`patch`. Use as a context manager or call :meth:`remove`."""

    def __init__(self, model, interventions: list[Intervention], backend: str = "reference"):
        if backend not in _BACKENDS:
            raise ValueError(f"unknown backend {backend!r}: use one of {_BACKENDS}")
        self.model = model
        self.adapter = Adapter.of(model)
        self.backend = "reference" if backend == "reference" else (None if backend in ("fused", "auto") else backend)
        self.state = PatchState()
        self.captures: dict[str, dict[int, list]] = defaultdict(lambda: defaultdict(list))
        self._hooks: list = []
        self._mid_h: dict[int, torch.Tensor] = {}
        self._fused = None  # fused decoder layers (emokernels.patch.fused_layers), non-reference backends
        self._device = home_device(model)
        # resolved once per patch: a backend that cannot run here fails now, not at the first call
        self.resolved_backend = "reference" if self.backend == "reference" else resolve_backend(self._device, self.backend)
        self.interventions = [self._prepare(iv) for iv in interventions]
        try:
            self._install()
        except BaseException:
            self.remove()
            raise

    # -- setup -----------------------------------------------------------------------------
    def _width(self, site: str) -> int:
        a = self.adapter
        return {"heads": a.num_heads * a.head_dim, "neurons": a.intermediate_size}.get(site, a.hidden_size)

    def _prepare(self, iv: Intervention) -> Intervention:
        """Validate ``iv`` against the model; return a copy with its tables, rows and strength on
        the model's device.

        Everything that does not depend on the batch is checked here, once, identically for every
        backend: layers in range; tables finite, with the site's width; edit ids integer, distinct
        and in range, with scale/add tables of the index's length; rows in ``[0, E)`` for tables
        of E rows; a finite strength; no steering (``add_rms``) with an all-zero vector (an error
        naming the layer and row: it would change nothing, silently; zero rows that no batch row
        uses are allowed, and ``add`` tables may hold zero rows, as a circuit's biases do where
        an emotion selects nothing). The checks run where the tables are (usually the CPU) before
        they move, and raise before anything is installed, so a bad argument leaves the model as
        it was.
        """
        a = self.adapter
        name = f"intervention {iv.name or f'{iv.site}.{iv.op}'!r}"
        check_layers(iv.layers, a.num_layers, name)
        width = self._width(iv.site)
        tables = {}
        for key in ("vectors", "index", "scale", "add", "directions"):
            m = getattr(iv, key)
            tables[key] = None if m is None else {l: _table(m[l], f"{name}: {key}[{l}]", key, iv.site, width,
                                                              a.head_dim) for l in iv.layers}
        rows, strength = iv.rows, iv.strength
        if iv.op not in ("capture", "project"):
            rows = resolve_rows(rows, self._table_rows(iv, tables, name), f"{name}: rows")
            strength = resolve_strength(strength, what=f"{name}: strength")
            if iv.op == "add_rms":  # steering towards a zero vector changes nothing: say so
                used = torch.tensor([rows]) if isinstance(rows, int) else rows.unique()
                nonzero = torch.stack([tables["vectors"][l][used.to(tables["vectors"][l].device)].ne(0).any(-1).cpu()
                                       for l in iv.layers])  # [L', U]
                if not bool(nonzero.all()):
                    i, j = (~nonzero).nonzero()[0].tolist()
                    raise ValueError(f"{name}: vectors[{iv.layers[i]}] row {int(used[j])} is all zeros: steering with "
                                     "it changes nothing (a direction that could not be estimated?)")
        dev = self._device
        moved = {k: None if t is None else {l: v.to(dev) for l, v in t.items()} for k, t in tables.items()}
        return Intervention(site=iv.site, op=iv.op, layers=iv.layers, positions=iv.positions, **moved,
                            rows=rows if not isinstance(rows, torch.Tensor) else rows.to(dev),
                            strength=strength if not isinstance(strength, torch.Tensor) else strength.to(dev),
                            name=iv.name, fn=iv.fn)

    def _table_rows(self, iv: Intervention, tables: dict, name: str) -> int:
        """E, the number of table rows every layer of an edit has (rows must lie in [0, E)).

        Also checks the sparse edits: ids in range and distinct; scale [E, n], add [E, n]
        (neurons) or [E, n, hd] (heads) for n = len(index[ℓ]), the same E for both tables."""
        if iv.op in ("add", "add_rms"):
            return min(int(tables["vectors"][l].shape[0]) for l in iv.layers)
        a = self.adapter
        limit = a.num_heads if iv.site == "heads" else a.intermediate_size
        unit = "head" if iv.site == "heads" else "neuron"
        E = None
        for l in iv.layers:
            idx = tables["index"][l]
            n = idx.numel()
            if n:
                lo, hi = int(idx.min()), int(idx.max())
                if lo < 0 or hi >= limit:
                    raise IndexError(f"{name}: index[{l}] has {unit} id {lo if lo < 0 else hi} outside [0, {limit}) "
                                     f"for site {iv.site!r}")
                if idx.unique().numel() != n:
                    raise ValueError(f"{name}: index[{l}] lists a {unit} id more than once (the edit would apply twice)")
            E_l = None
            for key in ("scale", "add"):
                t = _get(tables[key], l)
                if t is None:
                    continue
                want = (n,) if key == "scale" or iv.site == "neurons" else (n, a.head_dim)
                if tuple(t.shape[1:]) != want or t.dim() != 1 + len(want):
                    raise ValueError(f"{name}: {key}[{l}] must be [E, {', '.join(map(str, want))}] for {n} ids, "
                                     f"got shape {tuple(t.shape)}")
                if E_l is not None and t.shape[0] != E_l:
                    raise ValueError(f"{name}: scale[{l}] has {E_l} rows but add[{l}] has {t.shape[0]}")
                E_l = t.shape[0]
            E = E_l if E is None else min(E, E_l)
        return E

    def _install(self):
        a = self.adapter
        by_site: dict[tuple[str, int], list[Intervention]] = defaultdict(list)
        for iv in self.interventions:
            for l in iv.layers:
                by_site[(iv.site, l)].append(iv)
        self._hooks.append(a.backbone.register_forward_pre_hook(self._on_backbone, with_kwargs=True))
        fused: set = set()
        if self.backend != "reference":  # residual-point edits/reads ride in fused decoder layers
            from .fused_layers import install_fused_layers

            self._fused = install_fused_layers(self, by_site)
            fused = self._fused.keys
        for (site, l), ivs in by_site.items():
            if (site, l) in fused:
                continue
            s = a.sites(l)
            if site == "resid_pre":
                self._hooks.append(s.layer.register_forward_pre_hook(self._pre_layer(l, ivs), with_kwargs=True))
            elif site == "resid_post":
                self._hooks.append(s.layer.register_forward_hook(self._post_layer(l, ivs)))
            elif site in ("attn_out", "mlp_out"):
                mod = s.attn_out if site == "attn_out" else s.mlp_out
                self._hooks.append(mod.register_forward_hook(self._out_hook(l, ivs)))
            elif site == "resid_mid":
                self._hooks.append(s.layer.register_forward_pre_hook(self._keep_h(l), with_kwargs=True))
                self._hooks.append(s.attn_out.register_forward_hook(self._mid_hook(l, ivs)))
            elif site in ("heads", "neurons"):
                mod = s.o_proj if site == "heads" else s.down_proj
                self._hooks.append(mod.register_forward_pre_hook(self._in_hook(l, ivs)))

    # -- hooks -----------------------------------------------------------------------------
    def _on_backbone(self, module, args, kwargs):
        x = kwargs.get("input_ids", args[0] if args else None)
        if x is None:
            x = kwargs["inputs_embeds"]
        B, T = x.shape[0], x.shape[1]
        self.state.begin(B, T, _past_length(kwargs), kwargs.get("attention_mask"), x.device)

    def op_backend(self, x: torch.Tensor) -> str | None:
        """The ``backend=`` for an op on ``x``: the backend resolved at patch time; under
        ``torch.compile`` the request itself (it decides whether the op's reference is traced,
        see ``ops.backends.trace_reference``), and also for a tensor on another device type."""
        if torch.compiler.is_compiling() or x.device.type != self._device.type:
            return self.backend
        return self.resolved_backend

    def _rows(self, iv: Intervention):
        """(table row, strength) per batch row, built once per forward call and shared by all layers."""
        hit = self.state.rows_cache.get(id(iv))
        if hit is None:
            hit = self.state.rows_cache[id(iv)] = self._build_rows(iv)
        return hit

    def _build_rows(self, iv: Intervention):
        B, dev = self.state.batch, self.state.abs_pos.device
        return (per_row(iv.rows, B, "rows", torch.long, dev),
                per_row(iv.strength, B, "strength", torch.float32, dev))

    def _apply(self, l: int, x: torch.Tensor, ivs: list[Intervention]) -> torch.Tensor:
        from .. import ops

        st = self.state
        be = self.op_backend(x)
        for iv in ivs:
            if iv.op in ("capture", "project"):
                self._capture(l, x, iv)
                continue
            rows, s, mask = _to(x.device, *self._rows(iv), st.mask(iv.positions))
            if iv.op in ("add", "add_rms"):
                x = ops.gather_add(x, *_to(x.device, iv.vectors[l]), rows, s, mask, rms_scale=iv.op == "add_rms", backend=be)
            else:  # a neuron is a group of 1 channel, a head one of head_dim
                group = 1 if iv.site == "neurons" else self.adapter.head_dim
                index, scale, add = _to(x.device, iv.index[l], _get(iv.scale, l), _get(iv.add, l))
                x = ops.sparse_edit(x, index, group, scale, add, rows, s, mask, backend=be)
        return x

    def _capture(self, l: int, x: torch.Tensor, iv: Intervention):
        from .. import ops

        st = self.state
        if iv.fn is not None:
            iv.fn(l, x, st.mask(iv.positions), st)
            return
        key = iv.name or f"{iv.site}.{iv.op}"
        if iv.positions == ("readout",):
            if st.prefill is None:
                raise RuntimeError(_TRACED_READOUT)
            if not st.prefill:
                return  # t* lies in the prefill chunk; decode steps hold no readout row
            if iv.op == "project":
                self.captures[key][l].append(ops.capture_project(x, *_to(x.device, iv.directions[l], st.readout), backend=self.op_backend(x)))
            else:
                self.captures[key][l].append(x[torch.arange(st.batch, device=x.device), st.readout].detach().clone())
        else:
            self.captures[key][l].append(x[st.mask(iv.positions)].detach().clone())

    def _pre_layer(self, l, ivs):
        def hook(module, args, kwargs):
            if args:
                return (self._apply(l, args[0], ivs), *args[1:]), kwargs
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = self._apply(l, kwargs["hidden_states"], ivs)
            return args, kwargs

        return hook

    def _keep_h(self, l):
        def hook(module, args, kwargs):
            self._mid_h[l] = args[0] if args else kwargs["hidden_states"]

        return hook

    def _post_layer(self, l, ivs):
        def hook(module, args, output):
            if isinstance(output, tuple):
                return (self._apply(l, output[0], ivs), *output[1:])
            return self._apply(l, output, ivs)

        return hook

    def _out_hook(self, l, ivs):
        def hook(module, args, output):
            if isinstance(output, tuple):  # attention modules return (out, weights)
                return (self._apply(l, output[0], ivs), *output[1:])
            return self._apply(l, output, ivs)

        return hook

    def _mid_hook(self, l, ivs):
        """Edits of m = h + A are applied to A (same residual afterwards); captures see m."""

        def hook(module, args, A):
            h = self._mid_h.pop(l)
            for iv in ivs:
                if iv.op in ("capture", "project"):
                    self._capture(l, h + A, iv)
                elif iv.op == "add":
                    A = self._apply(l, A, [iv])
                else:  # add_rms: the rms is that of m, the vector being steered
                    rows, s = self._rows(iv)
                    m = (h + A).float()
                    r = m.pow(2).mean(-1, keepdim=True).add(1e-12).sqrt()
                    gain = (self.state.mask(iv.positions).float() * s[:, None])[..., None] * r
                    A = (A.float() + gain * iv.vectors[l][rows][:, None, :]).to(A.dtype)
            return A

        return hook

    def _in_hook(self, l, ivs):
        def hook(module, args):
            return (self._apply(l, args[0], ivs), *args[1:])

        return hook

    # -- lifecycle -------------------------------------------------------------------------
    def set_readout(self, readout: torch.Tensor | None):
        """Override t* for the next prefill calls (int64 [B]); None returns to the attention mask.

        Checked here (integers, 1-D, ≥ 0) and per prefill against the call's length T (a t*
        outside the sequence would edit nothing, silently): the largest value is read once here,
        so the per-call check is a host-side comparison, no device sync."""
        if readout is None:
            self.state.readout_override, self.state.readout_max = None, None
            return self
        r = readout if isinstance(readout, torch.Tensor) else torch.as_tensor(readout)
        if r.is_floating_point() or r.is_complex() or r.dtype == torch.bool:
            raise TypeError(f"readout= must hold integer token positions, got {r.dtype}")
        if r.dim() != 1:
            raise ValueError(f"readout= must be one position per batch row, shape [B]; got {tuple(r.shape)}")
        lo, hi = (int(r.min()), int(r.max())) if r.numel() else (0, -1)
        if lo < 0:
            raise IndexError(f"readout= holds {lo}: positions count from 0 (no negative indexing)")
        self.state.readout_override, self.state.readout_max = r, hi
        return self

    def pop_captures(self) -> dict[str, torch.Tensor]:
        """Take everything captured or projected so far as one tensor per name, and empty ``captures``.

        ``{name: [n_layers, N, ...]}``: each layer's rows of every call so far, concatenated (readout
        positions: [N, K] for a projection onto K directions, [N, d] for a capture; other positions:
        the selected rows), the layers stacked in increasing order. ``captures`` keeps one small
        tensor per (name, layer, call); draining it after every batch keeps one per batch and name,
        so a capture over thousands of prompts holds its payload and not the per-tensor overhead.
        """
        out = {key: torch.stack([torch.cat(per_layer[l]) for l in sorted(per_layer)])
               for key, per_layer in self.captures.items()}
        self.captures.clear()
        return out

    def remove(self):
        if self._fused is not None:
            self._fused.remove()
            self._fused = None
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        self._mid_h.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False


def _get(m, l):
    return None if m is None else m[l]


def _to(device: torch.device, *tensors):
    """``tensors`` on ``device``: a no-op unless the model's layers live on several devices
    (accelerate ``device_map`` splits), where a layer's edit runs on that layer's device."""
    return tuple(t if t is None or t.device == device else t.to(device) for t in tensors)


def home_device(model) -> torch.device:
    """Where the patch keeps its tables: the device of the first parameter that holds data.

    A model dispatched by accelerate with CPU/disk offload keeps offloaded weights on ``meta``
    (materialised only while their module runs), so the first parameter may be on ``meta``."""
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def _table(t, what: str, key: str, site: str, width: int, head_dim: int) -> torch.Tensor:
    """One layer's table, checked where it is: ``index`` int64 [n]; ``vectors`` / ``directions``
    fp32 [E, width] (a [width] vector is one row); ``scale`` / ``add`` fp32 (shapes checked
    against ``index`` in ``PatchHandle._table_rows``). NaN / inf anywhere is an error."""
    try:
        t = torch.as_tensor(t)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{what} must be a tensor, got {type(t).__name__}") from exc
    if key == "index":
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"{what} must hold integer ids, got {t.dtype} (ids are not rounded)")
        if t.dim() != 1:
            raise ValueError(f"{what} must be 1-D [n], got shape {tuple(t.shape)}")
        return t.long()
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"{what} must be a real float tensor, got {t.dtype}")
    if key in ("vectors", "directions"):
        if t.dim() == 1:
            t = t[None]
        if t.dim() != 2:
            raise ValueError(f"{what} must be [E, {width}] (or one vector [{width}]), got shape {tuple(t.shape)}")
    last = width if key in ("vectors", "directions") else head_dim if (key == "add" and site == "heads") else None
    if last is not None and t.shape[-1] != last:
        raise ValueError(f"{what} has last dim {t.shape[-1]}, site {site!r} has width {last}")
    t = t.float()
    check_finite(t.detach(), what)
    return t


def patch(model, *interventions, backend: str = "reference", readout: torch.Tensor | None = None, **kwargs) -> PatchHandle:
    """Patch ``model`` with interventions (or a circuit / steering object) until the handle is removed.

    ``patch(model, iv1, iv2, backend="fused")`` or ``patch(model, circuit, emotion="anger", strength=1.0)``:
    any argument with a ``to_interventions(model, **kwargs)`` method is expanded first.
    """
    flat: list[Intervention] = []
    for item in interventions:
        if isinstance(item, Intervention):
            flat.append(item)
        elif hasattr(item, "to_interventions"):
            flat.extend(item.to_interventions(model, **kwargs))
        elif isinstance(item, (list, tuple)):
            flat.extend(item)
        else:
            raise TypeError(f"cannot patch with {type(item).__name__}: expected Intervention or an object with to_interventions()")
    if kwargs and not any(hasattr(i, "to_interventions") for i in interventions):
        raise TypeError(f"unexpected keyword arguments {sorted(kwargs)}")
    h = PatchHandle(model, flat, backend=backend)
    if readout is not None:
        try:
            h.set_readout(readout)
        except BaseException:
            h.remove()
            raise
    return h
