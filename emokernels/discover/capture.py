r"""Streaming capture of residual states for emotion directions (METHOD.md §3, §4, §8.2).

Every *unit* is one forward pass: a context g (``group``; for SEV g = (skeleton, valence)) under
a target emotion e. Two kinds of units:

* **prompt** units (the paper's source): the emotion-elicitation prompt of g and e; the state
  is read at the readout token t* (the last prompt token, METHOD §0);
* **text** units (MODELS.md §4): an emotional reply fed as an assistant turn after the
  *neutral* prompt of g; the state is the mean over the reply's tokens.

At every layer ℓ two points are captured, in residual coordinates (width d):

* ``attn`` point  r^attn_ℓ = m_ℓ = h_ℓ + A_ℓ        (patch site ``resid_mid``)
* ``mlp`` point   r^mlp_ℓ  = h_{ℓ+1} = m_ℓ + F_ℓ    (patch site ``resid_post``)

At the last layer ``resid_post`` is the **pre-final-norm** residual h_L. The paper read HF's
``hidden_states[L]`` = RMSNorm_final(h_L) there (METHOD §11 item 1); ``paper_final_norm=True``
applies the final norm to reproduce that.

Nothing per unit is kept (unless asked for the probe). A :class:`GroupAccumulator` holds, in
fp64, only

* the partial sums of groups not yet complete (at most a few at a time: units are processed
  group by group),
* S[p, ℓ, e] = Σ_{g complete} (x_{g,e} − μ_g),  μ_g = (1/E) Σ_e x_{g,e}, overall and per
  valence and per theme (for the consistency checks),
* Σ rms(r) over the units of complete groups (σ_{p,ℓ}, METHOD §8.2),

so memory is O(points × layers × emotions × d), independent of the number of prompts. A
group is *complete* when every emotion has at least one unit; incomplete groups are dropped,
as in the paper (448 of 480). With several units per (g, e) (text source) x_{g,e} is their mean.
"""
from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from ..data.labels import EMOTIONS, VALENCES
from ..data.prompts import PromptConfig, chat_messages, encode, render
from ..models.adapters import Adapter

POINTS: tuple[str, ...] = ("attn", "mlp")
POINT_SITES: dict[str, str] = {"attn": "resid_mid", "mlp": "resid_post"}


# ---------------------------------------------------------------------------------------------
# units
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CaptureUnit:
    """One forward pass. ``reply`` is None for prompt units (read at t*), else the assistant
    text whose token states are averaged (under the neutral prompt)."""

    key: str
    group: str
    emotion: str
    user: str
    valence: str | None = None
    theme: str | None = None
    reply: str | None = None


def group_key(skeleton_id: str, valence: str) -> str:
    return f"{skeleton_id}__{valence}"


def prompt_units(skeletons: Iterable, emotions: Sequence[str] = EMOTIONS, valences: Sequence[str] = VALENCES,
                 accepted: set[str] | None = None) -> list[CaptureUnit]:
    """Emotion-prompt units for every (skeleton, valence, emotion), skeleton-major.

    ``skeletons``: ``Skeleton``s, or ready ``(skeleton, valence, emotion[, key])`` tuples
    (``sev.iter_units`` output; then ``emotions``/``valences`` are ignored).
    ``accepted``: keep only these unit keys (judge-accepted generations, METHOD §1.1); groups
    that lose an emotion become incomplete and are dropped by the accumulator.
    """
    from ..data.sev import iter_units, make_key

    items = list(skeletons)
    if items and isinstance(items[0], tuple):
        triples = [(u[0], u[1], u[2], make_key(u[0].skeleton_id, u[1], u[2])) for u in items]
    else:
        triples = iter_units(items, emotions, valences)
    units = []
    for sk, valence, emotion, key in triples:
        if accepted is not None and key not in accepted:
            continue
        units.append(CaptureUnit(key, group_key(sk.skeleton_id, valence), emotion, sk.user_message(valence),
                                 valence, sk.theme))
    return units


