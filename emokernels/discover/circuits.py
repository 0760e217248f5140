r"""Global emotion circuits (METHOD.md §8.4, stage 06.5): budget allocation over layers and
component selection, plus the :class:`Circuit` artifact that ``emokernels.patch`` applies.

Paper rule, per emotion e and kind (mlp neurons / attention heads), over L layers:

1. weights w_ℓ = max(Ī_{e,kind,ℓ}, 0)  (negative influence clipped);
2. budget K_total = 560 split by a fixed ratio mlp:attn = 0.7:0.3 → K_mlp = 392, K_attn = 168;
3. :func:`allocate`: floor k_min per layer (4 neurons / 2 heads), remainder R = K − L·k_min split as
   ⌊R·ŵ_ℓ⌋ (ŵ = w/Σw), leftovers one each to the largest fractional parts, per-layer cap
   min(⌊cap_ratio·K⌋, available_ℓ), and any deficit from the cap redistributed to layers with spare
   room, largest planned quota first;
4. layer ℓ takes its top-k_ℓ neurons by C_mean and top-k_ℓ heads by I^head, ranked *within* the layer;
5. each selected component carries its stage-05 mean difference (Δa at the neuron, Δz over the
   head's hd channels), un-normalised.

Options beyond the paper (all off by default; METHOD §11 item 13 lists the flaws they address):

* ``ratio="auto"``: split K_total by Σw_mlp : Σw_attn instead of the fixed 0.7 : 0.3, so the
  cross-kind importance matters.
* ``floors=False``: no per-layer floor, so layers with Ī ≈ 0 get nothing.
* ``include_negative=True``: an extra budget ``round(negative_frac·K_total)`` of **ablation targets**
  (same kind ratio, allocated by |Ī| with no floor): in each layer the components with the most
  negative score (C_mean < 0 / I^head < 0 only — components that push the residual *away* from
  the emotion). The circuit zero-ablates them (edit scale 0) alongside the Δ enhancement of the
  positive components. Scale-0 edits are multiplicative, so such a circuit cannot be compiled to
  biases (:func:`emokernels.control.modulation.compile_to_bias` refuses it).

Tensor layouts follow the rest of ``emokernels.discover``: component tables are **layer-major**
``[L, E, ...]`` (``NeuronScores.C_mean`` [L, 6, d_ff], ``HeadScores.mean`` [L, 6, H],
``ComponentDiffs.da`` [L, 6, d_ff] / ``dz`` [L, 6, H·hd]); those objects can be passed directly.
Ī is ``[E, 2 (attn, mlp), L]`` (``InfluenceResult.Ibar``).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..data.labels import EMOTIONS

PAPER_STRENGTHS = {"anger": 0.8}  # every other emotion 1.0 (stage 07)
KIND_POINT = {"attention": 0, "mlp": 1}  # index into Ī's second axis (attn, mlp)


# ---------------------------------------------------------------------------------------------
# allocation
# ---------------------------------------------------------------------------------------------
@dataclass
class Allocation:
    """Per-layer allocation log (the official ``alloc_log`` columns): all lists of length L."""

    w: list[float]
    w_norm: list[float]
    k_base: list[int]
    k_add: list[int]
    k_assigned: list[int]
    available: list[int]
    cap: list[int]
    k_used: list[int]
    budget: int

    @property
    def total(self) -> int:
        return sum(self.k_used)

    def rows(self) -> list[dict]:
        return [dict(layer=l, w=self.w[l], w_norm=self.w_norm[l], k_base=self.k_base[l], k_add=self.k_add[l],
                     k_assigned=self.k_assigned[l], available=self.available[l], cap=self.cap[l], k_used=self.k_used[l])
                for l in range(len(self.w))]


def allocate(w: Sequence[float] | torch.Tensor, budget: int, min_per_layer: int = 0, cap_ratio: float = 0.4,
             available: int | Sequence[int] | None = None) -> Allocation:
    """Split ``budget`` components over layers in proportion to the non-negative weights ``w`` [L].

    k_base_ℓ = min(min_per_layer, available_ℓ); R = budget − Σ k_base;
    k_add_ℓ  = ⌊R·ŵ_ℓ⌋ (ŵ = w/Σw, uniform when Σw = 0), then the R − Σ⌊·⌋ leftover units go one each
    to the largest fractional parts R·ŵ_ℓ − ⌊R·ŵ_ℓ⌋ (ties: lower layer first);
    cap_ℓ = min(⌊cap_ratio·budget⌋, available_ℓ); k_used_ℓ = min(k_base_ℓ + k_add_ℓ, cap_ℓ);
    the deficit Σ(k_assigned − k_used) goes to the layers with spare room in order of planned quota
    k_assigned (largest first, ties: lower layer), each filled up to its cap before the next. The
    committed run never hits the cap, so this order is our reading of the rule [unsure]; it keeps
    the deficit in high-weight layers rather than spreading it to layers with w = 0.
    If total capacity is below ``budget`` the result sums to less (``Allocation.total``).
    """
    wt = torch.as_tensor(w, dtype=torch.float64).flatten()
    L = wt.numel()
    if L == 0:
        raise ValueError("w is empty: need one weight per layer")
    if not torch.isfinite(wt).all() or (wt < 0).any():
        raise ValueError("w must be finite and non-negative (clip negative influence first)")
    budget = int(budget)
    if budget < 0 or min_per_layer < 0:
        raise ValueError(f"budget ({budget}) and min_per_layer ({min_per_layer}) must be ≥ 0")
    if not 0 < cap_ratio <= 1:
        raise ValueError(f"cap_ratio must be in (0, 1], got {cap_ratio}")
    if available is None:
        avail = [budget] * L
    elif isinstance(available, int):
        avail = [available] * L
    else:
        avail = [int(a) for a in available]
        if len(avail) != L:
            raise ValueError(f"available has {len(avail)} entries, w has {L}")
    if any(a < 0 for a in avail):
        raise ValueError("available counts must be ≥ 0")
    k_base = [min(min_per_layer, a) for a in avail]
    R = budget - sum(k_base)
    if R < 0:
        raise ValueError(f"budget {budget} is smaller than the per-layer floors ({sum(k_base)} = {L} layers × {min_per_layer})")
    total_w = float(wt.sum())
    w_norm = (wt / total_w) if total_w > 0 else torch.full((L,), 1.0 / L, dtype=torch.float64)
    raw = R * w_norm
    k_add = [int(math.floor(x)) for x in raw.tolist()]
    left = R - sum(k_add)
    frac = [x - k for x, k in zip(raw.tolist(), k_add)]
    for l in sorted(range(L), key=lambda i: -frac[i])[:left]:  # sorted() is stable: ties -> lower layer
        k_add[l] += 1
    k_assigned = [b + a for b, a in zip(k_base, k_add)]
    ratio_cap = int(math.floor(cap_ratio * budget))
    cap = [min(ratio_cap, a) for a in avail]
    k_used = [min(k, c) for k, c in zip(k_assigned, cap)]
    deficit = sum(k_assigned) - sum(k_used)
    for l in sorted(range(L), key=lambda i: -k_assigned[i]):  # largest planned quota first, filled to its cap
        give = min(deficit, cap[l] - k_used[l])
        k_used[l] += give
        deficit -= give
    return Allocation(w=wt.tolist(), w_norm=w_norm.tolist(), k_base=k_base, k_add=k_add, k_assigned=k_assigned,
                      available=avail, cap=cap, k_used=k_used, budget=budget)


# ---------------------------------------------------------------------------------------------
# circuit artifact
# ---------------------------------------------------------------------------------------------
def _empty_ids():
    return torch.zeros(0, dtype=torch.long)


@dataclass
class Circuit:
    """A global emotion circuit: per emotion and layer, the selected components and their Δ.

    * ``neurons[e][ℓ]``: int64 [n] neuron ids (best first); ``delta_a[e][ℓ]``: fp32 [n] = Δa_{e,ℓ}[ids].
    * ``heads[e][ℓ]``: int64 [m] head ids; ``delta_z[e][ℓ]``: fp32 [m, hd] = Δz_{e,ℓ} on those head slices.
    * ``ablate_neurons[e][ℓ]`` / ``ablate_heads[e][ℓ]``: ablation targets (``include_negative``; usually empty).
    * ``strengths[e]``: default modulation strength s (paper: 1.0, anger 0.8).
    * ``shape``: the model shape it was built for (``Adapter.describe()``), checked on apply.
    * ``model_identity``: name and config hash of that model (:mod:`emokernels.models.identity`),
      checked on apply unless ``allow_model_mismatch``.
    * ``meta``: allocation logs and options.

    Layers missing from a mapping select nothing. Apply with
    ``emokernels.patch(model, circuit, emotion="anger", strength=None)`` (see
    :mod:`emokernels.control.modulation`).
    """

    emotions: tuple[str, ...]
    neurons: dict[str, dict[int, torch.Tensor]]
    delta_a: dict[str, dict[int, torch.Tensor]]
    heads: dict[str, dict[int, torch.Tensor]]
    delta_z: dict[str, dict[int, torch.Tensor]]
    shape: dict
    strengths: dict[str, float] = field(default_factory=dict)
    ablate_neurons: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)
    ablate_heads: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    model_identity: dict | None = None
    allow_model_mismatch: bool = field(default=False, compare=False, repr=False)  # not saved

    def __post_init__(self):
        self.emotions = tuple(self.emotions)
        if len(set(self.emotions)) != len(self.emotions):
            raise ValueError(f"circuit emotions {self.emotions} name an emotion twice")
        for e in self.emotions:
            self.strengths.setdefault(e, PAPER_STRENGTHS.get(e, 1.0))
            for name in ("neurons", "delta_a", "heads", "delta_z", "ablate_neurons", "ablate_heads"):
                getattr(self, name).setdefault(e, {})
        for e in self.emotions:
            for l, ids in self.neurons[e].items():
                if self.delta_a[e].get(l) is None or self.delta_a[e][l].shape != ids.shape:
                    raise ValueError(f"circuit {e} layer {l}: delta_a does not match the {ids.numel()} neuron ids")
            for l, ids in self.heads[e].items():
                dz = self.delta_z[e].get(l)
                if dz is None or dz.dim() != 2 or dz.shape[0] != ids.numel():
                    raise ValueError(f"circuit {e} layer {l}: delta_z must be [{ids.numel()}, head_dim]")

    # -- queries -------------------------------------------------------------------------------
    def size(self, emotion: str) -> dict:
        e = self._check_emotion(emotion)
        return {"neurons": sum(int(v.numel()) for v in self.neurons[e].values()),
                "heads": sum(int(v.numel()) for v in self.heads[e].values()),
                "ablate_neurons": sum(int(v.numel()) for v in self.ablate_neurons[e].values()),
                "ablate_heads": sum(int(v.numel()) for v in self.ablate_heads[e].values())}

    def has_ablation(self) -> bool:
        return any(v.numel() for e in self.emotions for d in (self.ablate_neurons[e], self.ablate_heads[e]) for v in d.values())

    def _check_emotion(self, emotion) -> str:
        from ..patch.rows import emotion_index

        return self.emotions[emotion_index(self.emotions, emotion, owner="this circuit")]

    def check_model(self, model, allow_model_mismatch: bool | None = None) -> None:
        """Raise ValueError naming every shape field where ``model`` differs from the circuit's model,
        and :class:`~emokernels.models.identity.ModelMismatchError` if the recorded model identity
        is not ``model``'s (unless allowed: argument, else ``self.allow_model_mismatch``)."""
        from ..models.adapters import Adapter
        from ..models.identity import check_identity

        have = Adapter.of(model).describe()
        keys = ("num_layers", "hidden_size", "num_heads", "head_dim", "intermediate_size")
        bad = [f"{k}: circuit {self.shape.get(k)} vs model {have[k]}" for k in keys if self.shape.get(k) != have[k]]
        if bad:
            raise ValueError("circuit was built for a different model shape (" + "; ".join(bad) + ")")
        allow = self.allow_model_mismatch if allow_model_mismatch is None else allow_model_mismatch
        check_identity(self.model_identity, model, "this circuit", allow)

    def select(self, emotions: Sequence[str]) -> "Circuit":
        """This circuit with ``emotions`` in that order (tables stay keyed by name). Raises
        ValueError naming any emotion the circuit lacks."""
        emotions = tuple(emotions)
        missing = [e for e in emotions if e not in self.emotions]
        if missing:
            raise ValueError(f"the circuit has no {', '.join(map(repr, missing))}: it holds {', '.join(self.emotions)}")
        if emotions == self.emotions:
            return self
        pick = {name: {e: getattr(self, name)[e] for e in emotions} for name in self._TABLES}
        return dataclasses.replace(self, emotions=emotions, strengths={e: self.strengths[e] for e in emotions}, **pick)

    def to_interventions(self, model, **kwargs):
        """See :func:`emokernels.control.modulation.circuit_interventions`."""
        # The one upward import (discover -> control, allow-listed in tests/test_layering.py): patch()
        # expands objects through their ``to_interventions`` protocol, so the circuit applies itself,
        # while the apply logic lives in control; lazy, so discover never loads control at import.
        from ..control.modulation import circuit_interventions

        return circuit_interventions(self, model, **kwargs)

    # -- I/O -------------------------------------------------------------------------------------
    _TABLES = ("neurons", "delta_a", "heads", "delta_z", "ablate_neurons", "ablate_heads")

    def save(self, path) -> Path:
        """``path``.safetensors (one tensor per (table, emotion, layer)) + ``path``.json metadata."""
        from ..io import save_tensors

        tensors = {}
        for name in self._TABLES:
            for e, per_layer in getattr(self, name).items():
                for l, t in per_layer.items():
                    if t.numel():
                        tensors[f"{name}.{e}.{int(l)}"] = t
        meta = {"kind": "emotion_circuit", "emotions": list(self.emotions), "strengths": self.strengths,
                "shape": self.shape, "model_identity": self.model_identity, "meta": self.meta}
        if not tensors:  # safetensors needs at least something to hold the header
            tensors["_empty"] = torch.zeros(1)
        return save_tensors(path, tensors, meta)

    @classmethod
    def load(cls, path, model=None, *, emotions: Sequence[str] | None = None,
             allow_model_mismatch: bool = False) -> "Circuit":
        """Read a circuit written by :meth:`save`; with ``model`` check that it fits (shape and
        model identity; ``allow_model_mismatch=True`` applies a circuit of another model anyway).

        Tables are keyed by emotion name; ``emotions=[...]`` keeps those emotions in that order and
        raises ValueError naming any the file lacks. Missing metadata keys, non-finite Δ or
        strengths, and tensors of emotions the metadata does not list raise CorruptArtifactError
        naming the file."""
        from ..io import CorruptArtifactError, load_tensors, require_finite, require_keys
        from ..models.identity import warn_unrecorded

        t, meta = load_tensors(path)
        if meta.get("kind") != "emotion_circuit":
            raise CorruptArtifactError(f"{path} is not an emotion-circuit artifact (kind={meta.get('kind')!r})")
        require_keys(t, meta, path, meta_keys=("emotions", "shape"))
        require_finite(t, path)
        stored = tuple(meta["emotions"])
        tables = {name: {e: {} for e in stored} for name in cls._TABLES}
        unexpected = []
        for key, v in sorted(t.items()):
            if key == "_empty":
                continue
            try:
                name, e, l = key.rsplit(".", 2)
                tables[name][e][int(l)] = v.long() if name in ("neurons", "heads", "ablate_neurons", "ablate_heads") else v.float()
            except (ValueError, KeyError):
                unexpected.append(key)
        if unexpected:
            raise CorruptArtifactError(f"{path}: unexpected tensors {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''} "
                                       f"(not '<table>.<emotion>.<layer>' of a listed emotion {stored})")
        try:
            strengths = {k: float(v) for k, v in meta.get("strengths", {}).items()}
        except (TypeError, ValueError) as err:
            raise CorruptArtifactError(f"{path}: strengths must be numbers, got {meta.get('strengths')!r}") from err
        bad = [k for k, v in strengths.items() if not math.isfinite(v)]
        if bad:
            raise CorruptArtifactError(f"{path}: strengths of {bad} are not finite")
        try:
            c = cls(emotions=stored, shape=meta["shape"], strengths=strengths, meta=meta.get("meta", {}),
                    model_identity=meta.get("model_identity"), allow_model_mismatch=allow_model_mismatch, **tables)
        except ValueError as e:
            raise CorruptArtifactError(f"{path}: {e}") from e
        if "model_identity" not in meta:  # a file from before identities (built in memory without one: None, silent)
            warn_unrecorded(path, "circuit")
        if emotions is not None:
            c = c.select(emotions)
        if model is not None:
            c.check_model(model)
        return c


