"""Intervention latency, side by side: prefill and decode-step time under each way of intervening.

Conditions (same model, same inputs, interleaved rounds, warm-up, medians; the overhead is the
median over rounds of the *paired* ratio against the unpatched model measured in the same round):

  unpatched        the plain HF model
  hooks_steer      paper-style steering: a forward hook on each steered decoder layer adds
                   α·rms(h)·v at the last position of every call (METHOD §5)
  emk_ref_steer    emokernels.patch, reference backend (torch ops in hooks)
  emk_fused_steer  emokernels.patch, fused backend (C++ on CPU, CUDA/Triton on GPU)
  hooks_circuit    paper-style circuit modulation: an MLP forward hook that *recomputes*
                   act(W_G n)⊙(W_U n), adds Δa at the circuit's neurons (last position), then W_D;
                   an o_proj pre-hook adding Δz on the circuit's head slices at all positions (§8.5)
  emk_ref_circuit  emokernels sparse neuron/head edits, reference backend
  emk_fused_circuit  the same, fused backend
  emk_fused_bias   the circuit compiled to per-layer bias vectors (exact, §8.5), fused gather_add
  folded_bias      the static floor: the same biases folded into down_proj/o_proj as bias
                   parameters (all positions; no per-row emotions) — what an edit costs at best
  pyvene / nnsight / repeng / steering-vectors  the same steering edit through those libraries, when importable

With ``--compile MODE`` the decode step is also timed under ``torch.compile(mode=MODE)`` with a
static KV cache (eager prefill, compiled decode: what transformers' generate does), for the
conditions in ``--compile-conditions``: each on its own module tree over the same weight tensors,
with its hooks or patch installed for the whole run, so one compiled graph per condition. The
table then also gives every decode time against the *fastest* unpatched setup (eager or compiled):
a tool whose hooks cannot be compiled pays the lost compile / CUDA-graph speed-up there.

Run ``python bench/latency.py --help``. Writes ``bench/results/<machine>-<date>.csv`` and ``.md``.
The alternatives are optional; ``bench/requirements-alternatives.txt`` says how to install them.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import itertools
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from emokernels import Intervention, patch  # noqa: E402
from emokernels.models import Adapter, load  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------------------------
# the workloads
# ---------------------------------------------------------------------------------------------
class Workload:
    """A random circuit and steering directions sized like the paper's, scaled to the model."""

    def __init__(self, model, seed: int = 0, emotions: int = 6):
        a = Adapter.of(model)
        self.a = a
        g = torch.Generator().manual_seed(seed)
        dev = next(model.parameters()).device
        L = a.num_layers
        self.steer_layers = list(range(round(0.39 * L), round(0.71 * L) + 1))
        self.dirs = {l: torch.nn.functional.normalize(torch.randn(emotions, a.hidden_size, generator=g), dim=-1).to(dev)
                     for l in self.steer_layers}
        # paper: α = 8 at d = 3072, so the added vector is 8/√3072 ≈ 0.144 of ‖h‖; keep that ratio
        self.alpha = 8.0 / 3072 ** 0.5 * a.hidden_size ** 0.5
        # paper: 392 neurons and 168 heads over 28 layers (14 neurons, 6 heads per layer on average)
        n_per = max(1, round(392 / 28 * a.intermediate_size / 8192))
        h_per = max(1, round(168 / 28 * a.num_heads / 24))
        self.layers = list(range(L))
        self.neurons = {l: torch.randperm(a.intermediate_size, generator=g)[:n_per].to(dev) for l in self.layers}
        self.heads = {l: torch.randperm(a.num_heads, generator=g)[:h_per].to(dev) for l in self.layers}
        self.d_a = {l: torch.randn(emotions, n_per, generator=g).to(dev) for l in self.layers}
        self.d_z = {l: 0.1 * torch.randn(emotions, h_per, a.head_dim, generator=g).to(dev) for l in self.layers}
        # exact bias compilation: b_mlp = W_D[:, N] Δa[N], b_attn = W_O P_H Δz
        self.b_mlp, self.b_attn = {}, {}
        for l in self.layers:
            s = a.sites(l)
            WD = s.down_proj.weight.float()
            WO = s.o_proj.weight.float()
            self.b_mlp[l] = self.d_a[l] @ WD[:, self.neurons[l]].T
            cols = (self.heads[l][:, None] * a.head_dim + torch.arange(a.head_dim, device=dev)).reshape(-1)
            self.b_attn[l] = self.d_z[l].reshape(emotions, -1) @ WO[:, cols].T

    # emokernels specs ------------------------------------------------------------------------
    def steer_ivs(self, rows):
        return [Intervention(site="resid_post", op="add_rms", layers=self.steer_layers, positions=("readout", "generated"),
                             vectors=self.dirs, rows=rows, strength=self.alpha)]

    def circuit_ivs(self, rows):
        return [Intervention(site="neurons", op="edit", layers=self.layers, positions=("readout", "generated"),
                             index=self.neurons, add=self.d_a, rows=rows),
                Intervention(site="heads", op="edit", layers=self.layers, positions="all",
                             index=self.heads, add=self.d_z, rows=rows)]

    def bias_ivs(self, rows):
        return [Intervention(site="mlp_out", op="add", layers=self.layers, positions=("readout", "generated"),
                             vectors=self.b_mlp, rows=rows),
                Intervention(site="attn_out", op="add", layers=self.layers, positions="all", vectors=self.b_attn, rows=rows)]

    # paper-style hooks -----------------------------------------------------------------------
    @contextlib.contextmanager
    def hooks_steer(self, emotion: int = 0):
        hs = []
        for l in self.steer_layers:
            v = self.dirs[l][emotion]

            def hook(mod, args, out, v=v):
                h = out[0] if isinstance(out, tuple) else out
                last = h[:, -1:, :]
                r = last.float().pow(2).mean(-1, keepdim=True).add(1e-12).sqrt()
                h = torch.cat([h[:, :-1], (last.float() + self.alpha * r * v).to(h.dtype)], dim=1)
                return (h, *out[1:]) if isinstance(out, tuple) else h

            hs.append(self.a.sites(l).layer.register_forward_hook(hook))
        with _removing(hs):
            yield

    @contextlib.contextmanager
    def hooks_circuit(self, emotion: int = 0):
        hs = []
        hd = self.a.head_dim
        for l in self.layers:
            s = self.a.sites(l)
            idx, da = self.neurons[l], self.d_a[l][emotion]

            def mlp_hook(mod, args, out, idx=idx, da=da):  # the paper recomputes the activation
                x = args[0]
                act = mod.act_fn(mod.gate_proj(x)) * mod.up_proj(x)
                act[:, -1, idx] += da.to(act.dtype)
                return mod.down_proj(act)

            mask = torch.zeros(self.a.num_heads * hd, device=da.device)
            add = torch.zeros_like(mask)
            for j, h in enumerate(self.heads[l].tolist()):
                mask[h * hd:(h + 1) * hd] = 1
                add[h * hd:(h + 1) * hd] = self.d_z[l][emotion, j]

            def o_hook(mod, args, add=add):
                return (args[0] + add.to(args[0].dtype),)

            hs.append(s.mlp.register_forward_hook(mlp_hook))
            hs.append(s.o_proj.register_forward_pre_hook(o_hook))
        with _removing(hs):
            yield

    @contextlib.contextmanager
    def folded_bias(self, emotion: int = 0):
        mods = []
        for l in self.layers:
            s = self.a.sites(l)
            for mod, b in ((s.down_proj, self.b_mlp[l][emotion]), (s.o_proj, self.b_attn[l][emotion])):
                mod.bias = torch.nn.Parameter(b.to(mod.weight.dtype), requires_grad=False)
                mods.append(mod)
        try:
            yield
        finally:
            for m in mods:
                m.bias = None


