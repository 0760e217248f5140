r"""Components in one pass: neuron scores (METHOD §6.1), head scores (§6.2) and the
component-space difference vectors (§7) from one backbone forward per batch, resumable from a
checkpoint; their plots and a summary of the top components per emotion.

The ``emokernels components`` command (:mod:`emokernels.cli.components`) and the pipeline
(``emokernels run``) both call :func:`discover_components`.
"""
from __future__ import annotations

import io
import time
from pathlib import Path

__all__ = ["discover_components", "plot_heads", "plot_neurons", "summarise"]


def discover_components(model, tok, units, dirs_attn, dirs_mlp, *, reading="residual", prompt_config=None,
                        batch_size=6, checkpoint=None, checkpoint_every=20, fingerprint="", progress=True):
    """One pass over ``units`` → (NeuronScores, HeadScores, ComponentDiffs, seconds).

    ``checkpoint``: path prefix; collectors' state is saved every ``checkpoint_every`` batches as
    one ``<checkpoint>.safetensors`` whose header holds the count of units done, replaced in one
    ``os.replace``: a kill at any point leaves either the previous checkpoint or the new one,
    never the state of one with the count of another. A rerun with the same ``fingerprint``
    resumes after the saved units. The checkpoint has one writer at a time (``exclusive_output``)."""
    import contextlib

    from ..io import exclusive_output
    from .diffs import DiffAccumulator
    from .heads import HeadAccumulator
    from .neurons import NeuronAccumulator

    cols = [NeuronAccumulator(model, dirs_mlp), HeadAccumulator(model, dirs_attn, reading=reading), DiffAccumulator(model)]
    ck = None if checkpoint is None else Path(str(checkpoint) + ".safetensors")
    with exclusive_output(ck) if ck is not None else contextlib.nullcontext():
        return _discover(model, tok, units, cols, ck, batch_size, prompt_config, checkpoint_every, fingerprint, progress)


def _discover(model, tok, units, cols, ck, batch_size, prompt_config, checkpoint_every, fingerprint, progress):
    from ..io import load_tensors, save_tensors
    from .collect import run_collectors, unit_batches

    start = 0
    if ck is not None and ck.exists():
        state, meta = load_tensors(ck)
        if meta.get("fingerprint") == fingerprint:
            for c in cols:
                c.load_state_dict(state)
            start = int(meta["n_done"])
            print(f"resuming after {start} of {len(units)} prompts ({ck})")
    todo = units[start:]
    n_batches = [0]

    def on_batch(done):
        n_batches[0] += 1
        if ck is not None and (n_batches[0] % checkpoint_every == 0) and start + done < len(units):
            state = {k: v.detach().cpu() for c in cols for k, v in c.state_dict().items()}
            save_tensors(ck, state, {"fingerprint": fingerprint, "n_done": start + done}, sidecar=False)

    t0 = time.time()
    run_collectors(model, unit_batches(tok, todo, batch_size, prompt_config), cols, total=len(todo), on_batch=on_batch,
                   progress=progress)
    secs = time.time() - t0
    neurons, heads, diffs = (c.result() for c in cols)
    if ck is not None:
        for f in (ck, ck.with_suffix(".json")):
            if f.exists():
                f.unlink()
    return neurons, heads, diffs, secs


# ---------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------
def _save_fig(fig, path) -> Path:
    import matplotlib.pyplot as plt

    from ..io import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def plot_heads(heads, folder) -> list[Path]:
    """``heads_{e}.png``: layer × head heatmap of I^head (diverging, centred at 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..data.labels import EMOTIONS

    paths = []
    for e, name in enumerate(EMOTIONS):
        M = heads.mean[:, e].numpy()  # [L, H]
        lim = float(abs(M).max()) or 1.0
        fig, ax = plt.subplots(figsize=(max(4, 0.35 * M.shape[1] + 2), max(3, 0.22 * M.shape[0] + 1.2)))
        im = ax.imshow(M, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
        ax.set_yticks(range(len(heads.layers)))
        ax.set_yticklabels(heads.layers, fontsize=6)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(f"{name}: I^head ({heads.reading}, n={int(heads.counts[e])})", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.04)
        fig.tight_layout()
        paths.append(_save_fig(fig, Path(folder) / f"heads_{name}.png"))
    return paths


def plot_neurons(neurons, folder, top: int = 16) -> list[Path]:
    """``neurons_{e}.png``: per layer Σ_j C_mean (= mean ⟨W_D a, v⟩), Σ C_pos and −Σ C_neg,
    the top-1 and the sum of the top-``top`` C_mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..data.labels import EMOTIONS

    paths = []
    x = list(neurons.layers)
    for e, name in enumerate(EMOTIONS):
        C = neurons.C_mean[:, e]
        srt = C.sort(dim=-1, descending=True).values
        fig, ax = plt.subplots(figsize=(6.5, 3.4))
        ax.fill_between(x, (-neurons.C_neg[:, e].sum(-1)).numpy(), neurons.C_pos[:, e].sum(-1).numpy(), color="C0",
                        alpha=0.15, label="Σ C_pos / −Σ C_neg")
        ax.plot(x, C.sum(-1).numpy(), "k-", lw=1.5, label="Σ C_mean = mean ⟨W_D a, v⟩")
        ax.plot(x, srt[:, :top].sum(-1).numpy(), "C3-", lw=1, label=f"top-{top} Σ C_mean")
        ax.plot(x, srt[:, 0].numpy(), "C2.-", lw=1, label="top-1 C_mean")
        ax.axhline(0, color="gray", lw=0.5)
        ax.set_xlabel("layer")
        ax.set_ylabel("contribution to ⟨·, v^mlp⟩")
        ax.set_title(f"{name}: MLP neuron contributions (n={int(neurons.counts[e])})", fontsize=9)
        ax.legend(fontsize=6)
        fig.tight_layout()
        paths.append(_save_fig(fig, Path(folder) / f"neurons_{name}.png"))
    return paths


def summarise(neurons, heads, diffs, top: int = 5) -> dict:
    """Top heads (global by I^head) and neurons (global by C_mean) per emotion."""
    import torch

    from ..data.labels import EMOTIONS

    out = {}
    for e, name in enumerate(EMOTIONS):
        C = neurons.C_mean[:, e]
        flat = torch.argsort(C.flatten(), descending=True, stable=True)[:top]
        n = C.shape[1]
        hn = diffs.head_norms()[:, e] if diffs is not None else None
        out[name] = dict(
            samples=int(neurons.counts[e]),
            heads=[dict(layer=l, head=k, I=round(v, 5), std=round(float(heads.std[heads.layers.index(l), e, k]), 5),
                        dz_norm=None if hn is None else round(float(hn[diffs.layers.index(l), k]), 5))
                   for l, k, v in heads.top_global(e, top)],
            neurons=[dict(layer=neurons.layers[int(i) // n], neuron=int(i) % n, C_mean=round(float(C.flatten()[i]), 5),
                          beta=round(float(neurons.beta[int(i) // n, e, int(i) % n]), 5),
                          H_mean=round(float(neurons.H_mean[int(i) // n, e, int(i) % n]), 5))
                     for i in flat],
        )
    return out
