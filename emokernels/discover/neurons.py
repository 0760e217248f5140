r"""MLP neurons: exact additive decomposition of the MLP output's emotion projection (METHOD §6.1).

For layer ℓ, emotion e and the unit MLP-point direction v = v^mlp_{e,ℓ} ∈ R^d::

    β_{e,ℓ}   = W_D,ℓᵀ v                       [L, 6, d_ff]  precomputed once (fp32)
    c_j       = a_{ℓ,j}[t*] · β_{e,ℓ,j}         signed contribution of neuron j
    Σ_j c_j   = ⟨W_D,ℓ a_ℓ[t*], v⟩              exact (down_proj has no bias)

``a_ℓ`` is the down_proj input (post-SwiGLU activations, site ``neurons``) at the readout
token t*. For Llama/Qwen/Mistral/Phi-3 ``W_D a`` *is* the MLP output F_ℓ, so the c_j sum to
⟨F_ℓ[t*], v⟩. **Gemma 2/3** put a post-feed-forward RMSNorm between ``W_D a`` and the
residual (F = mlp_post(W_D a)); there the decomposition is exact for ``W_D a`` (the pre-norm
MLP output), not for F, which is a non-linear function of all neurons together.

Over the samples i of target emotion e (the paper groups by the row's target emotion, so each
emotion's ranking uses its own prompts), accumulated online — no per-sample [N, d_ff] store::

    C_mean_j = mean_i c_ij      C_pos_j = mean_i max(c_ij, 0)      C_neg_j = mean_i max(−c_ij, 0)
    H_mean_j = mean_i a_ij

Neurons are ranked per layer by C_mean, descending (what circuit selection consumes).

The pieces the component stage shares (SEV units → prompt batches, the one-pass runner, the
direction-tensor coercion) live in :mod:`.collect`.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch

from ..data.labels import EMOTIONS
from ..models.adapters import Adapter
from ..patch import Intervention, patch
from .collect import Collector, check_dirs, forward, readout_rows, resolve_layers, run_collectors

__all__ = ["neuron_betas", "neuron_contributions", "NeuronAccumulator", "NeuronScores", "neuron_scores"]


# ---------------------------------------------------------------------------------------------
# neurons
# ---------------------------------------------------------------------------------------------
def neuron_betas(model, dirs_mlp: torch.Tensor, layers=None) -> torch.Tensor:
    """β[i, e] = W_D,ℓᵀ v^mlp_{e,ℓ} for ℓ = layers[i]: fp32 ``[len(layers), 6, d_ff]``."""
    a = Adapter.of(model)
    dirs = check_dirs(dirs_mlp, a, "dirs_mlp")
    layers = resolve_layers(a, layers)
    out = []
    for l in layers:
        W = a.sites(l).down_proj.weight.detach().float()  # [d, d_ff]
        out.append(dirs[l].to(W.device) @ W)
    return torch.stack(out)


def neuron_contributions(model, batch: dict, dirs_mlp: torch.Tensor, layers=None, emotion=None) -> dict:
    """Per-sample decomposition for one batch (small inputs only: it keeps [B, L, d_ff]).

    Returns ``{"c": [B, L', d_ff], "a": [B, L', d_ff], "beta": [L', 6, d_ff]}``, c for each row's
    target emotion (``batch["emotion"]``, or ``emotion``: an int for all rows)."""
    a = Adapter.of(model)
    layers = resolve_layers(a, layers)
    beta = neuron_betas(model, dirs_mlp, layers)
    B = batch["input_ids"].shape[0]
    emo = batch.get("emotion") if emotion is None else torch.full((B,), int(emotion), dtype=torch.long)
    if emo is None:
        raise ValueError("batch has no 'emotion' ids; pass emotion=")
    rows: dict[int, torch.Tensor] = {}
    iv = Intervention("neurons", "capture", layers, positions="readout",
                      fn=lambda l, x, m, st: rows.__setitem__(l, readout_rows(x, st)) if st.prefill else None)
    with torch.no_grad(), patch(model, iv):
        forward(model, batch)
    acts = torch.stack([rows[l] for l in layers], 1)  # [B, L', d_ff]
    b = beta.to(acts.device)[:, emo.to(acts.device)].transpose(0, 1)  # [B, L', d_ff]
    return {"c": acts * b, "a": acts, "beta": beta}


class NeuronAccumulator(Collector):
    """Streaming C_sum, C_pos, C_neg, H_sum per (layer, emotion, neuron), fp64, grouped by each
    row's target emotion. Memory: 4 × L × 6 × d_ff doubles; nothing per sample."""

    def __init__(self, model, dirs_mlp: torch.Tensor, layers=None):
        self.adapter = Adapter.of(model)
        self.layers = resolve_layers(self.adapter, layers)
        self._pos = {l: i for i, l in enumerate(self.layers)}
        self.beta = neuron_betas(model, dirs_mlp, self.layers)  # [L', 6, d_ff] fp32
        dev = self.beta.device
        shape = (len(self.layers), len(EMOTIONS), self.adapter.intermediate_size)
        self.sums = {k: torch.zeros(shape, dtype=torch.float64, device=dev) for k in ("C", "C_pos", "C_neg", "H")}
        self.counts = torch.zeros(len(EMOTIONS), dtype=torch.float64, device=dev)
        self._emo: torch.Tensor | None = None

    def interventions(self):
        return [Intervention("neurons", "capture", self.layers, positions="readout", fn=self._on_neurons,
                             name="neuron_contrib")]

    def begin(self, batch):
        if "emotion" not in batch:
            raise ValueError("batches need 'emotion' (target emotion id per row) for the neuron decomposition")
        self._emo = batch["emotion"].to(self.beta.device)

    def _on_neurons(self, l, x, pos_mask, state):
        if not state.prefill:
            return
        i = self._pos[l]
        act = readout_rows(x, state).to(self.beta.device)  # [B, d_ff]
        c = (act * self.beta[i][self._emo]).double()
        self.sums["C"][i].index_add_(0, self._emo, c)
        self.sums["C_pos"][i].index_add_(0, self._emo, c.clamp(min=0))
        self.sums["C_neg"][i].index_add_(0, self._emo, (-c).clamp(min=0))
        self.sums["H"][i].index_add_(0, self._emo, act.double())

    def end(self, batch):
        self.counts.index_add_(0, self._emo, torch.ones_like(self._emo, dtype=torch.float64))

    def state_dict(self):
        return {**{f"neurons.{k}": v for k, v in self.sums.items()}, "neurons.counts": self.counts}

    def load_state_dict(self, state):
        for k in self.sums:
            self.sums[k].copy_(state[f"neurons.{k}"])
        self.counts.copy_(state["neurons.counts"])

    def result(self) -> "NeuronScores":
        n = self.counts.clamp(min=1)[None, :, None]
        f = lambda k: (self.sums[k] / n).float().cpu()  # noqa: E731
        return NeuronScores(C_mean=f("C"), C_pos=f("C_pos"), C_neg=f("C_neg"), H_mean=f("H"),
                            beta=self.beta.cpu(), counts=self.counts.long().cpu(), layers=self.layers)


@dataclass
class NeuronScores:
    """Neuron decomposition results. All tensors ``[L', 6, d_ff]`` (layer-major like the
    directions); ``counts`` [6] = samples per emotion; ``layers`` = model layer of each row."""

    C_mean: torch.Tensor
    C_pos: torch.Tensor
    C_neg: torch.Tensor
    H_mean: torch.Tensor
    beta: torch.Tensor
    counts: torch.Tensor
    layers: tuple[int, ...]
    meta: dict = field(default_factory=dict)

    def ranking(self) -> torch.Tensor:
        """Neuron ids per (layer, emotion) by C_mean descending: int64 ``[L', 6, d_ff]``."""
        return torch.argsort(self.C_mean, dim=-1, descending=True, stable=True)

    def top(self, emotion: int | str, layer: int, k: int) -> torch.Tensor:
        """The top-``k`` neuron ids of model layer ``layer`` for ``emotion`` (by C_mean)."""
        e = EMOTIONS.index(emotion) if isinstance(emotion, str) else int(emotion)
        i = self.layers.index(layer)
        return torch.argsort(self.C_mean[i, e], descending=True, stable=True)[:k]

    def save(self, path, metadata: dict | None = None) -> Path:
        from ..io import save_tensors

        t = {"C_mean": self.C_mean, "C_pos": self.C_pos, "C_neg": self.C_neg, "H_mean": self.H_mean,
             "beta": self.beta, "counts": self.counts, "layers": torch.tensor(self.layers), "rank": self.ranking()}
        meta = {"kind": "neuron_scores", "emotions": list(EMOTIONS), "layers": list(self.layers),
                "shape": "[layer, emotion, neuron]", **self.meta, **(metadata or {})}
        return save_tensors(path, t, meta)

    @classmethod
    def load(cls, path) -> "NeuronScores":
        from ..io import CorruptArtifactError, load_tensors

        t, meta = load_tensors(path)
        need = ("C_mean", "C_pos", "C_neg", "H_mean", "beta", "counts", "layers")
        missing = [k for k in need if k not in t]
        if missing:
            raise CorruptArtifactError(f"{path}: not a neuron-score artifact (missing {missing})")
        return cls(t["C_mean"], t["C_pos"], t["C_neg"], t["H_mean"], t["beta"], t["counts"],
                   tuple(int(x) for x in t["layers"]), meta)

    def write_csv(self, folder, emotions: Sequence[str] = EMOTIONS) -> list[Path]:
        """``neurons_{e}.csv`` per emotion: layer, neuron, C_mean, C_pos, C_neg, beta, H_mean
        (the paper's ``contrib_mean_{e}.csv``), rows sorted by layer then C_mean descending,
        plus ``rank`` (0 = top within the layer). Written atomically."""
        from ..io import atomic_write_bytes
        import io

        folder = Path(folder)
        paths = []
        rank = self.ranking()
        for name in emotions:
            e = EMOTIONS.index(name)
            buf = io.StringIO()
            w = csv.writer(buf)
            w.writerow(["layer", "neuron", "rank", "C_mean", "C_pos", "C_neg", "beta", "H_mean"])
            for i, l in enumerate(self.layers):
                order = rank[i, e].tolist()
                cols = [self.C_mean[i, e], self.C_pos[i, e], self.C_neg[i, e], self.beta[i, e], self.H_mean[i, e]]
                cols = [c.tolist() for c in cols]
                for r, j in enumerate(order):
                    w.writerow([l, j, r] + [f"{c[j]:.6g}" for c in cols])
            paths.append(atomic_write_bytes(folder / f"neurons_{name}.csv", buf.getvalue().encode()))
        return paths


def neuron_scores(model, batches: Iterable[dict], dirs_mlp: torch.Tensor, layers=None, total: int | None = None,
                  progress: bool = True) -> NeuronScores:
    """Stream ``batches`` (emotion-prompted, ``emotion`` = target id per row) once and return
    the C_mean/C_pos/C_neg/H_mean tables. See the module docstring for the math."""
    acc = NeuronAccumulator(model, dirs_mlp, layers)
    run_collectors(model, batches, [acc], total=total, progress=progress, desc="neurons")
    return acc.result()

