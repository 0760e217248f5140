r"""Ablation and enhancement validation of local emotion components (METHOD §6.3, [inference]).

The paper publishes no script for this; the protocol below follows its description ("sharp
drops when top-ranked components are intervened", enhancement with the stage-05 mean
differences) and uses the same ``patch`` edit as circuit modulation.

For emotion e, component kind (``neurons`` ranked by C_mean, ``heads`` by I^head) and k:

* **top-k**: the k highest-scoring components over the chosen layers (one global ranking);
* **random-k**: ``n_random`` draws of k components with the *same per-layer counts* as the
  top-k set, uniformly among the other components of those layers (layer-matched control).

Interventions (all exact ``patch`` edits):

* ``ablate``: zero the selected activations (``edit`` scale 0) at every position, on
  **emotion-prompted** inputs of target e;
* ``enhance``: add ``scale · Δ`` (un-normalised stage-05 differences, :mod:`..discover.diffs`)
  at the selected components on **neutral** prompts of the same contexts — neurons at t* and
  generated tokens, heads at every position (stage 07's placement).

Scores per prompt i (Δ = patched − unpatched, same prompt):

* ``local``: ⟨x_ℓ[t*], v_{e,ℓ}⟩ at the components' layers (neurons: resid_post with v^mlp;
  heads: resid_mid with v^attn), averaged over the layers that hold a selected component;
* ``final``: ⟨ĥ[t*], v_ref,e⟩ with ĥ the final-norm state (the paper's reading; ``final_reading=
  "residual"`` uses the un-normalised h_L) and v_ref the sign-aligned sum of the attn+mlp
  directions of the late window (METHOD §8.3, :func:`~..discover.influence.reference_directions`).

Effect size: Cohen's d = (mean Δ_top − mean Δ_random) / sqrt((var_top + var_random)/2) over
per-prompt Δs (random pooled over draws). Ablation "works" if d < 0 (top lowers the emotion
score more than random), enhancement if d > 0. Optionally a judge scores greedy generations
under the largest-k top set, one random set and no patch.

All conditions of one (emotion, kind, mode) run as **one batched forward**: rows = conditions ×
prompts, per-layer index = the union of the conditions' components, and each row's scale / add
table row switches on only its own components (scale 1 / add 0 elsewhere is an exact no-op).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..data.labels import EMOTIONS
from ..models.adapters import Adapter
from ..patch import Intervention, patch

__all__ = ["KINDS", "MODES", "top_components", "random_like", "reference_direction", "batched_edit",
           "ValidationResult", "validate_components", "cohens_d", "plot_validation"]

KINDS = ("neurons", "heads")
MODES = ("ablate", "enhance")
METRICS = ("local", "final")


# ---------------------------------------------------------------------------------------------
# selection
# ---------------------------------------------------------------------------------------------
def _score_table(scores, kind: str) -> torch.Tensor:
    """[L', 6, n] ranking scores: C_mean (neurons) or I^head mean (heads)."""
    if kind == "neurons":
        return scores.C_mean
    if kind == "heads":
        return scores.mean
    raise ValueError(f"unknown component kind {kind!r}: use one of {KINDS}")


def top_components(scores, kind: str, emotion: int, k: int, layers: Sequence[int] | None = None) -> dict[int, torch.Tensor]:
    """The ``k`` highest-scoring components of ``emotion`` over ``layers`` (default: all scored
    layers), one global ranking. Returns {layer: sorted ids}."""
    table = _score_table(scores, kind)
    layers = tuple(scores.layers) if layers is None else tuple(layers)
    missing = [l for l in layers if l not in scores.layers]
    if missing:
        raise ValueError(f"layers {missing} have no {kind} scores (scored: {list(scores.layers)})")
    rows = torch.stack([table[scores.layers.index(l), emotion] for l in layers])  # [n_layers, n]
    n = rows.shape[1]
    if not 1 <= k <= rows.numel():
        raise ValueError(f"k={k} out of range: {rows.numel()} {kind} in the chosen layers")
    flat = torch.argsort(rows.flatten(), descending=True, stable=True)[:k]
    out: dict[int, list[int]] = {}
    for f in flat.tolist():
        out.setdefault(layers[f // n], []).append(f % n)
    return {l: torch.tensor(sorted(ids)) for l, ids in sorted(out.items())}


def random_like(selection: dict[int, torch.Tensor], width: int, generator: torch.Generator,
                exclude: dict[int, torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
    """Same per-layer counts as ``selection``, ids drawn uniformly without replacement among the
    ``width`` components of each layer minus ``exclude`` (default: the selection itself)."""
    exclude = selection if exclude is None else exclude
    out = {}
    for l, ids in selection.items():
        pool = torch.ones(width, dtype=torch.bool)
        if l in exclude:
            pool[exclude[l]] = False
        cand = pool.nonzero().flatten()
        if len(cand) < len(ids):
            cand = torch.arange(width)  # too few left: allow overlap rather than fail
        out[l] = torch.sort(cand[torch.randperm(len(cand), generator=generator)[: len(ids)]]).values
    return out


def reference_direction(dirs_attn: torch.Tensor, dirs_mlp: torch.Tensor, window: Sequence[int] | None = None) -> torch.Tensor:
    """v_ref [6, d]: sign-aligned normalised sum of the attn+mlp directions of the late window
    (layers 21–25 of 28, scaled to depth) — METHOD §8.3."""
    from ..discover.influence import reference_directions

    ref, _ = reference_directions(torch.stack([dirs_attn.float(), dirs_mlp.float()]), window)
    return ref


def batched_edit(kind: str, mode: str, selections: Sequence[dict[int, torch.Tensor]], head_dim: int,
                 add_values=None, scale: float = 1.0) -> Intervention:
    """One ``edit`` intervention whose table row c applies ``selections[c]`` only.

    ``ablate``: scale table 0 at the row's own components, 1 at the others of the union.
    ``enhance``: add table = ``add_values(layer, ids)`` ([n] for neurons, [n, hd] for heads) at
    the row's components, 0 elsewhere; strength ``scale``. Positions follow the paper (see module doc)."""
    layers = sorted({l for s in selections for l in s})
    index, scale_t, add_t = {}, {}, {}
    for l in layers:
        union = torch.unique(torch.cat([s[l] for s in selections if l in s])).long()
        member = torch.zeros(len(selections), len(union), dtype=torch.bool)
        for c, s in enumerate(selections):
            if l in s:
                member[c] = torch.isin(union, s[l])
        index[l] = union
        if mode == "ablate":
            scale_t[l] = (~member).float()
        elif mode == "enhance":
            vals = add_values(l, union).float()  # [n] or [n, hd]
            m = member.float() if vals.dim() == 1 else member.float()[..., None]
            add_t[l] = m * vals[None]
        else:
            raise ValueError(f"unknown mode {mode!r}: use one of {MODES}")
    site = "neurons" if kind == "neurons" else "heads"
    if mode == "ablate":
        pos = "all"
    else:
        pos = ("readout", "generated") if kind == "neurons" else "all"
    return Intervention(site, "edit", layers, positions=pos, index=index,
                        scale=scale_t if mode == "ablate" else None, add=add_t if mode == "enhance" else None,
                        strength=scale if mode == "enhance" else 1.0, name=f"{kind}.{mode}")


def cohens_d(a: torch.Tensor, b: torch.Tensor) -> float:
    """(mean a − mean b) / sqrt((var a + var b) / 2), sample variances; nan if undefined."""
    a, b = a.double().flatten(), b.double().flatten()
    if a.numel() < 2 or b.numel() < 2:
        return float("nan")
    sd = math.sqrt((float(a.var()) + float(b.var())) / 2)
    diff = float(a.mean() - b.mean())
    if sd == 0:
        return 0.0 if diff == 0 else math.copysign(float("inf"), diff)
    return diff / sd


# ---------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------
def _repeat(batch: dict, n: int) -> dict:
    return {k: batch[k].repeat(n, *([1] * (batch[k].dim() - 1))) for k in ("input_ids", "attention_mask", "readout")}


class _Scorer:
    """Runs prompt batches under an optional intervention and returns per-row scores
    {"final": [B], "local": {layer: [B, 6]}} for the needed layers."""

    def __init__(self, model, dirs_attn, dirs_mlp, v_ref, final_reading: str, backend: str):
        self.model, self.a = model, Adapter.of(model)
        self.dev = next(model.parameters()).device
        self.dirs = {"heads": dirs_attn.float(), "neurons": dirs_mlp.float()}
        self.v_ref = v_ref.float().to(self.dev)
        if final_reading not in ("normed", "residual"):
            raise ValueError(f"final_reading must be 'normed' (ĥ, the paper) or 'residual' (h_L), got {final_reading!r}")
        self.final_reading, self.backend = final_reading, backend

    def __call__(self, batch: dict, kind: str, layers: Sequence[int], extra: list[Intervention]) -> dict:
        from ..discover.collect import forward

        site = "resid_post" if kind == "neurons" else "resid_mid"
        ivs = list(extra)
        if layers:
            ivs.append(Intervention(site, "project", tuple(layers), positions="readout", name="local",
                                    directions={l: self.dirs[kind][l] for l in layers}))
        L = self.a.num_layers - 1
        if self.final_reading == "residual":
            ivs.append(Intervention("resid_post", "project", (L,), positions="readout", name="final",
                                    directions={L: self.v_ref}))
        with torch.no_grad(), patch(self.model, *ivs, backend=self.backend) as h:
            out = forward(self.model, batch)
        B = batch["input_ids"].shape[0]
        if self.final_reading == "residual":
            final = h.captures["final"][L][0].float()  # [B, 6]
        else:
            hh = out.last_hidden_state[torch.arange(B, device=self.dev), batch["readout"].to(self.dev)].float()
            final = hh @ self.v_ref.T  # [B, 6]
        local = {l: h.captures["local"][l][0].float().cpu() for l in layers}
        return {"final": final.cpu(), "local": local}


@dataclass
class ValidationResult:
    """``rows``: one dict per (emotion, kind, mode, k, metric) with top/random summaries and
    Cohen's d; ``judged``: optional judged-accuracy rows; ``config``: the settings."""

    rows: list[dict] = field(default_factory=list)
    judged: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    def save(self, folder) -> Path:
        import csv
        import io

        from ..io import atomic_write_bytes, write_json

        folder = Path(folder)
        write_json(folder / "validation.json", {"config": self.config, "rows": self.rows, "judged": self.judged})
        if self.rows:
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=list(self.rows[0]))
            w.writeheader()
            w.writerows(self.rows)
            atomic_write_bytes(folder / "validation.csv", buf.getvalue().encode())
        return folder / "validation.json"

    def summary(self, metric: str = "final") -> list[dict]:
        """Per (kind, mode, k): emotion means of Δ_top / Δ_random, mean and median Cohen's d (per-emotion
        d can be huge when a component's effect barely varies across prompts, so the mean of d is
        fragile), and in how many emotions top-k beat random-k in the expected direction."""
        out = {}
        for r in self.rows:
            if r["metric"] != metric:
                continue
            out.setdefault((r["kind"], r["mode"], r["k"]), []).append(r)
        res = []
        for (kind, mode, k), rs in sorted(out.items()):
            f = lambda key: sum(x[key] for x in rs) / len(rs)  # noqa: E731
            ds = sorted(x["cohens_d"] for x in rs)
            med = ds[len(ds) // 2] if len(ds) % 2 else (ds[len(ds) // 2 - 1] + ds[len(ds) // 2]) / 2
            res.append(dict(kind=kind, mode=mode, k=k, metric=metric, top_mean=f("top_mean"), random_mean=f("random_mean"),
                            cohens_d=f("cohens_d"), cohens_d_median=med, n_emotions=len(rs),
                            top_beats_random=sum((x["top_mean"] < x["random_mean"]) if mode == "ablate"
                                                 else (x["top_mean"] > x["random_mean"]) for x in rs)))
        return res


def validate_components(model, tokenizer, units, neuron_scores, head_scores, diffs, dirs_attn, dirs_mlp, *,
                        kinds: Sequence[str] = KINDS, modes: Sequence[str] = MODES,
                        ks_neurons: Sequence[int] = (1, 4, 16, 64), ks_heads: Sequence[int] = (1, 2, 4, 8),
                        n_random: int = 5, layers_neurons=None, layers_heads=None, enhance_scale: float = 1.0,
                        emotions: Sequence[str] = EMOTIONS, final_reading: str = "normed", v_ref_window=None,
                        prompt_config=None, max_rows: int = 96, seed: int = 0, judge=None,
                        judge_max_new_tokens: int = 40, backend: str = "reference",
                        progress: bool = True) -> ValidationResult:
    """Ablate / enhance top-k vs layer-matched random-k components; see the module docstring.

    ``units``: SEV units (:func:`~..discover.collect.sev_units`) of the *evaluation* split; the
    ablation uses the units of target e (emotion prompt), the enhancement one neutral prompt per
    context. ``neuron_scores``/``head_scores``/``diffs``: the discovery artifacts (train split).
    ``judge``: optional object with ``classify(texts, targets) -> [Judgement(match=...)]``.
    """
    from tqdm.auto import tqdm

    from ..data.prompts import PromptConfig
    from ..discover.collect import check_dirs, unit_batches

    a = Adapter.of(model)
    dirs_attn = check_dirs(dirs_attn, a, "dirs_attn")
    dirs_mlp = check_dirs(dirs_mlp, a, "dirs_mlp")
    for x in kinds:
        if x not in KINDS:
            raise ValueError(f"unknown kind {x!r}: use {KINDS}")
    for x in modes:
        if x not in MODES:
            raise ValueError(f"unknown mode {x!r}: use {MODES}")
    if "enhance" in modes and diffs is None:
        raise ValueError("enhancement needs the component difference vectors (diffs=)")
    if n_random < 1:
        raise ValueError("n_random must be >= 1")
    config = prompt_config or PromptConfig()
    v_ref = reference_direction(dirs_attn, dirs_mlp, v_ref_window)
    scorer = _Scorer(model, dirs_attn, dirs_mlp, v_ref, final_reading, backend)
    gen = torch.Generator().manual_seed(seed)
    scores = {"neurons": neuron_scores, "heads": head_scores}
    widths = {"neurons": a.intermediate_size, "heads": a.num_heads}
    ks = {"neurons": tuple(ks_neurons), "heads": tuple(ks_heads)}
    layer_sets = {"neurons": layers_neurons, "heads": layers_heads}

    # one neutral unit per context (enhancement), units of each target (ablation)
    seen, neutral_units = set(), []
    for u in units:
        if u.group not in seen:
            seen.add(u.group)
            neutral_units.append(u)

    def one_batch(us, neutral):
        return next(unit_batches(tokenizer, us, batch_size=max(1, len(us)), config=config, neutral=neutral))

    result = ValidationResult(config=dict(
        kinds=list(kinds), modes=list(modes), ks_neurons=list(ks["neurons"]), ks_heads=list(ks["heads"]),
        n_random=n_random, enhance_scale=enhance_scale, final_reading=final_reading, seed=seed,
        layers_neurons=None if layers_neurons is None else list(layers_neurons),
        layers_heads=None if layers_heads is None else list(layers_heads), n_units=len(units),
        n_contexts=len(neutral_units), prompt=config.to_dict(), backend=backend))
    plan = [(e, kind, mode) for e in emotions for kind in kinds for mode in modes]
    bar = tqdm(plan, desc="validation", disable=not progress)
    for emo_name, kind, mode in bar:
        e = EMOTIONS.index(emo_name)
        if scores[kind] is None:
            raise ValueError(f"validating {kind} needs their scores")
        us = [u for u in units if (u.emotion == emo_name or u.emotion == e)] if mode == "ablate" else neutral_units
        if not us:
            raise ValueError(f"no evaluation units of target {emo_name!r}")
        batch = one_batch(us, neutral=(mode == "enhance"))
        n = len(us)
        conds, sels = [], []  # (k, draw) ; draw = -1 for top
        for k in ks[kind]:
            top = top_components(scores[kind], kind, e, k, layer_sets[kind])
            conds.append((k, -1))
            sels.append(top)
            for r in range(n_random):
                conds.append((k, r))
                sels.append(random_like(top, widths[kind], gen))
        layers_all = sorted({l for s in sels for l in s})
        base = scorer(batch, kind, layers_all, [])
        if kind == "neurons":
            def add_values(l, ids):
                return diffs.da[diffs.layers.index(l), e, ids]
        else:
            def add_values(l, ids):
                hd = a.head_dim
                row = diffs.dz[diffs.layers.index(l), e].view(-1, hd)
                return row[ids]
        deltas = {m: torch.zeros(len(conds), n) for m in METRICS}
        per_chunk = max(1, max_rows // n)
        for c0 in range(0, len(conds), per_chunk):
            cs = list(range(c0, min(len(conds), c0 + per_chunk)))
            iv = batched_edit(kind, mode, [sels[c] for c in cs], a.head_dim,
                              add_values if mode == "enhance" else None, enhance_scale)
            iv.rows = torch.arange(len(cs)).repeat_interleave(n)
            out = scorer(_repeat(batch, len(cs)), kind, layers_all, [iv])
            for j, c in enumerate(cs):
                sl = slice(j * n, (j + 1) * n)
                deltas["final"][c] = out["final"][sl, e] - base["final"][:, e]
                ls = sorted(sels[c])
                loc = torch.stack([out["local"][l][sl, e] - base["local"][l][:, e] for l in ls])  # [n_layers, n]
                deltas["local"][c] = loc.mean(0)
        for k in ks[kind]:
            top_i = conds.index((k, -1))
            rand_i = [i for i, (kk, r) in enumerate(conds) if kk == k and r >= 0]
            for metric in METRICS:
                D = deltas[metric]
                top, rnd = D[top_i], D[rand_i]  # [n], [R, n]
                draw_means = rnd.mean(1)
                result.rows.append(dict(
                    emotion=emo_name, kind=kind, mode=mode, k=k, metric=metric, n_prompts=n,
                    top_mean=float(top.mean()), top_std=float(top.std()) if n > 1 else 0.0,
                    random_mean=float(draw_means.mean()),
                    random_std=float(draw_means.std()) if len(rand_i) > 1 else 0.0,
                    cohens_d=cohens_d(top, rnd.flatten()),
                    top_layers=",".join(f"{l}:{len(v)}" for l, v in sels[top_i].items()),
                    base_mean=float(base["final"][:, e].mean()) if metric == "final" else float(
                        torch.stack([base["local"][l][:, e] for l in sels[top_i]]).mean()),
                ))
        if judge is not None:
            kmax = ks[kind][-1]
            sel_top, sel_rand = sels[conds.index((kmax, -1))], sels[conds.index((kmax, 0))]
            for cond, sel in (("none", None), ("top", sel_top), ("random", sel_rand)):
                ivs = [] if sel is None else [batched_edit(kind, mode, [sel], a.head_dim,
                                                           add_values if mode == "enhance" else None, enhance_scale)]
                texts = _generate(model, tokenizer, batch, ivs, judge_max_new_tokens, backend)
                js = judge.classify(texts, [emo_name] * len(texts))
                acc = sum(bool(j.match) for j in js) / len(js)
                result.judged.append(dict(emotion=emo_name, kind=kind, mode=mode, k=kmax, condition=cond,
                                          accuracy=acc, n=len(js), texts=texts))
    return result


def _generate(model, tokenizer, batch, ivs, max_new_tokens, backend) -> list[str]:
    dev = next(model.parameters()).device
    with torch.no_grad(), patch(model, *ivs, backend=backend):
        out = model.generate(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev),
                             max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    T = batch["input_ids"].shape[1]
    return [tokenizer.decode(o[T:], skip_special_tokens=True).strip() for o in out]


# ---------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------
def plot_validation(result: ValidationResult, folder, metrics: Sequence[str] = METRICS) -> list[Path]:
    """``validation_{metric}.png``: Δscore vs k per (kind, mode); emotion mean of top-k (solid)
    and random-k (dashed, ± mean std over draws), per-emotion top-k curves thin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import atomic_write_bytes
    import io

    folder = Path(folder)
    paths = []
    for metric in metrics:
        rows = [r for r in result.rows if r["metric"] == metric]
        if not rows:
            continue
        panels = sorted({(r["kind"], r["mode"]) for r in rows})
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
        for ax, (kind, mode) in zip(axes[0], panels):
            rs = [r for r in rows if r["kind"] == kind and r["mode"] == mode]
            ks = sorted({r["k"] for r in rs})
            for emo in sorted({r["emotion"] for r in rs}, key=EMOTIONS.index):
                er = sorted((r for r in rs if r["emotion"] == emo), key=lambda r: r["k"])
                ax.plot([r["k"] for r in er], [r["top_mean"] for r in er], lw=0.8, alpha=0.45, label=emo)
            mt = [sum(r["top_mean"] for r in rs if r["k"] == k) / max(1, sum(r["k"] == k for r in rs)) for k in ks]
            mr = [sum(r["random_mean"] for r in rs if r["k"] == k) / max(1, sum(r["k"] == k for r in rs)) for k in ks]
            sr = [sum(r["random_std"] for r in rs if r["k"] == k) / max(1, sum(r["k"] == k for r in rs)) for k in ks]
            ax.plot(ks, mt, "k-o", lw=2, label="top-k (mean)")
            ax.plot(ks, mr, "k--s", lw=1.5, label="random-k (mean)")
            ax.fill_between(ks, [m - s for m, s in zip(mr, sr)], [m + s for m, s in zip(mr, sr)], color="gray", alpha=0.25)
            ax.axhline(0, color="gray", lw=0.5)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("k components")
            ax.set_ylabel(f"Δ {metric} projection")
            ax.set_title(f"{kind} · {mode}")
        axes[0][-1].legend(fontsize=6, loc="best")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        paths.append(atomic_write_bytes(folder / f"validation_{metric}.png", buf.getvalue()))
    return paths
