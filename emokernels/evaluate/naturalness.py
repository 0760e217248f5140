"""Naturalness of generated replies: degenerate-text detection, distinct-n, perplexity.

Accuracy alone rewards caricature: the paper's judge accepted steered outputs that had collapsed
into hyphenated all-caps strings (METHOD §5, §11 item 9). These metrics are reported next to
accuracy so that a condition cannot win by breaking the text.

* ``degenerate(text)``: empty text; a repetition loop (one word n-gram, n = 1..4, whose repeats
  cover at least ``loop_cover`` of the words); a character loop (a unit of 1-6 characters 8+
  times in a row, "!!!!!!!!" or "hahahahahahahaha", or a "word" of 40+ characters); or shouting
  (an all-caps run of 4+ words, or 70 %+ of 12+ letters upper-case).
* ``distinct_n(texts, n)``: |unique n-grams| / |n-grams| over all texts (lower-cased words).
* ``perplexity(model, tok, prompts, replies)``: exp of the mean token NLL of each reply given its
  rendered prompt, under the model as given (pass it unpatched).
* ``emotion_word_density(text)`` / ``caricature(text)``: the share of words that name an emotion
  (the labels, their forms and synonyms: ``data.labels.EMOTION_WORDS``). A reply stuffed with
  emotion words ("Disgusting disgusts! I'm disgusted with disgusting ...") passes an embedding
  or LLM judge and escapes the loop detector when the words vary; natural emotional replies
  name the emotion once or twice (every reply of the judge reference set has at most 2 emotion
  words). ``caricature`` flags 3 or more emotion words making up more than 12 % of the words.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

import torch

_WORD = re.compile(r"[A-Za-z0-9']+")


def words(text: str) -> list[str]:
    """Lower-cased word tokens (letters, digits, apostrophes)."""
    return [w.lower() for w in _WORD.findall(text)]


def degeneracy_reasons(text: str, loop_cover: float = 0.5, min_repeats: int = 3) -> list[str]:
    """Why ``text`` looks degenerate (empty list = it looks fine). See the module docstring."""
    reasons = []
    ws = words(text)
    if not text.strip() or not ws:
        return ["empty"]
    n_words = len(ws)
    for n in (1, 2, 3, 4):
        if n_words < n * min_repeats:
            break
        grams = Counter(tuple(ws[i : i + n]) for i in range(n_words - n + 1))
        gram, count = grams.most_common(1)[0]
        # A single frequent function word ("the") is not a loop: unigrams need 4+ repeats and
        # must cover the text; longer n-grams need ``min_repeats``.
        need = max(min_repeats, 4) if n == 1 else min_repeats
        if count >= need and count * n / n_words >= loop_cover:
            reasons.append(f"loop:{' '.join(gram)}x{count}")
            break
    if re.search(r"(\S{1,6}?)\1{7,}", text) or any(len(w) >= 40 for w in re.split(r"\s+", text)):
        reasons.append("char_loop")
    caps_words = re.findall(r"\b[A-Z]{2,}(?:[-'][A-Z]+)*\b", text)
    run, best = 0, 0
    for tok in re.findall(r"\S+", text):
        letters = re.sub(r"[^A-Za-z]", "", tok)
        if len(letters) >= 2 and letters.isupper():
            run += 1
            best = max(best, run)
        elif letters:
            run = 0
    letters = re.sub(r"[^A-Za-z]", "", text)
    if best >= 4 or (len(letters) >= 12 and sum(c.isupper() for c in letters) / len(letters) >= 0.7 and caps_words):
        reasons.append("all_caps")
    return reasons


def degenerate(text: str, loop_cover: float = 0.5, min_repeats: int = 3) -> bool:
    """True if ``text`` is empty, loops, or shouts (see :func:`degeneracy_reasons`)."""
    return bool(degeneracy_reasons(text, loop_cover, min_repeats))


def emotion_word_density(text: str) -> float:
    """Share of the words of ``text`` that name an emotion (0 for an empty text)."""
    from ..data.labels import find_emotion_words

    n = len(words(text))
    return len(find_emotion_words(text)) / n if n else 0.0


def caricature(text: str, max_density: float = 0.12, min_count: int = 3) -> bool:
    """True when ``min_count``+ emotion words make up more than ``max_density`` of the reply."""
    from ..data.labels import find_emotion_words

    n = len(words(text))
    hits = len(find_emotion_words(text))
    return hits >= min_count and n > 0 and hits / n > max_density


def unnatural(text: str) -> bool:
    """Degenerate or caricature: the texts a condition must not win with."""
    return degenerate(text) or caricature(text)


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Corpus-level distinct-n: unique / total word n-grams over ``texts`` (0.0 if there are none)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if isinstance(texts, str):
        raise TypeError("distinct_n takes a list of texts")
    total, unique = 0, set()
    for t in texts:
        ws = words(t)
        grams = [tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)]
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else 0.0


@torch.no_grad()
def perplexity(model, tok, prompts: Sequence[str], replies: Sequence[str], batch_size: int = 8) -> list[float]:
    """Per-reply perplexity exp(−(1/|r|) Σ_t log p(r_t | prompt, r_<t)) under ``model``.

    ``prompts`` are rendered chat prompts (``emokernels.data.prompts.render``), ``replies`` the
    generated texts. Prompt and reply are tokenised separately (no special tokens added) and
    concatenated, right-padded; log-probs in fp32. An empty reply gives ``nan``.
    """
    if len(prompts) != len(replies):
        raise ValueError(f"got {len(prompts)} prompts but {len(replies)} replies")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    out: list[float] = []
    for i in range(0, len(prompts), batch_size):
        seqs, spans = [], []
        for p, r in zip(prompts[i : i + batch_size], replies[i : i + batch_size]):
            p_ids = tok.encode(p, add_special_tokens=False)
            r_ids = tok.encode(r, add_special_tokens=False) if r.strip() else []
            seqs.append(p_ids + r_ids)
            spans.append((len(p_ids), len(r_ids)))
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for b, s in enumerate(seqs):
            ids[b, : len(s)] = torch.tensor(s)
            mask[b, : len(s)] = 1
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), use_cache=False).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:].to(dev)[..., None])[..., 0]  # [B, T-1]
        for b, (lp, lr) in enumerate(spans):
            if lr == 0:
                out.append(float("nan"))
                continue
            nll = -logp[b, lp - 1 : lp - 1 + lr].mean().item()  # token t is predicted at column t-1
            out.append(math.exp(nll))
    return out


def summarize(texts: Sequence[str]) -> dict:
    """Degenerate rate, distinct-1/2 and mean length in words of ``texts``."""
    n = len(texts)
    return {
        "n": n,
        "degenerate_rate": (sum(degenerate(t) for t in texts) / n) if n else 0.0,
        "caricature_rate": (sum(caricature(t) for t in texts) / n) if n else 0.0,
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "mean_words": (sum(len(words(t)) for t in texts) / n) if n else 0.0,
    }
