r"""Circuit modulation (METHOD.md §8.5, stage 07) and its compile-to-bias form (§12.1 item 6).

**Sparse form** (the paper's injection, exact): for target emotion e with strength s,

* neurons: a_ℓ[t, j] += s·Δa_{e,ℓ,j} for j ∈ N_{e,ℓ}, at t* and every generated token
  (``positions=("readout", "generated")``);
* heads:   z_ℓ[t, k-slice] += s·Δz_{e,ℓ,k} for k ∈ H_{e,ℓ}, at **all** positions (prompt included);
* ablation targets (``include_negative`` circuits only): a_ℓ[t, j] ← 0 / z slice ← 0 at the same positions.

One batch can carry different emotions and strengths per row: the intervention tables hold one
row per distinct requested emotion, over the union of that layer's selected ids (zeros where a
neuron/head is not selected for that emotion), and ``rows`` picks the table row per batch row.

**Compiled form**: ``o_proj`` and ``down_proj`` are linear, so the additive edits equal constant
residual-space vectors added to the sublayer outputs:

    b^mlp_{e,ℓ}  = W_D,ℓ[:, N_{e,ℓ}] Δa_{e,ℓ}[N_{e,ℓ}]        ∈ R^d   (added to F_ℓ, t ≥ t*)
    b^attn_{e,ℓ} = Σ_{k∈H_{e,ℓ}} W_O,ℓ[:, k·hd:(k+1)·hd] Δz_{e,ℓ,k} ∈ R^d   (added to A_ℓ, all t)

times s at run time (a bias in o_proj/down_proj cancels in the difference, so it does not
matter). :func:`compile_to_bias` → :class:`CompiledCircuit` with tables [E, L, d]; applied with
``op="add"`` at ``mlp_out`` / ``attn_out``. That is the zero-extra-work form fused kernels use:
2·d adds per layer and token, no gather/scatter over neuron ids. Not valid when a post-norm sits
between the projection and the residual (Gemma 2/3: A = norm(W_O z)), nor for ablation targets
(multiplicative): both raise.

Usage::

    with emokernels.patch(model, circuit, emotion="anger"):            # s = circuit default (0.8)
        model.generate(**batch)
    with emokernels.patch(model, compile_to_bias(circuit, model), emotion=["fear", "anger"], strength=[1.0, 0.8]):
        ...
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ..discover.circuits import PAPER_STRENGTHS, Circuit
from ..models.adapters import Adapter
from ..patch import Intervention
from ..patch.rows import emotion_rows, resolve_strength

PAPER_POSITIONS = {"neurons": ("readout", "generated"), "heads": "all"}


def _resolve_rows(emotions: Sequence[str], emotion, strength, defaults: Mapping[str, float]):
    """-> (distinct emotions in first-seen order, rows (int or int64 [B]), strength (float or fp32 [B])).

    ``strength=None`` takes each row's emotion default (``defaults``, else 1.0). Validation is
    :mod:`emokernels.patch.rows` (unknown names, ids out of range, non-finite strengths)."""
    distinct, rows = emotion_rows(emotions, emotion, distinct=True, owner="this circuit")
    per_row = [distinct[r] for r in rows.tolist()] if isinstance(rows, torch.Tensor) else None
    what = "strength"
    if strength is None:
        what = "the circuit's default strength"
        strength = (float(defaults.get(distinct[0], 1.0)) if per_row is None
                    else torch.tensor([float(defaults.get(e, 1.0)) for e in per_row], dtype=torch.float32))
    return distinct, rows, resolve_strength(strength, n=None if per_row is None else len(per_row), what=what)


def _positions(positions, kind: str):
    if positions is None:
        return PAPER_POSITIONS[kind]
    if isinstance(positions, Mapping):
        alias = {"neurons": ("neurons", "mlp"), "heads": ("heads", "attn", "attention")}[kind]
        for k in alias:
            if k in positions:
                return positions[k]
        return PAPER_POSITIONS[kind]
    return positions


def circuit_interventions(circuit: Circuit, model, emotion=None, strength=None, positions=None, ablate: bool = True,
                          components: Sequence[str] = ("neurons", "heads")) -> list[Intervention]:
    """Sparse ``edit`` interventions that apply ``circuit`` for ``emotion``.

    ``emotion``: a name / index, or one per batch row. ``strength``: None (the circuit's per-emotion
    default: 1.0, anger 0.8), a float, or one per row. ``positions``: None (paper: neurons at
    readout+generated, heads at all), one spec for both, or ``{"neurons": ..., "heads": ...}``.
    ``ablate``: also zero the circuit's ablation targets (if it has any). ``components``: which
    kinds to apply (``("neurons",)`` for an MLP-only circuit, etc.).
    """
    circuit.check_model(model)
    bad = [c for c in components if c not in ("neurons", "heads")]
    if bad:
        raise ValueError(f"unknown components {bad}: use 'neurons' and/or 'heads'")
    distinct, rows, s = _resolve_rows(circuit.emotions, emotion, strength, circuit.strengths)
    a = Adapter.of(model)
    out = []
    for kind in components:
        sel = circuit.neurons if kind == "neurons" else circuit.heads
        dlt = circuit.delta_a if kind == "neurons" else circuit.delta_z
        abl = (circuit.ablate_neurons if kind == "neurons" else circuit.ablate_heads) if ablate else {}
        layers = sorted({l for e in distinct for l, v in sel[e].items() if v.numel()}
                        | {l for e in distinct for l, v in abl.get(e, {}).items() if v.numel()})
        index, add, scale = {}, {}, {}
        need_scale = False
        for l in layers:
            ids = sorted({int(i) for e in distinct for t in (sel[e].get(l), abl.get(e, {}).get(l)) if t is not None
                          for i in t.tolist()})
            pos = {i: j for j, i in enumerate(ids)}
            n = len(ids)
            A = torch.zeros((len(distinct), n) if kind == "neurons" else (len(distinct), n, a.head_dim))
            S = torch.ones(len(distinct), n)
            for r, e in enumerate(distinct):
                t = sel[e].get(l)
                if t is not None and t.numel():
                    A[r, [pos[int(i)] for i in t.tolist()]] = dlt[e][l].float()
                z = abl.get(e, {}).get(l)
                if z is not None and z.numel():
                    S[r, [pos[int(i)] for i in z.tolist()]] = 0.0
                    need_scale = True
            index[l], add[l], scale[l] = torch.tensor(ids, dtype=torch.long), A, S
        if not layers:
            continue
        out.append(Intervention(site=kind, op="edit", layers=layers, positions=_positions(positions, kind), index=index,
                                add=add, scale=scale if need_scale else None, rows=rows, strength=s,
                                name=f"circuit.{kind}"))
    return out


# ---------------------------------------------------------------------------------------------
# compiled form
# ---------------------------------------------------------------------------------------------
@dataclass
class CompiledCircuit:
    """Per-emotion residual-space biases: ``b_mlp`` / ``b_attn`` fp32 [E, L, d] (strength 1).

    ``layers_mlp`` / ``layers_attn``: the layers where the circuit selects anything (others are 0
    and get no hook). Apply with ``emokernels.patch(model, compiled, emotion=..., strength=...)``.
    """

    emotions: tuple[str, ...]
    b_mlp: torch.Tensor
    b_attn: torch.Tensor
    shape: dict
    strengths: dict[str, float] = field(default_factory=dict)
    layers_mlp: tuple[int, ...] = ()
    layers_attn: tuple[int, ...] = ()
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.emotions = tuple(self.emotions)
        for e in self.emotions:
            self.strengths.setdefault(e, PAPER_STRENGTHS.get(e, 1.0))

    def check_model(self, model) -> None:
        have = Adapter.of(model).describe()
        keys = ("num_layers", "hidden_size", "num_heads", "head_dim", "intermediate_size")
        bad = [f"{k}: compiled {self.shape.get(k)} vs model {have[k]}" for k in keys if self.shape.get(k) != have[k]]
        if bad:
            raise ValueError("compiled circuit was built for a different model shape (" + "; ".join(bad) + ")")
        from ..models.identity import check_identity  # issue 15: the model it was compiled on
        check_identity(self.meta.get("model_identity"), model, "this compiled circuit")

    def to_interventions(self, model, emotion=None, strength=None, positions=None,
                         components: Sequence[str] = ("neurons", "heads")) -> list[Intervention]:
        """``add`` interventions at ``mlp_out`` (readout+generated) and ``attn_out`` (all), same
        arguments and defaults as :func:`circuit_interventions` ("neurons" = the mlp biases)."""
        self.check_model(model)
        distinct, rows, s = _resolve_rows(self.emotions, emotion, strength, self.strengths)
        ei = [self.emotions.index(e) for e in distinct]
        out = []
        for kind in components:
            if kind not in ("neurons", "heads"):
                raise ValueError(f"unknown component {kind!r}: use 'neurons' and/or 'heads'")
            table, layers, site = ((self.b_mlp, self.layers_mlp, "mlp_out") if kind == "neurons"
                                   else (self.b_attn, self.layers_attn, "attn_out"))
            if not layers:
                continue
            out.append(Intervention(site=site, op="add", layers=layers, positions=_positions(positions, kind),
                                    vectors={l: table[ei, l] for l in layers}, rows=rows, strength=s,
                                    name=f"compiled.{kind}"))
        return out

    def save(self, path) -> Path:
        from ..io import save_tensors

        return save_tensors(path, {"b_mlp": self.b_mlp, "b_attn": self.b_attn},
                            {"kind": "compiled_circuit", "emotions": list(self.emotions), "strengths": self.strengths,
                             "shape": self.shape, "layers_mlp": list(self.layers_mlp),
                             "layers_attn": list(self.layers_attn), "meta": self.meta})

    @classmethod
    def load(cls, path) -> "CompiledCircuit":
        from ..io import CorruptArtifactError, load_tensors

        t, meta = load_tensors(path)
        if meta.get("kind") != "compiled_circuit":
            raise CorruptArtifactError(f"{path} is not a compiled-circuit artifact (kind={meta.get('kind')!r})")
        return cls(emotions=tuple(meta["emotions"]), b_mlp=t["b_mlp"], b_attn=t["b_attn"], shape=meta["shape"],
                   strengths={k: float(v) for k, v in meta.get("strengths", {}).items()},
                   layers_mlp=tuple(meta.get("layers_mlp", ())), layers_attn=tuple(meta.get("layers_attn", ())),
                   meta=meta.get("meta", {}))


@torch.no_grad()
def compile_to_bias(circuit: Circuit, model) -> CompiledCircuit:
    """Fold the circuit's additive edits through W_D and W_O (fp64 accumulation, stored fp32).

    Raises ValueError for architectures with a norm after o_proj/down_proj (Gemma 2/3) and for
    circuits with ablation targets (a multiplicative edit has no constant-bias form).
    """
    from ..models.identity import model_identity  # issue 15: recorded, checked when the biases are applied

    circuit.check_model(model)
    a = Adapter.of(model)
    if a.spec.attn_post or a.spec.mlp_post:
        raise ValueError(f"cannot compile a circuit to biases for {a.family!r}: its sublayer outputs pass through a "
                         "post-norm (A = norm(W_O z), F = norm(W_D a)), so the edit is not a constant residual vector; "
                         "apply the sparse circuit instead")
    if circuit.has_ablation():
        raise ValueError("this circuit has ablation targets (include_negative=True): zeroing a component is "
                         "multiplicative and has no bias form; apply the sparse circuit instead")
    E, L, d, hd = len(circuit.emotions), a.num_layers, a.hidden_size, a.head_dim
    b_mlp = torch.zeros(E, L, d, dtype=torch.float64)
    b_attn = torch.zeros(E, L, d, dtype=torch.float64)
    lm, la = set(), set()
    for ei, e in enumerate(circuit.emotions):
        for l, ids in circuit.neurons[e].items():
            if ids.numel():
                W = a.sites(l).down_proj.weight  # [d, d_ff]
                b_mlp[ei, l] = W[:, ids.to(W.device)].double().cpu() @ circuit.delta_a[e][l].double()
                lm.add(l)
        for l, ids in circuit.heads[e].items():
            if ids.numel():
                W = a.sites(l).o_proj.weight.view(d, a.num_heads, hd)  # [d, H, hd]
                b_attn[ei, l] = torch.einsum("dkh,kh->d", W[:, ids.to(W.device)].double().cpu(), circuit.delta_z[e][l].double())
                la.add(l)
    return CompiledCircuit(emotions=circuit.emotions, b_mlp=b_mlp.float(), b_attn=b_attn.float(), shape=dict(circuit.shape),
                           strengths=dict(circuit.strengths), layers_mlp=tuple(sorted(lm)), layers_attn=tuple(sorted(la)),
                           meta={"source": "compile_to_bias", "model_identity": model_identity(model), "circuit_meta": {k: v for k, v in circuit.meta.items()
                                                                               if k != "allocation"}})
