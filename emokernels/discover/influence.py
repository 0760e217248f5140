r"""Sublayer causal influence (METHOD.md §8.3, stage 06.3/06.4), computed without waste.

For emotion e, sublayer p ∈ {attn, mlp} of layer ℓ and dose α the paper adds

    δ = α · σ_{p,ℓ} · u_{e,p,ℓ}            (u: unit direction, sign-aligned to v_ref,e)

to the sublayer output (A_ℓ for attn, F_ℓ for mlp) at the readout token t* only, and reads the
score s = ⟨ĥ[t*], v_ref,e⟩ at the **post-final-norm** state ĥ. Then

    I_{e,p,ℓ}(α) = (mean_i s_i^inj − mean_i s_i^base) / (α σ_{p,ℓ})
    Ī_{e,p,ℓ}    = mean_α I_{e,p,ℓ}(α)
    P_{e,p,ℓ}    = Ī_{e,p,ℓ} / Σ_{p',ℓ'} Ī_{e,p',ℓ'}

v_ref,e = normalise(Σ_i sgn(⟨v_i, v_1⟩) v_i) over the attn+mlp directions of a late window
(the paper: layers 21–25 of 28; :func:`late_window` scales it to depth), v_1 = the attn direction
of the window's first layer; u_{e,p,ℓ} = sgn(⟨v_{e,p,ℓ}, v_ref,e⟩) v_{e,p,ℓ}.

Three ways to compute it, all returning an :class:`InfluenceResult`:

* :func:`influence_naive` — the paper's loop: one full forward of the prompt batch per
  (e, p, ℓ, α) plus one baseline (the paper also recomputes the baseline per α; we do not, the
  numbers are the same).
* :func:`influence_fast` — every position before t* is untouched by the injection, so the prefix
  (prompt minus its last token) is prefilled **once** into a KV cache and only the readout token
  is re-run, once per injection, all injections batched. Three layouts:

  - ``layout="tree"``: the N injected copies of the readout token are N *query tokens*
    of one sequence that share the prefix cache. A 4-D additive attention mask lets each copy
    see the prefix and itself only, and all copies get the position id of t*. Nothing is
    replicated; the cache grows by N keys per chunk and is cropped back after it.
  - ``layout="batch"``: the prefix cache is replicated along the batch (``batch_repeat_interleave``)
    and the copies run as ordinary batched one-token decode steps.
  - ``layout="staged"`` (what ``"auto"`` picks, every family): as ``tree``, and a copy
    also skips the layers below its injection. Below sublayer (p, ℓ) a copy *is* the clean readout
    token, so one clean pass stores m_ℓ[t*] and h_{ℓ+1}[t*] for every ℓ; copy j then enters at
    its sublayer as ``clean state + δ_j`` and runs only the rest of the network (the attention
    half of layer ℓ is skipped for an mlp injection too). The decoder layers are run half by half
    (input norm, attention, [Gemma's post-attention norm,] add; MLP norm, MLP, [post-MLP norm,]
    add), each layer with the rows that have entered by then: ≈ half the token-layer rows of
    ``tree``. The copies attend to the prefix cache and to themselves only
    (:func:`prefix_copy_attention`, which also applies sliding windows and Gemma 2's logit
    soft-cap), so no n × n copy-copy block of masked scores is computed and the cache is never
    written.

  Cost per prompt: one prefill of T−1 tokens plus N = 1 + E·|P|·L·|α| single-token rows, instead
  of N full prompts (≈T× fewer token-rows; T ≈ 80 for chat prompts); ``staged`` halves the rows.
* :func:`influence_grad` — the α→0 limit, ∂s/∂dose = ⟨∇_{A_ℓ[t*]} s, u⟩ (resp. F_ℓ): one forward
  and one backward per emotion give every sublayer at once (reverse mode beats a per-sublayer
  forward-mode JVP here). The paper notes the response is ≈ linear in α, so this is a cheap
  approximation of Ī, not the paper's finite difference.

Tensor conventions (as produced by ``discover.directions``):

* ``directions``: unit vectors ``[2, L, E, d]``, point 0 = attn (resid_mid m_ℓ), 1 = mlp (resid_post).
* ``sigma``: ``[2, L]`` dose unit per point (mean rms at t*).
* prompts: a padded batch ``{"input_ids", "attention_mask"}`` (left or right padding) or a list of
  1-D token-id sequences. ``members``: optional bool ``[N_prompts, E]`` — which prompts count for
  which emotion (the paper uses, for emotion e, the contexts whose e-generation was accepted).
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..models.adapters import Adapter

KINDS = ("attn", "mlp")
PAPER_ALPHAS = (0.1, 0.3, 0.5, 0.7)


# ---------------------------------------------------------------------------------------------
# reference direction
# ---------------------------------------------------------------------------------------------
def late_window(num_layers: int, paper: tuple[int, int] = (21, 25), paper_depth: int = 28) -> tuple[int, ...]:
    """The paper's v_ref window (layers 21–25 of 28) scaled to ``num_layers``: round(ℓ·L/28), clipped to [0, L−1]."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be ≥ 1, got {num_layers}")
    lo = min(num_layers - 1, max(0, round(paper[0] * num_layers / paper_depth)))
    hi = min(num_layers - 1, max(lo, round(paper[1] * num_layers / paper_depth)))
    return tuple(range(lo, hi + 1))


