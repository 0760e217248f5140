"""``emokernels run``: the whole workflow on one model, resumable, into one report folder.

Stages (each reads the previous stage's saved artifact; a finished stage is skipped on rerun,
and generation/judging resume row by row):

  1. generate   train split, emotion prompts (stage 01)                 gen/train_prompt.jsonl
  2. judge      those replies (accepted = judged as the target)         judge/train_prompt.jsonl
  3. directions readout directions (paper) and emotional-text directions; σ   directions/
  4. components neurons (exact decomposition), heads (one pass), Δa/Δz    components/
  5. influence  sublayer causal influence with KV reuse (neutral prompts)  influence/
  6. circuits   the paper's allocation → one circuit per emotion          circuit/
  7. select     steering α and circuit strength on the TRAIN split only   select/
  8. compare    test split: prompting vs steering vs circuit modulation,
                one judge, one precision, one decoding setup; naturalness  compare/

The test split is read only by stage 8. ``report.md`` / ``report.json`` and PNG plots land in
the output folder. The command line is in ``emokernels.cli.run`` (its parser needs no torch).
"""
from __future__ import annotations

import functools
import json
import math
import time
from pathlib import Path

import torch

from .io import read_json, read_jsonl, write_json

STAGES = ("generate", "judge", "directions", "components", "influence", "circuits", "select", "compare")
STAGE_DIRS = {"generate": "gen", "judge": "judge", "directions": "directions", "components": "components",
              "influence": "influence", "circuits": "circuit", "select": "select", "compare": "compare"}
# The first stage each setting changes (every later stage reads that stage's output, so it changes too).
FIRST_AFFECTED = {
    "model": "generate", "dtype": "generate", "seed": "generate", "train_limit": "generate", "preset": "generate",
    "batch_size": "generate", "max_new_tokens": "generate", "judge": "judge", "source": "directions",
    "circuit_source": "directions", "texts_per_emotion": "directions", "accepted_only": "directions", "budget": "circuits",
    "select_limit": "select", "select_judge": "select", "max_degenerate": "select", "backend": "select",
    "test_limit": "compare", "second_judge": "compare",
}


