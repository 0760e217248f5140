r"""Fused decoder layers: the patch owns the residual adds, as Liger-Kernel patches HF layers.

For every supported family a patched decoder layer's ``forward`` is replaced, per instance, by::

    x        = input_layernorm(h)                                   (the module, unchanged)
    A        = attn_post(self_attn(x, **kwargs))                    (o_proj hooks still fire)
    m, n, P  = fused_add_rmsnorm(h, A, edit_mid, γ_mlp, readout projections)   one pass
    F        = mlp_post(mlp(n))                                     (down_proj hooks still fire)
    h', _, P = fused_add_rmsnorm(m, F, edit_post, gamma=None, readout projections)

``attn_post`` / ``mlp_post`` are Gemma's post-sublayer norms (identity elsewhere; their own
modules, so hooks on them fire) and γ_mlp the weight of the norm in front of the MLP
(``post_attention_layernorm``; Gemma's ``pre_feedforward_layernorm``, which scales by 1 + γ).

so additive edits (``add`` / ``add_rms``), readout projections and captures at the two residual
points ride inside the residual add + RMSNorm pass instead of costing a hook and an extra
read/write of the hidden state each. The sparse neuron/head edits stay on their
``o_proj``/``down_proj`` pre-hooks (fused kernels there already).

Which interventions are fused (per layer and per point; mid = ``resid_mid`` + ``attn_out``,
post = ``resid_post`` + ``mlp_out``):

* ``add`` at ``resid_mid``, ``attn_out``, ``resid_post``, ``mlp_out`` (an addition to A is an
  addition to m = h + A; same for F and h'), except ``attn_out``/``mlp_out`` in a family whose residual
  dropout is > 0 (``FamilySpec.resid_dropout``, Phi-3's; the reference adds before the dropout);
* ``add_rms`` at ``resid_mid``/``resid_post`` (the rms is that of the residual, as in the hook
  path); ``add_rms`` at ``attn_out``/``mlp_out`` scales by rms(A)/rms(F) and stays on hooks;
* ``project`` and ``capture`` at ``resid_mid``/``resid_post`` (they read the final m / h').

A point is fused only if *all* its interventions are fusable and, in the order in which the
hook path applies them, no edit follows a capture/projection (so every read sees the edited
residual, exactly as with hooks); otherwise the whole point stays on hooks, which keep working
inside the fused forward (the layer's pre/post hooks and the submodules' hooks all fire).
Consecutive ``add`` edits with the same positions, rows and strength are summed into one table
(recomputed when a source table changes in place, and per call when one requires grad); other
edits at a point run one after another.

Exit restores each layer's ``forward`` attribute exactly (the instance attribute is deleted, or a
pre-existing one put back), also after an exception, so the model is bitwise what it was. A
layer already fused by another live patch keeps that patch's forward; this patch then uses hooks
there.
"""
from __future__ import annotations

import functools
import inspect
import warnings
from typing import Callable

import torch

from ..models.adapters import FAMILIES
from ..ops.fused_residual import EDIT_EPS, MAX_K, fused_add_rmsnorm_unchecked
from .spec import Intervention

__all__ = ["FUSABLE_FAMILIES", "FusedLayers", "install_fused_layers"]

FUSABLE_FAMILIES = tuple(FAMILIES)  # every row of the family table
_MARK = "_emokernels_fused_forward"
_EDITS = ("add", "add_rms")
_READS = ("capture", "project")


# ---------------------------------------------------------------------------------------------
# patch-time planning
# ---------------------------------------------------------------------------------------------
class _Derived:
    """A tensor derived from live source tensors (a sum of tables, a concat of directions).

    Cached, and rebuilt when a source was modified in place (``Tensor._version``); rebuilt on
    every call while autograd records and a source requires grad (so gradients reach the sources),
    and under ``torch.compile`` (traced, cheap).
    """

    def __init__(self, sources: list[torch.Tensor], fn: Callable):
        self.sources, self.fn = sources, fn
        self._ver: tuple | None = None
        self._val: torch.Tensor | None = None

    def get(self) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self.fn(self.sources)
        if torch.is_grad_enabled() and any(s.requires_grad for s in self.sources):
            return self.fn(self.sources)
        ver = tuple(s._version for s in self.sources)
        if ver != self._ver:
            with torch.no_grad():
                self._val = self.fn(self.sources)
            self._ver = ver
        return self._val