def _sgn(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x < 0, -1.0, 1.0).to(x.dtype)


def reference_directions(directions: torch.Tensor, window: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """v_ref [E, d] and the sign-aligned directions u [2, L, E, d] (METHOD §8.3).

    v_ref,e = normalise(Σ_{ℓ∈window, p∈(attn, mlp)} sgn(⟨v_{p,ℓ}, v_1⟩) v_{p,ℓ}), v_1 = v_{attn, window[0]};
    u_{p,ℓ,e} = sgn(⟨v_{p,ℓ,e}, v_ref,e⟩) v_{p,ℓ,e}. Directions are renormalised first (a no-op for unit input).
    """
    _check_directions(directions)
    v = directions.float()
    v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    L = v.shape[1]
    window = late_window(L) if window is None else tuple(int(l) for l in window)
    if not window or any(not 0 <= l < L for l in window):
        raise ValueError(f"window {window} must be a non-empty list of layers in [0, {L})")
    stack = torch.stack([v[p, l] for l in window for p in range(2)])  # [10, E, d], order attn21, mlp21, ...
    first = stack[0]
    signs = _sgn((stack * first).sum(-1))  # [10, E]
    ref = (signs[..., None] * stack).sum(0)
    ref = ref / ref.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    u = _sgn((v * ref).sum(-1))[..., None] * v
    return ref, u


def _check_directions(directions):
    if not isinstance(directions, torch.Tensor) or directions.dim() != 4 or directions.shape[0] != 2:
        shape = tuple(directions.shape) if isinstance(directions, torch.Tensor) else type(directions).__name__
        raise ValueError(f"directions must be a tensor [2 (attn, mlp), L, E, d], got {shape}")


# ---------------------------------------------------------------------------------------------
# result
# ---------------------------------------------------------------------------------------------
@dataclass
class InfluenceResult:
    """Sublayer influence for E emotions, 2 kinds (attn, mlp), L layers, A doses.

    ``I`` [E, 2, L, A] (NaN where a sublayer was not measured), ``Ibar`` [E, 2, L] (mean over α),
    ``s_base`` [E] mean baseline score, ``s_inj`` [E, 2, L, A] mean injected score, ``n_prompts`` [E].
    ``stats``: forward calls, token rows run through the layers, wall time.
    """

    I: torch.Tensor
    s_base: torch.Tensor
    s_inj: torch.Tensor
    alphas: tuple[float, ...]
    n_prompts: torch.Tensor
    emotions: tuple[str, ...] | None = None
    method: str = ""
    stats: dict = field(default_factory=dict)

    @property
    def Ibar(self) -> torch.Tensor:
        return self.I.mean(-1)

    @property
    def probability(self) -> torch.Tensor:
        """P = Ī / Σ_{p,ℓ} Ī per emotion (the paper's 06.4 column; can be negative)."""
        ib = self.Ibar
        return ib / ib.nansum(dim=(1, 2), keepdim=True)

    def save(self, path) -> "InfluenceResult":
        from ..io import save_tensors

        save_tensors(path, {"I": self.I, "s_base": self.s_base, "s_inj": self.s_inj, "n_prompts": self.n_prompts,
                            "Ibar": self.Ibar},
                     {"kind": "sublayer_influence", "alphas": list(self.alphas), "emotions": list(self.emotions or ()),
                      "method": self.method, "stats": self.stats, "kinds": list(KINDS)})
        return self

    @classmethod
    def load(cls, path) -> "InfluenceResult":
        from ..io import CorruptArtifactError, load_tensors, require_keys

        t, meta = load_tensors(path)
        if meta.get("kind") != "sublayer_influence":
            raise CorruptArtifactError(f"{path} is not a sublayer-influence artifact (kind={meta.get('kind')!r})")
        require_keys(t, meta, path, ("I", "s_base", "s_inj", "n_prompts"), ("alphas",))
        return cls(I=t["I"], s_base=t["s_base"], s_inj=t["s_inj"], alphas=tuple(meta["alphas"]), n_prompts=t["n_prompts"],
                   emotions=tuple(meta.get("emotions") or ()) or None, method=meta.get("method", ""), stats=meta.get("stats", {}))


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
def _prompt_list(prompts) -> list[torch.Tensor]:
    """Padded batch dict or a list of id sequences -> list of 1-D int64 tensors without padding."""
    if isinstance(prompts, dict):
        ids, mask = prompts["input_ids"], prompts.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        return [ids[i][mask[i].bool()].long().cpu() for i in range(ids.shape[0])]
    out = [torch.as_tensor(p).long().reshape(-1).cpu() for p in prompts]
    if not out:
        raise ValueError("no prompts given")
    return out


class _Plan:
    """Validated inputs shared by the three methods."""

    def __init__(self, model, u, sigma, v_ref, alphas, members, n_prompts, kinds, layers, emotions):
        a = Adapter.of(model)
        self.adapter = a
        L, d = a.num_layers, a.hidden_size
        if u.dim() != 4 or u.shape[0] != 2 or u.shape[1] != L or u.shape[3] != d:
            raise ValueError(f"directions u must be [2, L={L}, E, d={d}] for this model, got {tuple(u.shape)}")
        E = u.shape[2]
        if tuple(sigma.shape) != (2, L):
            raise ValueError(f"sigma must be [2, L={L}], got {tuple(sigma.shape)}")
        if tuple(v_ref.shape) != (E, d):
            raise ValueError(f"v_ref must be [E={E}, d={d}], got {tuple(v_ref.shape)}")
        if not torch.isfinite(sigma).all() or (sigma <= 0).any():
            raise ValueError("sigma must be finite and > 0 (it divides the influence)")
        self.alphas = tuple(float(x) for x in alphas)
        if not self.alphas or any(x == 0 or not math.isfinite(x) for x in self.alphas):
            raise ValueError(f"alphas must be non-zero finite numbers, got {alphas}")
        bad = [k for k in kinds if k not in KINDS]
        if bad or not kinds:
            raise ValueError(f"unknown kinds {bad or kinds}: use {KINDS}")
        self.kinds = tuple(kinds)
        self.layers = tuple(range(L)) if layers is None else tuple(int(l) for l in layers)
        if any(not 0 <= l < L for l in self.layers):
            raise ValueError(f"layers {self.layers} out of range for a {L}-layer model")
        dev = next(model.parameters()).device
        self.device, self.dtype = dev, next(model.parameters()).dtype
        self.u, self.sigma, self.v_ref = u.float().to(dev), sigma.float().to(dev), v_ref.float().to(dev)
        self.E, self.L, self.d = E, L, d
        if members is None:
            members = torch.ones(n_prompts, E, dtype=torch.bool)
        members = torch.as_tensor(members).bool().cpu()
        if tuple(members.shape) != (n_prompts, E):
            raise ValueError(f"members must be bool [N_prompts={n_prompts}, E={E}], got {tuple(members.shape)}")
        if (members.sum(0) == 0).any():
            raise ValueError(f"emotions {torch.nonzero(members.sum(0) == 0).flatten().tolist()} have no member prompts")
        self.members = members
        if emotions is not None and len(emotions) != E:
            raise ValueError(f"emotions names {emotions} do not match E={E}")
        self.emotions = tuple(emotions) if emotions is not None else None
        # injections: (e, kind index, layer, alpha index), in this order
        self.inj = [(e, KINDS.index(k), l, ai) for e in range(E) for k in self.kinds for l in self.layers
                    for ai in range(len(self.alphas))]
        self.inj_e = torch.tensor([e for e, *_ in self.inj], dtype=torch.long)  # emotion of each injection

    def add_scores(self, s_inj, h, first: int, memb) -> None:
        """s_inj[e, p, ℓ, a] += Σ_g memb[g, e] ⟨ĥ[g, k], v_ref,e⟩ for the k-th of the injections
        ``first, first + 1, …`` whose final states are ``h`` [G, k, d]."""
        e_j = self.inj_e[first:first + h.shape[1]]
        s = (h.float() * self.v_ref[e_j.to(self.device)][None]).sum(-1).double().cpu()  # [G, k]
        contrib = (s * memb[:, e_j]).sum(0)
        for k, (e, p, l, ai) in enumerate(self.inj[first:first + h.shape[1]]):
            s_inj[e, p, l, ai] += contrib[k]

    def delta(self, e, p, l, ai) -> torch.Tensor:
        return self.alphas[ai] * self.sigma[p, l] * self.u[p, l, e]

    def result(self, s_base_sum, s_inj_sum, method, stats) -> InfluenceResult:
        """s_base_sum [E] and s_inj_sum [E, 2, L, A] are sums over member prompts."""
        n = self.members.sum(0).double()
        base = s_base_sum / n
        inj = s_inj_sum / n[:, None, None, None]
        dose = torch.tensor(self.alphas, dtype=torch.float64)[None, None, :] * self.sigma.double().cpu()[:, :, None]
        I = (inj - base[:, None, None, None]) / dose[None]
        measured = torch.zeros(2, self.L, dtype=torch.bool)
        for k in self.kinds:
            measured[KINDS.index(k), list(self.layers)] = True
        I = torch.where(measured[None, :, :, None], I, torch.full_like(I, float("nan")))
        inj = torch.where(measured[None, :, :, None], inj, torch.full_like(inj, float("nan")))
        return InfluenceResult(I=I.float(), s_base=base.float(), s_inj=inj.float(), alphas=self.alphas,
                               n_prompts=self.members.sum(0), emotions=self.emotions, method=method, stats=stats)


class _Injector:
    """Forward hooks on the attn_out / mlp_out modules that add per-row (or per-token) deltas.

    ``plan[(p, l)] = (dim, index, deltas)``: ``out.index_add(dim, index, deltas)``, out of place.
    """

    def __init__(self, adapter: Adapter, kinds, layers):
        self.plan: dict = {}
        self.handles = []
        for l in layers:
            s = adapter.sites(l)
            for k in kinds:
                p = KINDS.index(k)
                mod = s.attn_out if p == 0 else s.mlp_out
                self.handles.append(mod.register_forward_hook(self._hook(p, l)))

    def _hook(self, p, l):
        def hook(module, args, output):
            entry = self.plan.get((p, l))
            if entry is None:
                return None
            dim, index, src = entry
            if isinstance(output, tuple):
                return (output[0].index_add(dim, index, src.to(output[0].dtype)), *output[1:])
            return output.index_add(dim, index, src.to(output.dtype))

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _new_cache(model):
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older transformers
        return DynamicCache()


def _progress(total, desc, enabled):
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, disable=not enabled, leave=False)
    except ImportError:  # pragma: no cover
        class _Null:
            def update(self, n=1):
                pass

            def close(self):
                pass

        return _Null()