@contextlib.contextmanager
def _removing(handles):
    """Remove the hook handles on exit, errors included."""
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _time_prefill(fwd, ids, dev) -> float:
    _sync(dev)
    t = time.perf_counter()
    fwd(input_ids=ids, use_cache=False)
    _sync(dev)
    return time.perf_counter() - t


def _time_decode(fwd, ids, dev, key: str, steps: int = 4) -> float:
    """Mean time of one KV-cached decode step after a prefill of ``ids`` (prefill not timed);
    ``key``: the cache keyword of this transformers version (``Adapter.cache_kwarg``)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    fwd(input_ids=ids, use_cache=True, **{key: cache})
    nxt = ids[:, -1:]
    _sync(dev)
    t = time.perf_counter()
    for _ in range(steps):
        fwd(input_ids=nxt, use_cache=True, **{key: cache})
    _sync(dev)
    return (time.perf_counter() - t) / steps


# ---------------------------------------------------------------------------------------------
# compiled decode: static cache, one compiled step per condition
# ---------------------------------------------------------------------------------------------
COMPILED_DEFAULT = "unpatched,hooks_steer,hooks_circuit,emk_fused_steer,emk_fused_bias"


def shared_copy(model):
    """A second module tree over the *same* parameter and buffer tensors (no weight memory): a
    condition's hooks or patch stay installed on it while its compiled step is timed."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def _fresh_step(model):
    """``model(**kw)`` under a code object of its own: dynamo keys its cache on the code object,
    so each condition gets its own graph and no condition pays for another's guard checks."""
    ns: dict = {}
    exec("def step(**kw):\n    return model(**kw)\n", {"model": model}, ns)  # noqa: S102
    return ns["step"]


