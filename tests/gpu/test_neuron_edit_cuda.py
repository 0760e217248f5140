"""neuron_edit on a CUDA device: the ``cuda`` and ``triton`` backends against the reference."""
from __future__ import annotations

import importlib

import pytest
import torch

from tests.gpu.common import BACKENDS, DEV, DTYPES, require_cuda, tol

pytestmark = pytest.mark.gpu
require_cuda()

from emokernels.ops import backends  # noqa: E402
from emokernels.ops.neuron_edit import neuron_edit, neuron_edit_reference  # noqa: E402

ne_mod = importlib.import_module("emokernels.ops.neuron_edit")

# (B, T, N, n): decode at Llama-3.2-3B width, prefill with the paper's largest layer budget
# (29 neurons), odd sizes, n=1, n=0, n=N, and a large n over many rows
SHAPES = [(1, 1, 8192, 29), (4, 257, 8192, 29), (2, 3, 77, 7), (3, 5, 128, 1), (2, 4, 37, 0),
          (1, 4, 19, 19), (2, 2, 1, 1), (2, 1024, 3000, 600)]


def _inputs(B, T, N, n, dtype, mode="both", E=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(B, T, N, generator=g) * 2).to(dtype)
    index = torch.randperm(N, generator=g)[:n]
    scale = torch.randn(E, n, generator=g) if mode in ("both", "scale") else None
    add = torch.randn(E, n, generator=g) if mode in ("both", "add") else None
    row_idx = torch.randint(0, E, (B,), generator=g)
    strength = torch.rand(B, generator=g) * 2 - 0.5
    pos_mask = torch.rand(B, T, generator=g) > 0.35
    pos_mask[0, -1] = True
    if T > 1:
        pos_mask[-1, 0] = False
    return tuple(t.to(DEV) if t is not None else None
                 for t in (a, index, scale, add, row_idx, strength, pos_mask))



def test_auto_backend_is_cuda():
    backends._reset_for_tests()
    assert backends.resolve_backend(DEV, "auto") == "cuda", backends.cuda_ext_error()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(backend, dtype, shape):
    args = _inputs(*shape, dtype)
    ref = neuron_edit_reference(*args)
    out = neuron_edit(*args, backend=backend)
    assert out.dtype == dtype and out.shape == args[0].shape
    torch.testing.assert_close(out, ref, **tol(dtype))
    if backend == "cuda":  # fp32 math + one round-to-nearest-even, like the reference
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["scale", "add", "none"])
def test_table_modes(backend, mode):
    args = _inputs(3, 17, 300, 13, torch.bfloat16, mode)
    torch.testing.assert_close(neuron_edit(*args, backend=backend), neuron_edit_reference(*args),
                               **tol(torch.bfloat16))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_poisoned_output_and_inplace(backend, dtype):
    args = _inputs(3, 33, 1000, 40, dtype)
    ref = neuron_edit_reference(*args)
    out = torch.full_like(args[0], float("nan"))
    ne_mod._forward(backend, *args, out=out)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, ref, **tol(dtype))
    a2 = args[0].clone()
    with torch.no_grad():
        assert neuron_edit(a2, *args[1:], backend=backend, inplace=True) is a2
    torch.testing.assert_close(a2, ref, **tol(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_ids_are_loud_not_out_of_bounds(backend):
    a, index, scale, add, row_idx, strength, pos_mask = _inputs(2, 3, 64, 4, torch.float32)
    pos_mask[:] = True
    out = neuron_edit(a, index, scale, add, torch.tensor([0, 99], device=DEV), strength, pos_mask,
                      backend=backend)
    torch.cuda.synchronize()
    assert torch.isnan(out[1][:, index]).all() and not torch.isnan(out[0]).any()
    bad = index.clone()
    bad[1] = 1 << 40
    out = neuron_edit(a, bad, scale, add, row_idx, strength, pos_mask, backend=backend)
    torch.cuda.synchronize()
    assert torch.equal(out[..., index[1]], a[..., index[1]])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grad_matches_autograd_of_reference(backend, dtype):
    a, index, scale, add, row_idx, strength, pos_mask = _inputs(2, 9, 200, 12, dtype)
    g = torch.randn(a.shape, device=DEV).to(dtype)
    grads = []
    for fn in (lambda *x: neuron_edit(*x, backend=backend), neuron_edit_reference):
        lv = [t.clone().requires_grad_() for t in (a, scale, add, strength)]
        fn(lv[0], index, lv[1], lv[2], row_idx, lv[3], pos_mask).backward(g)
        grads.append([t.grad for t in lv])
    for x, y in zip(*grads):
        torch.testing.assert_close(x, y, **tol(dtype))


def test_cpu_and_cuda_agree():
    args = _inputs(2, 5, 333, 21, torch.bfloat16)
    cpu_args = tuple(t.cpu() if t is not None else None for t in args)
    torch.testing.assert_close(neuron_edit(*args, backend="cuda").cpu(),
                               neuron_edit(*cpu_args, backend="cpu"), rtol=0, atol=0)


def test_cuda_graph_capture_inplace_decode():
    """No host sync and no allocation on the in-place decode path: it captures in a CUDA graph
    and follows new table rows / strengths written into the captured buffers."""
    a, index, scale, add, row_idx, strength, pos_mask = _inputs(4, 1, 8192, 29, torch.bfloat16)
    a0 = a.clone()
    buf = a.clone()
    with torch.no_grad():
        neuron_edit(buf, index, scale, add, row_idx, strength, pos_mask, backend="cuda",
                    inplace=True)  # warm-up (module load, first launch)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            neuron_edit(buf, index, scale, add, row_idx, strength, pos_mask, backend="cuda",
                        inplace=True)
        for rows, s in (([0, 1, 2, 3], 1.0), ([5, 5, 0, 2], -0.5)):
            row_idx.copy_(torch.tensor(rows))
            strength.fill_(s)
            buf.copy_(a0)
            graph.replay()
            torch.cuda.synchronize()
            ref = neuron_edit_reference(a0, index, scale, add, row_idx, strength, pos_mask)
            torch.testing.assert_close(buf, ref, **tol(torch.bfloat16))
