r"""Context-agnostic emotion directions (METHOD.md §4) and their artifact format.

For point p ∈ {attn, mlp}, layer ℓ and the complete context groups G (every emotion seen),
with x_{g,e} the captured state of context g under emotion e (see :mod:`.capture`)::

    μ_g = (1/E) Σ_e x_{g,e}                       context mean over the E = 6 emotions
    c_e = (1/|G|) Σ_g (x_{g,e} − μ_g)             emotion centroid of context-centred states
    v_e = (c_e − μ̄) / (‖c_e − μ̄‖₂ + 1e-12),  μ̄ = (1/E) Σ_e c_e  (= 0 by construction)

Sources:

* ``"prompt"`` (the paper): x_{g,e} = state at the readout token t* of the emotion prompt;
* ``"text"`` (MODELS.md §4): x_{g,e} = mean state over the tokens of emotional replies of e
  fed as the assistant turn after the *neutral* prompt of g. With a single context this is
  exactly "mean over e's texts minus the mean over the six emotions"; with many contexts
  the same within-context centring removes what the context contributes. Small models that
  ignore emotion prompts (SmolLM2, Qwen-0.5B) steer with these.

:class:`EmotionDirections` holds ``directions`` [P=2, L, E=6, d] (unit rows, fp32), ``sigma``
[2, L] (mean rms at each point, METHOD §8.2) and ``norms`` [2, L, 6] (‖c_e − μ̄‖ before
normalisation: how strongly the emotion separates at that point).
"""
from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from ..data.labels import EMOTIONS
from .capture import POINTS

EPS = 1e-12
ARTIFACT_NAME = "directions"
SOURCES = ("prompt", "text")


