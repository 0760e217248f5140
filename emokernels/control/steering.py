r"""Steering baseline (METHOD.md §5): add an emotion direction to the residual stream.

At every layer ℓ of a window, at the readout token t* and every generated token::

    h_{ℓ+1} ← h_{ℓ+1} + α · rms(h_{ℓ+1}) · v^mlp_{e,ℓ}        rms(h) = sqrt(mean_i h_i² + 1e-12)

(the rms of the vector being steered, before the update). This is one
``Intervention(site="resid_post", op="add_rms", positions=("readout", "generated"))`` whose
table holds all six emotions, ``vectors[ℓ] = [6, d]``, and ``rows`` picks each batch row's
emotion, so one batch can steer different rows towards different emotions.

**Scaling the paper's defaults to another model.** The paper used layers 11–20 of 28 and α = 8
with d = 3072. Because ‖v‖ = 1 and rms(h) = ‖h‖/√d, each steered layer adds
‖Δh‖ = (α/√d)·‖h‖ ≈ 0.144‖h‖: the rms factor already makes the update independent of the
residual's scale, so the quantity that carries over between models is ρ = α/√d. We keep
ρ = 8/√3072 and set α = ρ·√d = 8·√(d/3072) (SmolLM2-135M, d = 576: 3.46; Qwen2.5-0.5B, d = 896:
4.32; Qwen2.5-1.5B, d = 1536: 5.66; Llama-3.2-3B: 8). The window covers the same fraction of
depth, round(0.39·L)..round(0.71·L) (≈ 10 layers for L ≈ 28–30), so the cumulative push,
Σ_ℓ ρ‖h_ℓ‖ relative to ‖h‖, matches as well. ``alpha="paper"`` uses 8.0 unchanged.
``alpha_sweep`` picks α on the **train** split by judged accuracy, rejecting α whose outputs
are mostly degenerate.
"""
from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Sequence

from ..data.labels import EMOTIONS
from ..discover.directions import EmotionDirections, alpha_for_hidden, default_layers
from ..patch.rows import as_layers, emotion_rows, resolve_strength

PAPER_ALPHA = 8.0
POINT_SITES = {"mlp": "resid_post", "attn": "resid_mid"}


def default_alpha(hidden_size: int) -> float:
    """8·√(d/3072): the paper's per-layer added-norm ratio α/√d ≈ 0.144 at hidden size d."""
    return alpha_for_hidden(hidden_size, PAPER_ALPHA, 3072)


def parse_layers(spec: str | Sequence[int] | int | None, num_layers: int) -> list[int]:
    """``None`` → default window; ``"11-20"`` / ``"3,5,7"`` / an int / a list → sorted unique layers.

    Layers are integers in ``[0, num_layers)``: a float (``1.7``), a backwards range (``"9-3"``)
    or an empty spec is a ValueError / TypeError, never rounded or silently empty."""
    if spec is None:
        return default_layers(num_layers)
    if isinstance(spec, str):
        out = []
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                continue
            lo, sep, hi = part.partition("-")
            if not (lo.strip().isdigit() and (not sep or hi.strip().isdigit())):
                raise ValueError(f"steering layers {spec!r}: {part!r} is not a layer or a range like '3-7'")
            a, b = int(lo), int(hi) if sep else int(lo)
            if b < a:
                raise ValueError(f"steering layers {spec!r}: the range {part!r} runs backwards (write '{b}-{a}')")
            out += range(a, b + 1)
        if not out:
            raise ValueError(f"steering layers {spec!r} name no layer")
        spec = sorted(set(out))
    elif hasattr(spec, "__iter__"):  # a list of ints: sorted, duplicates dropped
        spec = sorted({i for x in spec for i in as_layers(x, "steering layers")})
    layers = list(as_layers(spec, "steering layers"))
    bad = [l for l in layers if not 0 <= l < num_layers]
    if bad:
        raise ValueError(f"steering layers {bad} invalid for a {num_layers}-layer model (0..{num_layers - 1})")
    return layers