def reference_text_units(skeletons: Iterable, references: Mapping[str, Sequence[str]],
                         valences: Sequence[str] = VALENCES) -> list[CaptureUnit]:
    """Text units: every reference reply of every emotion, as the assistant turn of every
    context (skeleton, valence) under the neutral prompt.

    Within-context centring then removes what the context contributes, and x_{g,e} is the mean
    over e's references. ``references``: emotion -> replies (e.g. :func:`default_references`).
    """
    missing = [e for e in EMOTIONS if not references.get(e)]
    if missing:
        raise ValueError(f"text source needs reference replies for every emotion; none for {missing}")
    units = []
    for sk in skeletons:
        for valence in valences:
            g = group_key(sk.skeleton_id, valence)
            for emotion in EMOTIONS:
                for k, text in enumerate(references[emotion]):
                    units.append(CaptureUnit(f"{g}__{emotion}__ref{k}", g, emotion, sk.user_message(valence), valence,
                                             sk.theme, reply=text.strip()))
    return units


_TEXT_FIELDS = ("text", "reply", "output", "generation", "response")


def reply_text_units(rows: Iterable[dict], skeletons: Iterable) -> list[CaptureUnit]:
    """Text units from generated rows (``key`` + reply text): each reply under the neutral
    prompt of its own context. Rows whose skeleton is not in ``skeletons`` raise."""
    from ..data.sev import parse_key

    by_id = {s.skeleton_id: s for s in skeletons}
    units = []
    for i, row in enumerate(rows):
        if "key" not in row:
            raise ValueError(f"row {i} has no 'key' field (expected 'skeleton__valence__emotion')")
        sid, valence, emotion = parse_key(row["key"])
        text = next((row[f] for f in _TEXT_FIELDS if isinstance(row.get(f), str)), None)
        if text is None:
            raise ValueError(f"row {i} ({row['key']}) has no reply text (fields tried: {', '.join(_TEXT_FIELDS)})")
        if sid not in by_id:
            raise ValueError(f"row {i}: skeleton {sid!r} is not in the split")
        sk = by_id[sid]
        units.append(CaptureUnit(row["key"], group_key(sid, valence), emotion, sk.user_message(valence), valence,
                                 sk.theme, reply=text.strip()))
    return units


def default_references() -> dict[str, list[str]]:
    """The packaged judge reference replies (emotion rows only), emotion -> texts."""
    from ..data.reference import load_judge_reference

    refs: dict[str, list[str]] = {e: [] for e in EMOTIONS}
    for row in load_judge_reference():
        if row.label in refs:
            refs[row.label].append(row.text)
    return refs


def is_accepted(row: dict) -> bool:
    """Whether a judged row was accepted: ``accepted``, else ``judge.match``, else ``match``."""
    if "accepted" in row:
        return bool(row["accepted"])
    j = row.get("judge")
    if isinstance(j, dict) and "match" in j:
        return bool(j["match"])
    if "match" in row:
        return bool(row["match"])
    raise ValueError(f"judged row {row.get('key', '?')!r} has none of 'accepted', 'judge.match', 'match'")


def load_accepted_keys(path) -> set[str]:
    """Unit keys of the accepted rows of a judged JSONL (``key`` + acceptance field)."""
    from ..io import read_jsonl

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"judged file not found: {path}")
    rows = read_jsonl(path)
    if not rows:
        raise ValueError(f"judged file {path} has no rows")
    keys = set()
    for i, row in enumerate(rows):
        if "key" not in row:
            raise ValueError(f"{path}: row {i + 1} has no 'key' field")
        if is_accepted(row):
            keys.add(row["key"])
    return keys


def order_by_group(units: Sequence[CaptureUnit]) -> list[CaptureUnit]:
    """Stable reorder so each group's units are consecutive (groups in first-seen order)."""
    by: "OrderedDict[str, list[CaptureUnit]]" = OrderedDict()
    for u in units:
        by.setdefault(u.group, []).append(u)
    return [u for us in by.values() for u in us]