class CompiledDecode:
    """One condition's decode step under ``torch.compile``, on a shared-weight copy of the model."""

    def __init__(self, model, name: str, batch: int, prompt: int, steps: int, mode: str, backend: str):
        from transformers import StaticCache

        self.model = shared_copy(model)
        self.name, self.steps = name, steps
        conds = conditions(self.model, Workload(self.model), batch, third_party=False)
        self._ctx = conds[name]()
        self._ctx.__enter__()  # installed for the whole run (left in close())
        dev = next(model.parameters()).device
        self.cache = StaticCache(config=self.model.config, max_cache_len=prompt + steps)
        self.positions = [torch.full((batch, 1), prompt + s, device=dev, dtype=torch.long) for s in range(steps)]
        kw = dict(mode=mode) if backend == "inductor" else dict(backend=backend)
        self.step = torch.compile(_fresh_step(self.model), dynamic=False, **kw)
        self.key = Adapter.of(self.model).cache_kwarg

    def time(self, ids, dev) -> float:
        """Mean decode-step time after an eager prefill of ``ids`` (the patch sees the prefill)."""
        self.cache.reset()
        self.model(input_ids=ids, use_cache=True, **{self.key: self.cache})
        nxt = ids[:, -1:]
        _sync(dev)
        t = time.perf_counter()
        mark = torch.compiler.cudagraph_mark_step_begin if dev.type == "cuda" else (lambda: None)
        for pos in self.positions:
            mark()  # a new decode step: CUDA-graph trees may reuse the last step's output memory
            self.step(input_ids=nxt, use_cache=True, position_ids=pos, **{self.key: self.cache})
        _sync(dev)
        return (time.perf_counter() - t) / self.steps

    def close(self):
        self._ctx.__exit__(None, None, None)


@contextlib.contextmanager
def _yield_model(model, ctx):
    with ctx:
        yield model


def conditions(model, wl: Workload, batch: int, third_party: bool = True) -> dict:
    """name -> factory of a context manager that yields the forward callable to time."""
    rows = torch.arange(batch, device=next(model.parameters()).device) % 6  # per-row emotions
    conds = {
        "unpatched": lambda: _yield_model(model, contextlib.nullcontext()),
        "hooks_steer": lambda: _yield_model(model, wl.hooks_steer()),
        "emk_ref_steer": lambda: _yield_model(model, patch(model, *wl.steer_ivs(rows), backend="reference")),
        "emk_fused_steer": lambda: _yield_model(model, patch(model, *wl.steer_ivs(rows), backend="fused")),
        "hooks_circuit": lambda: _yield_model(model, wl.hooks_circuit()),
        "emk_ref_circuit": lambda: _yield_model(model, patch(model, *wl.circuit_ivs(rows), backend="reference")),
        "emk_fused_circuit": lambda: _yield_model(model, patch(model, *wl.circuit_ivs(rows), backend="fused")),
        "emk_fused_bias": lambda: _yield_model(model, patch(model, *wl.bias_ivs(rows), backend="fused")),
        "folded_bias": lambda: _yield_model(model, wl.folded_bias()),
    }
    if third_party:
        conds.update(_third_party(model, wl))
    return conds


@contextlib.contextmanager
def _nnsight_steer(model, wl: Workload):
    """nnsight: the steering edit (α·rms(h)·v at the last position of each steered layer)."""
    from nnsight import NNsight

    nm = NNsight(model)
    vs = {l: wl.dirs[l][0] for l in wl.steer_layers}

    def fwd(**kw):
        with nm.trace(**kw):
            for l in wl.steer_layers:
                h = nm.model.layers[l].output
                last = h[:, -1, :]
                r = last.float().pow(2).mean(-1, keepdim=True).add(1e-12).sqrt()
                h[:, -1, :] = (last.float() + wl.alpha * r * vs[l]).to(last.dtype)
            out = nm.output.save()
        return out

    yield fwd