class Steering:
    """Directions + emotion(s) + α + layer window, pluggable into ``patch``.

    ``Steering(dirs, "anger")`` or ``Steering(dirs, ["anger", "fear", ...])`` (one per batch
    row); ``alpha``: a float, ``None`` (default: 8·√(d/3072)) or ``"paper"`` (8.0);
    ``layers``: default round(0.39·L)..round(0.71·L); ``point``: ``"mlp"`` (resid_post, the
    paper's default) or ``"attn"`` (resid_mid, the rms is that of m_ℓ).

    ``with patch(model, steering): model.generate(...)``, or override per call:
    ``patch(model, steering, emotion=[...], strength=torch.tensor([...]))``.
    """

    def __init__(self, directions: EmotionDirections, emotion=None, alpha: float | str | None = None,
                 layers: str | Sequence[int] | None = None, point: str = "mlp",
                 positions: tuple[str, ...] = ("readout", "generated")):
        if point not in POINT_SITES:
            raise ValueError(f"unknown point {point!r}: use 'mlp' or 'attn'")
        directions.point_index(point)
        self.directions = directions
        self.point = point
        self.positions = positions
        self.layers = parse_layers(layers, directions.num_layers)
        if alpha is None:
            alpha = default_alpha(directions.hidden_size)
        elif alpha == "paper":
            alpha = PAPER_ALPHA
        elif isinstance(alpha, str):
            raise ValueError(f"alpha must be a number, None or 'paper', got {alpha!r}")
        self.alpha = resolve_strength(alpha, what="alpha")
        if not isinstance(self.alpha, float):
            raise TypeError(f"alpha must be one number (per-row strengths go to patch(..., strength=)), got {alpha!r}")
        self.emotion = emotion

    def rows(self, emotion=None):
        """Emotion id(s): an int for one emotion, int64 [B] for per-row emotions."""
        return emotion_rows(self.directions.emotions, self.emotion if emotion is None else emotion,
                            owner="these directions")[1]

    def to_interventions(self, model, emotion=None, strength=None) -> list:
        """One ``add_rms`` intervention on all window layers with the [6, d] table per layer."""
        from ..patch import Intervention

        self.directions.check_model(model)
        p = self.directions.point_index(self.point)
        vectors = {l: self.directions.directions[p, l] for l in self.layers}
        s = resolve_strength(self.alpha if strength is None else strength, what="steering strength")
        return [Intervention(site=POINT_SITES[self.point], op="add_rms", layers=self.layers, positions=self.positions,
                             vectors=vectors, rows=self.rows(emotion), strength=s, name=f"steer.{self.point}")]

    def patch_factory(self, model, alpha: float | None = None, backend: str = "reference"):
        """For ``generate_rows(..., patch_factory=...)``: batch units → patch with per-row emotions."""
        from ..patch import patch

        def factory(units):
            return patch(model, self, emotion=[u[2] for u in units], strength=self.alpha if alpha is None else alpha,
                         backend=backend)

        return factory

    def describe(self) -> dict:
        return dict(point=self.point, layers=self.layers, alpha=self.alpha, positions=list(self.positions),
                    directions_model=self.directions.model, directions_source=self.directions.source,
                    alpha_ratio=self.alpha / math.sqrt(self.directions.hidden_size))


def _units(units):
    """(skeleton, valence, emotion[, key]) tuples → (skeleton, valence, emotion)."""
    return [tuple(u[:3]) for u in units]


def steer_generate(model, tok, steering: Steering, units, out_path, *, alpha: float | None = None,
                   batch_size: int = 8, max_new_tokens: int | None = None, progress: bool = True,
                   model_name: str | None = None, extra: dict | None = None, backend: str = "reference") -> list[dict]:
    """Generate one steered reply per unit (neutral prompt, each row steered towards its unit's
    emotion) into the JSONL ``out_path`` (resumable). Returns the rows in unit order."""
    from ..data.generate import generate_rows

    a = steering.alpha if alpha is None else float(alpha)
    info = dict(alpha=a, steer_layers=steering.layers, steer_point=steering.point)
    info.update(extra or {})
    return generate_rows(model, tok, _units(units), out_path, emotion_mode="neutral", batch_size=batch_size,
                         max_new_tokens=max_new_tokens, patch_factory=steering.patch_factory(model, a, backend),
                         progress=progress, condition="steer", model_name=model_name, extra=info)