def unit_directions(centroids: torch.Tensor, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(c − mean_e c) / (‖·‖ + eps) along the emotion axis (dim -2). Returns (unit fp32, norms fp32)."""
    c = centroids.double()
    c = c - c.mean(dim=-2, keepdim=True)
    n = c.norm(dim=-1, keepdim=True)
    return (c / (n + eps)).float(), n.squeeze(-1).float()


def directions_batch(states: torch.Tensor, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """The literal batch formula of METHOD §4 (reference for tests).

    ``states``: x [G, E, P, L, d] of complete groups. Returns (v [P, L, E, d], norms [P, L, E]).
    """
    x = states.double()
    mu_g = x.mean(dim=1, keepdim=True)
    c = (x - mu_g).mean(dim=0)  # [E, P, L, d]
    return unit_directions(c.permute(1, 2, 0, 3), eps)


def default_layers(num_layers: int) -> list[int]:
    """The paper's steering window 11–20 of 28 layers, scaled to depth: round(0.39·L)..round(0.71·L)."""
    lo, hi = round(11 / 28 * num_layers), round(20 / 28 * num_layers)
    return list(range(lo, max(hi, lo) + 1))


@dataclass
class EmotionDirections:
    """Unit emotion directions of one model. ``directions[p, ℓ, e]`` is v^p_{e,ℓ} ∈ R^d."""

    directions: torch.Tensor  # [P, L, E, d] fp32, unit rows
    sigma: torch.Tensor  # [P, L] mean rms at each point
    norms: torch.Tensor  # [P, L, E] norm of the centred centroid before normalisation
    model: str = ""
    source: str = "prompt"
    points: tuple[str, ...] = POINTS
    emotions: tuple[str, ...] = EMOTIONS
    normalisation: str = "pre_final_norm"  # or "paper_final_norm": last mlp point after the final RMSNorm
    prompt_preset: str = ""
    dataset_hash: str = ""
    n_groups: int = 0
    extra: dict = field(default_factory=dict)
    model_identity: dict | None = None  # models.identity.model_identity of the model they were estimated on
    allow_model_mismatch: bool = field(default=False, compare=False, repr=False)  # not saved

    def __post_init__(self):
        if self.directions.dim() != 4:
            raise ValueError(f"directions must be [points, layers, emotions, d], got shape {tuple(self.directions.shape)}")
        P, L, E, d = self.directions.shape
        if P != len(self.points) or E != len(self.emotions):
            raise ValueError(f"directions shape {tuple(self.directions.shape)} does not match points {self.points} "
                             f"and emotions {self.emotions}")
        if tuple(self.sigma.shape) != (P, L) or tuple(self.norms.shape) != (P, L, E):
            raise ValueError(f"sigma {tuple(self.sigma.shape)} / norms {tuple(self.norms.shape)} do not match "
                             f"directions {tuple(self.directions.shape)}")
        if self.source not in SOURCES:
            raise ValueError(f"unknown source {self.source!r}: use one of {SOURCES}")
        self.points, self.emotions = tuple(self.points), tuple(self.emotions)
        if len(set(self.emotions)) != len(self.emotions):
            raise ValueError(f"emotions {self.emotions} name an emotion twice")

    def select(self, emotions: Sequence[str]) -> "EmotionDirections":
        """These directions with the emotion axis in the order ``emotions`` (rows follow their
        names, never their positions). Raises ValueError naming any emotion not stored here."""
        emotions = tuple(emotions)
        missing = [e for e in emotions if e not in self.emotions]
        if missing:
            raise ValueError(f"the directions have no {', '.join(map(repr, missing))}: they hold {', '.join(self.emotions)}")
        if emotions == self.emotions:
            return self
        idx = torch.tensor([self.emotions.index(e) for e in emotions])
        return dataclasses.replace(self, directions=self.directions[:, :, idx], norms=self.norms[:, :, idx],
                                   emotions=emotions)

    # -- shape / lookup ---------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.directions.shape[1]

    @property
    def hidden_size(self) -> int:
        return self.directions.shape[3]

    def point_index(self, point: str) -> int:
        if point not in self.points:
            raise ValueError(f"unknown point {point!r}: use one of {self.points}")
        return self.points.index(point)

    def emotion_index(self, emotion: str | int) -> int:
        from ..patch.rows import emotion_index

        return emotion_index(self.emotions, emotion, owner="these directions")

    def _layer(self, layer: int) -> int:
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range: the directions have {self.num_layers} layers")
        return layer

    def table(self, layer: int, point: str = "mlp") -> torch.Tensor:
        """The [E, d] table of one point/layer (rows in ``emotions`` order)."""
        return self.directions[self.point_index(point), self._layer(layer)]

    def vector(self, emotion: str | int, layer: int, point: str = "mlp") -> torch.Tensor:
        return self.directions[self.point_index(point), self._layer(layer), self.emotion_index(emotion)]

    def residual_order(self, emotion: str | int) -> torch.Tensor:
        """The 2L unit vectors of ``emotion`` in residual order attn0, mlp0, attn1, …: [2L, d]."""
        e = self.emotion_index(emotion)
        return self.directions[:, :, e].transpose(0, 1).reshape(-1, self.hidden_size)

    def cross_layer_cosine(self, emotion: str | int) -> torch.Tensor:
        """2L × 2L cosine matrix over the residual order (METHOD §8.1)."""
        v = self.residual_order(emotion).double()
        v = v / v.norm(dim=-1, keepdim=True).clamp_min(EPS)
        return (v @ v.T).float()

    def check_model(self, model, allow_model_mismatch: bool | None = None) -> None:
        """Raise ValueError if ``model``'s hidden size or layer count differs from the directions',
        and :class:`~emokernels.models.identity.ModelMismatchError` if the recorded model identity
        (name, config hash) is not ``model``'s, unless mismatches are allowed (argument, else the
        ``allow_model_mismatch`` the directions were loaded with)."""
        from ..models.adapters import Adapter
        from ..models.identity import check_identity

        a = Adapter.of(model)
        if a.hidden_size != self.hidden_size or a.num_layers != self.num_layers:
            raise ValueError(
                f"directions were estimated on {self.model or 'a model'} with {self.num_layers} layers x hidden "
                f"{self.hidden_size}, but this model has {a.num_layers} layers x hidden {a.hidden_size}"
            )
        allow = self.allow_model_mismatch if allow_model_mismatch is None else allow_model_mismatch
        check_identity(self.model_identity, model, "these directions", allow)

    # -- artifact ---------------------------------------------------------------------------
    def metadata(self) -> dict:
        return dict(
            kind="emotion_directions", model=self.model, source=self.source, points=list(self.points),
            emotions=list(self.emotions), num_layers=self.num_layers, hidden_size=self.hidden_size,
            normalisation=self.normalisation, prompt_preset=self.prompt_preset, dataset_hash=self.dataset_hash,
            n_groups=self.n_groups, extra=self.extra, model_identity=self.model_identity,
            layout="directions[point, layer, emotion, d]; '{emotion}.direction.{k}' = mlp point of 0-based "
                   "layer k (llama.cpp control-vector convention: added to the output of block k)",
        )

    def save(self, path, emotion: str | None = None, *, control_vectors: bool = True) -> Path:
        """Write ``<path>.safetensors`` + ``<path>.json`` (``path`` may be a folder: then
        ``<folder>/directions``). Tensors: ``directions`` (in its own dtype: fp16 halves a shipped
        file; :meth:`load` returns fp32), ``sigma``, ``norms``; with ``control_vectors`` also, per
        emotion, ``{emotion}.direction.{k}`` = the mlp-point vector of 0-based layer k ≥ 1 (the GGUF
        control-vector name, see :meth:`export_gguf_control_vector`), and with ``emotion=`` the
        bare ``direction.{k}`` of that emotion, so the file reads like a control vector."""
        from ..io import save_tensors

        path = _artifact_path(path)
        keep = self.directions if self.directions.dtype in (torch.float16, torch.bfloat16) else self.directions.float()
        t = {"directions": keep.clone(), "sigma": self.sigma.float().clone(), "norms": self.norms.float().clone()}
        mlp = self.point_index("mlp") if "mlp" in self.points and control_vectors else None
        if mlp is not None:
            for e, name in enumerate(self.emotions):
                for k in range(1, self.num_layers):
                    t[f"{name}.direction.{k}"] = self.directions[mlp, k, e].float().clone()
            if emotion is not None:
                e = self.emotion_index(emotion)
                for k in range(1, self.num_layers):
                    t[f"direction.{k}"] = self.directions[mlp, k, e].float().clone()
        meta = self.metadata()
        meta["control_vector_emotion"] = emotion
        return save_tensors(path, t, meta)

    @classmethod
    def load(cls, path, model=None, *, emotions: Sequence[str] | None = None,
             allow_model_mismatch: bool = False) -> "EmotionDirections":
        """Read an artifact written by :meth:`save`; with ``model`` check that it fits (shape and
        model identity; ``allow_model_mismatch=True`` applies directions of another model anyway).

        Emotions follow their stored names: ``emotions=None`` gives the canonical order
        ``EMOTIONS`` when the file holds exactly those six (in whatever order it stores them),
        else the stored order; ``emotions=[...]`` gives that order and raises ValueError naming
        any emotion the file lacks. Non-finite values, missing metadata and per-emotion tensors
        that disagree with the rows named for them raise CorruptArtifactError naming the file."""
        from ..io import CorruptArtifactError, load_tensors, require_finite, require_keys
        from ..models.identity import warn_unrecorded

        path = _artifact_path(path)
        tensors, meta = load_tensors(path)
        if meta.get("kind") != "emotion_directions":
            raise CorruptArtifactError(f"{path} is not an emotion-directions artifact (kind={meta.get('kind')!r})")
        require_keys(tensors, meta, path, ("directions", "sigma", "norms"), ("emotions", "points", "num_layers", "hidden_size"))
        require_finite(tensors, path)
        try:
            d = cls(
                directions=tensors["directions"].float(), sigma=tensors["sigma"].float(), norms=tensors["norms"].float(),
                model=meta.get("model", ""), source=meta.get("source", "prompt"), points=tuple(meta["points"]),
                emotions=tuple(meta["emotions"]), normalisation=meta.get("normalisation", "pre_final_norm"),
                prompt_preset=meta.get("prompt_preset", ""), dataset_hash=meta.get("dataset_hash", ""),
                n_groups=int(meta.get("n_groups", 0)), extra=meta.get("extra", {}),
                model_identity=meta.get("model_identity"), allow_model_mismatch=allow_model_mismatch,
            )
        except ValueError as e:
            raise CorruptArtifactError(f"{path}: {e}") from e
        if (d.num_layers, d.hidden_size) != (meta.get("num_layers"), meta.get("hidden_size")):
            raise CorruptArtifactError(f"{path}: tensor shape {tuple(d.directions.shape)} disagrees with its metadata")
        if "mlp" in d.points:  # '{emotion}.direction.{k}' must hold the row stored under that emotion's name
            mlp = d.point_index("mlp")
            bad = [f"{e}.direction.{k}" for i, e in enumerate(d.emotions) for k in range(1, d.num_layers)
                   if f"{e}.direction.{k}" in tensors and not torch.equal(tensors[f"{e}.direction.{k}"], d.directions[mlp, k, i])]
            if bad:
                raise CorruptArtifactError(f"{path}: the rows of 'directions' disagree with the per-emotion tensors "
                                           f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}): the emotion "
                                           f"order {d.emotions} does not match the stored vectors")
        if "model_identity" not in meta:  # a file from before identities (built in memory without one: None, silent)
            warn_unrecorded(path, "directions artifact")
        if emotions is not None:
            d = d.select(emotions)
        elif set(d.emotions) == set(EMOTIONS):
            d = d.select(EMOTIONS)
        if model is not None:
            d.check_model(model)
        return d

    def export_gguf_control_vector(self, path, emotion: str | int, point: str = "mlp",
                                   layers: Sequence[int] | None = None, scale: float = 1.0,
                                   rms_dose: bool = False, model_hint: str | None = None) -> Path:
        """Write a llama.cpp ``--control-vector`` GGUF for one emotion and verify it by reading it back.

        llama.cpp's convention (``common_control_vector_load_one`` / ``llama_adapter_cvec``):
        arch ``controlvector``, 1-D F32 tensors ``direction.{k}``; tensor k is added to the
        output ``l_out`` of block k (0-based) — i.e. to our ``resid_post`` of layer k — at every
        position; k = 0 is rejected ("invalid (zero) direction tensor layer index"), so block 0
        cannot be steered. Layer indices therefore start at 1 and **equal our 0-based layer**.

        The file holds ``scale · v^mlp_{e,k}`` (times σ_{mlp,k} with ``rms_dose=True``, so that
        ``--control-vector-scaled file α`` approximates our ``add_rms`` steering h += α·rms(h)·v
        with rms(h) replaced by its mean at t*). llama.cpp adds a constant vector at every
        position, prompt included: that differs from our readout+generated steering.
        ``layers``: default :func:`default_layers` of this depth.
        """
        import gguf

        if point != "mlp":
            raise ValueError("llama.cpp control vectors act on the block output (our 'mlp' point / resid_post); "
                             f"point {point!r} has no GGUF equivalent")
        e = self.emotion_index(emotion)
        layers = default_layers(self.num_layers) if layers is None else [int(l) for l in layers]
        bad = [l for l in layers if not 1 <= l < self.num_layers]
        if bad:
            raise ValueError(f"layers {bad} cannot be exported: llama.cpp control vectors address blocks "
                             f"1..{self.num_layers - 1} (block 0's output is never steered)")
        if not layers:
            raise ValueError("no layers to export")
        p = self.point_index(point)
        vecs = {}
        for k in layers:
            v = self.directions[p, k, e].double() * scale
            if rms_dose:
                v = v * float(self.sigma[p, k])
            vecs[k] = v.float().numpy()
        hint = model_hint or self.extra.get("model_type") or self.model or "unknown"
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        os.close(fd)
        try:
            w = gguf.GGUFWriter(tmp, "controlvector")
            w.add_string("controlvector.model_hint", str(hint))
            w.add_uint32("controlvector.layer_count", len(vecs))
            for k in sorted(vecs):
                w.add_tensor(f"direction.{k}", vecs[k])
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            w.close()
            _verify_gguf(tmp, vecs, self.hidden_size)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path