class Run:
    def __init__(self, args):
        self.a = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self._model = None
        self._judges = {}
        if hasattr(args, "judge") and getattr(args, "select_judge", None) is None:
            # Strengths are picked with the second judge when there is one, so the first judge's
            # reading of the comparison is not tuned on. Resolved here so the choice is recorded.
            second = getattr(args, "second_judge", None)
            args.select_judge = second if second not in (None, "none") else args.judge
        state = self.out / "state.json"
        config = {k: getattr(args, k) for k in FIRST_AFFECTED if hasattr(args, k)}
        self.state = read_json(state) if state.exists() else {"done": [], "config": config}
        if getattr(args, "restart_from", None):
            self._restart(args.restart_from)
        old = self.state.get("config", {})
        stale = [k for k in config if old.get(k) != config[k] and FIRST_AFFECTED[k] in self.state["done"]]
        if stale == ["judge"] and not config.get("accepted_only"):
            # Only the judge changed: judge the train replies again. Discovery reads the judge only
            # through the auto source choice, which is checked to be unchanged after the stage.
            self._rejudge(old.get("judge"))
            stale = []
        if stale:
            first = min((FIRST_AFFECTED[k] for k in stale), key=STAGES.index)
            changes = ", ".join(f"{k}: {old.get(k)!r} -> {config[k]!r}" for k in stale)
            raise ValueError(f"{self.out} holds a run whose finished stages used other settings ({changes}); "
                             f"use another --out, or --restart-from {first} to redo {first} and every later stage")
        # Every finished stage agrees with these settings, so the report may show them.
        self.state["config"] = {**old, **config}

    def _rejudge(self, old_judge):
        import shutil

        self._source_before = (self.chosen_source(), self.circuit_source())
        shutil.rmtree(self.out / STAGE_DIRS["judge"], ignore_errors=True)
        self.state["done"].remove("judge")
        print(f"[emokernels run] judge changed ({old_judge!r} -> {self.a.judge!r}): the train replies are judged again", flush=True)

    def _restart(self, stage: str):
        """Forget ``stage`` and every later stage, and delete their outputs."""
        import shutil

        later = STAGES[STAGES.index(stage):]
        for st in later:
            shutil.rmtree(self.out / STAGE_DIRS[st], ignore_errors=True)
        self.state["done"] = [st for st in self.state["done"] if st not in later]
        for key in ("timings", "info"):
            for st in later:
                self.state.get(key, {}).pop(st, None)
        write_json(self.out / "state.json", self.state)
        print(f"[emokernels run] restarting from {stage}: removed {', '.join(later)}", flush=True)

    # -- shared resources ------------------------------------------------------------------------
    @property
    def model(self):
        if self._model is None:
            from .models import load

            self._model, self.tok = load(self.a.model, dtype=self.a.dtype)
        return self._model

    def get_judge(self, name: str):
        """One instance per judge name for the whole run."""
        if name not in self._judges:
            from .judge import get_judge

            self._judges[name] = get_judge(name)
        return self._judges[name]

    @property
    def judge(self):
        return self.get_judge(self.a.judge)

    @property
    def select_judge(self):
        return self.get_judge(self.a.select_judge)

    @property
    def second_judge(self):
        name = getattr(self.a, "second_judge", None)
        return None if name in (None, "none") else self.get_judge(name)

    def skeletons(self, split: str, limit: int):
        """``limit`` skeletons round-robin over the 8 themes, so small runs see every theme."""
        from .data.sev import select_skeletons

        return select_skeletons(split, limit, "balanced")

    def units(self, split: str, limit: int):
        from .data.sev import iter_units

        return list(iter_units(self.skeletons(split, limit)))

    def mark(self, stage: str, seconds: float, **info):
        self.state["done"] = [st for st in STAGES if st in self.state["done"] or st == stage]
        self.state.setdefault("timings", {})[stage] = round(seconds, 1)
        self.state.setdefault("info", {})[stage] = info
        write_json(self.out / "state.json", self.state)
        print(f"[emokernels run] {stage}: {seconds:.1f} s {json.dumps(info, default=str)[:300]}", flush=True)

    def run(self):
        t_all = time.time()
        for stage in STAGES:
            if stage in self.state["done"]:
                print(f"[emokernels run] {stage}: done earlier, skipped", flush=True)
                continue
            t = time.time()
            info = getattr(self, "stage_" + stage)() or {}
            self.mark(stage, time.time() - t, **info)
            if stage == self.a.stop_after:
                break
        self.write_report(time.time() - t_all)
        return 0

    # -- stages ----------------------------------------------------------------------------------
    def _prompt_config(self):
        from .data.prompts import PromptConfig

        return PromptConfig(preset=self.a.preset)

    def stage_generate(self):
        from .data.generate import generate_rows

        units = self.units("train", self.a.train_limit)
        rows = generate_rows(self.model, self.tok, units, self.out / "gen" / "train_prompt.jsonl",
                             emotion_mode="prompt", prompt=self._prompt_config(), batch_size=self.a.batch_size,
                             max_new_tokens=self.a.max_new_tokens, condition="prompt", model_name=self.a.model)
        return {"rows": len(rows)}

    def _judge_file(self, gen: Path, out: Path, judge=None, second=None):
        from .judge.rows import judge_rows
        from .judge.report import write_report

        rows = judge_rows(read_jsonl(gen, unique_key="key"), judge or self.judge, out, second=second)
        rep = write_report(rows, out.with_suffix(""))
        return rows, rep

    def stage_judge(self):
        rows, rep = self._judge_file(self.out / "gen" / "train_prompt.jsonl", self.out / "judge" / "train_prompt.jsonl")
        info = {"accuracy": rep["accuracy"]["overall"]["accuracy"]}
        before = getattr(self, "_source_before", None)
        if before is not None:
            self.state["info"]["judge"] = info
            if (self.chosen_source(), self.circuit_source()) != before:
                raise ValueError(f"under judge {self.a.judge!r} the train accuracy ({info['accuracy']:.3f}) changes the auto "
                                 f"source choice {before} of the finished discovery: rerun with --restart-from directions")
        return info

    def stage_directions(self):
        from .data.sev import dataset_hash
        from .discover.capture import prompt_units, reference_text_units
        from .discover.directions import estimate

        sk = self.skeletons("train", self.a.train_limit)
        refs = self._references()
        accepted = None
        if self.a.accepted_only:
            accepted = {r["key"] for r in read_jsonl(self.out / "judge" / "train_prompt.jsonl") if r.get("match")}
        info = {}
        for source in ("prompt", "text"):
            units = prompt_units(sk, accepted=accepted) if source == "prompt" else reference_text_units(sk, refs)
            dirs, _ = estimate(self.model, self.tok, units, source=source, model_name=self.a.model,
                               prompt_config=self._prompt_config(), dataset_hash=dataset_hash(sk),
                               batch_size=self.a.batch_size)
            dirs.save(self.out / "directions" / source)
            info[source] = {"n_units": len(units)}
        return info

    def _references(self) -> dict[str, list[str]]:
        """The emotional texts of the text source: the first ``--texts-per-emotion`` packaged
        reference replies per emotion (hand-written; no SEV test text)."""
        from .discover.capture import default_references

        return {e: texts[: self.a.texts_per_emotion] for e, texts in default_references().items()}

    def directions(self, source: str | None = None):
        from .discover.directions import EmotionDirections

        return EmotionDirections.load(self.out / "directions" / (source or self.chosen_source()), self.model)

    def chosen_source(self) -> str:
        """``--source auto``: the paper's prompt-readout directions when the model follows emotion
        prompts (train judged accuracy ≥ 0.5), else emotional-text directions (MODELS.md §4)."""
        if self.a.source != "auto":
            return self.a.source
        acc = self.state["info"]["judge"].get("accuracy") or 0.0
        return "prompt" if acc >= 0.5 else "text"

    def stage_components(self):
        from .discover.components import discover_components, plot_heads, plot_neurons, summarise
        from .discover.collect import direction_tensors, sev_units
        from .models.identity import model_identity

        d = self.directions("prompt")  # components score the emotion-prompt readout (the paper)
        dirs_attn, dirs_mlp = direction_tensors(d)  # [L, 6, d] each, rows in EMOTIONS order by name
        units = sev_units(self.skeletons("train", self.a.train_limit))
        neurons, heads, diffs, secs = discover_components(self.model, self.tok, units, dirs_attn, dirs_mlp,
                                                          prompt_config=self._prompt_config(),
                                                          batch_size=self.a.batch_size,
                                                          checkpoint=self.out / "components" / "checkpoint")
        folder = self.out / "components"
        meta = {"model": self.a.model, "model_identity": model_identity(self.model)}
        neurons.save(folder / "neurons", meta)
        heads.save(folder / "heads", meta)
        diffs.save(folder / "diffs", meta)
        plot_heads(heads, folder)
        plot_neurons(neurons, folder)
        summary = summarise(neurons, heads, diffs)
        write_json(folder / "summary.json", summary)
        info = {"seconds_one_pass": round(secs, 1)}
        if self.circuit_source() == "text":
            info["text_seconds"] = self._text_components()
        return info

    def _text_components(self) -> float:
        """Component scores and Δ from emotional text under neutral prompts (discover.text_components)."""
        from .discover.capture import reference_text_units
        from .discover.text_components import text_component_tables
        from .io import save_tensors

        t = time.time()
        units = reference_text_units(self.skeletons("train", self.a.train_limit), self._references())
        C, I, diffs = text_component_tables(self.model, self.tok, units, self.directions("text"),
                                            prompt_config=self._prompt_config(), batch_size=self.a.batch_size)
        folder = self.out / "components"
        save_tensors(folder / "text_scores", {"C": C, "I": I}, {"source": "text", "model": self.a.model})
        diffs.save(folder / "text_diffs", {"model": self.a.model, "source": "text"})
        return round(time.time() - t, 1)

    def circuit_source(self) -> str:
        """Where the circuit's components come from: the paper's emotion-prompt readout, or emotional text."""
        return self.chosen_source() if self.a.circuit_source == "auto" else self.a.circuit_source

    def stage_influence(self):
        from .data.prompts import chat_messages, render
        from .discover.influence import sublayer_influence

        d = self.directions(self.circuit_source())
        sk = self.skeletons("train", self.a.train_limit)
        cfg = self._prompt_config()
        seqs = []
        for s in sk:
            for v in ("positive", "neutral", "negative"):
                text = render(self.tok, chat_messages(s.user_message(v), None, cfg), cfg)
                seqs.append(torch.tensor(self.tok(text, add_special_tokens=False)["input_ids"]))
        # fp32: Ī is a finite difference of scores, and bf16 rounding swamps it (the paper ran fp32).
        # bf16 -> fp32 -> bf16 is exact, so the model comes back bit-identical.
        dtype = next(self.model.parameters()).dtype
        self.model.float()
        try:
            res = sublayer_influence(self.model, seqs, d.directions, d.sigma, method="fast")
        finally:
            self.model.to(dtype)
        res.save(self.out / "influence" / "influence")
        return {"stats": res.stats}

    def stage_circuits(self):
        from .discover.circuits import assemble_circuit
        from .discover.diffs import ComponentDiffs
        from .discover.heads import HeadScores
        from .discover.influence import InfluenceResult
        from .discover.neurons import NeuronScores
        from .models import Adapter
        from .models.identity import model_identity

        folder = self.out / "components"
        inf = InfluenceResult.load(self.out / "influence" / "influence")
        a = Adapter.of(self.model)
        # The paper's K=560 over 28 layers of a 3B model; scale the budget with width x depth.
        # At least 7 per layer so the paper's floors (4 neurons + 2 heads per layer at 0.7 : 0.3) fit.
        K = self.a.budget or max(7 * a.num_layers, round(560 * (a.num_layers / 28) * math.sqrt(a.intermediate_size / 8192)))
        if self.circuit_source() == "text":
            from .io import load_tensors

            scores, _ = load_tensors(folder / "text_scores")
            neurons, heads, diffs = scores["C"], scores["I"], ComponentDiffs.load(folder / "text_diffs")
        else:
            neurons, heads = NeuronScores.load(folder / "neurons"), HeadScores.load(folder / "heads")
            diffs = ComponentDiffs.load(folder / "diffs")
        circuit = assemble_circuit(inf, neurons, heads, diffs, shape=a.describe(), K_total=K,
                                   model_identity=model_identity(self.model))
        circuit.meta["source"] = self.circuit_source()
        circuit.save(self.out / "circuit" / "circuit")
        return {"K_total": K, "source": self.circuit_source(), "size": circuit.size(circuit.emotions[0])}

    def _conditions(self):
        from .control.steering import Steering
        from .discover.circuits import Circuit

        steering = Steering(self.directions())
        circuit = Circuit.load(self.out / "circuit" / "circuit")
        return steering, circuit

    def _generate_condition(self, name, units, out_path, strength=None):
        from .data.generate import generate_rows
        from .patch import patch

        steering, circuit = self._conditions()
        if name == "prompt":
            return generate_rows(self.model, self.tok, units, out_path, emotion_mode="prompt", prompt=self._prompt_config(),
                                 batch_size=self.a.batch_size, max_new_tokens=self.a.max_new_tokens, condition=name,
                                 model_name=self.a.model)
        obj = steering if name == "steering" else circuit

        def factory(batch_units):
            return patch(self.model, obj, emotion=[u[2] for u in batch_units], strength=strength, backend=self.a.backend)

        return generate_rows(self.model, self.tok, units, out_path, emotion_mode="neutral", prompt=self._prompt_config(),
                             batch_size=self.a.batch_size, max_new_tokens=self.a.max_new_tokens, condition=name,
                             patch_factory=factory, model_name=self.a.model, extra={"strength": strength})

    def stage_select(self):
        """Pick α (steering) and s (circuit) on a TRAIN subset by *natural* accuracy: judged hits
        that are neither degenerate nor emotion-word caricatures (the judges reward both)."""
        from .evaluate.naturalness import caricature, degenerate, unnatural

        steering, _ = self._conditions()
        units = self.units("train", self.a.select_limit)
        grids = {"steering": [steering.alpha * f for f in (0.5, 1.0, 2.0, 4.0)], "circuit": [1.0, 2.0, 3.0, 4.0, 6.0]}
        table, chosen = {}, {}
        for name, grid in grids.items():
            best = None
            for s in grid:
                tag = f"{name}_{s:.3g}"
                rows = self._generate_condition(name, units, self.out / "select" / f"{tag}.jsonl", strength=s)
                judged, rep = self._judge_file(self.out / "select" / f"{tag}.jsonl", self.out / "select" / f"{tag}_judged.jsonl",
                                               judge=self.select_judge)
                acc = sum(bool(r["match"]) for r in judged) / len(judged)
                nat_acc = sum(bool(r["match"]) and not unnatural(r["text"]) for r in judged) / len(judged)
                deg = sum(degenerate(r["text"]) for r in rows) / len(rows)
                car = sum(caricature(r["text"]) for r in rows) / len(rows)
                table[tag] = {"strength": s, "accuracy": acc, "natural_accuracy": nat_acc, "degenerate": deg,
                              "caricature": car}
                score = nat_acc if deg <= self.a.max_degenerate else -1.0
                if best is None or score > best[0]:
                    best = (score, s)
            chosen[name] = best[1]
        write_json(self.out / "select" / "selection.json",
                   {"table": table, "chosen": chosen, "judge": self.select_judge.describe()})
        return {"chosen": chosen}

    def stage_compare(self):
        from .evaluate.naturalness import caricature, degenerate, distinct_n, perplexity, unnatural
        from .judge.report import build_report

        chosen = read_json(self.out / "select" / "selection.json")["chosen"]
        units = self.units("test", self.a.test_limit)
        result = {}
        for name in ("prompt", "steering", "circuit"):
            gen = self.out / "compare" / f"{name}.jsonl"
            t = time.time()
            rows = self._generate_condition(name, units, gen, strength=chosen.get(name))
            gen_s = time.time() - t
            judged, rep = self._judge_file(gen, self.out / "compare" / f"{name}_judged.jsonl", second=self.second_judge)
            texts = [r["text"] for r in rows]
            nat = {"natural_accuracy": sum(bool(r["match"]) and not unnatural(r["text"]) for r in judged) / len(judged),
                   "degenerate": sum(map(degenerate, texts)) / len(texts),
                   "caricature": sum(map(caricature, texts)) / len(texts), "distinct2": distinct_n(texts, 2)}
            if self.second_judge is not None:
                nat["natural_accuracy_second"] = sum(bool(r["second"]["match"]) and not unnatural(r["text"])
                                                     for r in judged) / len(judged)
            try:
                ppl = perplexity(self.model, self.tok, [self._neutral_prompt(r) for r in rows], texts)
                ppl = [p for p in ppl if p is not None and math.isfinite(p)]
                nat["perplexity"] = sorted(ppl)[len(ppl) // 2] if ppl else None  # median over replies
            except Exception as e:  # noqa: BLE001 - report, don't lose the comparison
                nat["perplexity_error"] = str(e)
            result[name] = {"report": build_report(judged), "naturalness": nat, "strength": chosen.get(name),
                            "generate_seconds": round(gen_s, 1)}
        write_json(self.out / "compare" / "comparison.json", result)
        return {k: {"accuracy": v["report"]["accuracy"]["overall"]["accuracy"], **v["naturalness"]} for k, v in result.items()}

    @functools.cached_property
    def _test_skeletons(self) -> dict:
        from .data.sev import load_split

        return {s.skeleton_id: s for s in load_split("test")}

    def _neutral_prompt(self, row: dict) -> str:
        """The rendered neutral prompt a test reply answered (perplexity is taken under it)."""
        from .data.prompts import chat_messages, render

        s, cfg = self._test_skeletons[row["skeleton_id"]], self._prompt_config()
        return render(self.tok, chat_messages(s.user_message(row["valence"]), None, cfg), cfg)

    # -- report ----------------------------------------------------------------------------------
    def write_report(self, seconds: float):
        from .report import write_run_report

        write_run_report(self.out, self.state, seconds)
