r"""Attention heads: zero-ablation scores for every head from ONE forward pass (METHOD §6.2).

The paper zeroes head k of layer ℓ (channels [k·hd, (k+1)·hd) of the o_proj input z_ℓ, at all
positions), re-runs the model and reads an emotion score at the *same* layer at t*: 1 + L·H
forward passes per sample. The score depends on the head only through the attention output at
t*, so all L·H scores follow exactly from one pass. At t*, per layer (fp32)::

    z ∈ R^{H·hd}   o_proj input          m = h + A ∈ R^d   mid residual (site resid_mid)
    u_k = W_O[:, k·hd:(k+1)·hd] z^{(k)}  ∈ R^d              per-head partial outputs [H, d]
    o   = W_O z (+ b_O)                                      o_proj output
    m^{(−k)} = m − u_k                                        (Llama, Qwen, Mistral, Phi-3)
    m^{(−k)} = m − P(o) + P(o − u_k)                          (Gemma: A = P(W_O z), P = post-attention RMSNorm)

Earlier positions are also ablated in the paper's run, but layer ℓ's attention at t* reads
only layer-ℓ inputs, which come from layers < ℓ, so they do not change the score (exact).

Readings of the score with v = v^attn_{e,ℓ} (unit, estimated on the un-normalised m):

* ``reading="residual"`` (default; METHOD §11 item 2 fixed): ``s = ⟨m, v⟩``, so
  ``s − s^{(−k)} = ⟨u_k, v⟩`` (Gemma: ``⟨P(o) − P(o − u_k), v⟩``).
* ``reading="normed"`` (the paper's code: the MLP input n = RMSNorm_mlp(m), γ-scaled)::

      s^{(−k)} = ⟨γ ⊙ v, m^{(−k)}⟩ / sqrt(‖m^{(−k)}‖² / d + ε)

Per emotion e over its samples i (rows whose target is e)::

    I^head_{e,ℓ,k} = mean_i (s_i − s_i^{(−k)})      std_{e,ℓ,k} = std_i(...)   (population std)

Positive I means the head writes towards the emotion. :func:`head_scores_bruteforce` runs the
paper's procedure (``patch`` edit with scale 0, one full forward per head, reading the MLP
input through a hook on the norm module) and is the oracle of the tests.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch

from ..data.labels import EMOTIONS
from ..models.adapters import Adapter
from ..patch import Intervention, patch
from .collect import Collector, check_dirs, forward, readout_rows, resolve_layers, run_collectors

__all__ = ["READINGS", "HeadScores", "HeadAccumulator", "head_deltas", "head_deltas_bruteforce", "head_scores",
           "head_scores_bruteforce"]

READINGS = ("residual", "normed")


def _check_reading(reading: str) -> str:
    if reading not in READINGS:
        raise ValueError(f"unknown reading {reading!r}: use 'residual' (⟨m, v⟩, default) or 'normed' (the paper's "
                         "⟨RMSNorm_mlp(m), v⟩)")
    return reading


def _rms_norm(x: torch.Tensor, gamma: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gamma


class _LayerMath:
    """fp32 copies of what the one-pass formula needs at one layer."""

    def __init__(self, adapter: Adapter, l: int, device):
        s = adapter.sites(l)
        W = s.o_proj.weight.detach().float().to(device)  # [d, H*hd]
        self.W_heads = W.view(W.shape[0], adapter.num_heads, adapter.head_dim)  # [d, H, hd]
        self.W = W
        b = getattr(s.o_proj, "bias", None)
        self.b = None if b is None else b.detach().float().to(device)
        self.post = None
        if adapter.spec.attn_post:
            self.post = (adapter.norm_gamma(s.attn_out).to(device), adapter.norm_eps(s.attn_out))
        self.mlp_norm = (adapter.norm_gamma(s.norm_mlp).to(device), adapter.norm_eps(s.norm_mlp))
        self.H, self.hd = adapter.num_heads, adapter.head_dim

    def ablated_mid(self, z: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """m^{(−k)} for every head k: [B, H, d] from z [B, H·hd], m [B, d]."""
        B = z.shape[0]
        u = torch.einsum("dhk,bhk->bhd", self.W_heads, z.view(B, self.H, self.hd))  # [B, H, d]
        if self.post is None:
            return m[:, None, :] - u
        o = z @ self.W.T
        if self.b is not None:
            o = o + self.b
        g, eps = self.post
        return m[:, None, :] - _rms_norm(o, g, eps)[:, None, :] + _rms_norm(o[:, None, :] - u, g, eps)

    def read(self, m: torch.Tensor, v: torch.Tensor, reading: str) -> torch.Tensor:
        """Score of mid-residual(s) ``m`` [..., d] on directions ``v`` (broadcast) → [...]."""
        if reading == "normed":
            g, eps = self.mlp_norm
            m = _rms_norm(m, g, eps)
        return (m * v).sum(-1)


def _rows_dirs(dirs: torch.Tensor, l: int, emo: torch.Tensor, device) -> torch.Tensor:
    return dirs[l].to(device)[emo.to(device)]  # [B, d]


class HeadAccumulator(Collector):
    """One-pass head scores, streamed: per (layer, emotion, head) sums of Δ = s − s^{(−k)}, Δ²,
    and of the baseline s (fp64). Captures z (site ``heads``) and m (``resid_mid``) at t*."""

    def __init__(self, model, dirs_attn: torch.Tensor, layers=None, reading: str = "residual"):
        self.adapter = Adapter.of(model)
        self.reading = _check_reading(reading)
        self.layers = resolve_layers(self.adapter, layers)
        self.dirs = check_dirs(dirs_attn, self.adapter, "dirs_attn")
        self.device = next(model.parameters()).device
        self._math = {l: _LayerMath(self.adapter, l, self.device) for l in self.layers}
        L, E, H = len(self.layers), len(EMOTIONS), self.adapter.num_heads
        self.sum = torch.zeros(L, E, H, dtype=torch.float64, device=self.device)
        self.sumsq = torch.zeros_like(self.sum)
        self.base = torch.zeros(L, E, dtype=torch.float64, device=self.device)
        self.counts = torch.zeros(E, dtype=torch.float64, device=self.device)
        self._z: dict[int, torch.Tensor] = {}
        self._m: dict[int, torch.Tensor] = {}
        self.last_deltas: torch.Tensor | None = None  # [B, L', H] of the latest batch

    def interventions(self):
        def keep(store):
            return lambda l, x, mask, st: store.__setitem__(l, readout_rows(x, st)) if st.prefill else None

        return [Intervention("heads", "capture", self.layers, positions="readout", fn=keep(self._z), name="head_z"),
                Intervention("resid_mid", "capture", self.layers, positions="readout", fn=keep(self._m), name="head_m")]

    def begin(self, batch):
        if "emotion" not in batch:
            raise ValueError("batches need 'emotion' (target emotion id per row) for head scores")
        self._z.clear()
        self._m.clear()

    def end(self, batch):
        emo = batch["emotion"].to(self.device)
        deltas, base = [], []
        for l in self.layers:
            lm = self._math[l]
            v = _rows_dirs(self.dirs, l, emo, self.device)
            z, m = self._z[l].to(self.device), self._m[l].to(self.device)
            s = lm.read(m, v, self.reading)  # [B]
            s_abl = lm.read(lm.ablated_mid(z, m), v[:, None, :], self.reading)  # [B, H]
            deltas.append(s[:, None] - s_abl)
            base.append(s)
        d = torch.stack(deltas, 1)  # [B, L', H]
        _accumulate(self, d, torch.stack(base, 1), emo)
        self.last_deltas = d

    def state_dict(self):
        return {"heads.sum": self.sum, "heads.sumsq": self.sumsq, "heads.base": self.base, "heads.counts": self.counts}

    def load_state_dict(self, state):
        for k in ("sum", "sumsq", "base", "counts"):
            getattr(self, k).copy_(state[f"heads.{k}"])

    def result(self) -> "HeadScores":
        return _result(self)


def _accumulate(acc, deltas: torch.Tensor, base: torch.Tensor, emo: torch.Tensor) -> None:
    """deltas [B, L', H], base [B, L'] → per-emotion sums (index_add over rows)."""
    d = deltas.double().transpose(0, 1)  # [L', B, H]
    for i in range(d.shape[0]):
        acc.sum[i].index_add_(0, emo, d[i])
        acc.sumsq[i].index_add_(0, emo, d[i] ** 2)
        acc.base[i].index_add_(0, emo, base[:, i].double())
    acc.counts.index_add_(0, emo, torch.ones_like(emo, dtype=torch.float64))


def _result(acc) -> "HeadScores":
    n = acc.counts.clamp(min=1)
    mean = acc.sum / n[None, :, None]
    var = (acc.sumsq / n[None, :, None] - mean**2).clamp(min=0)
    return HeadScores(mean=mean.float().cpu(), std=var.sqrt().float().cpu(),
                      baseline=(acc.base / n[None, :]).float().cpu(), counts=acc.counts.long().cpu(),
                      layers=acc.layers, reading=acc.reading)


@dataclass
class HeadScores:
    """``mean``/``std`` [L', 6, H] = I^head and its std over samples; ``baseline`` [L', 6] = mean s;
    ``counts`` [6]; ``layers`` = model layer of each row; ``reading`` = residual | normed."""

    mean: torch.Tensor
    std: torch.Tensor
    baseline: torch.Tensor
    counts: torch.Tensor
    layers: tuple[int, ...]
    reading: str
    meta: dict = field(default_factory=dict)

    def ranking(self) -> torch.Tensor:
        """Head ids per (layer, emotion) by I^head descending: int64 [L', 6, H]."""
        return torch.argsort(self.mean, dim=-1, descending=True, stable=True)

    def top(self, emotion, layer: int, k: int) -> torch.Tensor:
        e = EMOTIONS.index(emotion) if isinstance(emotion, str) else int(emotion)
        return torch.argsort(self.mean[self.layers.index(layer), e], descending=True, stable=True)[:k]

    def top_global(self, emotion, k: int) -> list[tuple[int, int, float]]:
        """The ``k`` highest-I (layer, head, I) over all scored layers."""
        e = EMOTIONS.index(emotion) if isinstance(emotion, str) else int(emotion)
        flat = self.mean[:, e].flatten()
        idx = torch.argsort(flat, descending=True, stable=True)[:k]
        H = self.mean.shape[-1]
        return [(self.layers[int(i) // H], int(i) % H, float(flat[i])) for i in idx]

    def save(self, path, metadata: dict | None = None) -> Path:
        from ..io import save_tensors

        t = {"mean": self.mean, "std": self.std, "baseline": self.baseline, "counts": self.counts,
             "layers": torch.tensor(self.layers), "rank": self.ranking()}
        meta = {"kind": "head_scores", "emotions": list(EMOTIONS), "layers": list(self.layers),
                "reading": self.reading, "shape": "[layer, emotion, head]", **self.meta, **(metadata or {})}
        return save_tensors(path, t, meta)

    @classmethod
    def load(cls, path) -> "HeadScores":
        from ..io import CorruptArtifactError, load_tensors

        t, meta = load_tensors(path)
        missing = [k for k in ("mean", "std", "baseline", "counts", "layers") if k not in t]
        if missing:
            raise CorruptArtifactError(f"{path}: not a head-score artifact (missing {missing})")
        return cls(t["mean"], t["std"], t["baseline"], t["counts"], tuple(int(x) for x in t["layers"]),
                   meta.get("reading", "residual"), meta)

    def write_csv(self, folder, emotions: Sequence[str] = EMOTIONS) -> list[Path]:
        """``heads_{e}.csv``: layer, head, mean_importance, std_importance, samples, baseline_mean
        (the paper's ``head_importance_{e}.csv`` columns)."""
        from ..io import atomic_write_bytes

        paths = []
        for name in emotions:
            e = EMOTIONS.index(name)
            buf = io.StringIO()
            w = csv.writer(buf)
            w.writerow(["layer", "head", "mean_importance", "std_importance", "samples", "baseline_mean"])
            for i, l in enumerate(self.layers):
                for k in range(self.mean.shape[-1]):
                    w.writerow([l, k, f"{float(self.mean[i, e, k]):.6g}", f"{float(self.std[i, e, k]):.6g}",
                                int(self.counts[e]), f"{float(self.baseline[i, e]):.6g}"])
            paths.append(atomic_write_bytes(Path(folder) / f"heads_{name}.csv", buf.getvalue().encode()))
        return paths


# ---------------------------------------------------------------------------------------------
# per-batch API (tests, inspection)
# ---------------------------------------------------------------------------------------------
def head_deltas(model, batch: dict, dirs_attn: torch.Tensor, layers=None, reading: str = "residual") -> torch.Tensor:
    """One pass: Δ[b, i, k] = s − s^{(−k)} at layer ``layers[i]`` for each row's target emotion.
    fp32 [B, L', H]."""
    acc = HeadAccumulator(model, dirs_attn, layers, reading)
    run_collectors(model, [batch], [acc], progress=False)
    return acc.last_deltas


def _head_ablation(l: int, k: int) -> Intervention:
    return Intervention("heads", "edit", (l,), positions="all", index={l: torch.tensor([k])},
                        scale={l: torch.zeros(1, 1)}, name=f"ablate.{l}.{k}")


def head_deltas_bruteforce(model, batch: dict, dirs_attn: torch.Tensor, layers=None, reading: str = "residual",
                           backend: str = "reference") -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's procedure: 1 + L'·H full forwards, each with one head zero-ablated at every
    position, reading the score at the same layer (the MLP input, through a hook on the norm
    module, for ``normed``; m at ``resid_mid`` for ``residual``). Returns (Δ [B, L', H], s [B, L'])."""
    a = Adapter.of(model)
    reading = _check_reading(reading)
    layers = resolve_layers(a, layers)
    dirs = check_dirs(dirs_attn, a, "dirs_attn")
    dev = next(model.parameters()).device
    emo = batch["emotion"].to(dev)
    readout = batch["readout"].to(dev)
    B = emo.shape[0]

    def run(l: int, extra: list[Intervention]) -> torch.Tensor:
        got: dict[str, torch.Tensor] = {}
        hooks = []
        ivs = list(extra)
        if reading == "normed":
            def grab(mod, args, out):
                got["x"] = out[torch.arange(B, device=out.device), readout].float()

            hooks.append(a.sites(l).norm_mlp.register_forward_hook(grab))
        else:
            ivs.append(Intervention("resid_mid", "capture", (l,), positions="readout", name="m"))
        try:
            with torch.no_grad(), patch(model, *ivs, backend=backend) as h:
                forward(model, batch)
        finally:
            for hk in hooks:
                hk.remove()
        x = got["x"] if reading == "normed" else h.captures["m"][l][0].float()
        return (x * _rows_dirs(dirs, l, emo, dev)).sum(-1)  # [B]

    base = torch.stack([run(l, []) for l in layers], 1)  # [B, L']
    out = torch.zeros(B, len(layers), a.num_heads)
    for i, l in enumerate(layers):
        for k in range(a.num_heads):
            out[:, i, k] = (base[:, i] - run(l, [_head_ablation(l, k)])).cpu()
    return out, base.cpu()


# ---------------------------------------------------------------------------------------------
# dataset API
# ---------------------------------------------------------------------------------------------
def head_scores(model, batches: Iterable[dict], dirs_attn: torch.Tensor, layers=None, reading: str = "residual",
                total: int | None = None, progress: bool = True) -> HeadScores:
    """I^head for every (layer, emotion, head) from one forward pass per batch."""
    acc = HeadAccumulator(model, dirs_attn, layers, reading)
    run_collectors(model, batches, [acc], total=total, progress=progress, desc="heads")
    return acc.result()


class _BruteAcc:
    def __init__(self, layers, H, reading):
        L, E = len(layers), len(EMOTIONS)
        self.layers, self.reading = layers, reading
        self.sum = torch.zeros(L, E, H, dtype=torch.float64)
        self.sumsq = torch.zeros_like(self.sum)
        self.base = torch.zeros(L, E, dtype=torch.float64)
        self.counts = torch.zeros(E, dtype=torch.float64)


def head_scores_bruteforce(model, batches: Iterable[dict], dirs_attn: torch.Tensor, layers=None,
                           reading: str = "residual", backend: str = "reference", progress: bool = True) -> HeadScores:
    """The paper's 1 + L·H passes per batch (oracle and benchmark baseline for :func:`head_scores`)."""
    from tqdm.auto import tqdm

    a = Adapter.of(model)
    layers = resolve_layers(a, layers)
    acc = _BruteAcc(layers, a.num_heads, _check_reading(reading))
    for batch in tqdm(list(batches), desc="heads (brute force)", disable=not progress):
        d, s = head_deltas_bruteforce(model, batch, dirs_attn, layers, reading, backend)
        _accumulate(acc, d, s, batch["emotion"].cpu())
    return _result(acc)
