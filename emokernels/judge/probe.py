"""Trained judges: a calibrated softmax probe over frozen reply features.

For a reply x with features φ(x) ∈ R^d (``judge.features``: MiniLM embedding, or an LLM's
mean-pooled hidden state at layer ℓ):

    z = (φ(x) − μ) ⊘ σ                        μ, σ ∈ R^d: mean and std over the corpus train split
    p(y | x) = softmax((W z + b) / T)_y       W ∈ R^{7×d}, b ∈ R^7, T > 0

    W, b = argmin  Σ_i w_{y_i} CE(W z_i + b, y_i) / Σ_i w_{y_i}  +  λ ‖W‖²_F
           (L-BFGS, full batch, fp32; w_y = 1 / #train rows of label y, so no label dominates)

λ (and the layer ℓ for LLM features) is chosen on the corpus **dev** split by macro-F1; T is then
fitted on dev by minimising the negative log-likelihood (temperature scaling changes the
confidences, never the argmax). The **test** split fits nothing. A trained judge is one
safetensors file (W, b, μ, σ) plus JSON metadata (features, λ, T, corpus hash, dev scores).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence

import torch

from ..io import load_tensors, save_tensors
from .base import LABELS, Judge, Judgement, check_targets, with_matches

LAMBDAS: tuple[float, ...] = (1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def weights_dir() -> Path:
    """Folder of the packaged trained judges."""
    return Path(str(resources.files(__package__).joinpath("weights")))


def artifact(path: str | Path) -> Path:
    """``path`` ending in ``.safetensors`` (judge names hold dots: "qwen0.5b-probe" is no suffix)."""
    path = Path(path)
    return path if path.suffix == ".safetensors" else path.with_name(path.name + ".safetensors")


# -- metrics (used for choosing settings here and for reports in judge.evaluate) --------------------
def macro_f1(pred: torch.Tensor, gold: torch.Tensor, n_classes: int = len(LABELS)) -> float:
    """Mean over classes present in ``gold`` or ``pred`` of F1 = 2·TP / (2·TP + FP + FN)."""
    f1s = []
    for c in range(n_classes):
        tp = int(((pred == c) & (gold == c)).sum())
        fp = int(((pred == c) & (gold != c)).sum())
        fn = int(((pred != c) & (gold == c)).sum())
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / len(f1s) if f1s else 0.0


# -- the probe ------------------------------------------------------------------------------------
@dataclass
class Probe:
    W: torch.Tensor      # [C, d]
    b: torch.Tensor      # [C]
    mu: torch.Tensor     # [d]
    sigma: torch.Tensor  # [d]
    temperature: float = 1.0

    def logits(self, X: torch.Tensor) -> torch.Tensor:
        """[N, C] uncalibrated logits of features X [N, d]."""
        if X.ndim != 2 or X.shape[1] != self.W.shape[1]:
            raise ValueError(f"features must be [N, {self.W.shape[1]}], got {list(X.shape)}")
        return ((X.float() - self.mu) / self.sigma) @ self.W.T + self.b

    def probs(self, X: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(X) / self.temperature, dim=-1)

    def save(self, path, metadata: dict) -> Path:
        return save_tensors(path, {"W": self.W, "b": self.b, "mu": self.mu, "sigma": self.sigma},
                            {**metadata, "temperature": self.temperature})

    @classmethod
    def load(cls, path) -> tuple["Probe", dict]:
        t, meta = load_tensors(path)
        missing = [k for k in ("W", "b", "mu", "sigma") if k not in t]
        if missing or "temperature" not in meta:
            raise ValueError(f"{path} is not a trained judge: missing {missing or ['temperature']}")
        W = t["W"].float()
        if t["b"].shape != (W.shape[0],) or t["mu"].shape != (W.shape[1],) or t["sigma"].shape != (W.shape[1],):
            raise ValueError(f"{path}: inconsistent probe shapes W{list(W.shape)} b{list(t['b'].shape)} "
                             f"mu{list(t['mu'].shape)} sigma{list(t['sigma'].shape)}")
        T = float(meta["temperature"])
        if not (math.isfinite(T) and T > 0) or not all(torch.isfinite(t[k]).all() for k in ("W", "b", "mu", "sigma")):
            raise ValueError(f"{path}: non-finite or non-positive probe values")
        return cls(W, t["b"].float(), t["mu"].float(), t["sigma"].float(), T), meta


def fit_probe(X: torch.Tensor, y: torch.Tensor, lam: float, n_classes: int = len(LABELS), max_iter: int = 300) -> Probe:
    """Class-balanced L2-regularised softmax regression on standardised features (L-BFGS)."""
    X = X.float()
    mu = X.mean(0)
    sigma = X.std(0).clamp(min=1e-6)
    Z = (X - mu) / sigma
    counts = torch.bincount(y, minlength=n_classes).float()
    w = torch.where(counts > 0, 1.0 / counts.clamp(min=1), torch.zeros_like(counts))[y]
    w = w / w.sum()
    W = torch.zeros(n_classes, X.shape[1], requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        nll = (torch.nn.functional.cross_entropy(Z @ W.T + b, y, reduction="none") * w).sum()
        loss = nll + lam * (W * W).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return Probe(W.detach().clone(), b.detach().clone(), mu, sigma)


def fit_temperature(logits: torch.Tensor, y: torch.Tensor) -> float:
    """T > 0 minimising the NLL of softmax(logits / T), over 161 log-spaced values in [0.01, 100]."""
    logits = logits.float()
    grid = torch.logspace(-2, 2, 161)
    nll = torch.stack([torch.nn.functional.cross_entropy(logits / t, y) for t in grid])
    return float(grid[int(nll.argmin())])


def select_and_fit(Xtr: torch.Tensor, ytr: torch.Tensor, Xdev: torch.Tensor, ydev: torch.Tensor,
                   lambdas: Sequence[float] = LAMBDAS) -> tuple[Probe, dict]:
    """Fit one probe per λ on train, keep the best dev macro-F1 (ties: larger λ), calibrate T on dev."""
    if len(Xtr) == 0 or len(Xdev) == 0:
        raise ValueError("training a judge needs train and dev rows")
    best = None
    table = {}
    for lam in lambdas:
        p = fit_probe(Xtr, ytr, lam)
        pred = p.logits(Xdev).argmax(-1)
        f1 = macro_f1(pred, ydev)
        table[f"{lam:g}"] = {"dev_macro_f1": round(f1, 4), "dev_accuracy": round(float((pred == ydev).float().mean()), 4)}
        if best is None or f1 >= best[0]:
            best = (f1, lam, p)
    f1, lam, probe = best
    probe.temperature = fit_temperature(probe.logits(Xdev), ydev)
    dev_nll = float(torch.nn.functional.cross_entropy(probe.logits(Xdev) / probe.temperature, ydev))
    return probe, {"lambda": lam, "dev_macro_f1": round(f1, 4), "dev_nll": round(dev_nll, 4), "lambda_table": table}


# -- the judge --------------------------------------------------------------------------------------
class ProbeJudge(Judge):
    """A trained probe behind the ``Judge`` interface; ``scores`` are calibrated probabilities."""

    def __init__(self, name: str, path: str | Path | None = None, features=None, **feature_kwargs):
        from .features import make_features

        path = artifact(path if path is not None else weights_dir() / name)
        if not path.exists():
            raise FileNotFoundError(f"no trained judge {name!r} at {path}: "
                                    f"train it with `emokernels judge --train {name}`")
        self.probe, self.meta = Probe.load(path)
        if tuple(self.meta.get("labels", ())) != LABELS:
            raise ValueError(f"{path}: trained for labels {self.meta.get('labels')}, not {list(LABELS)}")
        self.name = name
        self.labels = LABELS
        self.features = features if features is not None else make_features(self.meta["features"], **feature_kwargs)

    def probs(self, texts: Sequence[str]) -> torch.Tensor:
        return self.probe.probs(self.features(list(texts)))

    def classify(self, texts: Sequence[str], targets: Sequence[str] | None = None) -> list[Judgement]:
        check_targets(texts, targets)
        texts = list(texts)
        if not texts:
            return []
        P = self.probs(texts)
        best = P.argmax(-1).tolist()
        rows = [(LABELS[b], {l: round(float(p), 6) for l, p in zip(LABELS, row)}) for b, row in zip(best, P.tolist())]
        return with_matches(rows, targets)

    def describe(self) -> dict:
        return {"name": self.name, "features": self.meta["features"], "scores": "calibrated softmax probe",
                "corpus": self.meta.get("corpus_hash"), "temperature": self.meta.get("temperature")}


# -- training ---------------------------------------------------------------------------------------
def _labels(rows) -> torch.Tensor:
    return torch.tensor([LABELS.index(r.label) for r in rows])


def cache_dir() -> Path:
    """Where extracted features are cached: ``$EMOKERNELS_CACHE/judge_features`` (default ``~/.cache/emokernels``)."""
    return Path(os.environ.get("EMOKERNELS_CACHE", Path.home() / ".cache" / "emokernels")) / "judge_features"


def cached(fn, texts: Sequence[str], key: dict, folder: str | Path | None) -> torch.Tensor:
    """``fn(texts)`` through an on-disk cache (safetensors) keyed by sha256 of ``key`` and the texts."""
    if folder is None:
        return fn(list(texts))
    from safetensors.torch import load_file, save

    from ..io import atomic_write_bytes

    h = hashlib.sha256(json.dumps(key, sort_keys=True).encode() + b"\0" + "\0".join(texts).encode()).hexdigest()[:24]
    path = Path(folder) / f"{h}.safetensors"
    if path.exists():
        return load_file(path)["x"]
    x = fn(list(texts))
    atomic_write_bytes(path, save({"x": x.contiguous()}))
    return x


def train_judge(name: str, out: str | Path | None = None, corpus_path=None, features=None, layers: Sequence[int] | None = None,
                lambdas: Sequence[float] = LAMBDAS, progress: bool = True, cache: str | Path | None = "default") -> dict:
    """Train the probe judge ``name`` (``TRAINABLE``) on the corpus train split, choose settings and
    calibrate on dev, and save it to ``out`` (default: the packaged weights). Returns the metadata.
    Features are cached in ``cache`` (``"default"``: ``cache_dir()``; None: no cache)."""
    from ..data.corpus import corpus_hash, load_judge_corpus
    from .features import LLMHiddenStates, MiniLMEncoder

    if name not in TRAINABLE:
        raise ValueError(f"unknown trainable judge {name!r}: use one of {', '.join(TRAINABLE)}")
    rows = load_judge_corpus(path=corpus_path)
    tr, dev = [r for r in rows if r.split == "train"], [r for r in rows if r.split == "dev"]
    ytr, ydev = _labels(tr), _labels(dev)
    spec = TRAINABLE[name]
    t0 = time.perf_counter()
    if features is None:
        features = MiniLMEncoder() if spec["kind"] == "minilm" else LLMHiddenStates(spec["model"])
    folder = cache_dir() if cache == "default" else cache
    if spec["kind"] == "minilm":
        key = features.describe()
        Xtr, Xdev = (cached(features, [r.text for r in part], key, folder) for part in (tr, dev))
        probe, info = select_and_fit(Xtr, ytr, Xdev, ydev, lambdas)
        feat_desc = features.describe()
    else:
        cand = list(layers if layers is not None else spec.get("layers", range(1, features.num_layers + 1)))
        upto = max(cand)
        key = {**features.describe(), "layer": None, "upto": upto}
        Atr, Adev = (cached(lambda t: features.all_layers(t, upto=upto, progress=progress), [r.text for r in part], key, folder)
                     for part in (tr, dev))  # [N, upto+1, d]
        best, layer_table = None, {}
        for l in cand:
            p, inf = select_and_fit(Atr[:, l], ytr, Adev[:, l], ydev, lambdas)
            layer_table[str(l)] = {"dev_macro_f1": inf["dev_macro_f1"], "lambda": inf["lambda"]}
            if progress:
                print(f"[train {name}] layer {l}: dev macro-F1 {inf['dev_macro_f1']:.3f} (λ={inf['lambda']:g})", flush=True)
            if best is None or inf["dev_macro_f1"] > best[2]["dev_macro_f1"]:
                best = (l, p, inf)
        layer, probe, info = best
        info["layer_table"] = layer_table
        features.layer = layer
        feat_desc = features.describe()
    meta = {"name": name, "labels": list(LABELS), "features": feat_desc, "corpus_hash": corpus_hash(rows),
            "n_train": len(tr), "n_dev": len(dev), "temperature": probe.temperature, "train_seconds": round(time.perf_counter() - t0, 1), **info}
    probe.save(artifact(out if out is not None else weights_dir() / name), meta)
    return meta


# name -> feature spec of the judges `emokernels judge --train` knows
TRAINABLE: dict[str, dict] = {
    "minilm-probe": {"kind": "minilm"},
    # Layers above 16 scored lower on dev in the first full sweep (macro-F1 0.85-0.90 against 0.93 at 7).
    "qwen0.5b-probe": {"kind": "llm", "model": "qwen2.5-coder-0.5b", "layers": range(1, 17)},
    "qwen1.5b-probe": {"kind": "llm", "model": "qwen2.5-coder-1.5b"},
}
