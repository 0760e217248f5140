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

This module also holds the pieces the component stage shares: SEV units → prompt batches
(:func:`sev_units`, :func:`unit_batches`), the one-pass runner (:func:`run_collectors`) and the
direction-tensor coercion (:func:`direction_tensors`).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from ..data.labels import EMOTIONS, VALENCES
from ..models.adapters import Adapter
from ..patch import Intervention, patch

__all__ = [
    "sev_units", "unit_batches", "forward", "direction_tensors", "Collector", "run_collectors",
    "neuron_betas", "neuron_contributions", "NeuronAccumulator", "NeuronScores", "neuron_scores",
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


def _check_dirs(dirs, adapter: Adapter, name: str) -> torch.Tensor:
    """``[L, 6, d]`` fp32 for this model; an EmotionDirections / [2, L, 6, d] / pair is reduced to
    its attn point (``name == "dirs_attn"``) or mlp point (``"dirs_mlp"``)."""
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


def _layers(adapter: Adapter, layers) -> tuple[int, ...]:
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


def _readout_rows(x: torch.Tensor, state) -> torch.Tensor:
    return x[torch.arange(x.shape[0], device=x.device), state.readout].float()


# ---------------------------------------------------------------------------------------------
# neurons
# ---------------------------------------------------------------------------------------------
def neuron_betas(model, dirs_mlp: torch.Tensor, layers=None) -> torch.Tensor:
    """β[i, e] = W_D,ℓᵀ v^mlp_{e,ℓ} for ℓ = layers[i]: fp32 ``[len(layers), 6, d_ff]``."""
    a = Adapter.of(model)
    dirs = _check_dirs(dirs_mlp, a, "dirs_mlp")
    layers = _layers(a, layers)
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
    layers = _layers(a, layers)
    beta = neuron_betas(model, dirs_mlp, layers)
    B = batch["input_ids"].shape[0]
    emo = batch.get("emotion") if emotion is None else torch.full((B,), int(emotion), dtype=torch.long)
    if emo is None:
        raise ValueError("batch has no 'emotion' ids; pass emotion=")
    rows: dict[int, torch.Tensor] = {}
    iv = Intervention("neurons", "capture", layers, positions="readout",
                      fn=lambda l, x, m, st: rows.__setitem__(l, _readout_rows(x, st)) if st.prefill else None)
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
        self.layers = _layers(self.adapter, layers)
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
        act = _readout_rows(x, state).to(self.beta.device)  # [B, d_ff]
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