def _artifact_path(path) -> Path:
    """``x.safetensors`` / ``x.json`` name the artifact itself; anything else is a folder holding
    ``directions.safetensors``."""
    path = Path(path)
    if path.suffix in (".safetensors", ".json"):
        return path.with_suffix(".safetensors")
    return path / f"{ARTIFACT_NAME}.safetensors"


def read_gguf_control_vector(path) -> tuple[dict[int, torch.Tensor], dict]:
    """Read a control-vector GGUF: ({k: vector [d] fp32}, {key: value}) with llama.cpp's checks."""
    import gguf

    r = gguf.GGUFReader(str(path))
    fields = {}
    for name, f in r.fields.items():
        if name.startswith("controlvector.") or name == "general.architecture":
            fields[name] = f.contents()
    out = {}
    for t in r.tensors:
        head, _, idx = t.name.partition(".")
        if head != "direction" or not idx.isdigit():
            raise ValueError(f"{path}: tensor {t.name!r} is not 'direction.<layer>'")
        k = int(idx)
        if k == 0:
            raise ValueError(f"{path}: direction.0 is invalid for llama.cpp (layer indices start at 1)")
        if t.tensor_type != gguf.GGMLQuantizationType.F32 or len(t.shape) != 1:
            raise ValueError(f"{path}: {t.name} must be a 1-D F32 tensor")
        out[k] = torch.from_numpy(t.data.copy()).float()
        if not bool(torch.isfinite(out[k]).all()):
            raise ValueError(f"{path}: tensor {t.name!r} holds non-finite values (NaN or inf)")
    return out, fields


