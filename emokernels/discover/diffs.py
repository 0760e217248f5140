r"""Component-space emotion difference vectors (METHOD §7, the paper's stage 05).

At the readout token t* of emotion-prompted units, for every layer ℓ, capture

* the o_proj input ``z_ℓ ∈ R^{H·hd}`` (head k owns channels [k·hd, (k+1)·hd); KV heads are
  already expanded, so every query head has its own slice), site ``heads``;
* the down_proj input ``a_ℓ ∈ R^{d_ff}`` (post-activation neurons), site ``neurons``.

Within-context contrast over the six emotions, averaged over the complete contexts G::

    Δz_{e,ℓ} = (1/|G|) Σ_g ( z_{g,e,ℓ} − (1/6) Σ_{e'} z_{g,e',ℓ} )     [H·hd]
    Δa_{e,ℓ} = (1/|G|) Σ_g ( a_{g,e,ℓ} − (1/6) Σ_{e'} a_{g,e',ℓ} )     [d_ff]

so Σ_e Δ_{e,ℓ} = 0. A context g is a **(skeleton, valence)** pair — the published scripts key
groups by skeleton alone and let valences overwrite each other (METHOD §11 item 5); here the
batch's ``groups`` field (``skeleton__valence`` from :func:`~.collect.sev_units`) is the key.
Un-normalised, as the paper's stage 07 consumes them (its committed files are un-normalised).

Streaming: only incomplete groups are held (fp32, [6, L, width] each); a group is folded into
the fp64 running sum the moment its sixth emotion arrives. Groups still incomplete at the end
(e.g. judge rejections) are dropped and counted, as in the paper (448 of 480).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch

from ..data.labels import EMOTIONS
from ..models.adapters import Adapter
from ..patch import Intervention
from .collect import Collector, readout_rows, resolve_layers, run_collectors

__all__ = ["GroupContrast", "contrast_batch", "DiffAccumulator", "ComponentDiffs", "component_diffs"]


def contrast_batch(x: torch.Tensor) -> torch.Tensor:
    """Batch formula (test oracle): x [G, E, ...] of complete groups → Δ [E, ...] (fp64)."""
    x = x.double()
    return (x - x.mean(dim=1, keepdim=True)).mean(dim=0)


class GroupContrast:
    """Streaming Δ_e = mean_g (x_{g,e} − mean_{e'} x_{g,e'}) over complete groups.

    ``add(group, emotion_id, x)`` with x of a fixed shape; a second x for the same (group,
    emotion) raises. Holds only incomplete groups."""

    def __init__(self, shape: tuple[int, ...], num_emotions: int = len(EMOTIONS)):
        self.shape, self.E = tuple(shape), num_emotions
        self.sum = torch.zeros((self.E, *self.shape), dtype=torch.float64)
        self.n_groups = 0
        self.pending: "OrderedDict[str, tuple[torch.Tensor, torch.Tensor]]" = OrderedDict()

    def add(self, group: str, emotion: int, x: torch.Tensor) -> bool:
        """Add one unit; returns True if this completed its group."""
        if tuple(x.shape) != self.shape:
            raise ValueError(f"unit of group {group!r} has shape {tuple(x.shape)}, expected {self.shape}")
        if not 0 <= emotion < self.E:
            raise ValueError(f"emotion id {emotion} out of range 0..{self.E - 1}")
        buf, have = self.pending.get(group, (None, None))
        if buf is None:
            buf = torch.zeros((self.E, *self.shape), dtype=torch.float32)
            have = torch.zeros(self.E, dtype=torch.bool)
            self.pending[group] = (buf, have)
        if have[emotion]:
            raise ValueError(f"group {group!r} got emotion {EMOTIONS[emotion] if self.E == len(EMOTIONS) else emotion} "
                             "twice: each (context, emotion) must appear once")
        buf[emotion] = x.detach().float().cpu()
        have[emotion] = True
        if bool(have.all()):
            del self.pending[group]
            self.sum += contrast_batch(buf[None])
            self.n_groups += 1
            return True
        return False

    def result(self) -> torch.Tensor:
        """Δ [E, *shape] fp32; raises if no group was complete."""
        if not self.n_groups:
            raise ValueError("no complete context group (every group lacks at least one of the six emotions)")
        return (self.sum / self.n_groups).float()

    def state_dict(self, prefix: str) -> tuple[dict[str, torch.Tensor], list[str]]:
        t = {f"{prefix}.sum": self.sum, f"{prefix}.n_groups": torch.tensor(self.n_groups)}
        names = []
        for i, (g, (buf, have)) in enumerate(self.pending.items()):
            t[f"{prefix}.pending.{i}.x"], t[f"{prefix}.pending.{i}.have"] = buf, have
            names.append(g)
        return t, names

    def load_state_dict(self, state: dict[str, torch.Tensor], prefix: str, names: list[str]) -> None:
        self.sum = state[f"{prefix}.sum"].double().clone()
        self.n_groups = int(state[f"{prefix}.n_groups"])
        self.pending = OrderedDict((g, (state[f"{prefix}.pending.{i}.x"].float().clone(),
                                        state[f"{prefix}.pending.{i}.have"].bool().clone()))
                                   for i, g in enumerate(names))


class DiffAccumulator(Collector):
    """Captures z (``heads``) and a (``neurons``) at t* for ``layers`` and streams them into two
    :class:`GroupContrast` s keyed by the batch's ``groups``."""

    def __init__(self, model, layers=None):
        a = self.adapter = Adapter.of(model)
        self.layers = resolve_layers(a, layers)
        L = len(self.layers)
        self.z = GroupContrast((L, a.num_heads * a.head_dim))
        self.a = GroupContrast((L, a.intermediate_size))
        self._rows: dict[tuple[str, int], torch.Tensor] = {}

    def interventions(self):
        def keep(site):
            return lambda l, x, m, st: self._rows.__setitem__((site, l), readout_rows(x, st).cpu()) if st.prefill else None

        return [Intervention("heads", "capture", self.layers, positions="readout", fn=keep("z"), name="diff_z"),
                Intervention("neurons", "capture", self.layers, positions="readout", fn=keep("a"), name="diff_a")]

    def begin(self, batch):
        for k in ("emotion", "groups"):
            if k not in batch:
                raise ValueError(f"batches need {k!r} for difference vectors (see collect.unit_batches)")
        self._rows.clear()

    def end(self, batch):
        z = torch.stack([self._rows[("z", l)] for l in self.layers], 1)  # [B, L', H*hd]
        a = torch.stack([self._rows[("a", l)] for l in self.layers], 1)  # [B, L', d_ff]
        for b, (g, e) in enumerate(zip(batch["groups"], batch["emotion"].tolist())):
            self.z.add(g, e, z[b])
            self.a.add(g, e, a[b])

    def state_dict(self):
        tz, nz = self.z.state_dict("diffs.z")
        ta, na = self.a.state_dict("diffs.a")
        if nz != na:
            raise RuntimeError("internal: z and a pending groups differ")
        names = torch.tensor(list("\x00".join(nz).encode()), dtype=torch.uint8)
        return {**tz, **ta, "diffs.pending_names": names}

    def load_state_dict(self, state):
        raw = bytes(state["diffs.pending_names"].tolist()).decode()
        names = raw.split("\x00") if raw else []
        self.z.load_state_dict(state, "diffs.z", names)
        self.a.load_state_dict(state, "diffs.a", names)

    def result(self) -> "ComponentDiffs":
        a = self.adapter
        return ComponentDiffs(dz=self.z.result().transpose(0, 1).contiguous(), da=self.a.result().transpose(0, 1).contiguous(),
                              layers=self.layers, n_groups=self.z.n_groups, n_incomplete=len(self.z.pending),
                              head_dim=a.head_dim)


