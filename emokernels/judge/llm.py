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
