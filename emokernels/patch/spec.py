"""Declarative intervention spec: *where* (site, layers, positions), *what* (op and its tables), *for whom* (per-row table rows and strengths).

Sites of decoder layer ℓ (see ``emokernels.models.adapters`` for the notation):

=============  =====================================  ==========
site           tensor                                 width
=============  =====================================  ==========
``resid_pre``  h_ℓ, the layer input                    d
``resid_mid``  m_ℓ = h_ℓ + A_ℓ                        d
``resid_post`` h_{ℓ+1} = m_ℓ + F_ℓ                    d
``attn_out``   A_ℓ, attention output                  d
``mlp_out``    F_ℓ, MLP output                        d
``heads``      z_ℓ, o_proj input (H heads × hd)        H·hd
``neurons``    a_ℓ, down_proj input                    d_ff
=============  =====================================  ==========

Ops:

* ``add``      x += s[b] · V_ℓ[row[b]]                      (``vectors``: layer -> [E, width])
* ``add_rms``  x += s[b] · rms(x) · V_ℓ[row[b]]             (steering, METHOD §5)
* ``edit``     sparse: x[idx_j] = x[idx_j]·S_ℓ[row[b], j] + s[b]·D_ℓ[row[b], j]
               on neuron ids (``neurons``) or whole head slices (``heads``);
               zero-ablation is scale 0, enhancement is an additive table
* ``capture``  copy rows out (readout rows [B, width], or the rows under ``positions``)
* ``project``  P[b] = x[b, t*_b] · D_ℓᵀ, fp32 [B, K]         (``directions``: layer -> [K, width])

Positions (a name or a tuple of names, OR-ed): ``readout`` (t = t*), ``prompt`` (t ≤ t*),
``generated`` (t > t*), ``all``. In KV-cached decoding each step's single token is ``generated``.

Validation (:mod:`emokernels.patch.rows`): ``layers`` is an int or distinct ints (checked here);
tables, rows and strengths are checked against the model when ``patch()`` is entered (finite
values, widths, table sizes, row ids in range), before anything is installed, for every backend.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Sequence

import torch

from .rows import as_layers

SITES = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "heads", "neurons")
OPS = ("add", "add_rms", "edit", "capture", "project")
POSITIONS = ("readout", "prompt", "generated", "all")
_DENSE = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")


def _as_tuple(positions) -> tuple[str, ...]:
    p = (positions,) if isinstance(positions, str) else tuple(positions)
    bad = [x for x in p if x not in POSITIONS]
    if bad or not p:
        raise ValueError(f"unknown positions {bad or p!r}: use names from {POSITIONS}")
    return p


@dataclass
class Intervention:
    site: str
    op: str
    layers: Sequence[int] | int
    positions: str | tuple[str, ...] = "all"
    vectors: Mapping[int, torch.Tensor] | None = None
    index: Mapping[int, torch.Tensor] | None = None
    scale: Mapping[int, torch.Tensor] | None = None
    add: Mapping[int, torch.Tensor] | None = None
    directions: Mapping[int, torch.Tensor] | None = None
    rows: torch.Tensor | int | None = None
    strength: torch.Tensor | float = 1.0
    name: str | None = None
    fn: Callable | None = field(default=None, repr=False)  # capture callback fn(layer, x, pos_mask, state)

    def __post_init__(self):
        if self.site not in SITES:
            raise ValueError(f"unknown site {self.site!r}: use one of {SITES}")
        if self.op not in OPS:
            raise ValueError(f"unknown op {self.op!r}: use one of {OPS}")
        self.layers = as_layers(self.layers)
        self.positions = _as_tuple(self.positions)
        need = {"add": "vectors", "add_rms": "vectors", "project": "directions"}.get(self.op)
        if need and getattr(self, need) is None:
            raise ValueError(f"op {self.op!r} needs {need}= (a mapping layer -> tensor)")
        if self.op in ("add", "add_rms") and self.site not in _DENSE:
            raise ValueError(f"op {self.op!r} works on residual/sublayer sites {_DENSE}; use op='edit' for {self.site!r}")
        if self.op == "edit":
            if self.site not in ("heads", "neurons"):
                raise ValueError("op 'edit' works on the 'heads' and 'neurons' sites")
            if self.index is None or (self.scale is None and self.add is None):
                raise ValueError("op 'edit' needs index= and at least one of scale= / add=")
        if self.op == "project" and self.positions != ("readout",):
            raise ValueError("op 'project' reads the readout row: use positions='readout'")
        for name in ("vectors", "index", "scale", "add", "directions"):
            table = getattr(self, name)
            if table is not None:
                missing = [l for l in self.layers if l not in table]
                if missing:
                    raise ValueError(f"{name}= has no entry for layers {missing}")

    def with_rows(self, rows=None, strength=None) -> "Intervention":
        return replace(self, rows=self.rows if rows is None else rows, strength=self.strength if strength is None else strength)