@contextlib.contextmanager
def _pyvene_steer(model, wl: Workload):
    """pyvene: AdditionIntervention of α·v̄ at the last position of each steered layer (pyvene has
    no rms-scaled addition; the added vector uses the layer's mean rms, same cost class)."""
    import pyvene as pv

    cfg = pv.IntervenableConfig([{"layer": l, "component": "block_output", "intervention_type": pv.AdditionIntervention}
                                 for l in wl.steer_layers])
    pvm = pv.IntervenableModel(cfg, model=model)
    reps = [wl.alpha * wl.dirs[l][0] for l in wl.steer_layers]

    def fwd(input_ids, **kw):
        T = input_ids.shape[1]
        _, out = pvm({"input_ids": input_ids, **kw}, unit_locations={"base": [[[T - 1]] * input_ids.shape[0]] * len(reps)},
                     source_representations=reps)
        return out

    try:
        yield fwd
    finally:
        del pvm


def _submodule_skipping_init(package: str, module: str):
    """``package.module`` of an installed package, imported under a stub parent package so that the
    package's own ``__init__`` never runs (cached in ``sys.modules`` like any import)."""
    import importlib.util
    import types

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"No module named {package!r}")
    stub = f"_emk_bench_{package}"
    if stub not in sys.modules:
        pkg = types.ModuleType(stub)
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules[stub] = pkg
    return importlib.import_module(f"{stub}.{module}")


def _repeng_control():
    """repeng's ``control`` module. repeng 0.4.0 (the newest on PyPI) pins numpy<2 and its package
    ``__init__`` fails under numpy 2 (``np.float_``, in ``extract``); ``control`` needs only torch."""
    return _submodule_skipping_init("repeng", "control")


@contextlib.contextmanager
def _repeng_steer(model, wl: Workload):
    """repeng: ControlModel wraps each steered layer and adds α·v̄ at every position (its own edit:
    repeng has no per-position or rms-scaled control)."""
    control = _repeng_control()
    cm = control.ControlModel(model, wl.steer_layers)
    cm.set_raw_control({l: (wl.alpha * wl.dirs[l][0]).to(next(model.parameters()).dtype) for l in wl.steer_layers})

    def fwd(input_ids, **kw):  # repeng reads position_ids per row ([B, T]); HF alone passes [1, T]
        cache = kw.get("cache", kw.get("past_key_values"))
        past = 0 if cache is None else int(cache.get_seq_length())
        B, T = input_ids.shape
        pos = (past + torch.arange(T, device=input_ids.device)).expand(B, T)
        return model(input_ids=input_ids, position_ids=pos, **kw)

    try:
        yield fwd
    finally:
        cm.unwrap()


def _steering_vectors_module():
    """steering-vectors' ``steering_vector`` module. steering-vectors 0.12.2 pins transformers<5 and its
    package ``__init__`` imports scikit-learn (for training aggregators); applying a vector needs only
    torch."""
    return _submodule_skipping_init("steering_vectors", "steering_vector")


@contextlib.contextmanager
def _steering_vectors_steer(model, wl: Workload):
    """steering-vectors: a SteeringVector of α·v̄ per steered decoder block, applied at the last
    position (``token_indices=slice(-1, None)``), its hook adding in place (no rms-scaled addition)."""
    sv = _steering_vectors_module()
    dt = next(model.parameters()).dtype
    vec = sv.SteeringVector({l: (wl.alpha * wl.dirs[l][0]).to(dt) for l in wl.steer_layers}, "decoder_block")
    with vec.apply(model, min_token_index=None, token_indices=slice(-1, None)):  # apply() defaults min_token_index=0
        yield model


def _third_party(model, wl: Workload) -> dict:
    """pyvene / nnsight / repeng / steering-vectors doing the steering edit, when they import; else a
    note why not."""
    out = {}
    alternatives = (("pyvene_steer", "pyvene", lambda: __import__("pyvene"), _pyvene_steer),
                    ("nnsight_steer", "nnsight", lambda: __import__("nnsight"), _nnsight_steer),
                    ("repeng_steer", "repeng", _repeng_control, _repeng_steer),
                    ("steering_vectors_steer", "steering_vectors", _steering_vectors_module, _steering_vectors_steer))
    for name, mod, importer, factory in alternatives:
        try:
            importer()
        except Exception as e:  # noqa: BLE001
            note = f"{mod}: not benchmarked ({type(e).__name__}: {str(e)[:80]})"
            if note not in NOTES:
                NOTES.append(note)
            continue
        out[name] = (lambda f=factory: f(model, wl))
    return out


