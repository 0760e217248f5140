"""LLM-as-judge: forced choice over the 7 labels by first-token logits.

For a reply x the judge renders (chat template, generation prompt on)

    system: "You are an emotion classifier."
    user:   "Which emotion does the following reply express most strongly? Choose exactly one of:
             anger, sadness, happiness, fear, surprise, disgust, neutral (neutral = no clear
             emotion).\n\nReply: \"{x}\"\n\nAnswer with the single word only."

and reads the next-token logits ℓ ∈ R^V at the last prompt position (left-padded batch, so
that is column T-1 of every row). With τ_y the first token of label y (the 7 first tokens must
be distinct), ``scores[y] = softmax_y(ℓ[τ_y])`` over the 7 labels and the label is the argmax.
No generation is needed: one prompt forward per reply.

Default model: Qwen2.5-Coder-1.5B-Instruct in bf16 (MODELS.md §6: 0.89 on 35 hand-written
replies). Contextual calibration was tried there and made things worse, so none is applied.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .base import LABELS, Judge, Judgement, check_targets, with_matches

SYSTEM = "You are an emotion classifier."
QUESTION = (
    "Which emotion does the following reply express most strongly? Choose exactly one of: "
    "{labels} (neutral = no clear emotion).\n\nReply: \"{reply}\"\n\nAnswer with the single word only."
)
DEFAULT_MODEL = "qwen2.5-coder-1.5b"


def label_first_tokens(tokenizer, labels: Sequence[str] = LABELS) -> list[int]:
    """First token id of each label as the assistant's first word; raises if two coincide."""
    ids = []
    for lab in labels:
        toks = tokenizer.encode(lab, add_special_tokens=False)
        if not toks:
            raise ValueError(f"label {lab!r} encodes to no tokens")
        ids.append(toks[0])
    if len(set(ids)) != len(ids):
        dup = [l for l, i in zip(labels, ids) if ids.count(i) > 1]
        raise ValueError(f"labels {dup} share a first token in this tokenizer; the forced choice needs distinct first tokens")
    return ids


class LLMJudge(Judge):
    name = "llm"

    def __init__(self, model_name: str = DEFAULT_MODEL, dtype: torch.dtype = torch.bfloat16, batch_size: int = 8,
                 model=None, tokenizer=None, max_reply_chars: int = 1200):
        """Load ``model_name`` with ``emokernels.models.load`` (raises ``ModelNotInstalledError``
        naming the pip command if its packages are missing), or use a given ``model``/``tokenizer``."""
        if (model is None) != (tokenizer is None):
            raise ValueError("pass both model= and tokenizer=, or neither")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if model is None:
            from ..models.loader import load

            model, tokenizer = load(model_name, dtype=dtype)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.model_name = model_name
        self.batch_size, self.max_reply_chars = batch_size, max_reply_chars
        self.labels = LABELS
        self.label_ids = torch.tensor(label_first_tokens(tokenizer, LABELS))
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("the LLM judge needs a chat model (its tokenizer has no chat template)")

    def prompt(self, reply: str) -> str:
        reply = " ".join(reply.split())[: self.max_reply_chars]
        msgs = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": QUESTION.format(labels=", ".join(LABELS), reply=reply)}]
        return self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    @torch.no_grad()
    def label_probs(self, texts: Sequence[str]) -> torch.Tensor:
        """Softmax over the 7 label first-tokens, fp32 [N, 7]."""
        tok = self.tokenizer
        dev = next(self.model.parameters()).device
        out = []
        old = tok.padding_side
        tok.padding_side = "left"
        try:
            for i in range(0, len(texts), self.batch_size):
                enc = tok([self.prompt(t) for t in texts[i : i + self.batch_size]], return_tensors="pt",
                          padding=True, add_special_tokens=False).to(dev)
                logits = self.model(**enc, use_cache=False, logits_to_keep=1).logits[:, -1]  # [b, V]
                out.append(torch.softmax(logits.float()[:, self.label_ids.to(dev)], dim=-1).cpu())
        finally:
            tok.padding_side = old
        return torch.cat(out) if out else torch.zeros(0, len(LABELS))

    def classify(self, texts: Sequence[str], targets: Sequence[str] | None = None) -> list[Judgement]:
        check_targets(texts, targets)
        texts = list(texts)
        if not texts:
            return []
        probs = self.label_probs(texts)
        best = probs.argmax(dim=-1).tolist()
        rows = [(LABELS[b], {l: round(float(p), 6) for l, p in zip(LABELS, row)}) for b, row in zip(best, probs.tolist())]
        return with_matches(rows, targets)

    def describe(self) -> dict:
        return {"name": self.name, "model": self.model_name, "dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
                "scores": "softmax over the first tokens of the 7 labels"}


YESNO_QUESTION = (
    "Does the following reply express {target}? Judge the reply's own tone and wording, not the event it talks "
    "about.\n\nReply: \"{reply}\"\n\nAnswer yes or no."
)