def _verify_gguf(path, vecs: dict, d: int) -> None:
    got, fields = read_gguf_control_vector(path)
    if fields.get("general.architecture") != "controlvector":
        raise ValueError(f"GGUF read-back: architecture {fields.get('general.architecture')!r} != 'controlvector'")
    if sorted(got) != sorted(vecs) or int(fields.get("controlvector.layer_count", -1)) != len(vecs):
        raise ValueError("GGUF read-back: layer set or layer_count differs from what was written")
    for k, v in vecs.items():
        if got[k].shape != (d,) or not torch.equal(got[k], torch.from_numpy(v)):
            raise ValueError(f"GGUF read-back: direction.{k} differs from what was written")


def from_accumulator(acc, *, model: str = "", source: str = "prompt", normalisation: str = "pre_final_norm",
                     prompt_preset: str = "", dataset_hash: str = "", extra: dict | None = None,
                     model_identity: dict | None = None) -> EmotionDirections:
    """Directions from a finished :class:`~.capture.GroupAccumulator` (METHOD §4).
    ``model_identity``: :func:`emokernels.models.identity.model_identity` of the captured model."""
    v, n = unit_directions(acc.centroids())
    info = dict(acc.counts())
    info.update(extra or {})
    return EmotionDirections(directions=v, sigma=acc.sigma(), norms=n, model=model, source=source,
                             normalisation=normalisation, prompt_preset=prompt_preset, dataset_hash=dataset_hash,
                             n_groups=acc.n_groups, extra=info, model_identity=model_identity)


