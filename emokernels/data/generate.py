"""Emotion-elicited generation (stage 01) and the shared decoding setup of every condition.

For each unit u = (skeleton, valence, emotion) the prompt is the chat-templated

    system: PromptConfig.system(emotion)   (emotion_mode="prompt")   or the neutral system text
            (emotion_mode="neutral": steering / circuit conditions, which patch the model instead)
    user:   skeleton.scenario + "\\n" + skeleton.event[valence]

rendered with the date pinned (METHOD §11 item 7). Prompts are batched with **left padding**, so
every row's readout t* is column T-1 and the new tokens start at column T for every row;
decoding is greedy with the KV cache. Only the new tokens are decoded (special tokens skipped,
whitespace stripped).

One decoding setup (``DEFAULT_DECODING``) is shared by prompting, steering and circuit
modulation, so the three are compared under the same constraints (METHOD §11 item 14; the paper
used different penalties per stage). ``PAPER_STAGE01_DECODING`` reproduces the paper's stage-01
settings (greedy, 100 tokens, no penalties) where that is wanted.

Output: one JSONL row per unit, keyed ``f"{skeleton_id}__{valence}__{emotion}"``, appended per
batch with ``emokernels.io.append_jsonl`` (one write + fsync). Re-running skips keys already in
the file, so a killed run resumes where it stopped; a torn last line left by a crash is cut off
before appending. One process writes a file at a time (``emokernels.io.exclusive_output``): a
second ``generate`` on the same ``--out`` stops with an error naming the file and the PID.
"""
from __future__ import annotations

import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, ContextManager, Iterable, Sequence

import torch

from ..io import append_jsonl, exclusive_output, read_jsonl
from .prompts import PromptConfig, chat_messages, encode, render
from .sev import Skeleton, make_key

# Shared by every condition (prompting, steering, circuit modulation). Greedy, so deterministic.
DEFAULT_DECODING: dict = dict(
    do_sample=False, num_beams=1, max_new_tokens=48, min_new_tokens=4,
    repetition_penalty=1.1, no_repeat_ngram_size=3,
)
# The paper's stage-01 prompt-based generation (METHOD §1.3): greedy, 100 tokens, no penalties.
PAPER_STAGE01_DECODING: dict = dict(
    do_sample=False, num_beams=1, max_new_tokens=100, min_new_tokens=0,
    repetition_penalty=1.0, no_repeat_ngram_size=0,
)
_DECODING_KEYS = set(DEFAULT_DECODING)
EMOTION_MODES = ("prompt", "neutral")

Unit = tuple  # (Skeleton, valence, emotion) or iter_units' (Skeleton, valence, emotion, key)


def decoding_settings(decoding: dict | None = None, max_new_tokens: int | None = None) -> dict:
    """``DEFAULT_DECODING`` updated with ``decoding`` and ``max_new_tokens``; validated, greedy only."""
    out = dict(DEFAULT_DECODING)
    if decoding:
        unknown = sorted(set(decoding) - _DECODING_KEYS)
        if unknown:
            raise ValueError(f"unknown decoding setting(s) {unknown}: allowed {sorted(_DECODING_KEYS)}")
        out.update(decoding)
    if max_new_tokens is not None:
        out["max_new_tokens"] = max_new_tokens
        if not (decoding and "min_new_tokens" in decoding):
            # The default floor of 4 tokens must not turn a short --max-new-tokens into an error
            # about min_new_tokens, which the user never set (and no flag sets).
            out["min_new_tokens"] = min(int(out["min_new_tokens"]), int(max_new_tokens))
    if out["do_sample"] or out["num_beams"] != 1:
        raise ValueError("generation here is greedy (do_sample=False, num_beams=1) so runs are deterministic and resumable")
    if int(out["max_new_tokens"]) < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {out['max_new_tokens']}")
    if not 0 <= int(out["min_new_tokens"]) <= int(out["max_new_tokens"]):
        raise ValueError(f"min_new_tokens must lie in [0, max_new_tokens], got {out['min_new_tokens']}")
    if float(out["repetition_penalty"]) <= 0:
        raise ValueError("repetition_penalty must be > 0")
    return out


