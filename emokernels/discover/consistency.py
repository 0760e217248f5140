r"""Evidence that emotion directions are context-agnostic (METHOD.md §4, §8.1, §11 item 15).

The paper's code never checks this; we add:

* **cross-valence consistency**: cos(v_e from positive-only contexts, v_e from negative-only
  contexts), per point, layer and emotion — the same estimator on disjoint context sets whose
  events push opposite ways;
* **leave-one-theme-out (LOTO)**: mean over themes t of cos(v_e without theme t, v_e of all);
* **linear probe**: multinomial logistic regression on train readout states, accuracy on the
  **test** split's readout states (held-out contexts), per point and layer;
* **nearest-direction accuracy** on the test split: argmax_e ⟨x_{g,e} − μ_g, v_e⟩ — do the
  train directions, untouched, sort held-out context-centred states by emotion?
* the 2L × 2L cross-layer cosine heatmap per emotion (METHOD §8.1), as PNG;
* a report (JSON + Markdown) ranking layers by stability.

All cosines are of unit directions, so they lie in [-1, 1]; for orientation, two independent
random directions in R^d have |cos| ≈ 1/√d.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..data.labels import EMOTIONS
from .directions import EmotionDirections, unit_directions


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.double(), b.double()
    return ((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-30)).float()


# ---------------------------------------------------------------------------------------------
# split-half consistency (from the accumulator: no second pass)
# ---------------------------------------------------------------------------------------------
def cross_valence(acc, a: str = "positive", b: str = "negative") -> torch.Tensor:
    """cos(v_e estimated on valence ``a`` contexts only, v_e on valence ``b`` only): [P, L, E]."""
    for v in (a, b):
        if not acc.n_valence.get(v):
            raise ValueError(f"no complete {v!r} context groups: cross-valence consistency needs both {a!r} and {b!r}")
    va, _ = unit_directions(acc.centroids(valence=a))
    vb, _ = unit_directions(acc.centroids(valence=b))
    return _cos(va, vb)


def leave_one_theme_out(acc) -> dict:
    """{"mean": [P, L, E], "per_theme": {t: [P, L, E]}}: cos(v_e without theme t, v_e of all)."""
    themes = sorted(t for t, n in acc.n_theme.items() if n)
    if len(themes) < 2:
        raise ValueError(f"leave-one-theme-out needs at least 2 themes with complete groups, got {themes}")
    full, _ = unit_directions(acc.centroids())
    per = {t: _cos(unit_directions(acc.centroids(without_theme=t))[0], full) for t in themes}
    return {"mean": torch.stack(list(per.values())).mean(0), "per_theme": per}


def emotion_pair_cosines(dirs: EmotionDirections) -> torch.Tensor:
    """[P, L, E, E] cosines between emotions at each point (six-way centring forces mean ≈ −1/5)."""
    v = dirs.directions.double()
    return (v @ v.transpose(-1, -2)).float()


def compare_directions(a: EmotionDirections, b: EmotionDirections) -> torch.Tensor:
    """[P, L, E]: cos(v_e of ``a``, v_e of ``b``) point by point (e.g. prompt vs text source)."""
    if a.directions.shape != b.directions.shape or a.emotions != b.emotions:
        raise ValueError(f"cannot compare directions of shape {tuple(a.directions.shape)} and {tuple(b.directions.shape)}")
    return _cos(a.directions, b.directions)


def adjacent_layer_cosine(dirs: EmotionDirections) -> torch.Tensor:
    """[P, L-1, E]: cos(v^p_{e,ℓ}, v^p_{e,ℓ+1}), how fast a direction drifts with depth."""
    v = dirs.directions
    return _cos(v[:, :-1], v[:, 1:])


# ---------------------------------------------------------------------------------------------
# probes on held-out contexts
# ---------------------------------------------------------------------------------------------
def train_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                steps: int = 300, lr: float = 0.05, weight_decay: float = 1e-3, num_classes: int = len(EMOTIONS),
                max_elements: int = 2 ** 26, seed: int = 0) -> dict:
    r"""Multinomial logistic regression per probe position, trained full-batch with Adam.

    ``train_x`` [N, *pos, d], ``test_x`` [M, *pos, d] (e.g. pos = (P, L')), labels int64 [N] / [M].
    Features are standardised with the train mean/std of each position;
    loss = CE(x W + b, y) + weight_decay · ‖W‖². All positions are trained at once
    (batched matmuls), in chunks of at most ``max_elements`` feature values.
    Returns {"train_acc": [*pos], "test_acc": [*pos]}.
    """
    if train_x.shape[1:] != test_x.shape[1:]:
        raise ValueError(f"train states {tuple(train_x.shape)} and test states {tuple(test_x.shape)} differ in shape")
    N, M, d = train_x.shape[0], test_x.shape[0], train_x.shape[-1]
    pos_shape = train_x.shape[1:-1]
    xtr = train_x.reshape(N, -1, d).transpose(0, 1).float()  # [K, N, d]
    xte = test_x.reshape(M, -1, d).transpose(0, 1).float()
    K = xtr.shape[0]
    chunk = max(1, max_elements // max(1, (N + M) * d))
    # Small problems are dominated by per-op thread synchronisation (20x slower with 2 threads
    # on a busy machine): run them single-threaded.
    threads = torch.get_num_threads()
    if min(chunk, K) * (N + M) * d < 2 ** 22:
        torch.set_num_threads(1)
    try:
        return _fit_probes(xtr, xte, train_y, test_y, pos_shape, chunk, steps, lr, weight_decay, num_classes, seed)
    finally:
        torch.set_num_threads(threads)


def _fit_probes(xtr, xte, train_y, test_y, pos_shape, chunk, steps, lr, weight_decay, num_classes, seed):
    K, d = xtr.shape[0], xtr.shape[-1]
    g = torch.Generator().manual_seed(seed)
    tr_acc, te_acc = torch.zeros(K), torch.zeros(K)
    for s in range(0, K, chunk):
        a, b = xtr[s: s + chunk], xte[s: s + chunk]
        mu, sd = a.mean(1, keepdim=True), a.std(1, keepdim=True).clamp_min(1e-6)
        a, b = (a - mu) / sd, (b - mu) / sd
        k = a.shape[0]
        W = (torch.randn(k, d, num_classes, generator=g) * 0.01).requires_grad_()
        bias = torch.zeros(k, 1, num_classes, requires_grad=True)
        opt = torch.optim.Adam([W, bias], lr=lr)
        yk = train_y.repeat(k)
        with torch.enable_grad():
            for _ in range(steps):
                opt.zero_grad()
                logits = torch.baddbmm(bias, a, W)  # [k, N, C]
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, num_classes), yk)
                loss = loss + weight_decay * W.pow(2).sum() / k
                loss.backward()
                opt.step()
        with torch.no_grad():
            tr_acc[s: s + k] = (torch.baddbmm(bias, a, W).argmax(-1) == train_y).float().mean(1)
            te_acc[s: s + k] = (torch.baddbmm(bias, b, W).argmax(-1) == test_y).float().mean(1)
    return {"train_acc": tr_acc.reshape(pos_shape), "test_acc": te_acc.reshape(pos_shape)}


def nearest_direction_accuracy(states: torch.Tensor, labels: torch.Tensor, groups: Sequence[str],
                               tables: torch.Tensor) -> torch.Tensor:
    r"""Held-out check of the directions themselves, no training: for every complete group g
    (all E emotions present, one unit each), predict argmax_e ⟨x_{g,e'} − μ_g, v_e⟩.

    ``states`` [N, *pos, d], ``tables`` [*pos, E, d]. Returns accuracy [*pos].
    """
    E = tables.shape[-2]
    by: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        by.setdefault(g, []).append(i)
    x = states.double()
    centred, ys = [], []
    for g, idx in by.items():
        if sorted(labels[idx].tolist()) != list(range(E)):
            continue  # incomplete (or duplicated) group
        xs = x[idx]
        centred.append(xs - xs.mean(0, keepdim=True))
        ys.append(labels[idx])
    if not centred:
        raise ValueError("no complete groups (one unit per emotion) among the held-out states")
    xc, y = torch.cat(centred), torch.cat(ys)
    scores = torch.einsum("n...d,...ed->n...e", xc, tables.double())
    pred = scores.argmax(-1)
    return (pred == y.view(-1, *([1] * (pred.dim() - 1)))).float().mean(0)


# ---------------------------------------------------------------------------------------------
# report and plots
# ---------------------------------------------------------------------------------------------
def stability_report(dirs: EmotionDirections, acc=None, probe: dict | None = None,
                     nearest: torch.Tensor | None = None, probe_layers: Sequence[int] | None = None) -> dict:
    """Per-layer evidence and a ranking of layers by stability.

    stability_ℓ (per point) = mean over emotions of min(cross-valence cos, LOTO cos) when both
    exist (else whichever exists, else the mean adjacent-layer cosine). Layers are ranked by
    the mlp point's stability (the point steering uses).
    """
    P, L, E, _ = dirs.directions.shape
    rep: dict = dict(model=dirs.model, source=dirs.source, n_groups=dirs.n_groups, points=list(dirs.points),
                     emotions=list(dirs.emotions), num_layers=L, hidden_size=dirs.hidden_size,
                     random_cosine_scale=round(dirs.hidden_size ** -0.5, 4))
    pair = emotion_pair_cosines(dirs)
    off = ~torch.eye(E, dtype=torch.bool)
    rep["mean_pairwise_emotion_cosine"] = pair[..., off].mean(-1).tolist()  # [P, L]
    adj = adjacent_layer_cosine(dirs)
    rep["adjacent_layer_cosine"] = adj.mean(-1).tolist()  # [P, L-1]
    rep["norms"] = dirs.norms.mean(-1).tolist()
    rep["sigma"] = dirs.sigma.tolist()
    # size of the emotion component relative to the residual: mean_e ‖c_e − μ̄‖ / (σ·√d), σ·√d ≈ ‖h‖
    rep["relative_norm"] = (dirs.norms.mean(-1) / (dirs.sigma * dirs.hidden_size ** 0.5).clamp_min(1e-30)).tolist()
    cv = loto = None
    if acc is not None:
        try:
            cv = cross_valence(acc)
            rep["cross_valence"] = {"per_emotion": cv.tolist(), "mean": cv.mean(-1).tolist()}
        except ValueError as e:
            rep["cross_valence"] = {"unavailable": str(e)}
        try:
            lt = leave_one_theme_out(acc)
            loto = lt["mean"]
            rep["leave_one_theme_out"] = {"per_emotion": loto.tolist(), "mean": loto.mean(-1).tolist(),
                                          "min_over_themes": torch.stack(list(lt["per_theme"].values())).min(0).values
                                          .mean(-1).tolist()}
        except ValueError as e:
            rep["leave_one_theme_out"] = {"unavailable": str(e)}
    if cv is not None and loto is not None:
        stab = torch.minimum(cv, loto).mean(-1)
        basis = "mean_e min(cross-valence, LOTO)"
    elif cv is not None or loto is not None:
        stab = (cv if cv is not None else loto).mean(-1)
        basis = "mean_e cross-valence" if cv is not None else "mean_e LOTO"
    else:
        a = adj.mean(-1)
        stab = torch.cat([a, a[:, -1:]], 1)
        basis = "mean_e adjacent-layer cosine"
    rep["stability"] = {"basis": basis, "per_layer": stab.tolist()}
    mlp = dirs.point_index("mlp")
    order = torch.argsort(stab[mlp], descending=True).tolist()
    rep["ranking_mlp"] = [{"layer": l, "stability": round(float(stab[mlp, l]), 4)} for l in order]
    if probe is not None:
        rep["probe"] = {"layers": list(probe_layers or range(L)), "train_acc": probe["train_acc"].tolist(),
                        "test_acc": probe["test_acc"].tolist(), "chance": 1.0 / E}
    if nearest is not None:
        rep["nearest_direction_test_acc"] = {"layers": list(probe_layers or range(L)), "acc": nearest.tolist(),
                                             "chance": 1.0 / E}
    return rep


def write_report(rep: dict, out_dir) -> tuple[Path, Path]:
    """``consistency.json`` and ``consistency.md`` (a per-layer table and the ranking) in ``out_dir``."""
    from ..io import atomic_write_bytes, write_json

    out = Path(out_dir)
    j = write_json(out / "consistency.json", rep)
    pts = rep["points"]
    L = rep["num_layers"]
    lines = [f"# Emotion-direction consistency: {rep['model']} ({rep['source']} source, {rep['n_groups']} contexts)", "",
             f"Random unit vectors in R^{rep['hidden_size']} have |cos| ≈ {rep['random_cosine_scale']}. "
             f"Stability = {rep['stability']['basis']}. ‖c‖/‖h‖ = mean_e ‖c_e‖ / (σ·√d): how large the "
             "emotion component is next to the residual (a layer can be stable yet carry almost no signal).", ""]
    cols = ["layer"] + [f"{p} ‖c‖/‖h‖" for p in pts]
    for p in pts:
        cols += [f"{p} x-valence", f"{p} LOTO", f"{p} stability"]
    has_probe = "probe" in rep
    if has_probe:
        cols += [f"{p} probe test acc" for p in pts]
    if "nearest_direction_test_acc" in rep:
        cols += [f"{p} nearest-dir test acc" for p in pts]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def get(section, key, p, l):
        s = rep.get(section, {})
        return f"{s[key][p][l]:.3f}" if key in s else "–"

    for l in range(L):
        row = [str(l)] + [f"{rep['relative_norm'][pi][l]:.4f}" for pi in range(len(pts))]
        for pi in range(len(pts)):
            row += [get("cross_valence", "mean", pi, l), get("leave_one_theme_out", "mean", pi, l),
                    f"{rep['stability']['per_layer'][pi][l]:.3f}"]
        for sec, key in (("probe", "test_acc"), ("nearest_direction_test_acc", "acc")):
            if sec in rep:
                layers = rep[sec]["layers"]
                for pi in range(len(pts)):
                    row.append(f"{rep[sec][key][pi][layers.index(l)]:.3f}" if l in layers else "–")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Layers ranked by mlp-point stability: "
              + ", ".join(f"{r['layer']} ({r['stability']:.3f})" for r in rep["ranking_mlp"]), ""]
    md = atomic_write_bytes(out / "consistency.md", "\n".join(lines).encode())
    return j, md


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_cross_layer(dirs: EmotionDirections, out_dir, per_emotion: bool = False) -> list[Path]:
    """``cross_layer_all.png``: the 2L × 2L cosine heatmap (residual order attn0, mlp0, …) of
    each emotion, six panels; with ``per_emotion`` also one ``cross_layer_{emotion}.png`` each."""
    plt = _plt()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    L = dirs.num_layers
    step = max(1, L // 7)
    ticks = [2 * l for l in range(0, L, step)]
    labels = [f"L{l}" for l in range(0, L, step)]
    paths = []
    mats = {e: dirs.cross_layer_cosine(e).numpy() for e in dirs.emotions}
    for e, m in (mats.items() if per_emotion else ()):
        fig, ax = plt.subplots(figsize=(5.5, 4.6))
        im = ax.imshow(m, vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set_xticks(ticks, labels)
        ax.set_yticks(ticks, labels)
        ax.set_title(f"{e}: cosine across depth (attn/mlp interleaved)\n{dirs.model} · {dirs.source} source", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
        fig.tight_layout()
        p = out / f"cross_layer_{e}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    fig, axes = plt.subplots(2, 3, figsize=(13, 8.2))
    for ax, (e, m) in zip(axes.flat, mats.items()):
        im = ax.imshow(m, vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set_title(e)
        ax.set_xticks(ticks, labels, fontsize=7)
        ax.set_yticks(ticks, labels, fontsize=7)
    fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.02)
    fig.suptitle(f"Cross-layer cosine of emotion directions: {dirs.model} ({dirs.source} source, {dirs.n_groups} contexts)")
    p = out / "cross_layer_all.png"
    fig.savefig(p, dpi=100)
    plt.close(fig)
    paths.append(p)
    return paths


def plot_consistency(rep: dict, path) -> Path:
    """Per-layer curves (mlp and attn): cross-valence cosine, LOTO cosine, probe and
    nearest-direction test accuracy, averaged over emotions."""
    plt = _plt()
    L = rep["num_layers"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for pi, p in enumerate(rep["points"]):
        ax = axes[0]
        ls = "-" if p == "mlp" else "--"
        for sec, lab in (("cross_valence", "cross-valence cos"), ("leave_one_theme_out", "LOTO cos")):
            if "mean" in rep.get(sec, {}):
                ax.plot(range(L), rep[sec]["mean"][pi], ls, label=f"{p}: {lab}")
        ax2 = axes[1]
        for sec, key, lab in (("probe", "test_acc", "probe"), ("nearest_direction_test_acc", "acc", "nearest direction")):
            if sec in rep:
                ax2.plot(rep[sec]["layers"], rep[sec][key][pi], ls, marker=".", label=f"{p}: {lab}")
    axes[0].set(xlabel="layer", ylabel="cosine", title="consistency of v_e across context splits (mean over emotions)",
                ylim=(-0.1, 1.02))
    axes[0].legend(fontsize=8)
    axes[1].axhline(1 / len(rep["emotions"]), color="grey", lw=0.8, ls=":", label="chance")
    axes[1].set(xlabel="layer", ylabel="accuracy", title="held-out (test split) emotion decoding", ylim=(0, 1.02))
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{rep['model']} · {rep['source']} source · {rep['n_groups']} train contexts", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