def _sum(ts):
    out = ts[0]
    for t in ts[1:]:
        out = out + t
    return out


def _cat(ts):
    return torch.cat(ts, 0)


class _Edit:
    """One edit application at a point: a run of summable ``add``s, or one ``add_rms``."""

    __slots__ = ("iv", "rms", "positions", "table", "derived")

    def __init__(self, ivs: list[Intervention], layer: int):
        self.iv = ivs[0]
        self.rms = self.iv.op == "add_rms"
        self.positions = self.iv.positions
        tables = [iv.vectors[layer] for iv in ivs]
        self.table = tables[0] if len(tables) == 1 else None
        self.derived = _Derived(tables, _sum) if len(tables) > 1 else None

    def get_table(self) -> torch.Tensor:
        return self.table if self.derived is None else self.derived.get()


def _same_scalar_or_object(a, b) -> bool:
    if a is b:
        return True
    num = (int, float)
    return isinstance(a, num) and isinstance(b, num) and not isinstance(a, bool) and a == b


def _summable(a: Intervention, b: Intervention, layer: int) -> bool:
    return (a.op == b.op == "add" and a.positions == b.positions
            and _same_scalar_or_object(a.rows, b.rows)
            and _same_scalar_or_object(a.strength, b.strength)
            and a.vectors[layer].shape == b.vectors[layer].shape)


def _fusable(iv: Intervention, resid_dropout: bool) -> bool:
    if iv.op == "add":
        return not (resid_dropout and iv.site in ("attn_out", "mlp_out"))
    if iv.op == "add_rms":
        return iv.site in ("resid_mid", "resid_post")
    if iv.op in _READS:
        return iv.site in ("resid_mid", "resid_post")
    return False


class _Point:
    """The interventions of one residual point of one layer (mid or post), in hook order."""

    def __init__(self, handle, layer: int, ivs: list[Intervention]):
        self.handle, self.layer = handle, layer
        edits = [iv for iv in ivs if iv.op in _EDITS]
        self.reads = [iv for iv in ivs if iv.op in _READS]
        self.edits: list[_Edit] = []
        run: list[Intervention] = []
        for iv in edits:
            if run and _summable(run[-1], iv, layer):
                run.append(iv)
                continue
            if run:
                self.edits.append(_Edit(run, layer))
            run = [iv]
        if run:
            self.edits.append(_Edit(run, layer))
        # readout projections fused into the kernel (one [K_total, d] matrix); the rest (copies,
        # callbacks, other positions, or more than MAX_K directions) read m in Python
        projs = [iv for iv in self.reads if iv.op == "project" and iv.fn is None]
        k_total = sum(iv.directions[layer].shape[0] for iv in projs)
        if projs and k_total <= MAX_K and len(self.edits) <= 1:
            self.projs = projs
            self.splits = [iv.directions[layer].shape[0] for iv in projs]
            ds = [iv.directions[layer] for iv in projs]
            self.dirs = _Derived(ds, _cat) if len(ds) > 1 else None
            self.dir0 = ds[0]
            self.others = [iv for iv in self.reads if iv not in projs]
        else:
            self.projs, self.splits, self.dirs, self.dir0 = [], [], None, None
            self.others = list(self.reads)


def _point_ivs(by_site: dict, layer: int, point: str) -> list[Intervention]:
    """The interventions at one point in the order the hook path applies them."""
    if point == "mid":  # attn_out / resid_mid hooks sit on one module: registration order
        keys = [k for k in by_site if k[1] == layer and k[0] in ("attn_out", "resid_mid")]
    else:  # the mlp_out hook fires inside the layer, before the layer's resid_post hook
        keys = [k for k in (("mlp_out", layer), ("resid_post", layer)) if k in by_site]
    return [iv for k in keys for iv in by_site[k]]


def _point_ok(ivs: list[Intervention], resid_dropout: bool) -> bool:
    if not all(_fusable(iv, resid_dropout) for iv in ivs):
        return False
    seen_read = False
    for iv in ivs:
        if iv.op in _READS:
            seen_read = True
        elif seen_read:  # an edit after a read: the read must see the unedited value
            return False
    return True