# ---------------------------------------------------------------------------------------------
# accumulator
# ---------------------------------------------------------------------------------------------
class GroupAccumulator:
    r"""Streaming within-context-centred emotion sums. Tensors are fp64, layout [P, L, E, d].

    ``add(group, emotion, x, rms)`` with x ∈ R^{P×L×d} (one unit's state) and rms ∈ R^{P×L};
    ``close(group)`` finalises a group: if every emotion was seen,

        x_{g,e} = mean of its units,  μ_g = mean_e x_{g,e},  S += x_{g,·} − μ_g  (also S_valence, S_theme)
        σ_sum += Σ_e mean rms of (g, e),  σ_n += E

    and the group is counted; otherwise it is dropped. ``centroids()`` = S / n_groups = c_e of
    METHOD §4 (exactly the batch formula over the complete groups).
    """

    def __init__(self, num_points: int, num_layers: int, hidden_size: int, emotions: Sequence[str] = EMOTIONS,
                 track_valence: bool = True, track_theme: bool = True):
        self.shape = (num_points, num_layers, len(emotions), hidden_size)
        self.emotions = tuple(emotions)
        self._eidx = {e: i for i, e in enumerate(self.emotions)}
        self.track_valence, self.track_theme = track_valence, track_theme
        self.sum = torch.zeros(self.shape, dtype=torch.float64)
        self.n_groups = 0
        self.sigma_sum = torch.zeros(self.shape[:2], dtype=torch.float64)
        self.sigma_n = 0
        self.by_valence: dict[str, torch.Tensor] = {}
        self.n_valence: dict[str, int] = {}
        self.by_theme: dict[str, torch.Tensor] = {}
        self.n_theme: dict[str, int] = {}
        self.dropped: list[str] = []
        self.pending: "OrderedDict[str, dict]" = OrderedDict()

    # -- streaming --------------------------------------------------------------------------
    def add(self, group: str, emotion: str, x: torch.Tensor, rms: torch.Tensor, valence=None, theme=None) -> None:
        P, L, E, d = self.shape
        if emotion not in self._eidx:
            raise ValueError(f"unknown emotion {emotion!r}: expected one of {self.emotions}")
        if tuple(x.shape) != (P, L, d):
            raise ValueError(f"state has shape {tuple(x.shape)}, expected {(P, L, d)}")
        g = self.pending.get(group)
        if g is None:
            g = self.pending[group] = dict(
                sum=torch.zeros(self.shape, dtype=torch.float64), count=torch.zeros(E, dtype=torch.long),
                rms=torch.zeros((P, L, E), dtype=torch.float64), valence=valence, theme=theme,
            )
        e = self._eidx[emotion]
        g["sum"][:, :, e] += x.to(torch.float64)
        g["rms"][:, :, e] += rms.to(torch.float64)
        g["count"][e] += 1

    def close(self, group: str) -> bool:
        """Finalise ``group``; returns True if it was complete (and counted)."""
        g = self.pending.pop(group, None)
        if g is None:
            return False
        count = g["count"]
        if bool((count == 0).any()):
            self.dropped.append(group)
            return False
        c = count.to(torch.float64)
        x = g["sum"] / c[None, None, :, None]  # x_{g,e}   [P, L, E, d]
        centred = x - x.mean(dim=2, keepdim=True)  # x_{g,e} − μ_g
        self.sum += centred
        self.n_groups += 1
        self.sigma_sum += (g["rms"] / c[None, None, :]).sum(-1)
        self.sigma_n += len(self.emotions)
        if self.track_valence and g["valence"] is not None:
            v = g["valence"]
            self.by_valence[v] = self.by_valence.get(v, torch.zeros(self.shape, dtype=torch.float64)) + centred
            self.n_valence[v] = self.n_valence.get(v, 0) + 1
        if self.track_theme and g["theme"] is not None:
            t = g["theme"]
            self.by_theme[t] = self.by_theme.get(t, torch.zeros(self.shape, dtype=torch.float64)) + centred
            self.n_theme[t] = self.n_theme.get(t, 0) + 1
        return True

    def finish(self) -> "GroupAccumulator":
        """Close every pending group (incomplete ones are dropped)."""
        for g in list(self.pending):
            self.close(g)
        return self

    # -- results ----------------------------------------------------------------------------
    def centroids(self, valence: str | None = None, theme: str | None = None,
                  without_theme: str | None = None) -> torch.Tensor:
        """c_e = mean over the selected complete groups of (x_{g,e} − μ_g); fp64 [P, L, E, d]."""
        if sum(a is not None for a in (valence, theme, without_theme)) > 1:
            raise ValueError("pass at most one of valence=, theme=, without_theme=")
        if valence is not None:
            s, n = self.by_valence.get(valence), self.n_valence.get(valence, 0)
            what = f"valence {valence!r}"
        elif theme is not None:
            s, n = self.by_theme.get(theme), self.n_theme.get(theme, 0)
            what = f"theme {theme!r}"
        elif without_theme is not None:
            if without_theme not in self.by_theme:
                raise ValueError(f"no complete groups of theme {without_theme!r}")
            s, n = self.sum - self.by_theme[without_theme], self.n_groups - self.n_theme[without_theme]
            what = f"all themes but {without_theme!r}"
        else:
            s, n, what = self.sum, self.n_groups, "the run"
        if not n:
            raise ValueError(f"no complete context groups for {what}: every group lacks at least one emotion")
        return s / n

    def sigma(self) -> torch.Tensor:
        """σ_{p,ℓ} = mean rms of the captured vectors of complete groups; fp32 [P, L]."""
        if not self.sigma_n:
            raise ValueError("no complete context groups: σ is undefined")
        return (self.sigma_sum / self.sigma_n).float()

    def counts(self) -> dict:
        return dict(n_groups=self.n_groups, n_dropped=len(self.dropped), by_valence=dict(self.n_valence),
                    by_theme=dict(self.n_theme))

    # -- persistence (resumable runs) -------------------------------------------------------
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        t = {"sum": self.sum, "sigma_sum": self.sigma_sum}
        for v, s in self.by_valence.items():
            t[f"valence.{v}"] = s
        for th, s in self.by_theme.items():
            t[f"theme.{th}"] = s
        pend = []
        for i, (name, g) in enumerate(self.pending.items()):
            t[f"pending.{i}.sum"], t[f"pending.{i}.rms"], t[f"pending.{i}.count"] = g["sum"], g["rms"], g["count"]
            pend.append(dict(group=name, valence=g["valence"], theme=g["theme"]))
        meta = dict(shape=list(self.shape), emotions=list(self.emotions), n_groups=self.n_groups,
                    sigma_n=self.sigma_n, n_valence=self.n_valence, n_theme=self.n_theme, dropped=self.dropped,
                    pending=pend, track_valence=self.track_valence, track_theme=self.track_theme)
        return t, meta

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "GroupAccumulator":
        P, L, E, d = meta["shape"]
        acc = cls(P, L, d, meta["emotions"], meta["track_valence"], meta["track_theme"])
        acc.sum, acc.sigma_sum = tensors["sum"].double(), tensors["sigma_sum"].double()
        acc.n_groups, acc.sigma_n, acc.dropped = meta["n_groups"], meta["sigma_n"], list(meta["dropped"])
        acc.n_valence, acc.n_theme = dict(meta["n_valence"]), dict(meta["n_theme"])
        acc.by_valence = {v: tensors[f"valence.{v}"].double() for v in acc.n_valence}
        acc.by_theme = {t: tensors[f"theme.{t}"].double() for t in acc.n_theme}
        for i, p in enumerate(meta["pending"]):
            acc.pending[p["group"]] = dict(sum=tensors[f"pending.{i}.sum"].double(), rms=tensors[f"pending.{i}.rms"].double(),
                                           count=tensors[f"pending.{i}.count"].long(), valence=p["valence"], theme=p["theme"])
        return acc