def _normalise_units(units: Iterable[Unit]) -> list[tuple[Skeleton, str, str, str]]:
    out, seen = [], set()
    for u in units:
        if len(u) not in (3, 4):
            raise ValueError(f"a unit is (skeleton, valence, emotion[, key]), got {len(u)} items")
        sk, valence, emotion = u[0], u[1], u[2]
        key = make_key(sk.skeleton_id, valence, emotion)
        if key in seen:
            raise ValueError(f"unit {key!r} given twice")
        seen.add(key)
        out.append((sk, valence, emotion, key))
    return out


def prompt_texts(tokenizer, units: Sequence[Unit], emotion_mode: str = "prompt", prompt: PromptConfig = PromptConfig()) -> list[str]:
    """Rendered chat prompts of ``units`` (emotion system prompt, or the neutral one)."""
    if emotion_mode not in EMOTION_MODES:
        raise ValueError(f"emotion_mode must be one of {EMOTION_MODES}, got {emotion_mode!r}")
    return [render(tokenizer, chat_messages(u[0].user_message(u[1]), u[2] if emotion_mode == "prompt" else None, prompt), prompt)
            for u in units]


def _eos_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, (list, tuple)) else [] if ids is None else [ids])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


@torch.inference_mode()
def generate_texts(model, tokenizer, texts: Sequence[str], decoding: dict) -> list[dict]:
    """Greedy-decode one left-padded batch of rendered prompts.

    Returns per row ``{"text", "n_new_tokens", "input_len"}``: the new tokens up to the first
    EOS (exclusive), decoded without special tokens and stripped; ``input_len`` = unpadded
    prompt length.
    """
    dev = next(model.parameters()).device
    batch = encode(tokenizer, list(texts), padding_side="left", device=dev)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    T = ids.shape[1]
    kw = {k: v for k, v in decoding.items() if v is not None}
    if not kw.get("no_repeat_ngram_size"):
        kw.pop("no_repeat_ngram_size", None)
    # Greedy: drop the sampling knobs a model's generation_config may carry (they only warn).
    out = model.generate(input_ids=ids, attention_mask=mask, use_cache=True, pad_token_id=tokenizer.pad_token_id,
                         temperature=None, top_p=None, top_k=None, **kw)
    eos = _eos_ids(model, tokenizer)
    rows = []
    for b in range(ids.shape[0]):
        new = out[b, T:].tolist()
        n = next((i for i, t in enumerate(new) if t in eos), len(new))
        rows.append({"text": tokenizer.decode(new[:n], skip_special_tokens=True).strip(),
                     "n_new_tokens": n, "input_len": int(mask[b].sum())})
    return rows