# ---------------------------------------------------------------------------------------------
# the fused forward
# ---------------------------------------------------------------------------------------------
def _run_point(pt: _Point | None, be: str, req: str, res, delta, gamma, eps, gemma: bool = False):
    """Residual add + edits + (norm) + reads at one point; returns (m, n)."""
    op = fused_add_rmsnorm_unchecked
    if pt is None:
        m, n, _ = op(be, req, res, delta, None, None, None, None, False, gamma, eps, gemma, None,
                     None, EDIT_EPS)
        return m, n
    h = pt.handle
    st = h.state
    edits = pt.edits
    if len(edits) <= 1:
        if edits:
            e = edits[0]
            rows, s = h._rows(e.iv)
            table, mask, rms = e.get_table(), st.mask(e.positions), e.rms
        else:
            table = rows = s = mask = None
            rms = False
        dirs = ro = None
        if pt.projs and st.prefill is None:
            from .engine import _TRACED_READOUT

            raise RuntimeError(_TRACED_READOUT)
        if pt.projs and st.prefill:
            dirs = pt.dir0 if pt.dirs is None else pt.dirs.get()
            ro = st.readout
        m, n, P = op(be, req, res, delta, table, rows, s, mask, rms, gamma, eps, gemma, dirs, ro,
                     EDIT_EPS)
        if dirs is not None:
            _record(h, pt, P)
    else:  # several non-summable edits: one after another, as the hook path does
        from .. import ops

        e = edits[0]
        rows, s = h._rows(e.iv)
        m = op(be, req, res, delta, e.get_table(), rows, s, st.mask(e.positions), e.rms, None,
               eps, False, None, None, EDIT_EPS)[0]
        for e in edits[1:]:
            rows, s = h._rows(e.iv)
            m = ops.gather_add(m, e.get_table(), rows, s, st.mask(e.positions), rms_scale=e.rms,
                               backend=h.op_backend(m))
        n = None
        if gamma is not None:
            m, n, _ = op(be, req, m, torch.zeros_like(m), None, None, None, None, False, gamma,
                         eps, gemma, None, None, EDIT_EPS)
    for iv in pt.others:
        h._capture(pt.layer, m, iv)
    return m, n


def _record(h, pt: _Point, P: torch.Tensor):
    if len(pt.projs) == 1:
        iv = pt.projs[0]
        h.captures[iv.name or f"{iv.site}.{iv.op}"][pt.layer].append(P)
        return
    for iv, part in zip(pt.projs, torch.split(P, pt.splits, dim=1)):
        h.captures[iv.name or f"{iv.site}.{iv.op}"][pt.layer].append(part)


def _checkpoints_in_forward(layer) -> bool:
    """transformers >= 5.2x checkpoints inside the class ``forward`` (bypassed by an instance
    ``forward``); older versions checkpoint in ``__call__`` (still in effect)."""
    f = type(layer).forward
    return getattr(getattr(f, "__code__", None), "co_name", "") == "forward_with_checkpointing"


def _make_forward(sites, gemma: bool, mid: _Point | None, post: _Point | None, be: str, req: str):
    """The fused forward of the layer ``sites`` (its :class:`~emokernels.models.adapters.LayerSites`);
    ``gemma``: the MLP-input norm scales by 1 + γ."""
    from ..models.adapters import Adapter

    layer = sites.layer
    norm_in, attn, mlp, norm_mlp = sites.norm_in, sites.attn, sites.mlp, sites.norm_mlp
    attn_post, mlp_post = sites.attn_post, sites.mlp_post
    eps = Adapter.norm_eps(norm_mlp)
    drop_a = getattr(layer, "resid_attn_dropout", None)
    drop_m = getattr(layer, "resid_mlp_dropout", None)
    orig = type(layer).forward
    orig = getattr(orig, "__wrapped__", orig)
    try:
        names = list(inspect.signature(orig).parameters)[1:]  # after self
    except (TypeError, ValueError):  # pragma: no cover
        names = ["hidden_states", "attention_mask", "position_ids"]
    ckpt = _checkpoints_in_forward(layer)

    def body(hidden_states, **kwargs):
        x = norm_in(hidden_states)
        A = attn(hidden_states=x, **kwargs)[0]
        if attn_post is not None:
            A = attn_post(A)
        if drop_a is not None and drop_a.training and drop_a.p > 0:
            A = drop_a(A)
        m, n = _run_point(mid, be, req, hidden_states, A, norm_mlp.weight, eps, gemma)
        F = mlp(n)
        if mlp_post is not None:
            F = mlp_post(F)
        if drop_m is not None and drop_m.training and drop_m.p > 0:
            F = drop_m(F)
        return _run_point(post, be, req, m, F, None, eps)[0]

    def forward(*args, **kwargs):
        if args:
            hidden_states = args[0]
            if len(args) > 1:  # positional extras (the HF backbones pass keywords)
                kwargs.update(zip(names[1:], args[1:]))
        else:
            hidden_states = kwargs.pop("hidden_states")
        if ckpt and layer.gradient_checkpointing and layer.training and torch.is_grad_enabled():
            if kwargs.get("use_cache"):
                kwargs["use_cache"] = False
            if not getattr(layer, "_can_checkpoint_with_cache", False) and kwargs.get("cache") is not None:
                kwargs["cache"] = None
            return layer._gradient_checkpointing_func(functools.partial(body, **kwargs), hidden_states)
        return body(hidden_states, **kwargs)

    setattr(forward, _MARK, True)
    return forward