# ---------------------------------------------------------------------------------------------
# assembly
# ---------------------------------------------------------------------------------------------
def _layer_table(x, name: str, L: int, E: int, width: int | None, attr_candidates: Sequence[str]):
    """Object with ``.layers`` and a [L', E, W] table, or a plain [L, E, W] tensor -> {layer: [E, W]}."""
    layers = None
    for a in () if isinstance(x, torch.Tensor) else attr_candidates:
        if hasattr(x, a):
            layers = tuple(int(l) for l in getattr(x, "layers", range(L)))
            x = getattr(x, a)
            break
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor [L, E, ...] or an object with .{attr_candidates[0]}")
    if layers is None:
        layers = tuple(range(x.shape[0]))
        if x.shape[0] != L:
            raise ValueError(f"{name} has {x.shape[0]} layers, the model has {L}: expected layer-major [L={L}, E={E}, ...] "
                             f"(like NeuronScores/HeadScores/ComponentDiffs); transpose an emotion-major table first")
    if x.dim() != 3 or x.shape[0] != len(layers) or x.shape[1] != E or (width is not None and x.shape[2] != width):
        raise ValueError(f"{name} must be [L', E={E}, {width or 'W'}] layer-major, got {tuple(x.shape)}")
    if any(not 0 <= l < L for l in layers):
        raise ValueError(f"{name} names layers outside [0, {L})")
    return {l: x[i] for i, l in enumerate(layers)}


