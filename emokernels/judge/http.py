"""Judge through an OpenAI-compatible chat endpoint, asking the paper's binary question (METHOD §2).

For each (reply, target) the endpoint gets a careful-rater system message and the question
"does the *style* of this text express {target}?", and must answer compact JSON
``{"match": 0|1, "reason": "..."}``. Departures from the paper's code (METHOD §11 item 9), on
purpose: temperature 0 (deterministic), and a fenced ```json block is unwrapped in every case.
As in the paper, a reply that still cannot be parsed after the retries counts as no match
(``label = "error"``, ``match = False``, the error in ``reason``).

``label`` is the target when it matches, else ``"other"``: a binary judge says nothing about
which other emotion it was, so its confusion matrix has a single "other" row.

Settings come from the arguments or the environment: ``EMOKERNELS_JUDGE_URL`` (base URL, e.g.
``https://api.openai.com/v1``), ``EMOKERNELS_JUDGE_MODEL`` (e.g. ``gpt-4o-mini``),
``EMOKERNELS_JUDGE_KEY``. Nothing is sent unless this judge is chosen explicitly.
"""
from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

from ..data.labels import EMOTIONS
from .base import Judge, Judgement, check_targets

SYSTEM = (
    "You are a careful rater of emotional style. Given a target emotion and a text, decide whether the "
    "text's style (its tone and attitude) clearly expresses the target emotion. The label space is: "
    + ", ".join(EMOTIONS) + ". Judge the tone, not whether the events described are good or bad. "
    'Answer with compact JSON holding exactly two keys: "match" (1 or 0) and "reason" (a short string).'
)
USER = "Target emotion: {target}\nText: \"\"\"{text}\"\"\"\nDoes the text's style express the target emotion?"

_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S | re.I)


class JudgeResponseError(ValueError):
    """The endpoint answered, but not with the JSON the rubric asks for."""


def parse_match(content: str) -> tuple[bool, str]:
    """``(match, reason)`` from the judge's reply; unwraps a ```json fence; raises JudgeResponseError."""
    s = content.strip()
    m = _FENCE.search(s)
    if m:
        s = m.group(1).strip()
    if not s.startswith("{"):
        brace = re.search(r"\{.*\}", s, re.S)
        if brace is None:
            raise JudgeResponseError(f"no JSON object in judge reply {content[:80]!r}")
        s = brace.group(0)
    try:
        obj = json.loads(s)
    except json.JSONDecodeError as e:
        raise JudgeResponseError(f"judge reply is not valid JSON ({e.msg}): {content[:80]!r}") from e
    if not isinstance(obj, dict) or "match" not in obj:
        raise JudgeResponseError(f"judge reply has no 'match' key: {content[:80]!r}")
    val = obj["match"]
    if isinstance(val, str):
        val = val.strip().lower()
        if val in ("1", "true", "yes"):
            val = 1
        elif val in ("0", "false", "no"):
            val = 0
    if val not in (0, 1, True, False):
        raise JudgeResponseError(f"'match' must be 0 or 1, got {obj['match']!r}")
    return bool(val), str(obj.get("reason", ""))


class HTTPJudge(Judge):
    name = "http"

    def __init__(self, base_url: str | None = None, model: str | None = None, api_key: str | None = None,
                 retries: int = 4, backoff: float = 1.8, timeout: float = 60.0, max_tokens: int = 200,
                 workers: int = 4):
        self.base_url = (base_url or os.environ.get("EMOKERNELS_JUDGE_URL") or "").rstrip("/")
        self.model = model or os.environ.get("EMOKERNELS_JUDGE_MODEL") or ""
        self.api_key = api_key if api_key is not None else os.environ.get("EMOKERNELS_JUDGE_KEY", "")
        if not self.base_url:
            raise ValueError("the HTTP judge needs a base URL: pass base_url= or set EMOKERNELS_JUDGE_URL")
        if not self.model:
            raise ValueError("the HTTP judge needs a model name: pass model= or set EMOKERNELS_JUDGE_MODEL")
        if retries < 0 or backoff <= 0 or workers < 1:
            raise ValueError("retries must be >= 0, backoff > 0 and workers >= 1")
        self.retries, self.backoff, self.timeout = retries, backoff, timeout
        self.max_tokens, self.workers = max_tokens, workers
        self.labels = tuple(EMOTIONS) + ("other",)

    def _post(self, payload: dict) -> dict:
        req = urllib.request.Request(self.base_url + "/chat/completions", data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})})
        with urllib.request.urlopen(req, timeout=self.timeout) as r:
            return json.loads(r.read().decode())

    def ask(self, text: str, target: str) -> Judgement:
        """One binary question with retries (backoff ``backoff**i`` seconds) on network, HTTP and format errors."""
        payload = {"model": self.model, "temperature": 0, "max_tokens": self.max_tokens,
                   "messages": [{"role": "system", "content": SYSTEM},
                                {"role": "user", "content": USER.format(target=target, text=text)}]}
        err = "no attempt"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff ** attempt)
            try:
                content = self._post(payload)["choices"][0]["message"]["content"]
                match, reason = parse_match(content or "")
                return Judgement(label=target if match else "other", scores={target: float(match)}, match=match, reason=reason)
            except urllib.error.HTTPError as e:
                err = f"HTTP {e.code}: {e.reason}"
                if e.code in (400, 401, 403, 404):  # will not get better by retrying
                    break
            except (urllib.error.URLError, TimeoutError, OSError, KeyError, IndexError, TypeError,
                    json.JSONDecodeError, JudgeResponseError) as e:
                err = f"{type(e).__name__}: {e}"
        return Judgement(label="error", scores={target: 0.0}, match=False, reason=err)

    def classify(self, texts: Sequence[str], targets: Sequence[str] | None = None) -> list[Judgement]:
        if targets is None:
            raise ValueError("the HTTP judge asks 'does this text express the target?': pass targets=")
        check_targets(texts, targets, allowed=EMOTIONS)
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(pool.map(self.ask, list(texts), list(targets)))

    def describe(self) -> dict:
        return {"name": self.name, "model": self.model, "base_url": self.base_url, "temperature": 0,
                "question": "binary match (METHOD §2)"}
