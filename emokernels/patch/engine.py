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
        a = self.adapter
        for l in iv.layers:
            if not 0 <= l < a.num_layers:
                raise IndexError(f"layer {l} out of range for a {a.num_layers}-layer model")
        dev = next(self.model.parameters()).device
        width = self._width(iv.site)

        def table(m, name, last_dim):
            if m is None:
                return None
            out = {}
            for l in iv.layers:
                t = torch.as_tensor(m[l]).to(dev)
                if t.dim() == 1 and name in ("vectors", "directions"):
                    t = t[None]
                if last_dim is not None and t.shape[-1] != last_dim:
                    raise ValueError(f"{name}[{l}] has last dim {t.shape[-1]}, site {iv.site!r} has width {last_dim}")
                out[l] = t.long() if name == "index" else t.float()
            return out

        head_dim = a.head_dim if iv.site == "heads" else None
        iv = Intervention(
            site=iv.site, op=iv.op, layers=iv.layers, positions=iv.positions,
            vectors=table(iv.vectors, "vectors", width), index=table(iv.index, "index", None),
            scale=table(iv.scale, "scale", None), add=table(iv.add, "add", head_dim),
            directions=table(iv.directions, "directions", width), rows=iv.rows, strength=iv.strength,
            name=iv.name, fn=iv.fn,
        )
        if iv.op == "edit":
            limit = a.num_heads if iv.site == "heads" else a.intermediate_size
            for l in iv.layers:
                idx = iv.index[l]
                if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= limit):
                    raise IndexError(f"index[{l}] has ids outside [0, {limit}) for site {iv.site!r}")
        return iv

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

    def _rows(self, iv: Intervention):
        """(table row, strength) per batch row, built once per forward call and shared by all layers."""
        hit = self.state.rows_cache.get(id(iv))
        if hit is None:
            hit = self.state.rows_cache[id(iv)] = self._build_rows(iv)
        return hit

    def _build_rows(self, iv: Intervention):
        B, dev = self.state.batch, self.state.abs_pos.device
        rows = iv.rows
        if rows is None or isinstance(rows, int):
            rows = torch.full((B,), 0 if rows is None else rows, dtype=torch.long, device=dev)
        else:
            rows = torch.as_tensor(rows, device=dev).long()
            if rows.shape != (B,):
                raise ValueError(f"rows= has shape {tuple(rows.shape)}, the batch has {B} rows")
        s = iv.strength
        if isinstance(s, (int, float)):
            s = torch.full((B,), float(s), dtype=torch.float32, device=dev)
        else:
            s = torch.as_tensor(s, device=dev).float()
            if s.shape != (B,):
                raise ValueError(f"strength= has shape {tuple(s.shape)}, the batch has {B} rows")
        return rows, s

    def _apply(self, l: int, x: torch.Tensor, ivs: list[Intervention]) -> torch.Tensor:
        from .. import ops

        st = self.state
        for iv in ivs:
            if iv.op in ("capture", "project"):
                self._capture(l, x, iv)
                continue
            rows, s = self._rows(iv)
            mask = st.mask(iv.positions)
            if iv.op in ("add", "add_rms"):
                x = ops.gather_add(x, iv.vectors[l], rows, s, mask, rms_scale=iv.op == "add_rms", backend=self.backend)
            else:  # a neuron is a group of 1 channel, a head one of head_dim
                group = 1 if iv.site == "neurons" else self.adapter.head_dim
                x = ops.sparse_edit(x, iv.index[l], group, _get(iv.scale, l), _get(iv.add, l), rows, s, mask,
                                    backend=self.backend)
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
                self.captures[key][l].append(ops.capture_project(x, iv.directions[l], st.readout, backend=self.backend))
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
        """Override t* for the next prefill calls (int64 [B]); None returns to the attention mask."""
        self.state.readout_override = readout
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
        h.set_readout(readout)
    return h