def judge_summary(rows: Sequence[dict], judge) -> dict:
    """Judge ``rows`` (``text``, ``emotion``) in memory: accuracy, per emotion, degenerate rate."""
    from ..evaluate.naturalness import degenerate

    texts, targets = [r["text"] for r in rows], [r["emotion"] for r in rows]
    js = judge.classify(texts, targets)
    hits = [bool(j.match) for j in js]
    degen = [degenerate(t) for t in texts]
    per = {}
    for e in EMOTIONS:
        idx = [i for i, t in enumerate(targets) if t == e]
        if idx:
            per[e] = sum(hits[i] for i in idx) / len(idx)
    return dict(n=len(rows), accuracy=sum(hits) / max(1, len(rows)), per_emotion=per,
                degenerate_rate=sum(degen) / max(1, len(rows)), labels=[j.label for j in js], matches=hits,
                degenerate=degen)


def alpha_sweep(model, tok, directions: EmotionDirections, train_units, alphas: Sequence[float], judge, *,
                layers=None, point: str = "mlp", max_degenerate: float = 0.5, out_dir=None, batch_size: int = 8,
                max_new_tokens: int | None = None, progress: bool = True, model_name: str | None = None) -> dict:
    """Pick α on **train** units by judged accuracy, with a naturalness guard.

    For each α: steered generation of every unit (neutral prompt, per-row emotions), judged by
    ``judge``; α is *rejected* when more than ``max_degenerate`` of its outputs are degenerate
    (``evaluate.naturalness.degenerate``: loops, char loops, shouting, empty). The chosen α has
    the highest accuracy among the rest (ties → the smaller α). Raises ValueError if every α is
    rejected. Generations go to ``out_dir/sweep_alpha{α}.jsonl`` (resumable) or a temp folder.

    Returns {"alphas": [{alpha, accuracy, degenerate_rate, n, rejected, per_emotion}], "alpha": chosen}.
    """
    split_ids = {u[0].skeleton_id for u in train_units}
    leaked = sorted(s for s in split_ids if "_test_" in s)
    if leaked:
        raise ValueError(f"alpha_sweep must use train units only; got test skeletons {leaked[:3]}")
    if not alphas:
        raise ValueError("no alphas to sweep")
    tmp = None
    if out_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="emokernels-sweep-")
        out_dir = tmp.name
    out_dir = Path(out_dir)
    st = Steering(directions, layers=layers, point=point)
    results = []
    try:
        for a in sorted(float(x) for x in alphas):
            rows = steer_generate(model, tok, st, train_units, out_dir / f"sweep_alpha{a:g}.jsonl", alpha=a,
                                  batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress,
                                  model_name=model_name, extra={"sweep": True})
            s = judge_summary(rows, judge)
            results.append(dict(alpha=a, accuracy=s["accuracy"], degenerate_rate=s["degenerate_rate"], n=s["n"],
                                rejected=s["degenerate_rate"] > max_degenerate, per_emotion=s["per_emotion"],
                                examples=[dict(emotion=r["emotion"], text=r["text"], label=l)
                                          for r, l in list(zip(rows, s["labels"]))[:6]]))
    finally:
        if tmp is not None:
            tmp.cleanup()
    ok = [r for r in results if not r["rejected"]]
    if not ok:
        rates = ", ".join(f"α={r['alpha']:g}: {r['degenerate_rate']:.0%}" for r in results)
        raise ValueError(f"every α was rejected by the naturalness guard (degenerate > {max_degenerate:.0%}): {rates}")
    best = max(ok, key=lambda r: (r["accuracy"], -r["alpha"]))
    return dict(alphas=results, alpha=best["alpha"], max_degenerate=max_degenerate, n_units=len(train_units),
                layers=st.layers, point=point)