def assemble_circuit(Ibar, neuron_scores, head_scores, delta_a, delta_z=None, *, shape: Mapping, K_total: int = 560,
                     ratio: str = "fixed", mlp_frac: float = 0.7, floors: bool = True, min_mlp: int = 4, min_attn: int = 2,
                     cap_ratio: float = 0.4, include_negative: bool = False, negative_frac: float = 0.1,
                     emotions: Sequence[str] = EMOTIONS, strengths: Mapping[str, float] | None = None,
                     model_identity: dict | None = None) -> Circuit:
    """Build a :class:`Circuit` from sublayer influence and component scores (METHOD §8.4).

    * ``Ibar``: [E, 2 (attn, mlp), L] (or an ``InfluenceResult``); NaN counts as 0.
    * ``neuron_scores``: C_mean [L, E, d_ff] (or ``NeuronScores``); ``head_scores``: I^head [L, E, H]
      (or ``HeadScores``). Ranking is by score, descending, within each layer (ties: lower id).
    * ``delta_a`` [L, E, d_ff], ``delta_z`` [L, E, H·hd] (or one ``ComponentDiffs`` as ``delta_a``).
    * ``shape``: ``Adapter.of(model).describe()`` — stored and checked when the circuit is applied.
    * ``K_total``, ``ratio`` ("fixed": K_mlp = round(mlp_frac·K); "auto": by Σw_mlp : Σw_attn),
      ``floors`` (k_min = min_mlp / min_attn per layer, else 0), ``cap_ratio``: see :func:`allocate`.
    * ``include_negative``/``negative_frac``: ablation targets (module docstring).
    * ``model_identity``: ``emokernels.models.identity.model_identity(model)``, stored and checked on apply.
    Layers with no score or Δ rows get ``available = 0``, so their quota moves elsewhere.
    """
    if ratio not in ("fixed", "auto"):
        raise ValueError(f"ratio must be 'fixed' or 'auto', got {ratio!r}")
    if not 0 <= mlp_frac <= 1:
        raise ValueError(f"mlp_frac must be in [0, 1], got {mlp_frac}")
    emotions = tuple(emotions)
    E = len(emotions)
    if model_identity:  # component tables that recorded their model must come from this one
        from ..models.identity import ModelMismatchError, describe, mismatch

        for what, obj in (("neuron_scores", neuron_scores), ("head_scores", head_scores), ("delta_a", delta_a),
                          ("delta_z", delta_z)):
            stored = (getattr(obj, "meta", None) or {}).get("model_identity")
            diff = mismatch(stored, model_identity) if isinstance(stored, dict) else []
            if diff:
                raise ModelMismatchError(f"{what} were computed on {describe(stored)}, but the circuit is assembled for "
                                         f"{describe(model_identity)}: " + "; ".join(diff))
    L, H, hd, d_ff = (int(shape[k]) for k in ("num_layers", "num_heads", "head_dim", "intermediate_size"))
    Ibar = getattr(Ibar, "Ibar", Ibar)
    Ibar = torch.as_tensor(Ibar, dtype=torch.float64).nan_to_num(0.0)
    if tuple(Ibar.shape) != (E, 2, L):
        raise ValueError(f"Ibar must be [E={E}, 2 (attn, mlp), L={L}], got {tuple(Ibar.shape)}")
    if delta_z is None:
        if not (hasattr(delta_a, "da") and hasattr(delta_a, "dz")):
            raise ValueError("pass delta_z, or a ComponentDiffs object as delta_a")
        delta_z = delta_a
    C = _layer_table(neuron_scores, "neuron_scores", L, E, d_ff, ("C_mean",))
    Ih = _layer_table(head_scores, "head_scores", L, E, H, ("mean",))
    Da = _layer_table(delta_a, "delta_a", L, E, d_ff, ("da",))
    Dz = _layer_table(delta_z, "delta_z", L, E, H * hd, ("dz",))
    n_layers_ok = [l for l in range(L) if l in C and l in Da]
    h_layers_ok = [l for l in range(L) if l in Ih and l in Dz]
    avail_mlp = [d_ff if l in n_layers_ok else 0 for l in range(L)]
    avail_attn = [H if l in h_layers_ok else 0 for l in range(L)]

    def split(w_mlp, w_attn, K):
        if ratio == "fixed":
            return int(round(mlp_frac * K))
        tot = float(w_mlp.sum() + w_attn.sum())
        return int(round(K * float(w_mlp.sum()) / tot)) if tot > 0 else int(round(mlp_frac * K))

    strengths = dict(strengths or {})
    out = {name: {e: {} for e in emotions} for name in Circuit._TABLES}
    logs = {}
    for ei, e in enumerate(emotions):
        w_attn, w_mlp = Ibar[ei, 0].clamp(min=0), Ibar[ei, 1].clamp(min=0)  # paper: negative Ī clipped
        k_mlp = split(w_mlp, w_attn, K_total)
        fm, fa = (min_mlp, min_attn) if floors else (0, 0)
        # the floors must fit in each kind's budget (auto ratio can starve one kind)
        k_mlp = min(max(k_mlp, fm * sum(a > 0 for a in avail_mlp)), K_total - fa * sum(a > 0 for a in avail_attn))
        alloc_m = allocate(w_mlp, k_mlp, fm, cap_ratio, avail_mlp)
        alloc_a = allocate(w_attn, K_total - k_mlp, fa, cap_ratio, avail_attn)
        logs[e] = {"mlp": alloc_m.rows(), "attention": alloc_a.rows(), "K_mlp": k_mlp, "K_attn": K_total - k_mlp}
        for l in range(L):
            if alloc_m.k_used[l]:
                ids = torch.argsort(C[l][ei].double(), descending=True, stable=True)[: alloc_m.k_used[l]]
                out["neurons"][e][l] = ids.long()
                out["delta_a"][e][l] = Da[l][ei][ids].float()
            if alloc_a.k_used[l]:
                ids = torch.argsort(Ih[l][ei].double(), descending=True, stable=True)[: alloc_a.k_used[l]]
                out["heads"][e][l] = ids.long()
                out["delta_z"][e][l] = Dz[l][ei].float().view(H, hd)[ids].clone()
        if include_negative:
            K_neg = int(round(negative_frac * K_total))
            wa, wm = Ibar[ei, 0].abs(), Ibar[ei, 1].abs()
            kn_mlp = split(wm, wa, K_neg)
            neg_n = [int((C[l][ei] < 0).sum()) if l in C else 0 for l in range(L)]
            neg_h = [int((Ih[l][ei] < 0).sum()) if l in Ih else 0 for l in range(L)]
            an = allocate(wm, kn_mlp, 0, cap_ratio, neg_n)
            ah = allocate(wa, K_neg - kn_mlp, 0, cap_ratio, neg_h)
            logs[e]["ablate_mlp"], logs[e]["ablate_attention"] = an.rows(), ah.rows()
            for l in range(L):
                if an.k_used[l]:
                    out["ablate_neurons"][e][l] = torch.argsort(C[l][ei].double(), stable=True)[: an.k_used[l]].long()
                if ah.k_used[l]:
                    out["ablate_heads"][e][l] = torch.argsort(Ih[l][ei].double(), stable=True)[: ah.k_used[l]].long()
    meta = {"K_total": K_total, "ratio": ratio, "mlp_frac": mlp_frac, "floors": floors, "min_mlp": min_mlp,
            "min_attn": min_attn, "cap_ratio": cap_ratio, "include_negative": include_negative,
            "negative_frac": negative_frac if include_negative else 0.0,
            "allocation": logs, "Ibar": Ibar.tolist()}
    return Circuit(emotions=emotions, shape=dict(shape), strengths=strengths, meta=meta, model_identity=model_identity, **out)
