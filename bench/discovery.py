"""Discovery cost and capture memory, and heterogeneous batches — side by side, one machine.

1. Capture memory: the bytes a discovery pass must hold for the train split, streaming
   accumulators and projections (emokernels) vs keeping every readout state or the paper's
   dumps; measured on a real capture of N prompts and given by formula for the full train split
   (2880 prompts) of each model shape. ``--peak``: the peak resident memory of each capture over
   the whole split, each in a fresh process.
2. Heterogeneous batches: one batch of B rows carrying six different emotions (per-row tables)
   vs one batch per emotion (what hook libraries with one global edit need), same total rows.
3. ``--cost``: head scores (one pass vs zeroing each head) and sublayer influence (prefix reuse
   vs one full forward per injection) against the paper's procedure, same prompts, fp32.
   ``--cost-family gemma2`` times a random-weight model of that family with ``--model``'s shape
   and tokenizer instead (families without an offline checkpoint here).

    python bench/discovery.py --model smollm2-135m --peak --cost

Results go to bench/results/discovery-<date>.md (and .csv: every table, long format), with the
date, commit and versions.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from emokernels.data.sev import load_split  # noqa: E402
from emokernels.discover.capture import capture, prompt_units  # noqa: E402
from emokernels.models import Adapter, load  # noqa: E402

TRAIN_PROMPTS = 160 * 3 * 6


def tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


# Shapes (layers L, width d, MLP width d_ff) for the per-model table; SmolLM2 is also measured.
SHAPES = {"smollm2-135m": (30, 576, 1536), "qwen2.5-coder-0.5b": (24, 896, 4864),
          "qwen2.5-coder-1.5b": (28, 1536, 8960), "llama-3.2-3b (the paper's)": (28, 3072, 8192)}
N_VALENCES, N_THEMES, K = 3, 8, 6


def held_bytes(L: int, d: int, d_ff: int, n: int = TRAIN_PROMPTS) -> dict:
    """What each way of capturing holds for ``n`` prompts (bytes), from the model's shape.

    * paper: fp16 dumps of both residual points (stage 02) and of z, a (stage 05) per prompt:
      n · L · (2d + d + d_ff) · 2
    * residual states only (the directions stage), fp16: n · 2L · d · 2
    * projections onto the K = 6 directions, fp32: n · 2L · K · 4
    * emokernels' streaming accumulators, fixed in n: the centred sums [2, L, 6, d] fp64 for the
      run and for each valence and theme (consistency checks), plus the neuron sums
      4 · [L, 6, d_ff] fp64 (heads: [L, 6, H], negligible)
    """
    acc_dirs = (1 + N_VALENCES + N_THEMES) * 2 * L * K * d * 8
    acc_neurons = 4 * L * K * d_ff * 8
    return dict(paper=n * L * (3 * d + d_ff) * 2, states=n * 2 * L * d * 2, projections=n * 2 * L * K * 4,
                accumulators=acc_dirs + acc_neurons, acc_dirs=acc_dirs, acc_neurons=acc_neurons)


def project_readouts(model, tok, units, project: bool = True) -> int:
    """Forward ``units`` in batches of 16 with the fused ``project`` op reading both residual points
    of every layer at t* onto K random unit directions, drained after each batch into one fp32
    buffer [2, L, N, K] (``project=False``: the same forward passes, nothing read); returns the
    bytes of that buffer."""
    from emokernels import Intervention, patch
    from emokernels.data.prompts import PromptConfig
    from emokernels.discover.capture import _render_batch

    a = Adapter.of(model)
    g = torch.Generator().manual_seed(0)
    dirs = {l: torch.nn.functional.normalize(torch.randn(K, a.hidden_size, generator=g), dim=-1)
            for l in range(a.num_layers)}
    ivs = [Intervention(site=site, op="project", layers=range(a.num_layers), positions="readout", directions=dirs,
                        name=site) for site in ("resid_mid", "resid_post")] if project else []
    out = torch.empty(2, a.num_layers, len(units), K) if project else torch.empty(0)  # [point, L, N, K]
    with torch.no_grad(), patch(model, *ivs, backend="fused") as h:
        for i in range(0, len(units), 16):
            batch = _render_batch(tok, units[i:i + 16], PromptConfig(), "prompt")
            model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            if project:  # drained per batch into the one buffer
                got = h.pop_captures()
                out[0, :, i:i + 16], out[1, :, i:i + 16] = got["resid_mid"], got["resid_post"]
    return tensor_bytes(out)


def capture_memory(model, tok, n_prompts: int) -> dict:
    """Measured on ``n_prompts`` train prompts: bytes of the kept fp16 states, of the directions
    accumulator, and of readout projections captured by the fused ``project`` op."""
    sk = load_split("train", limit=max(1, n_prompts // 18))
    units = prompt_units(sk)[:n_prompts]
    res = capture(model, tok, units, keep_states=True, states_dtype=torch.float16, progress=False)
    acc_state, _ = res.accumulator.state_dict()
    return dict(n=len(units), states=tensor_bytes(res.states), acc_measured=tensor_bytes(acc_state),
                acc_tensors=len(acc_state), projections=project_readouts(model, tok, units))


def heterogeneous(model, tok, batch: int, rounds: int) -> dict:
    from emokernels import patch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from latency import Workload as W

    wl = W(model)
    dev = next(model.parameters()).device
    ids = torch.randint(10, model.config.vocab_size - 10, (batch, 96), device=dev)
    rows = torch.arange(batch, device=dev) % 6
    per_emotion = [ids[rows == e] for e in range(6)]
    one, split = [], []
    with torch.no_grad():
        for r in range(rounds + 1):
            t = time.perf_counter()
            with patch(model, *wl.steer_ivs(rows), backend="fused"):
                model(input_ids=ids, use_cache=False)
            t1 = time.perf_counter() - t
            t = time.perf_counter()
            for e in range(6):
                with patch(model, *wl.steer_ivs(torch.full((len(per_emotion[e]),), e, device=dev)), backend="fused"):
                    model(input_ids=per_emotion[e], use_cache=False)
            t2 = time.perf_counter() - t
            if r:  # first round is warm-up
                one.append(t1)
                split.append(t2)
    return dict(batch=batch, one_batch_ms=statistics.median(one) * 1e3, per_emotion_ms=statistics.median(split) * 1e3,
                speedup=statistics.median([b / a for a, b in zip(one, split)]))


def random_like(model, family: str):
    """A seeded random-weight fp32 model of ``family`` (a transformers model_type) with ``model``'s
    depth, widths and head counts."""
    from transformers import AutoConfig, AutoModelForCausalLM

    c = model.config
    hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    cfg = AutoConfig.for_model(family, vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                               intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
                               num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
                               head_dim=hd, query_pre_attn_scalar=hd, max_position_embeddings=8192)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).float().eval()


def discovery_cost(model_name: str, n_skeletons: int, emotions: int, family: str | None = None) -> list[str]:
    """Head scores and sublayer influence, emokernels vs the paper's procedure, same prompts, fp32.

    Random unit directions stand in for real ones (the cost does not depend on their values).
    Heads: one pass per batch vs 1 + L·H ablation passes per batch. Influence: the prefix-reusing
    fast paths (tree, staged) vs one full forward per (emotion, sublayer, α). ``family``: time a
    random model of that family with ``model_name``'s shape (:func:`random_like`) instead.
    """
    from emokernels.data.prompts import chat_messages, render
    from emokernels.discover.heads import head_scores, head_scores_bruteforce
    from emokernels.discover.influence import influence_fast, influence_naive, reference_directions
    from emokernels.discover.collect import sev_units, unit_batches

    model, tok = load(model_name, dtype=torch.float32)
    if family:
        model, model_name = random_like(model, family), f"random {family} of {model_name}'s shape"
    a = Adapter.of(model)
    g = torch.Generator().manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(2, a.num_layers, 6, a.hidden_size, generator=g), dim=-1)
    sk = load_split("train", limit=n_skeletons)
    units = [u for u in sev_units(sk) if u.valence == "neutral"]
    lines = [f"## Discovery cost: {model_name}, fp32, CPU {os.cpu_count()} cores", "",
             "| stage | paper's procedure | emokernels | forward passes | wall time | ratio (wall) | max abs difference |",
             "|---|---|---|---|---|---|---|"]

    def timed(fn):
        t = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t

    batches = lambda: unit_batches(tok, units, batch_size=6)  # noqa: E731
    fast, t_fast = timed(lambda: head_scores(model, batches(), dirs[0], progress=False))
    brute, t_brute = timed(lambda: head_scores_bruteforce(model, batches(), dirs[0], progress=False))
    nb = -(-len(units) // 6)
    diff = (fast.mean - brute.mean).abs().max().item()
    lines.append(f"| head scores, {len(units)} prompts | zero each head, re-run | one pass | {nb * (1 + a.num_layers * a.num_heads)} "
                 f"vs {nb} | {t_brute:.1f} s vs {t_fast:.2f} s | **{t_brute / t_fast:.0f}x** | {diff:.1e} |")

    seqs = [torch.tensor(tok(render(tok, chat_messages(s.user_message(v), None)), add_special_tokens=False)["input_ids"])
            for s in sk for v in ("positive", "neutral", "negative")]
    sigma = torch.ones(2, a.num_layers)
    v_ref, u = reference_directions(dirs[:, :, :emotions])
    naive, t_naive = timed(lambda: influence_naive(model, seqs, u, sigma, v_ref, batch_size=16, progress=False))
    for layout in ("tree", "staged"):
        res, t = timed(lambda: influence_fast(model, seqs, u, sigma, v_ref, layout=layout, progress=False))
        diff = (res.I - naive.I).abs().max().item()
        lines.append(f"| sublayer influence, {len(seqs)} prompts × {emotions} emotions × {2 * a.num_layers} sublayers × "
                     f"{len(res.alphas)} α ({layout}) | full forward per injection | prefix once, readout token "
                     f"{'from its layer on' if layout == 'staged' else 'per copy'} | {naive.stats['token_rows']:.0f} vs "
                     f"{res.stats['token_rows']:.0f} token rows | {t_naive:.1f} s vs {t:.2f} s | **{t_naive / t:.0f}x** | {diff:.1e} |")
    lines += ["", "Directions and neuron scores need one forward per prompt in both (the paper dumps states, "
              "emokernels streams them): no speed-up there, the gain is memory (below)."]
    return lines


def peak_child(model_name: str, what: str, n_prompts: int) -> None:
    """Run one capture of the first ``n_prompts`` train prompts and print the peak RSS (KiB).

    ``what``: ``states`` (keep every readout state, fp16: store-then-estimate), ``projections``
    (the fused ``project`` op, fp32 [B, 6] per layer and point), ``accumulators`` (emokernels'
    streaming capture), or ``forward`` (the same forward passes keeping nothing: the baseline).
    """
    import gc

    model, tok = load(model_name, dtype=torch.bfloat16)
    units = prompt_units(load_split("train"))[:n_prompts]
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to now: loading is not the capture
    if what in ("states", "accumulators"):
        res = capture(model, tok, units, keep_states=what == "states", states_dtype=torch.float16,
                      accumulate=what == "accumulators", progress=False)
        held = tensor_bytes(res.states) + (tensor_bytes(res.accumulator.state_dict()[0]) if res.accumulator else 0)
    else:
        held = project_readouts(model, tok, units, project=what == "projections")
    status = dict(l.split(":", 1) for l in Path("/proc/self/status").read_text().splitlines() if ":" in l)
    print(f"PEAK {what} {int(status['VmHWM'].split()[0])} {held}", flush=True)


def peak_memory(model_name: str, n_prompts: int) -> list[str]:
    """Peak resident memory of each capture, each in a fresh process, minus the forward-only run."""
    import subprocess

    out = {}
    # glibc keeps freed heap memory (small long-lived tensors pin it: RSS then grew ~1 MB per prompt
    # with nothing live, and malloc_trim gave it back); fixed mmap/trim thresholds return the large
    # activation buffers at once, so the peak RSS follows the live tensors.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    for what in ("forward", "projections", "accumulators", "states"):
        r = subprocess.run([sys.executable, __file__, "--model", model_name, "--peak-child", what,
                            "--peak-prompts", str(n_prompts)], capture_output=True, text=True, check=True, env=env)
        line = next(l for l in r.stdout.splitlines() if l.startswith("PEAK "))
        _, _, kib, held = line.split()
        out[what] = (int(kib) * 1024, int(held))
        print(line, flush=True)
    mb = 1 / 2 ** 20
    base = out["forward"][0]
    lines = [f"## Peak memory of a capture of {n_prompts} train prompts ({model_name}, measured)", "",
             "Each capture in a fresh process (glibc mmap/trim thresholds fixed at 128 KiB so freed activations "
             "leave the RSS); the peak resident memory (VmHWM, reset after the model is loaded) minus that of the "
             "same forward passes keeping nothing.", "", "| capture | peak RSS | added peak | tensors held at the end |", "|---|---|---|---|"]
    for what in ("forward", "projections", "accumulators", "states"):
        peak, held = out[what]
        lines.append(f"| {what} | {peak * mb:.0f} MiB | {(peak - base) * mb:+.1f} MiB | {held * mb:.2f} MiB |")
    return lines


def memory_lines(model_name: str, model, mem: dict) -> list[str]:
    mb = 1 / 2 ** 20
    a = Adapter.of(model)
    n = mem["n"]
    f = held_bytes(a.num_layers, a.hidden_size, a.intermediate_size, n)
    lines = [f"## Capture memory: measured on {model_name}, {n} train prompts (readout token, both residual points)", "",
             "| what is held | measured | formula (see held_bytes) |", "|---|---|---|",
             f"| residual states, fp16 (directions stage, store-then-estimate) | {mem['states'] * mb:.3f} MiB | "
             f"{f['states'] * mb:.3f} MiB |",
             f"| projections onto 6 directions, fp32 (fused `project`) | {mem['projections'] * mb:.4f} MiB | "
             f"{f['projections'] * mb:.4f} MiB |",
             f"| directions accumulator, fp64 ({mem['acc_tensors']} tensors: run + the valences/themes seen so far) | "
             f"{mem['acc_measured'] * mb:.2f} MiB | {f['acc_dirs'] * mb:.2f} MiB once all 3 valences and 8 themes are seen |",
             "", "## Held for the whole train split (2880 prompts), by model shape", "",
             "Computed from the formulas above (SmolLM2's measured row checks them). *paper* = the fp16 dumps of "
             "stages 02 and 05 (both residual points, z and a: L·(3d + d_ff) values per prompt); *accumulators* = "
             "everything emokernels' discovery keeps (directions incl. per-valence/per-theme sums, neuron sums), "
             "independent of the number of prompts.", "",
             "| model (L, d, d_ff) | paper dumps | residual states fp16 | projections fp32 | accumulators fp64 | "
             "states / projections | paper / projections | paper / accumulators |", "|---|---|---|---|---|---|---|---|"]
    for name, (L, d, dff) in SHAPES.items():
        h = held_bytes(L, d, dff)
        lines.append(f"| {name} ({L}, {d}, {dff}) | {h['paper'] * mb:.0f} MiB | {h['states'] * mb:.0f} MiB | "
                     f"{h['projections'] * mb:.1f} MiB | {h['accumulators'] * mb:.1f} MiB | "
                     f"{h['states'] / h['projections']:.0f}x | {h['paper'] / h['projections']:.0f}x | "
                     f"{h['paper'] / h['accumulators']:.1f}x |")
    smol = held_bytes(*SHAPES["smollm2-135m"])
    lines += ["", "States / projections = d / 6 × (2 bytes / 4 bytes): bounded by the width, so it passes 100x only "
              "from d ≥ 1200 (Qwen 1.5B and up). Against everything the paper dumps for discovery (its two capture "
              f"stages), projections are {smol['paper'] / smol['projections']:.0f}x smaller already on SmolLM2. The "
              "accumulators are fixed in N (the ratio grows with the data set); at 2880 prompts they are "
              f"{smol['paper'] / smol['accumulators']:.0f}x smaller than SmolLM2's dumps, held back by the per-valence "
              "and per-theme sums that the consistency checks need (11 of the 12 direction-sized sums)."]
    return lines


def tables_to_csv(markdown: str, path: Path, info: dict) -> None:
    """Every Markdown table of the report as CSV rows, long format: section, row, column, value
    (the report's tables differ in columns), plus date/commit/versions on each row."""
    import csv

    section, header, rows = "", None, []
    for line in markdown.splitlines():
        if line.startswith("#"):
            section, header = line.lstrip("# ").strip(), None
        elif line.startswith("|") and not set(line) <= set("|-: "):
            cells = [c.strip().strip("*") for c in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
            else:
                rows += [dict(section=section, row=cells[0], column=col, value=val) for col, val in zip(header[1:], cells[1:])]
        elif not line.startswith("|"):
            header = None
    keys = ["date", "commit", "card", "torch", "transformers"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["section", "row", "column", "value"] + keys)
        w.writeheader()
        w.writerows({**r, **{k: info[k] for k in keys}} for r in rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompts", type=int, default=48)
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-hetero", action="store_true", help="skip the heterogeneous-batch timing")
    p.add_argument("--cost", action="store_true", help="also time heads and influence against the paper's procedure")
    p.add_argument("--cost-skeletons", type=int, default=2, help="train skeletons for --cost (3 prompts each)")
    p.add_argument("--cost-emotions", type=int, default=6, help="emotions for the influence part of --cost (default: all six, as discovery runs it)")
    p.add_argument("--cost-only", action="store_true", help="only --cost (no memory, no heterogeneous batch)")
    p.add_argument("--cost-family", default=None, help="--cost on a random model of this family (e.g. gemma2) with --model's shape")
    p.add_argument("--peak", action="store_true", help="also measure the peak memory of each capture (subprocesses)")
    p.add_argument("--peak-prompts", type=int, default=TRAIN_PROMPTS, help="prompts for --peak (default: the train split)")
    p.add_argument("--out", default=None, help="results file (default: bench/results/discovery-<date>.md)")
    p.add_argument("--peak-child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.peak_child:
        return peak_child(a.model, a.peak_child, a.peak_prompts)
    from latency import machine_info

    info = machine_info(torch.device("cpu"))
    what = f"{a.model}" + (f" (--cost: random {a.cost_family} of its shape)" if a.cost_family else "")
    lines = [f"# Discovery {'cost' if a.cost_only else 'memory and heterogeneous batches'} — {what}, {info['card']}",
             "", f"date {info['date']}, commit {info['commit']}, torch {info['torch']}, transformers {info['transformers']}"]
    if not a.cost_only:
        model, tok = load(a.model, dtype=torch.bfloat16)
        lines += [""] + memory_lines(a.model, model, capture_memory(model, tok, a.prompts))
    if not (a.no_hetero or a.cost_only):
        het = heterogeneous(model, tok, a.batch, a.rounds)
        lines += ["", f"## Heterogeneous batch", "", f"{het['batch']} rows x 96 tokens, six emotions, fused steering, "
                  f"prefill: one batch {het['one_batch_ms']:.1f} ms vs one batch per emotion {het['per_emotion_ms']:.1f} ms "
                  f"(median paired speed-up {het['speedup']:.2f}x)."]
    if a.peak and not a.cost_only:
        lines += [""] + peak_memory(a.model, a.peak_prompts)
    if a.cost or a.cost_only:
        lines += [""] + discovery_cost(a.model, a.cost_skeletons, a.cost_emotions, a.cost_family)
    out = Path(a.out or Path(__file__).resolve().parent / "results" / f"discovery-{_dt.date.today().isoformat()}.md")
    out.write_text("\n".join(lines) + "\n")
    tables_to_csv(out.read_text(), out.with_name(out.name.removesuffix(".md") + ".csv"), info)
    print(out.read_text())


if __name__ == "__main__":
    main()