def estimate(model, tokenizer, units, *, source: str | None = None, model_name: str = "", prompt_config=None,
             paper_final_norm: bool = False, dataset_hash: str = "", batch_size: int = 16,
             keep_states: bool | Sequence[int] = False, checkpoint=None, progress: bool = True,
             distributed: bool = False):
    """Capture ``units`` and estimate directions. Returns ``(EmotionDirections, CaptureResult)``.

    ``distributed``: shard the capture over the ranks of the initialised ``torch.distributed``
    group (see :mod:`.distributed`); every rank returns the same directions.
    """
    from ..data.prompts import PromptConfig
    from ..models.adapters import Adapter
    from ..models.identity import model_identity
    from .capture import capture

    config = prompt_config or PromptConfig()
    res = capture(model, tokenizer, units, prompt_config=config, batch_size=batch_size,
                  paper_final_norm=paper_final_norm, keep_states=keep_states, checkpoint=checkpoint, progress=progress,
                  distributed=distributed)
    src = source or res.mode
    if src != res.mode:
        raise ValueError(f"source {src!r} but the units are {res.mode} units")
    a = Adapter.of(model)
    dirs = from_accumulator(
        res.accumulator, model=model_name, source=src,
        normalisation="paper_final_norm" if paper_final_norm else "pre_final_norm",
        prompt_preset=config.preset if src == "prompt" else "neutral", dataset_hash=dataset_hash,
        extra=dict(model_type=a.family, prompt=config.to_dict(), n_units=len(res.keys)), model_identity=model_identity(model),
    )
    return dirs, res


def alpha_for_hidden(hidden_size: int, paper_alpha: float = 8.0, paper_hidden: int = 3072) -> float:
    """α that keeps the paper's per-layer added-norm ratio α·rms(h)/‖h‖ = α/√d: α·√(d/3072)."""
    return paper_alpha * math.sqrt(hidden_size / paper_hidden)


__all__ = ["EmotionDirections", "unit_directions", "directions_batch", "from_accumulator", "estimate",
           "default_layers", "alpha_for_hidden", "read_gguf_control_vector", "SOURCES"]