# ---------------------------------------------------------------------------------------------
# install / remove
# ---------------------------------------------------------------------------------------------
class FusedLayers:
    """The fused layers of one patch: ``keys`` are the (site, layer) pairs they handle."""

    def __init__(self):
        self.keys: set[tuple[str, int]] = set()
        self._saved: list[tuple[torch.nn.Module, bool, object]] = []  # (layer, had attr, old)

    def _swap(self, layer, fn):
        had = "forward" in layer.__dict__
        self._saved.append((layer, had, layer.__dict__.get("forward")))
        layer.forward = fn  # plain instance attribute: nn.Module.__call__ calls it

    def remove(self):
        while self._saved:
            layer, had, old = self._saved.pop()
            if had:
                layer.__dict__["forward"] = old
            else:
                layer.__dict__.pop("forward", None)
        self.keys.clear()


def install_fused_layers(handle, by_site: dict) -> FusedLayers:
    """Replace the forward of every decoder layer of ``handle``'s model with fusable work.

    ``by_site``: (site, layer) -> interventions, as the hook installer groups them. Returns the
    :class:`FusedLayers` (its ``keys`` must not get hooks). Undoes itself if anything fails.
    """
    fl = FusedLayers()
    a = handle.adapter
    if a.family not in FAMILIES:  # read live: a row added to the table is fusable at once
        return fl
    be = handle.resolved_backend
    req = handle.backend or ""
    drop = a.spec.resid_dropout
    resid_dropout = bool(drop) and float(getattr(a.model.config, drop, 0.0) or 0.0) > 0
    layers = sorted({l for (site, l) in by_site if site in ("resid_mid", "attn_out", "resid_post", "mlp_out")})
    # A layer dispatched by accelerate (device_map: offloaded to CPU/disk, or on another device)
    # runs through accelerate's forward wrapper, which materialises its weights (they sit on
    # ``meta`` otherwise) and moves its inputs; replacing that forward would hand the kernels
    # meta or foreign-device pointers. Such layers keep accelerate's forward and take the edits
    # on hooks, which run inside it.
    dispatched: list[int] = []
    try:
        for l in layers:
            layer = a.layers[l]
            if getattr(layer.__dict__.get("forward"), _MARK, False):
                continue  # another live patch owns this layer's forward: hooks here
            if getattr(layer, "_hf_hook", None) is not None:
                dispatched.append(l)  # see below: hooks here
                continue
            points, keys = {}, set()
            for point, sites in (("mid", ("attn_out", "resid_mid")), ("post", ("mlp_out", "resid_post"))):
                ivs = _point_ivs(by_site, l, point)
                if ivs and _point_ok(ivs, resid_dropout):
                    points[point] = _Point(handle, l, ivs)
                    keys |= {(s, l) for s in sites if (s, l) in by_site}
            if not points:
                continue
            fl._swap(layer, _make_forward(a.sites(l), a.spec.gemma_norm, points.get("mid"), points.get("post"), be, req))
            fl.keys |= keys
    except BaseException:
        fl.remove()
        raise
    if dispatched:
        warnings.warn(f"emokernels: decoder layers {dispatched} are dispatched by accelerate (device_map offload or "
                      "another device); their edits run on hooks instead of fused layers", RuntimeWarning, stacklevel=3)
    return fl