NOTES: list[str] = []


def run(model, name: str, shapes, rounds: int, warmup: int, dev, keep=None, compile_mode: str | None = None,
        compile_conditions=(), compile_shapes=None, compile_backend: str = "inductor", on_shape=None) -> list[dict]:
    """Time every shape; ``on_shape(rows)`` after each (the results so far survive a time limit)."""
    key = Adapter.of(model).cache_kwarg
    model.requires_grad_(False)  # inference; pyvene freezes the weights itself, which would fail compiled guards
    wl = Workload(model)
    rows_out = []
    torch.manual_seed(0)
    for (B, T) in shapes:
        ids = torch.randint(10, model.config.vocab_size - 10, (B, T), device=dev)
        conds = {c: f for c, f in conditions(model, wl, B).items() if keep is None or c in keep}
        times = {c: {"prefill": [], "decode": []} for c in conds}
        compiled: dict[str, CompiledDecode] = {}
        if compile_mode and (compile_shapes is None or (B, T) in compile_shapes):
            torch._dynamo.reset()
            for c in compile_conditions:
                try:
                    t0 = time.perf_counter()
                    cd = CompiledDecode(model, c, B, T, steps=4, mode=compile_mode, backend=compile_backend)
                    with torch.no_grad():
                        for _ in range(max(warmup, 3)):  # compile, then CUDA-graph warm-up and record
                            cd.time(ids, dev)
                    compiled[c] = cd
                    print(f"  compiled {c} ({compile_mode}): {time.perf_counter() - t0:.0f} s", flush=True)
                except Exception as e:  # noqa: BLE001 - a condition that cannot compile is reported
                    NOTES.append(f"{c}@compiled: failed at B={B} T={T} ({type(e).__name__}: {str(e)[:160]})")
            times.update({f"{c}@compiled": {"decode": []} for c in compiled})
        with torch.no_grad():
            for c, f in list(conds.items()):  # warm-up (and first-use kernel builds)
                try:
                    with f() as fwd:
                        for _ in range(warmup):
                            _time_prefill(fwd, ids, dev)
                            _time_decode(fwd, ids, dev, key, steps=1)
                except Exception as e:  # noqa: BLE001 - a third-party tool that fails is reported, not fatal
                    NOTES.append(f"{c}: failed at B={B} T={T} ({type(e).__name__}: {str(e)[:100]})")
                    del conds[c], times[c]
            for r in range(rounds):
                for c in (list(conds) if r % 2 == 0 else list(reversed(conds))):
                    with conds[c]() as fwd:
                        times[c]["prefill"].append(_time_prefill(fwd, ids, dev))
                        times[c]["decode"].append(_time_decode(fwd, ids, dev, key))
            # compiled steps in rounds of their own: interleaved with eager runs (patch installs,
            # third-party objects) they picked up ±5 % noise on the CPU
            for r in range(rounds if compiled else 0):
                for c in (list(compiled) if r % 2 == 0 else list(reversed(compiled))):
                    times[f"{c}@compiled"]["decode"].append(compiled[c].time(ids, dev))
        for cd in compiled.values():
            cd.close()
        best = None  # per round, the fastest unpatched decode (eager or compiled)
        if "unpatched@compiled" in times:
            best = [min(a, b) for a, b in zip(times["unpatched"]["decode"], times["unpatched@compiled"]["decode"])]
        for c in times:
            mode = "compiled" if c.endswith("@compiled") else "eager"
            for phase in times[c]:
                base = times["unpatched" if mode == "eager" else "unpatched@compiled"][phase]
                mine = times[c][phase]
                row = dict(model=name, batch=B, prompt=T, phase=phase, condition=c.replace("@compiled", ""),
                           mode=mode if mode == "eager" else f"compiled:{compile_mode}",
                           median_ms=statistics.median(mine) * 1e3,
                           ratio=statistics.median([m / b for m, b in zip(mine, base)]),
                           added_ms=statistics.median([(m - b) * 1e3 for m, b in zip(mine, base)]),
                           ratio_vs_best="", rounds=rounds)
                if best is not None and phase == "decode":
                    row["ratio_vs_best"] = f"{statistics.median([m / b for m, b in zip(mine, best)]):.3f}"
                rows_out.append(row)
        print(f"{name} B={B} T={T}: done", flush=True)
        if on_shape is not None:
            on_shape(rows_out)
    return rows_out