class LLMYesNoJudge(LLMJudge):
    """The paper's per-target question, asked offline: "Does the reply express {target}?".

    Score s(x, e) = log Σ_{w∈{yes,Yes}} p(w) − log Σ_{w∈{no,No}} p(w) from the first-token logits
    after the chat-templated question. With a target e, ``match = s(x, e) > θ`` and the label is
    e on a match, else ``"other"``. Without targets, all six emotions are asked: the label is the
    argmax emotion if its score passes θ, else ``"neutral"`` (six forwards per reply). The threshold
    θ is calibrated on the judge corpus dev split (``calibrate``), to maximise balanced accuracy
    of the match decision over (reply, true emotion) and (reply, another emotion) pairs.
    """

    name = "llm-yesno"

    def __init__(self, threshold: float | None = None, **kwargs):
        super().__init__(**kwargs)
        tok = self.tokenizer
        self.yes_ids = sorted({tok.encode(w, add_special_tokens=False)[0] for w in ("yes", "Yes")})
        self.no_ids = sorted({tok.encode(w, add_special_tokens=False)[0] for w in ("no", "No")})
        if set(self.yes_ids) & set(self.no_ids):
            raise ValueError("'yes' and 'no' share a first token in this tokenizer")
        if threshold is None:
            threshold = self.packaged_threshold()
        self.threshold = float(threshold)

    def packaged_threshold(self) -> float:
        from ..io import read_json
        from .probe import weights_dir

        path = weights_dir() / f"{self.name}.json"
        if not path.exists():
            return 0.0
        meta = read_json(path)
        if meta.get("model") != self.model_name:
            return 0.0
        return float(meta["threshold"])

    def question(self, reply: str, target: str) -> str:
        reply = " ".join(reply.split())[: self.max_reply_chars]
        msgs = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": YESNO_QUESTION.format(target=target, reply=reply)}]
        return self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    @torch.no_grad()
    def yes_scores(self, texts: Sequence[str], targets: Sequence[str]) -> torch.Tensor:
        """s(x_i, e_i), fp32 [N]."""
        tok = self.tokenizer
        dev = next(self.model.parameters()).device
        out, old = [], tok.padding_side
        tok.padding_side = "left"
        try:
            for i in range(0, len(texts), self.batch_size):
                prompts = [self.question(t, e) for t, e in zip(texts[i : i + self.batch_size], targets[i : i + self.batch_size])]
                enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(dev)
                lp = torch.log_softmax(self.model(**enc, use_cache=False, logits_to_keep=1).logits[:, -1].float(), -1)
                out.append((lp[:, self.yes_ids].logsumexp(-1) - lp[:, self.no_ids].logsumexp(-1)).cpu())
        finally:
            tok.padding_side = old
        return torch.cat(out) if out else torch.zeros(0)

    def classify(self, texts: Sequence[str], targets: Sequence[str] | None = None) -> list[Judgement]:
        check_targets(texts, targets)
        texts = list(texts)
        if not texts:
            return []
        if targets is not None:
            s = self.yes_scores(texts, list(targets)).tolist()
            return [Judgement(label=e if v > self.threshold else "other", scores={e: round(v, 4)}, match=v > self.threshold)
                    for e, v in zip(targets, s)]
        emos = LABELS[:-1]
        S = self.yes_scores([t for t in texts for _ in emos], [e for _ in texts for e in emos]).view(len(texts), len(emos))
        rows = []
        for row in S.tolist():
            b = max(range(len(emos)), key=row.__getitem__)
            rows.append((emos[b] if row[b] > self.threshold else LABELS[-1], {e: round(v, 4) for e, v in zip(emos, row)}))
        return with_matches(rows, None)

    def describe(self) -> dict:
        return {"name": self.name, "model": self.model_name, "threshold": round(self.threshold, 4),
                "scores": "log p(yes) - log p(no) for the per-target question"}


def calibrate_yesno(judge: LLMYesNoJudge, rows, seed: int = 0) -> dict:
    """θ maximising balanced accuracy on (reply, true emotion) positives and (reply, other emotion)
    negatives built from labelled ``rows`` (one negative per row; neutral rows give negatives only)."""
    import random

    rng = random.Random(seed)
    emos = LABELS[:-1]
    texts, targets, ys = [], [], []
    for r in rows:
        if r.label in emos:
            texts.append(r.text), targets.append(r.label), ys.append(1)
        texts.append(r.text), targets.append(rng.choice([e for e in emos if e != r.label])), ys.append(0)
    s = judge.yes_scores(texts, targets)
    y = torch.tensor(ys, dtype=torch.bool)
    best = None
    for th in torch.unique(s).tolist() + [float(s.min()) - 1]:
        pred = s > th
        tpr = float((pred & y).sum() / y.sum().clamp(min=1))
        tnr = float((~pred & ~y).sum() / (~y).sum().clamp(min=1))
        bal = (tpr + tnr) / 2
        if best is None or bal > best[0]:
            best = (bal, th)
    return {"threshold": best[1], "balanced_accuracy": round(best[0], 4), "n_pairs": len(ys), "model": judge.model_name}
