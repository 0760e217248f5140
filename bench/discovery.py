"""Discovery cost and capture memory, and heterogeneous batches — side by side, one machine.

1. Capture memory: the bytes a discovery pass must hold for the train split, streaming
   accumulators (emokernels) vs keeping every readout state (the paper stores per-prompt
   activations), measured as the size of what each path keeps after a real capture of N prompts
   on the model, and extrapolated linearly in N to the full train split (2880 prompts).
2. Heterogeneous batches: one batch of B rows carrying six different emotions (per-row tables)
   vs one batch per emotion (what hook libraries with one global edit need), same total rows.

    python bench/discovery.py --model smollm2-135m --prompts 48

Results go to bench/results/discovery-<date>.md. (Head scores one-pass vs brute force and
sublayer influence fast vs naive are measured by their own scripts/tests; their ratios are in
the README.)
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


def capture_memory(model, tok, n_prompts: int) -> dict:
    sk = load_split("train", limit=max(1, n_prompts // 18))
    units = prompt_units(sk)[:n_prompts]
    res = capture(model, tok, units, keep_states=True, states_dtype=torch.float16, progress=False)
    acc_state, _ = res.accumulator.state_dict()
    kept = tensor_bytes(res.states)  # what a store-everything pipeline holds (fp16, like the paper)
    streaming = tensor_bytes(acc_state)
    per_prompt = kept / len(units)
    a = Adapter.of(model)
    proj = TRAIN_PROMPTS * 2 * a.num_layers * 6 * 4  # projections onto 6 directions, fp32
    return dict(n=len(units), kept_bytes=kept, streaming_bytes=streaming,
                full_split_kept=per_prompt * TRAIN_PROMPTS, full_split_streaming=streaming, projections=proj)


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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompts", type=int, default=48)
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args(argv)
    model, tok = load(a.model, dtype=torch.bfloat16)
    mem = capture_memory(model, tok, a.prompts)
    het = heterogeneous(model, tok, a.batch, a.rounds)
    mb = 1 / 2 ** 20
    lines = [f"# Discovery memory and heterogeneous batches — {a.model}, CPU {os.cpu_count()} cores, "
             f"{_dt.date.today().isoformat()}", "",
             f"Capture of {mem['n']} train prompts (both points, all layers, readout token):", "",
             "| what is held | measured for N prompts | full train split (2880 prompts) |", "|---|---|---|",
             f"| every readout state, fp16 (store-then-estimate, the paper) | {mem['kept_bytes'] * mb:.2f} MiB | "
             f"{mem['full_split_kept'] * mb:.1f} MiB (linear in N) |",
             f"| emokernels streaming accumulators (fp64 sums per emotion, valence, theme) | {mem['streaming_bytes'] * mb:.2f} MiB | "
             f"{mem['full_split_streaming'] * mb:.2f} MiB (independent of N) |",
             f"| projections onto the 6 directions only (capture_project), fp32 | – | {mem['projections'] * mb:.2f} MiB |", "",
             f"Ratio at the full split: {mem['full_split_kept'] / mem['full_split_streaming']:.1f}x (accumulators), "
             f"{mem['full_split_kept'] / mem['projections']:.0f}x (projections).", "",
             f"Heterogeneous batch ({het['batch']} rows x 96 tokens, six emotions, fused steering, prefill): one batch "
             f"{het['one_batch_ms']:.1f} ms vs one batch per emotion {het['per_emotion_ms']:.1f} ms "
             f"(median paired speed-up {het['speedup']:.2f}x)."]
    out = Path(__file__).resolve().parent / "results" / f"discovery-{_dt.date.today().isoformat()}.md"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