def truncate_torn_tail(path: str | os.PathLike) -> bool:
    """Cut a last line without its newline (a crash mid-append) so later appends stay line-aligned."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return False
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return False
        f.seek(0)
        data = f.read()
        f.truncate(data.rfind(b"\n") + 1)
        f.flush()
        os.fsync(f.fileno())
    return True


_SETTINGS_FIELDS = ("model", "condition", "prompt", "decoding")


def generate_rows(model, tok, units: Iterable[Unit], out_path: str | os.PathLike, *, emotion_mode: str = "prompt",
                  prompt: PromptConfig = PromptConfig(), batch_size: int = 8, max_new_tokens: int | None = None,
                  decoding: dict | None = None, resume: bool = True,
                  patch_factory: Callable[[list], ContextManager] | None = None, progress: bool = True,
                  condition: str | None = None, model_name: str | None = None, extra: dict | None = None) -> list[dict]:
    """Generate one reply per unit into ``out_path`` (JSONL) and return the rows of ``units`` in unit order.

    ``units``: ``(skeleton, valence, emotion)`` tuples (``iter_units`` output works too).
    ``emotion_mode``: ``"prompt"`` (emotion system prompt) or ``"neutral"`` (neutral prompt; give
    ``patch_factory(batch_units) -> context manager`` to patch the model per batch with per-row
    emotions: steering / circuit modulation). ``condition`` names the condition in each row
    (default: ``"prompt"`` or ``"neutral"``); ``extra`` adds fields to every row (e.g. a strength).
    ``decoding`` overrides ``DEFAULT_DECODING``; ``max_new_tokens`` overrides both.
    ``resume=True`` skips keys already in the file (their settings must agree, else ValueError);
    ``resume=False`` deletes the file first. The file is locked for the whole call
    (:class:`~emokernels.io.OutputLockedError` if another process holds it) and a file holding a
    key twice raises :class:`~emokernels.io.DuplicateKeyError` naming the keys and the repair.
    """
    if emotion_mode not in EMOTION_MODES:
        raise ValueError(f"emotion_mode must be one of {EMOTION_MODES}, got {emotion_mode!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dec = decoding_settings(decoding, max_new_tokens)
    units = _normalise_units(units)
    out_path = Path(out_path)
    if model_name is None:
        from ..models.loader import model_name_of

        model_name = model_name_of(model)
    settings = {"model": model_name, "condition": condition or emotion_mode,
                "prompt": prompt.to_dict(), "decoding": dec}
    if extra:
        clash = sorted(set(extra) & {"key", "skeleton_id", "theme", "valence", "emotion", "text", "n_new_tokens", "input_len", *settings})
        if clash:
            raise ValueError(f"extra= must not overwrite row fields {clash}")

    with exclusive_output(out_path):
        return _generate_locked(model, tok, units, out_path, emotion_mode, prompt, batch_size, dec, resume,
                                patch_factory, progress, settings, extra)


def _generate_locked(model, tok, units, out_path, emotion_mode, prompt, batch_size, dec, resume, patch_factory,
                     progress, settings, extra):
    if not resume and out_path.exists():
        out_path.unlink()
    truncate_torn_tail(out_path)
    done: dict[str, dict] = {}
    for row in read_jsonl(out_path, unique_key="key"):
        done[row["key"]] = row
    wanted = {u[3] for u in units}
    for key, row in done.items():
        if key not in wanted:
            continue
        diff = [f for f in _SETTINGS_FIELDS + tuple(extra or ()) if row.get(f) != {**settings, **(extra or {})}.get(f)]
        if diff:
            raise ValueError(f"{out_path} already holds {key!r} generated with other settings ({', '.join(diff)}); "
                             "use another --out or --no-resume")
    todo = [u for u in units if u[3] not in done]

    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), unit="row", desc=f"generate[{settings['condition']}]", disable=not progress, dynamic_ncols=True)
    t0, n_tok = time.perf_counter(), 0
    try:
        for i in range(0, len(todo), batch_size):
            chunk = todo[i : i + batch_size]
            texts = prompt_texts(tok, chunk, emotion_mode, prompt)
            ctx = patch_factory([u[:3] for u in chunk]) if patch_factory is not None else nullcontext()
            with ctx:
                gens = generate_texts(model, tok, texts, dec)
            rows = []
            for (sk, valence, emotion, key), g in zip(chunk, gens):
                rows.append({"key": key, "skeleton_id": sk.skeleton_id, "theme": sk.theme, "valence": valence,
                             "emotion": emotion, **g, **settings, **(extra or {})})
            append_jsonl(out_path, rows)
            for r in rows:
                done[r["key"]] = r
            n_tok += sum(g["n_new_tokens"] for g in gens)
            bar.update(len(chunk))
            bar.set_postfix(tok_s=f"{n_tok / max(time.perf_counter() - t0, 1e-9):.1f}")
    finally:
        bar.close()
    return [done[u[3]] for u in units]