def machine_info(dev) -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip() or "unknown"
    card = torch.cuda.get_device_name(0) if dev.type == "cuda" else f"CPU {os.cpu_count()} cores ({platform.processor() or platform.machine()})"
    import transformers

    return dict(date=_dt.date.today().isoformat(), commit=commit, card=card, torch=torch.__version__,
                transformers=transformers.__version__, python=platform.python_version())


def write_results(rows: list[dict], info: dict, tag: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"{tag}-{info['date']}"  # not Path.with_suffix: tags like llama-3.2-3b hold dots
    csv_path, md_path = RESULTS / f"{stem}.csv", RESULTS / f"{stem}.md"
    import csv

    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) + list(info))
        w.writeheader()
        for r in rows:
            w.writerow({**r, **info})
    lines = [f"# Intervention latency — {info['card']}", "",
             f"date {info['date']}, commit {info['commit']}, torch {info['torch']}, transformers {info['transformers']}", "",
             "Ratios are medians of per-round paired ratios against the unpatched model in the same mode; "
             "'vs fastest' pairs each decode step with the faster of unpatched eager and unpatched compiled.", "",
             "| model | B | T | phase | mode | condition | median ms | ratio vs unpatched | added ms | vs fastest |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['prompt']} | {r['phase']} | {r['mode']} | {r['condition']} | "
                     f"{r['median_ms']:.2f} | {r['ratio']:.3f} | {r['added_ms']:+.3f} | {r['ratio_vs_best'] or '–'} |")
    if NOTES:
        lines += [""] + [f"- {n}" for n in NOTES]
    md_path.write_text("\n".join(lines) + "\n")
    return md_path


def gpu_model(shape: str):
    """Random-weight Llama shapes in bf16 on the GPU (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfgs = {
        "llama-3.2-3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
                             num_key_value_heads=8, vocab_size=128256),
        "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=8, vocab_size=128256),
    }
    with torch.device("cuda"):
        m = LlamaForCausalLM(LlamaConfig(**cfgs[shape], max_position_embeddings=4096)).to(torch.bfloat16).eval()
    return m


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2-135m", help="comma list: zoo names, tiny-*, or gpu:llama-3.2-3b / gpu:llama-3-8b")
    p.add_argument("--shapes", default="1x128,8x128", help="comma list of BxT")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--tag", default=None, help="results file prefix (default: cpu or the card)")
    p.add_argument("--suffix", default="", help="appended to the tag (e.g. -llama-3-8b), so runs do not overwrite")
    p.add_argument("--conditions", default=None, help="comma list of eager conditions to time (default: all)")
    p.add_argument("--compile", default=None, metavar="MODE",
                   help="also time decode under torch.compile(mode=MODE), e.g. reduce-overhead (CUDA graphs) or default")
    p.add_argument("--compile-conditions", default=COMPILED_DEFAULT, help="comma list of conditions to compile")
    p.add_argument("--compile-shapes", default=None, help="comma list of BxT to compile (default: all --shapes)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (aot_eager for a quick check)")
    a = p.parse_args(argv)
    if a.compile:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    shapes = [tuple(int(x) for x in s.split("x")) for s in a.shapes.split(",")]
    rows, dev = [], torch.device("cpu")
    if any(n.startswith("gpu:") for n in a.models.split(",")):
        dev = torch.device("cuda")
    info = machine_info(dev)
    tag = (a.tag or ("cpu" if dev.type == "cpu" else info["card"].replace(" ", "-"))) + a.suffix
    cshapes = None if a.compile_shapes is None else [tuple(int(x) for x in v.split("x")) for v in a.compile_shapes.split(",")]
    keep = None if a.conditions is None else set(a.conditions.split(",")) | {"unpatched"}
    for name in a.models.split(","):
        if name.startswith("gpu:"):
            model = gpu_model(name[4:])
        else:
            model, _ = load(name, dtype=dtype)
        done = list(rows)
        rows += run(model, name, shapes, a.rounds, a.warmup, dev, keep=keep, compile_mode=a.compile,
                    compile_conditions=[c for c in a.compile_conditions.split(",") if c], compile_shapes=cshapes,
                    compile_backend=a.compile_backend, on_shape=lambda r: write_results(done + r, info, tag))
        del model
    path = write_results(rows, info, tag)
    text = path.read_text().splitlines()  # the decode rows and notes; the whole table is in the file
    print("\n".join(l for l in text if "| decode |" in l or not l.startswith("| ") or l.startswith("| model")))
    print(f"full table: {path}")


if __name__ == "__main__":
    main()
