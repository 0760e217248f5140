"""The op template: an op declares its math once; :class:`KernelOp` makes the rest.

An op file gives

* ``reference(*args)``: pure torch, the ground truth (and what ``torch.compile`` traces by default);
* ``forward(backend, *args, out=None)``: one resolved backend (``reference``, ``cpu``, ``triton``,
  ``cuda``); usually the table :func:`runners` builds from a Triton launcher and a native
  launcher, plus the op's own preparation (contiguity, dtypes, empty inputs);
* ``backward(args, grads, needs, op)``: one gradient per argument (``needs`` are the
  ``needs_input_grad`` flags; ``op(*args)`` calls the op itself, traceably, e.g. for an edit whose
  input gradient is the edit again);
* ``schema``: the ``torch.library`` schema, ``str backend`` last.

and the template makes the ``emokernels::<name>`` custom op (``torch.compile`` sees one opaque
node), registers its fake (the reference itself, run on fake tensors: shapes and dtypes cannot
drift from the math) and its autograd (once: eager calls that record autograd go through the same
custom op), and :meth:`KernelOp.__call__`, the dispatch every public function ends in::

    compiling:   reference(*args)                 unless a native backend was asked for by name
                 torch.ops.emokernels.<name>(*args, requested)
    eager:       forward(resolve_backend(device, requested), *args, out=out)     no autograd
                 torch.ops.emokernels.<name>(*args, resolved)                      autograd records

Optional tensor outputs may be None from ``forward``; the custom op returns empty tensors for them.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch
from torch import Tensor

from .backends import native_fn, resolve_backend, stream_args, trace_reference, triton_available

__all__ = ["KernelOp", "runners", "HAS_TRITON"]

HAS_TRITON = triton_available()  # Triton is optional (CPU-only installs)

# (backend, name) -> the bound native function, or None (looked up once: the hot path of the
# fused layers calls a runner per layer and token)
_NATIVE: dict = {}


def runners(name: str, reference: Callable, triton_fn: Callable | None, native_args: Callable) -> dict:
    """The backend table of an op whose launchers share one argument list.

    ``reference(*args)`` and ``triton_fn(*args)`` run the op into the preallocated output
    buffers in ``args``; ``native_args(*args)`` gives the arguments of the native function
    ``name`` (pointers, sizes, dtype codes; the CUDA launcher takes the same ones plus the stream
    of ``args[0]``). A native module without ``name`` falls back to ``reference`` (with a one-time
    warning).
    """
    def native(backend, *args):
        fn = _NATIVE.get((backend, name), _NATIVE)
        if fn is _NATIVE:
            fn = _NATIVE[(backend, name)] = native_fn(backend, name)
        if fn is None:
            return reference(*args)
        if any(isinstance(a, Tensor) and a.is_meta for a in args):  # a pointer into nothing: a segfault in C++
            raise ValueError(f"{name}: a tensor is on the meta device (a weight offloaded by accelerate and not "
                             f"materialised?); the {backend} kernel needs real memory: use backend='reference'")
        fn(*native_args(*args), *stream_args(backend, args[0]))

    return {"reference": reference, "triton": triton_fn, "cpu": functools.partial(native, "cpu"),
            "cuda": functools.partial(native, "cuda")}


def _as_tensors(out, like: Tensor):
    """A custom op returns tensors: empty ones (on ``like``'s device) for absent (None) outputs."""
    if isinstance(out, tuple):
        return tuple(like.new_empty((0,)) if t is None else t for t in out)
    return out


class KernelOp:
    """One op: the custom op, its fake and autograd, and the eager / compiled dispatch."""

    def __init__(self, name: str, schema: str, *, reference: Callable, forward: Callable,
                 backward: Callable, grad_args: Sequence[int], compiled_reference: Callable | None = None):
        """``compiled_reference``: the reference with the custom op's output structure (default
        ``reference``); ``grad_args``: positions of the arguments that may require grad."""
        self.name = name
        self.reference = reference
        self.compiled_reference = compiled_reference or reference
        self.forward = forward
        self._backward_fn = backward
        self.grad_args = tuple(grad_args)
        lib_op = torch.library.custom_op(f"emokernels::{name}", self._impl, mutates_args=(),
                                         schema=schema)
        lib_op.register_fake(lambda *a: _as_tensors(self.compiled_reference(*a[:-1]), a[0]))
        lib_op.register_autograd(self._backward, setup_context=self._setup_context)
        self.custom_op = getattr(torch.ops.emokernels, name)

    # -- the custom op ----------------------------------------------------------------------
    def _impl(self, *args):
        *args, backend = args
        return _as_tensors(self.forward(resolve_backend(args[0].device, backend or None), *args), args[0])

    @staticmethod
    def _setup_context(ctx, inputs, output):
        pos = [i for i, a in enumerate(inputs) if isinstance(a, Tensor)]
        ctx.save_for_backward(*(inputs[i] for i in pos))
        ctx.tensor_pos = pos
        ctx.consts = [None if isinstance(a, Tensor) else a for a in inputs]

    def _backward(self, ctx, *grads):
        args = list(ctx.consts)
        for i, t in zip(ctx.tensor_pos, ctx.saved_tensors):
            args[i] = t
        *args, backend = args
        needs = ctx.needs_input_grad

        def op(*a):
            return self.custom_op(*a, backend)

        return (*self._backward_fn(args, grads, needs, op), None)

    # -- dispatch ---------------------------------------------------------------------------
    def __call__(self, requested: str | None, *args, out: Tensor | None = None):
        """Run the op on ``args`` (checked by the caller) with the backend ``requested``.

        ``out``: write into this buffer (``inplace=True`` of the edits: ``out`` is ``args[0]``);
        eager only, and not while autograd records.
        """
        if torch.compiler.is_compiling():
            if out is not None:
                raise RuntimeError(f"{self.name}: inplace=True is not supported under torch.compile")
            if trace_reference(requested):
                return self.compiled_reference(*args)
            return self.custom_op(*args, requested or "")
        return self.run(resolve_backend(args[0].device, requested), *args, out=out)

    def run(self, backend: str, *args, out: Tensor | None = None):
        """Eager dispatch on a resolved ``backend`` (the fused layers' hot path calls this)."""
        if torch.is_grad_enabled():
            for i in self.grad_args:
                t = args[i]
                if t is not None and t.requires_grad:
                    if out is not None:
                        raise RuntimeError(f"{self.name}: inplace=True needs torch.no_grad() or "
                                           f"inputs that do not require grad")
                    return self.custom_op(*args, backend)
        if out is not None and not out.is_contiguous():
            raise ValueError(f"{self.name}: inplace=True needs a contiguous input")
        return self.forward(backend, *args, out=out)