# ---------------------------------------------------------------------------------------------
# capture driver
# ---------------------------------------------------------------------------------------------
@dataclass
class CaptureResult:
    """What one capture pass produced.

    ``accumulator``: the streaming sums (None with ``accumulate=False``).
    ``states``: per-unit states [N, P, len(state_layers), d] (only with ``keep_states``), in the
    order of ``keys`` / ``emotions`` / ``groups`` (group-major; see :func:`order_by_group`).
    """

    mode: str
    accumulator: GroupAccumulator | None
    keys: list[str] = field(default_factory=list)
    emotions: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    valences: list = field(default_factory=list)
    themes: list = field(default_factory=list)
    states: torch.Tensor | None = None
    state_layers: list[int] = field(default_factory=list)
    num_layers: int = 0
    hidden_size: int = 0
    paper_final_norm: bool = False

    def labels(self) -> torch.Tensor:
        """Emotion ids (index into EMOTIONS) of the units, int64 [N]."""
        return torch.tensor([EMOTIONS.index(e) for e in self.emotions], dtype=torch.long)


def _render_batch(tokenizer, units: Sequence[CaptureUnit], config: PromptConfig, mode: str):
    """Tokenised batch (left padding) and t* per row (for text units: the last prompt token)."""
    if mode == "prompt":
        texts = [render(tokenizer, chat_messages(u.user, u.emotion, config), config) for u in units]
        return encode(tokenizer, texts, padding_side="left")
    prefixes = [render(tokenizer, chat_messages(u.user, None, config), config) for u in units]
    full = [p + u.reply for p, u in zip(prefixes, units)]
    batch = encode(tokenizer, full, padding_side="left")
    T = batch["input_ids"].shape[1]
    n_reply = []
    for p, f, u in zip(prefixes, full, units):
        ids_p = tokenizer(p, add_special_tokens=False)["input_ids"]
        ids_f = tokenizer(f, add_special_tokens=False)["input_ids"]
        if ids_f[: len(ids_p)] != ids_p:
            raise ValueError(f"unit {u.key}: the reply's tokens merge with the prompt's; cannot locate the reply span")
        if len(ids_f) == len(ids_p):
            raise ValueError(f"unit {u.key}: empty reply text")
        n_reply.append(len(ids_f) - len(ids_p))
    batch["readout"] = T - 1 - torch.tensor(n_reply, dtype=torch.long)  # left padding: reply = t > t*
    return batch