# ---------------------------------------------------------------------------------------------
# naive (the paper's loop)
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def influence_naive(model, prompts, u: torch.Tensor, sigma: torch.Tensor, v_ref: torch.Tensor,
                    alphas: Sequence[float] = PAPER_ALPHAS, members=None, kinds=KINDS, layers=None,
                    batch_size: int = 16, emotions=None, progress: bool = True) -> InfluenceResult:
    """The paper's method: re-run every prompt for each (e, p, ℓ, α) with
    ``patch(model, Intervention(site="attn_out"|"mlp_out", op="add", positions="readout"))``.

    Prompts are left-padded into batches of ``batch_size`` with position ids from the mask, so
    a padded row computes what it would alone. Forward calls: ceil(N/batch)·(1 + E·|P|·L·|α|).
    """
    from ..data.prompts import readout_positions
    from ..patch import Intervention, patch

    seqs = _prompt_list(prompts)
    plan = _Plan(model, u, sigma, v_ref, alphas, members, len(seqs), kinds, layers, emotions)
    backbone = plan.adapter.backbone
    E, A = plan.E, len(plan.alphas)
    s_base = torch.zeros(E, dtype=torch.float64)
    s_inj = torch.zeros(E, 2, plan.L, A, dtype=torch.float64)
    calls = rows = 0
    t0 = time.perf_counter()
    n_batches = math.ceil(len(seqs) / batch_size)
    bar = _progress(n_batches * (1 + len(plan.inj)), "influence (naive)", progress)
    for b0 in range(0, len(seqs), batch_size):
        chunk = seqs[b0 : b0 + batch_size]
        memb = plan.members[b0 : b0 + batch_size].double()  # [B, E]
        T = max(len(s) for s in chunk)
        ids = torch.zeros(len(chunk), T, dtype=torch.long)
        mask = torch.zeros(len(chunk), T, dtype=torch.long)
        for i, s in enumerate(chunk):
            ids[i, T - len(s):], mask[i, T - len(s):] = s, 1
        ids, mask = ids.to(plan.device), mask.to(plan.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        readout = readout_positions(mask)
        ar = torch.arange(len(chunk), device=plan.device)

        def score(*ivs):
            with patch(model, *ivs):
                h = backbone(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).last_hidden_state
            return (h[ar, readout].float() @ plan.v_ref.T).double().cpu()  # [B, E]

        s_base += (score() * memb).sum(0)
        calls, rows = calls + 1, rows + ids.numel()
        bar.update()
        for e, p, l, ai in plan.inj:
            iv = Intervention(site=("attn_out", "mlp_out")[p], op="add", layers=(l,), positions="readout",
                              vectors={l: plan.delta(e, p, l, ai)[None]})
            s_inj[e, p, l, ai] += (score(iv)[:, e] * memb[:, e]).sum()
            calls, rows = calls + 1, rows + ids.numel()
            bar.update()
    bar.close()
    stats = dict(forward_calls=calls, token_rows=rows, prompt_tokens=sum(len(s) for s in seqs), n_prompts=len(seqs),
                 injections=len(plan.inj), wall_s=time.perf_counter() - t0)
    return plan.result(s_base, s_inj, "naive", stats)


# ---------------------------------------------------------------------------------------------
# fast (prefix KV cache reused, readout token only)
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def influence_fast(model, prompts, u: torch.Tensor, sigma: torch.Tensor, v_ref: torch.Tensor,
                   alphas: Sequence[float] = PAPER_ALPHAS, members=None, kinds=KINDS, layers=None,
                   layout: str = "auto", chunk: int = 512, group_size: int = 8, emotions=None,
                   progress: bool = True) -> InfluenceResult:
    """Same numbers as :func:`influence_naive` (up to float rounding), with the prefix run once.

    Prompts of equal length are grouped (≤ ``group_size`` per group, no padding anywhere). Per
    group: prefill the T−1 prefix tokens into a KV cache, then run the readout token for
    N = 1 + #injections copies (copy 0 = baseline) in chunks of ``chunk`` copies:

    * ``layout="tree"``: copies are query tokens [G, n] at position T−1 with a 4-D additive mask
      [G, 1, n, T−1+n] (prefix visible, copies see only themselves); the n appended keys are
      cropped after each chunk. δ is added to copy j's row of A_ℓ / F_ℓ by a forward hook.
    * ``layout="batch"``: the cache is deep-copied and repeated to G·n rows, one token each.

    * ``layout="staged"`` (``"auto"``): see the module docstring.

    Scores are read from the backbone's last_hidden_state (the final-norm output ĥ); the LM
    head is never run. ``layout="tree"`` falls back to ``"batch"`` on models with a sliding
    window shorter than a prompt (``stats["layout"]`` says which ran).

    Precision: I is a difference of scores divided by a small dose, so run it in fp32 as the
    paper does; in bf16 both this and the naive loop are dominated by rounding noise (measured on
    an H200: |I_fast − I_naive| up to 0.19 for |I| ≤ 0.3, against 1e-5 in fp32).
    """
    if layout not in ("auto", "staged", "tree", "batch"):
        raise ValueError(f"layout must be 'auto', 'staged', 'tree' or 'batch', got {layout!r}")
    if chunk < 1 or group_size < 1:
        raise ValueError("chunk and group_size must be ≥ 1")
    seqs = _prompt_list(prompts)
    if min(len(s) for s in seqs) < 2:
        raise ValueError("every prompt needs at least 2 tokens (a prefix and the readout token)")
    plan = _Plan(model, u, sigma, v_ref, alphas, members, len(seqs), kinds, layers, emotions)
    backbone, dev = plan.adapter.backbone, plan.device
    E, A = plan.E, len(plan.alphas)
    s_base = torch.zeros(E, dtype=torch.float64)
    s_inj = torch.zeros(E, 2, plan.L, A, dtype=torch.float64)
    N = 1 + len(plan.inj)
    # copy j ≥ 1 carries injection plan.inj[j - 1] (copy 0 is the baseline)
    all_deltas = torch.stack([plan.delta(*x) for x in plan.inj]) if plan.inj else torch.zeros(0, plan.d, device=dev)
    site_of = {}
    for j, (e, p, l, ai) in enumerate(plan.inj, start=1):
        site_of.setdefault((p, l), []).append(j)
    site_of = {k: torch.tensor(v) for k, v in site_of.items()}

    layout = "staged" if layout == "auto" else layout
    window = getattr(model.config, "sliding_window", None)
    if (layout == "tree" and window is not None and getattr(model.config, "use_sliding_window", True) is not False
            and max(len(s) for s in seqs) > window):
        layout = "batch"  # a custom 4-D mask would bypass the sliding-window mask; replicated rows keep it
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(seqs):
        groups.setdefault(len(s), []).append(i)
    batches = [(T, idx[g : g + group_size]) for T, idx in sorted(groups.items()) for g in range(0, len(idx), group_size)]
    n_chunks = math.ceil(N / chunk)
    cache_kw = plan.adapter.cache_kwarg
    injector = _Injector(plan.adapter, plan.kinds, plan.layers)
    calls = rows = 0
    t0 = time.perf_counter()
    bar = _progress(len(batches) * (1 + n_chunks), f"influence (fast, {layout})", progress)
    try:
        for T, idx in batches:
            G, T0 = len(idx), T - 1
            ids = torch.stack([seqs[i] for i in idx]).to(dev)
            memb = plan.members[idx].double()  # [G, E]
            cache = _new_cache(model)
            backbone(input_ids=ids[:, :T0], use_cache=True, **{cache_kw: cache})
            calls, rows = calls + 1, rows + G * T0
            bar.update()
            last = ids[:, T0:]
            if layout == "staged":
                with _prefix_copies_attention(plan.adapter.layers[0].self_attn.config):
                    r, base = _staged_group(plan, backbone, cache, last, T0, all_deltas, memb, s_inj, chunk)
                s_base += (base * memb).sum(0)
                calls, rows = calls + r[0], rows + r[1]
                bar.update(1 + n_chunks)
                continue
            for c0 in range(0, N, chunk):
                c1 = min(N, c0 + chunk)
                n = c1 - c0
                # which copies of this chunk are injected at (p, l), as local indices
                injector.plan = {}
                for key, js in site_of.items():
                    sel = js[(js >= c0) & (js < c1)]
                    if sel.numel():
                        src = all_deltas[(sel - 1).to(dev)]  # [k, d]
                        loc = (sel - c0).to(dev)
                        if layout == "tree":
                            injector.plan[key] = (1, loc, src[None].expand(G, -1, -1))
                        else:  # batch rows are (g, j) -> g * n + j
                            rows_idx = (torch.arange(G, device=dev)[:, None] * n + loc[None]).reshape(-1)
                            injector.plan[key] = (0, rows_idx, src[None].expand(G, -1, -1).reshape(-1, 1, plan.d))
                if layout == "tree":
                    h = backbone(input_ids=last.expand(G, n), attention_mask=_tree_mask(G, n, T0, plan.dtype, dev),
                                 position_ids=torch.full((G, n), T0, device=dev), use_cache=True,
                                 **{cache_kw: cache}).last_hidden_state  # [G, n, d]
                    cache.crop(-n)  # drop the n appended keys (negative = tokens to remove, in every version)
                else:
                    rep = copy.deepcopy(cache)
                    rep.batch_repeat_interleave(n)
                    h = backbone(input_ids=last.repeat_interleave(n, 0), attention_mask=torch.ones(G * n, T0 + 1, dtype=torch.long, device=dev),
                                 position_ids=torch.full((G * n, 1), T0, device=dev), use_cache=True,
                                 **{cache_kw: rep}).last_hidden_state.reshape(G, n, plan.d)
                    del rep
                calls, rows = calls + 1, rows + G * n
                injector.plan = {}
                h = h.float()
                if c0 == 0:
                    base = (h[:, 0] @ plan.v_ref.T).double().cpu()  # [G, E]
                    s_base += (base * memb).sum(0)
                j0 = max(c0, 1)
                if j0 < c1:
                    plan.add_scores(s_inj, h[:, j0 - c0:], j0 - 1, memb)
                bar.update()
    finally:
        injector.remove()
        bar.close()
    stats = dict(forward_calls=calls, token_rows=rows, prompt_tokens=sum(len(s) for s in seqs), n_prompts=len(seqs),
                 injections=len(plan.inj), layout=layout, wall_s=time.perf_counter() - t0)
    return plan.result(s_base, s_inj, f"fast-{layout}", stats)


def _tree_mask(G: int, n: int, T0: int, dtype, dev) -> torch.Tensor:
    """[G, 1, n, T0 + n] additive mask: every copy sees the prefix and itself only."""
    mask = torch.zeros(G, 1, n, T0 + n, dtype=dtype, device=dev)
    blocked = torch.full((n, n), torch.finfo(dtype).min, dtype=dtype, device=dev)
    mask[:, :, :, T0:] = blocked.fill_diagonal_(0)
    return mask


def prefix_copy_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                          prefix_kv=None, sliding_window=None, softcap=None, **kwargs):
    r"""Attention of n one-token copies that share a prompt prefix and never see each other.

    Copy j attends to the T0 prefix positions and to itself:

        s_j = [q_j·K_0, …, q_j·K_{T0−1}, q_j·k_j] · scaling,   o_j = softmax(s_j) · [V_0; …; V_{T0−1}; v_j]

    which is what a [n, T0 + n] additive "tree" mask gives, without the n × n copy-copy block
    (the copies outnumber the prefix tokens ~10:1, so that block was most of the attention work).
    Grouped-query heads share K/V: head h reads kv head h // (H / KVH). With a ``sliding_window``
    W a copy sees only the last W − 1 prefix positions (HF's window: key i is visible from query t
    when i > t − W); with ``softcap`` c the scaled scores become c·tanh(s / c) (Gemma 2).

    Shapes: ``query`` [G, H, n, hd]; ``key``, ``value`` [G, KVH, n, hd] (each copy's own, after
    rotary); ``prefix_kv`` = (K, V), each [G, KVH, T0, hd]. Returns ([G, n, H, hd], None), the
    layout of transformers' attention interface. The softmax runs in fp32 as transformers' eager
    attention does. Registered as the attention implementation ``"emokernels_prefix_copies"``;
    ``attention_mask`` and ``dropout`` must be unset (the copies are unpadded, inference only).
    """
    if prefix_kv is None:
        raise ValueError("prefix_copy_attention needs prefix_kv=(K, V), the prefix keys and values [G, KVH, T0, hd]")
    if attention_mask is not None or dropout:
        raise ValueError("prefix_copy_attention takes no attention mask and no dropout")
    K, V = prefix_kv
    if sliding_window is not None and K.shape[2] > sliding_window - 1:
        K, V = K[:, :, K.shape[2] - sliding_window + 1:], V[:, :, V.shape[2] - sliding_window + 1:]
    G, H, n, hd = query.shape
    kvh, T0 = K.shape[1], K.shape[2]
    scaling = hd ** -0.5 if scaling is None else scaling
    q = query.reshape(G, kvh, H // kvh, n, hd)
    s_prefix = torch.matmul(q.reshape(G, kvh, -1, hd), K.transpose(-1, -2)).reshape(G, kvh, H // kvh, n, T0)
    s_self = (q * key[:, :, None]).sum(-1, keepdim=True)  # [G, KVH, H/KVH, n, 1]
    scores = torch.cat([s_prefix, s_self], -1).float() * scaling
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    p = torch.softmax(scores, dim=-1).to(query.dtype)
    out = torch.matmul(p[..., :T0].reshape(G, kvh, -1, T0), V).reshape_as(q) + p[..., T0:] * value[:, :, None]
    return out.reshape(G, H, n, hd).transpose(1, 2).contiguous(), None


_PREFIX_COPIES = "emokernels_prefix_copies"


@contextlib.contextmanager
def _prefix_copies_attention(config):
    """Register :func:`prefix_copy_attention` and switch the attention modules reading ``config`` to
    it; the previous implementation is restored on exit, errors included."""
    from transformers import AttentionInterface

    AttentionInterface.register(_PREFIX_COPIES, prefix_copy_attention)  # idempotent: a global name -> function map
    old = config._attn_implementation
    config._attn_implementation = _PREFIX_COPIES
    try:
        yield
    finally:
        config._attn_implementation = old


def _attention_half(a, l: int, X, kv, T0: int, pe):
    """m = X + A for copies X [G, n, d] at t*, A = attn_post(Attn(norm_in(X))) over the prefix in cache
    layer ``kv`` and the copies themselves; ``pe`` = (cos, sin) of layer ``l`` at t* ([G, 1, hd]: every
    copy sits at t*, so one position broadcasts over the n copies)."""
    s = a.sites(l)
    A = s.attn(hidden_states=s.norm_in(X), position_embeddings=pe, attention_mask=None,
               prefix_kv=(kv.keys[:, :, :T0], kv.values[:, :, :T0]))[0]
    return X + (A if s.attn_post is None else s.attn_post(A))


def _mlp_half(a, l: int, M):
    """h = M + F, F = mlp_post(MLP(norm_mlp(M)))."""
    s = a.sites(l)
    F = s.mlp(s.norm_mlp(M))
    return M + (F if s.mlp_post is None else s.mlp_post(F))


def _rotary(a, x, position_ids) -> list:
    """(cos, sin) for every layer: one call per layer type where the rotary takes one (Gemma 3 keeps
    a local and a global frequency base), else one call shared by all layers."""
    rotary = a.backbone.rotary_emb
    types = getattr(a.backbone.config, "layer_types", None)
    if types and "layer_type" in inspect.signature(rotary.forward).parameters:
        per_type = {t: rotary(x, position_ids, t) for t in set(types)}
        return [per_type[t] for t in types[: a.num_layers]]
    return [rotary(x, position_ids)] * a.num_layers


def _run_staged(plan, backbone, cache, T0: int, entries, clean_m, clean_h, pe, deltas):
    """Run copies that enter at their sublayers; returns (ĥ [G, n, d] by local copy index,
    token-layer rows).

    ``entries[(p, ℓ)]``: local copy indices entering at sublayer (p, ℓ), in order; ``deltas`` [n, d]
    (local); ``clean_m``, ``clean_h`` [G, L, d]: the clean readout token's m_ℓ and h_{ℓ+1}; ``pe``:
    the clean pass's per-layer (cos, sin) at t*. The copies attend to the prefix in ``cache`` and
    to themselves (:func:`prefix_copy_attention`); the cache is read, never written.
    """
    a = plan.adapter
    dev, dt = plan.device, plan.dtype
    order: list[int] = []
    X = None  # [G, n_active, d], states at the current layer's input
    layer_rows = 0
    first = min(l for (_, l) in entries)
    for l in range(first, a.num_layers):
        if X is not None:
            M = _attention_half(a, l, X, cache.layers[l], T0, pe[l])
            layer_rows += X.shape[1]
        else:
            M = None
        new = entries.get((0, l))
        if new:
            add = clean_m[:, l, None, :] + deltas[new][None]  # [G, k, d], fp32
            M = add.to(dt) if M is None else torch.cat([M, add.to(dt)], 1)
            order += new
        if M is not None:
            X = _mlp_half(a, l, M)
        new = entries.get((1, l))
        if new:
            add = (clean_h[:, l, None, :] + deltas[new][None]).to(dt)
            X = add if X is None else torch.cat([X, add], 1)
            order += new
    h = backbone.norm(X)
    out = torch.empty_like(h)
    out[:, torch.tensor(order, device=dev)] = h
    return out, layer_rows


def _staged_group(plan, backbone, cache, last, T0, all_deltas, memb, s_inj, chunk):
    """One group of equal-length prompts (prefix already in ``cache``): the clean pass, then the
    injected copies in chunks. Adds into ``s_inj``; returns ((calls, rows), base scores [G, E]).
    Runs with the attention switched to :func:`prefix_copy_attention`."""
    a = plan.adapter
    G, dev = last.shape[0], plan.device
    # clean pass, layer by layer, keeping m_ℓ and h_{ℓ+1} of the readout token
    X = backbone.embed_tokens(last)  # Gemma's √d scale lives in its embedding module
    pe = _rotary(a, X, torch.full((G, 1), T0, device=dev))
    clean_m = torch.empty(G, a.num_layers, plan.d, dtype=torch.float32, device=dev)
    clean_h = torch.empty_like(clean_m)
    for l in range(a.num_layers):
        M = _attention_half(a, l, X, cache.layers[l], T0, pe[l])
        X = _mlp_half(a, l, M)
        clean_m[:, l], clean_h[:, l] = M[:, 0].float(), X[:, 0].float()
    base = (backbone.norm(X)[:, 0].float() @ plan.v_ref.T).double().cpu()  # [G, E]
    calls, rows = 1, G
    N = all_deltas.shape[0]  # injected copies (copy 0, the baseline, is the clean pass)
    for c0 in range(0, N, chunk):
        c1 = min(N, c0 + chunk)
        entries: dict = {}
        for j in range(c0, c1):
            e, p, l, ai = plan.inj[j]
            entries.setdefault((p, l), []).append(j - c0)
        h, layer_rows = _run_staged(plan, backbone, cache, T0, entries, clean_m, clean_h, pe, all_deltas[c0:c1].float())
        plan.add_scores(s_inj, h, c0, memb)
        calls, rows = calls + 1, rows + G * layer_rows / a.num_layers
    return (calls, rows), base


# ---------------------------------------------------------------------------------------------
# gradient (α → 0 limit)
# ---------------------------------------------------------------------------------------------
def influence_grad(model, prompts, u: torch.Tensor, sigma: torch.Tensor, v_ref: torch.Tensor, members=None,
                   kinds=KINDS, layers=None, batch_size: int = 16, emotions=None, progress: bool = True) -> InfluenceResult:
    """Linearised influence: I_{e,p,ℓ}(α→0) = mean_i ⟨∂s_{i,e}/∂X_ℓ[t*], u_{e,p,ℓ}⟩, X = A (attn) or F (mlp).

    A zero vector ε_{p,ℓ} [B, d] (requires grad) is added at t* of each sublayer output; one
    forward, then one backward per emotion of Σ_i s_{i,e} gives ∂s/∂ε for all 2L sublayers.
    Returned with ``alphas=(0.0,)``: ``I[..., 0]`` is the derivative, ``s_inj`` = ``s_base``.
    Model parameters are frozen for the call and restored after.
    """
    from ..data.prompts import readout_positions

    seqs = _prompt_list(prompts)
    plan = _Plan(model, u, sigma, v_ref, (1.0,), members, len(seqs), kinds, layers, emotions)
    backbone, dev, E = plan.adapter.backbone, plan.device, plan.E
    s_base = torch.zeros(E, dtype=torch.float64)
    dsum = torch.zeros(E, 2, plan.L, dtype=torch.float64)
    flags = [p.requires_grad for p in model.parameters()]
    calls = rows = 0
    t0 = time.perf_counter()
    bar = _progress(math.ceil(len(seqs) / batch_size), "influence (grad)", progress)
    hooks = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        state: dict = {}

        def make_hook(key):
            def hook(module, args, output):
                eps = state["eps"].get(key)
                if eps is None:
                    return None
                x = output[0] if isinstance(output, tuple) else output
                add = torch.zeros(x.shape, dtype=eps.dtype, device=x.device).index_put((state["ar"], state["readout"]), eps)
                y = x + add.to(x.dtype)
                return (y, *output[1:]) if isinstance(output, tuple) else y

            return hook

        for l in plan.layers:
            s = plan.adapter.sites(l)
            for k in plan.kinds:
                p = KINDS.index(k)
                hooks.append((s.attn_out if p == 0 else s.mlp_out).register_forward_hook(make_hook((p, l))))
        with torch.enable_grad():
            for b0 in range(0, len(seqs), batch_size):
                chunk = seqs[b0 : b0 + batch_size]
                memb = plan.members[b0 : b0 + batch_size].to(dev)
                B, T = len(chunk), max(len(s) for s in chunk)
                ids = torch.zeros(B, T, dtype=torch.long)
                mask = torch.zeros(B, T, dtype=torch.long)
                for i, s in enumerate(chunk):
                    ids[i, T - len(s):], mask[i, T - len(s):] = s, 1
                ids, mask = ids.to(dev), mask.to(dev)
                state["ar"], state["readout"] = torch.arange(B, device=dev), readout_positions(mask)
                eps = {(KINDS.index(k), l): torch.zeros(B, plan.d, device=dev, requires_grad=True)
                       for k in plan.kinds for l in plan.layers}
                state["eps"] = eps
                h = backbone(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
                             use_cache=False).last_hidden_state
                sc = h[state["ar"], state["readout"]].float() @ plan.v_ref.T  # [B, E]
                s_base += (sc.detach().double() * memb.double()).sum(0).cpu()
                keys = list(eps)
                for e in range(E):
                    grads = torch.autograd.grad((sc[:, e] * memb[:, e]).sum(), [eps[k] for k in keys], retain_graph=e < E - 1)
                    for (p, l), g in zip(keys, grads):
                        dsum[e, p, l] += (g.double() @ plan.u[p, l, e].double()).sum().cpu()
                state["eps"] = {}
                calls, rows = calls + 1, rows + ids.numel()
                bar.update()
    finally:
        for hk in hooks:
            hk.remove()
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        bar.close()
    n = plan.members.sum(0).double()
    base = s_base / n
    D = dsum / n[:, None, None]
    measured = torch.zeros(2, plan.L, dtype=torch.bool)
    for k in plan.kinds:
        measured[KINDS.index(k), list(plan.layers)] = True
    D = torch.where(measured[None], D, torch.full_like(D, float("nan")))
    stats = dict(forward_calls=calls, backward_calls=calls * E, token_rows=rows, prompt_tokens=sum(len(s) for s in seqs),
                 n_prompts=len(seqs), wall_s=time.perf_counter() - t0)
    return InfluenceResult(I=D[..., None].float(), s_base=base.float(), s_inj=base[:, None, None, None].expand(E, 2, plan.L, 1).float().clone(),
                           alphas=(0.0,), n_prompts=plan.members.sum(0), emotions=plan.emotions, method="grad", stats=stats)


# ---------------------------------------------------------------------------------------------
# convenience
# ---------------------------------------------------------------------------------------------
def sublayer_influence(model, prompts, directions: torch.Tensor, sigma: torch.Tensor, method: str = "fast",
                       window: Sequence[int] | None = None, **kwargs) -> InfluenceResult:
    """Build v_ref and u from ``directions`` [2, L, E, d] (:func:`reference_directions`) and run
    ``method`` ∈ {"fast", "naive", "grad"} with the remaining keyword arguments."""
    v_ref, u = reference_directions(directions, window)
    fn = {"fast": influence_fast, "naive": influence_naive, "grad": influence_grad}.get(method)
    if fn is None:
        raise ValueError(f"unknown method {method!r}: use 'fast', 'naive' or 'grad'")
    res = fn(model, prompts, u, sigma, v_ref, **kwargs)
    res.stats["window"] = list(window) if window is not None else list(late_window(directions.shape[1]))
    return res
