"""Prompt presets, chat templating with a pinned date, and readout positions.

The readout position t* of a row is the last token of its chat-templated prompt after
``add_generation_prompt=True`` (METHOD.md §0): the token that closes the assistant header.
Under left padding every row's t* is T-1; under right padding it is length-1. ``encode``
returns t* per row so both paddings work.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# The paper's Llama-3.2 template stamps today's date into the prompt, so activations drift
# with the run date (METHOD.md §11 item 7). We always pin it.
PINNED_DATE = "26 Jul 2024"

PRESETS: dict[str, str] = {
    # The paper's wording (stages 01/02/04/05). Small models read it as "reply in a language".
    "paper": "Always reply in {emotion}.\nKeep the reply to at most two sentences.",
    # Stronger wording that small models follow more often (MODELS.md §3).
    "strong": "You are feeling intense {emotion}. Every reply must clearly express {emotion}. "
    "Keep the reply to at most two sentences.",
}
NEUTRAL_SYSTEM = "Keep the reply to at most two sentences."


@dataclass(frozen=True)
class PromptConfig:
    preset: str = "strong"
    date: str = PINNED_DATE

    def system(self, emotion: str | None) -> str:
        if emotion is None:
            return NEUTRAL_SYSTEM
        if self.preset not in PRESETS and "{emotion}" not in self.preset:
            raise ValueError(f"unknown prompt preset {self.preset!r}: use one of {sorted(PRESETS)} or a template with '{{emotion}}'")
        template = PRESETS.get(self.preset, self.preset)
        return template.format(emotion=emotion)

    def to_dict(self) -> dict:
        return {"preset": self.preset, "template": PRESETS.get(self.preset, self.preset), "date": self.date}


def chat_messages(user: str, emotion: str | None = None, config: PromptConfig = PromptConfig()) -> list[dict]:
    """System + user messages; ``emotion=None`` gives the neutral prompt."""
    return [{"role": "system", "content": config.system(emotion)}, {"role": "user", "content": user}]


def render(tokenizer, messages: list[dict], config: PromptConfig = PromptConfig(), assistant: str | None = None) -> str:
    """Chat-template ``messages`` (with the generation prompt) into a string, date pinned.

    With ``assistant`` the reply is appended as an assistant turn (for text-source directions).
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the tokenizer has no chat template; emotion prompts need a chat model")
    if assistant is not None:
        msgs = messages + [{"role": "assistant", "content": assistant}]
        return tokenizer.apply_chat_template(msgs, tokenize=False, date_string=config.date)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, date_string=config.date)


def encode(tokenizer, texts: list[str], padding_side: str = "left", device=None) -> dict:
    """Tokenise rendered prompts as a padded batch and add ``readout`` (t* per row, int64 [B]).

    The template already holds BOS where the model wants one, so no special tokens are added.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    old = tokenizer.padding_side
    tokenizer.padding_side = padding_side
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = old
    mask = enc["attention_mask"]
    batch = {"input_ids": enc["input_ids"], "attention_mask": mask, "readout": readout_positions(mask)}
    if device is not None:
        batch = {k: v.to(device) for k, v in batch.items()}
    return batch


def readout_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row: works for left and right padding. int64 [B]."""
    T = attention_mask.shape[-1]
    idx = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), idx, torch.full_like(idx, -1)).max(dim=-1).values
