"""Ready-made emotion directions and a circuit for the default model, shipped in the package.

They let the quick start steer and modulate SmolLM2-135M-Instruct in under a minute, without a
finished ``emokernels run`` (about an hour on a 2-core CPU). Both come from one such run
(``emokernels run --test-limit 24``, fp32; its report is ``docs/runs/smollm2-135m``): discovery
used only SEV **train** skeletons, and the strengths stored with them are the ones that run chose
on the train split (steering α = 1.73, circuit s = 4). Files, in ``emokernels/assets/<model>/``:

* ``directions``: :class:`~emokernels.discover.directions.EmotionDirections` from emotional text
  (``source="text"``), the MLP point only, fp16 on disk (fp32 when loaded), no control-vector copies;
  ``extra["steering_alpha"]`` is the chosen α.
* ``circuit``: the text-source :class:`~emokernels.discover.circuits.Circuit` (K = 260: 182 neurons,
  78 heads), Δ tables fp16 on disk, every emotion's default strength the chosen s.

Both record the model identity, so applying them to another model is an error
(``allow_model_mismatch=True`` overrides). :func:`build` re-creates them from a run folder.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["READY_MODELS", "ready_path", "ready_directions", "ready_circuit", "build"]

ROOT = Path(__file__).resolve().parent
READY_MODELS = ("smollm2-135m",)


def ready_path(kind: str, name: str = "smollm2-135m") -> Path:
    """``emokernels/assets/<name>/<kind>`` (``kind``: ``"directions"`` or ``"circuit"``), the path
    that ``EmotionDirections.load`` / ``Circuit.load`` take."""
    if kind not in ("directions", "circuit"):
        raise ValueError(f"unknown ready artifact {kind!r}: use 'directions' or 'circuit'")
    if name not in READY_MODELS:
        raise ValueError(f"no ready artifacts for {name!r}: they ship for {', '.join(READY_MODELS)}; "
                         f"run `emokernels run --model {name}` to discover your own")
    return ROOT / name / kind


def ready_directions(name: str = "smollm2-135m", **load_kwargs):
    """The shipped :class:`EmotionDirections` of the zoo model ``name`` (``load_kwargs``: ``model=``
    to check them against a loaded model, ``emotions=`` ...)."""
    from ..discover.directions import EmotionDirections

    return EmotionDirections.load(ready_path("directions", name), **load_kwargs)


def ready_circuit(name: str = "smollm2-135m", **load_kwargs):
    """The shipped :class:`Circuit` of the zoo model ``name`` (``load_kwargs``: ``model=`` to check it
    against a loaded model, ``emotions=`` ...)."""
    from ..discover.circuits import Circuit

    return Circuit.load(ready_path("circuit", name), **load_kwargs)


def build(run_dir, model: str = "smollm2-135m", out_root: Path = ROOT) -> tuple[Path, Path]:
    """Write ``<out_root>/<model>/{directions,circuit}`` from a finished ``emokernels run`` folder.

    Takes the run's text-source directions and its circuit, the strengths its ``select`` stage
    chose, and the identity of ``model`` as loaded here (runs from before identities lack one)."""
    import dataclasses
    import json

    import torch

    from ..discover.circuits import Circuit
    from ..discover.directions import EmotionDirections
    from ..models import load
    from ..models.identity import model_identity

    run_dir = Path(run_dir)
    chosen = json.loads((run_dir / "report.json").read_text())["state"]["info"]["select"]["chosen"]
    ident = model_identity(load(model, dtype="fp32")[0])
    out = Path(out_root) / model
    out.mkdir(parents=True, exist_ok=True)

    d = EmotionDirections.load(run_dir / "directions" / "text", allow_model_mismatch=True)
    mlp = d.point_index("mlp")
    d = dataclasses.replace(d, directions=d.directions[mlp:mlp + 1].half(), sigma=d.sigma[mlp:mlp + 1],
                            norms=d.norms[mlp:mlp + 1], points=("mlp",), model_identity=ident,
                            extra={**d.extra, "steering_alpha": float(chosen["steering"]), "run": str(run_dir)})
    d_path = d.save(out / "directions", control_vectors=False)

    c = Circuit.load(run_dir / "circuit" / "circuit", allow_model_mismatch=True)
    half = {name: {e: {l: t.half() for l, t in per.items()} for e, per in getattr(c, name).items()}
            for name in ("delta_a", "delta_z")}
    c = dataclasses.replace(c, strengths={e: float(chosen["circuit"]) for e in c.emotions}, model_identity=ident,
                            meta={**c.meta, "strength_chosen_on": "SEV train, natural accuracy, second judge",
                                  "run": str(run_dir)}, **half)
    return d_path, c.save(out / "circuit")