@dataclass
class ComponentDiffs:
    """``dz`` [L', 6, H·hd] (Δz per head slice), ``da`` [L', 6, d_ff] (Δa per neuron), un-normalised."""

    dz: torch.Tensor
    da: torch.Tensor
    layers: tuple[int, ...]
    n_groups: int
    n_incomplete: int
    head_dim: int
    meta: dict = field(default_factory=dict)

    def head_norms(self) -> torch.Tensor:
        """‖Δz‖ per head slice: [L', 6, H]."""
        L, E, W = self.dz.shape
        return self.dz.view(L, E, W // self.head_dim, self.head_dim).norm(dim=-1)

    def head_slice(self, layer: int, emotion: int, head: int) -> torch.Tensor:
        i = self.layers.index(layer)
        return self.dz[i, emotion, head * self.head_dim : (head + 1) * self.head_dim]

    def save(self, path, metadata: dict | None = None) -> Path:
        from ..io import save_tensors

        meta = {"kind": "component_diffs", "emotions": list(EMOTIONS), "layers": list(self.layers),
                "n_groups": self.n_groups, "n_incomplete": self.n_incomplete, "head_dim": self.head_dim,
                "normalised": False, "group_key": "skeleton__valence", "shape": "[layer, emotion, width]",
                **self.meta, **(metadata or {})}
        return save_tensors(path, {"dz": self.dz, "da": self.da, "layers": torch.tensor(self.layers)}, meta)

    @classmethod
    def load(cls, path) -> "ComponentDiffs":
        from ..io import CorruptArtifactError, load_tensors, require_keys

        t, meta = load_tensors(path)
        if meta.get("kind") != "component_diffs":
            raise CorruptArtifactError(f"{path}: not a component-diffs artifact (kind={meta.get('kind')!r})")
        require_keys(t, meta, path, ("dz", "da", "layers"), ("n_groups", "head_dim"))
        return cls(t["dz"], t["da"], tuple(int(x) for x in t["layers"]), int(meta["n_groups"]),
                   int(meta.get("n_incomplete", 0)), int(meta["head_dim"]), meta)


def component_diffs(model, batches: Iterable[dict], layers=None, total: int | None = None,
                    progress: bool = True) -> ComponentDiffs:
    """Stream emotion-prompted ``batches`` (with ``emotion`` and ``groups``) once → Δz, Δa."""
    acc = DiffAccumulator(model, layers)
    run_collectors(model, batches, [acc], total=total, progress=progress, desc="diffs")
    return acc.result()