def _fingerprint(model, units: Sequence[CaptureUnit], config: PromptConfig, paper_final_norm: bool,
                 state_layers) -> str:
    a = Adapter.of(model)
    h = hashlib.sha256()
    h.update(json.dumps([a.describe(), config.to_dict(), paper_final_norm, list(state_layers or []),
                         str(next(model.parameters()).dtype)], sort_keys=True).encode())
    for u in units:
        h.update(json.dumps([u.key, u.group, u.emotion, u.user, u.reply]).encode())
    return h.hexdigest()


def capture(model, tokenizer, units: Sequence[CaptureUnit], *, prompt_config: PromptConfig = PromptConfig(),
            batch_size: int = 16, paper_final_norm: bool = False, accumulate: bool = True,
            keep_states: bool | Sequence[int] = False, states_dtype: torch.dtype = torch.float32,
            checkpoint: str | Path | None = None, checkpoint_every: int = 20, progress: bool = True,
            backend: str = "reference", distributed: bool = False) -> CaptureResult:
    """Run ``units`` through ``model`` and stream their states into a :class:`GroupAccumulator`.

    Units are all prompt units (``reply is None``: state at t*) or all text units (mean over
    the reply tokens). Each batch is one prefill of the backbone (no LM head) under ``patch``
    with two ``capture`` interventions whose ``fn`` callbacks write rows into a [B, P, L, d]
    fp32 buffer; left padding with explicit position ids, so a row's states do not depend on
    its batch mates (up to kernel rounding).

    ``keep_states``: also return per-unit states (True = all layers, or a list of layers) for
    the linear probe, as ``states_dtype``; that part is O(N · P · layers · d).
    ``checkpoint``: a path prefix; the accumulator (and kept states) are saved atomically every
    ``checkpoint_every`` batches and a rerun with the same inputs resumes from it.
    ``distributed``: under an initialised ``torch.distributed`` group, shard the context groups
    over the ranks and all-reduce the accumulator (:func:`.distributed.capture_sharded`); every
    rank passes the same units and gets the single-process result (up to fp64 summation order).
    """
    import contextlib

    from ..io import exclusive_output, load_tensors, save_tensors
    from ..patch import Intervention, patch

    if distributed:
        from .distributed import capture_sharded

        return capture_sharded(model, tokenizer, units, prompt_config=prompt_config, batch_size=batch_size,
                               paper_final_norm=paper_final_norm, accumulate=accumulate, keep_states=keep_states,
                               states_dtype=states_dtype, checkpoint=checkpoint, checkpoint_every=checkpoint_every,
                               progress=progress, backend=backend)

    if not units:
        raise ValueError("no units to capture (empty split, or no accepted rows)")
    kinds = {u.reply is None for u in units}
    if len(kinds) != 1:
        raise ValueError("mixing prompt units and text units in one capture is not supported")
    mode = "prompt" if kinds == {True} else "text"
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    units = order_by_group(units)
    a = Adapter.of(model)
    P, L, d = len(POINTS), a.num_layers, a.hidden_size
    if keep_states is True:
        state_layers = list(range(L))
    elif keep_states:
        state_layers = sorted(set(int(l) for l in keep_states))
        bad = [l for l in state_layers if not 0 <= l < L]
        if bad:
            raise ValueError(f"keep_states layers {bad} out of range for a {L}-layer model")
    else:
        state_layers = []
    acc = GroupAccumulator(P, L, d) if accumulate else None
    remaining: dict[str, int] = {}
    for u in units:
        remaining[u.group] = remaining.get(u.group, 0) + 1

    done: set[str] = set()
    kept: list[torch.Tensor] = []
    ck = Path(checkpoint) if checkpoint is not None else None
    fp = _fingerprint(model, units, prompt_config, paper_final_norm, state_layers) if ck else None
    if ck is not None and ck.with_suffix(".safetensors").exists():
        tensors, meta = load_tensors(ck)
        if meta.get("fingerprint") != fp:
            raise ValueError(f"checkpoint {ck} was written for different inputs (model, units, prompt or switches); "
                             "delete it or choose another --out")
        if accumulate:
            acc = GroupAccumulator.from_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("acc.")},
                                                   meta["accumulator"])
        done = set(meta["done"])
        if "states" in tensors:
            kept = [tensors["states"]]
        for u in units:
            if u.key in done:
                remaining[u.group] -= 1

    todo = [u for u in units if u.key not in done]
    buf = torch.zeros(batch_size, P, L, d, dtype=torch.float32)
    rms_buf = torch.zeros(batch_size, P, L, dtype=torch.float32)
    final_norm = a.final_norm

    def make_cb(p: int):
        def cb(layer, x, pos_mask, state):
            if paper_final_norm and p == 1 and layer == L - 1:
                x = final_norm(x)  # the paper's hidden_states[L] = RMSNorm_final(h_L)
            B = x.shape[0]
            if mode == "prompt":
                rows = x[torch.arange(B, device=x.device), state.readout].float()
                buf[:B, p, layer] = rows.cpu()
                rms_buf[:B, p, layer] = rows.pow(2).mean(-1).sqrt().cpu()
            else:
                m = pos_mask.float()
                cnt = m.sum(1)
                xf = x.float()
                buf[:B, p, layer] = ((xf * m[..., None]).sum(1) / cnt[:, None]).cpu()
                rms_buf[:B, p, layer] = ((xf.pow(2).mean(-1).sqrt() * m).sum(1) / cnt).cpu()

        return cb

    positions = "readout" if mode == "prompt" else "generated"
    ivs = [Intervention(site=POINT_SITES[pt], op="capture", layers=range(L), positions=positions, fn=make_cb(p),
                        name=f"capture.{pt}") for p, pt in enumerate(POINTS)]
    dev = next(model.parameters()).device

    def save_checkpoint():
        if ck is None:
            return
        tensors, meta = {}, {"fingerprint": fp, "done": sorted(done), "mode": mode}
        if acc is not None:
            t, m = acc.state_dict()
            tensors.update({f"acc.{k}": v for k, v in t.items()})
            meta["accumulator"] = m
        if kept:
            tensors["states"] = torch.cat(kept)
        save_tensors(ck, tensors, meta, sidecar=False)  # one file: the `done` list is atomic with the state

    batches = [todo[i: i + batch_size] for i in range(0, len(todo), batch_size)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(units), initial=len(units) - len(todo), desc=f"capture ({mode})", unit="unit")
    # One writer per checkpoint: a second capture into the same --out stops here, before writing.
    lock = exclusive_output(ck.with_suffix(".safetensors")) if ck is not None else contextlib.nullcontext()
    with lock, torch.no_grad(), patch(model, *ivs, backend=backend) as handle:
        for bi, chunk in enumerate(batches):
            batch = _render_batch(tokenizer, chunk, prompt_config, mode)
            mask = batch["attention_mask"].to(dev)
            handle.set_readout(batch["readout"].to(dev))
            a.backbone(input_ids=batch["input_ids"].to(dev), attention_mask=mask,
                       position_ids=(mask.long().cumsum(-1) - 1).clamp(min=0), use_cache=False)
            B = len(chunk)
            if state_layers:
                kept.append(buf[:B][:, :, state_layers].to(states_dtype).clone())
            for i, u in enumerate(chunk):
                if acc is not None:
                    acc.add(u.group, u.emotion, buf[i], rms_buf[i], u.valence, u.theme)
                done.add(u.key)
                remaining[u.group] -= 1
                if remaining[u.group] == 0 and acc is not None:
                    acc.close(u.group)
            if bar is not None:
                bar.update(B)
            if ck is not None and (bi + 1) % checkpoint_every == 0:
                save_checkpoint()
        if acc is not None:
            acc.finish()
        save_checkpoint()
    if bar is not None:
        bar.close()
    return CaptureResult(
        mode=mode, accumulator=acc, keys=[u.key for u in units], emotions=[u.emotion for u in units],
        groups=[u.group for u in units], valences=[u.valence for u in units], themes=[u.theme for u in units],
        states=torch.cat(kept) if kept else None, state_layers=state_layers, num_layers=L, hidden_size=d,
        paper_final_norm=paper_final_norm,
    )
