"""emokernels.ops: fused intervention kernels (one op per file, reference beside each kernel).

Exports :func:`gather_add`, :func:`capture_project`, :func:`sparse_edit` (MLP neurons: group 1;
attention heads: group head_dim), :func:`fused_add_rmsnorm` (the residual add + edit + RMSNorm
pass of ``patch.fused_layers``) and :func:`resolve_backend`. Every op is declared through the
template of :mod:`emokernels.ops._op`.
"""
from __future__ import annotations

from .backends import resolve_backend
from .capture_project import capture_project, capture_project_reference
from .fused_residual import fused_add_rmsnorm, fused_add_rmsnorm_reference
from .gather_add import gather_add, gather_add_reference
from .sparse_edit import sparse_edit, sparse_edit_reference

# The public names are functions that share their module's name: importing them here binds the
# package attribute to the function (a lazy __getattr__ would be shadowed by the submodule as
# soon as anything imported ``emokernels.ops.sparse_edit``).
__all__ = [
    "gather_add",
    "gather_add_reference",
    "capture_project",
    "capture_project_reference",
    "sparse_edit",
    "sparse_edit_reference",
    "fused_add_rmsnorm",
    "fused_add_rmsnorm_reference",
    "resolve_backend",
]
