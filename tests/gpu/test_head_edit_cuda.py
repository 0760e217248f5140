"""head_edit on a CUDA device: the ``cuda`` and ``triton`` backends against the reference."""
from __future__ import annotations

import importlib

import pytest
import torch

from tests.gpu.common import BACKENDS, DEV, DTYPES, require_cuda, tol

pytestmark = pytest.mark.gpu
require_cuda()

from emokernels.ops import backends  # noqa: E402
from emokernels.ops.head_edit import head_edit, head_edit_reference  # noqa: E402

he_mod = importlib.import_module("emokernels.ops.head_edit")

# (B, T, H, hd, n): Llama-3.2-3B decode and prefill (24 x 128, up to 12 heads), hd 64 / 40 / 96 /
# 7 / 1 (non-powers of 2: masked Triton tails, CUDA tiles of 2048 // hd rows), n=0, n=H
SHAPES = [(1, 1, 24, 128, 12), (4, 257, 24, 128, 12), (2, 33, 16, 64, 5), (2, 3, 6, 40, 2),
          (3, 70, 4, 96, 1), (2, 4, 5, 64, 0), (1, 4, 3, 16, 3), (2, 2, 1, 1, 1), (2, 9, 4, 7, 2)]


def _inputs(B, T, H, hd, n, dtype, mode="both", E=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(B, T, H * hd, generator=g) * 2).to(dtype)
    head_index = torch.randperm(H, generator=g)[:n]
    scale = torch.randn(E, n, generator=g) if mode in ("both", "scale") else None
    add = torch.randn(E, n, hd, generator=g) if mode in ("both", "add") else None
    row_idx = torch.randint(0, E, (B,), generator=g)
    strength = torch.rand(B, generator=g) * 2 - 0.5
    pos_mask = torch.rand(B, T, generator=g) > 0.35
    pos_mask[0, -1] = True
    if T > 1:
        pos_mask[-1, 0] = False
    dev = [t.to(DEV) if t is not None else None
           for t in (z, head_index, scale, add, row_idx, strength, pos_mask)]
    return (dev[0], dev[1], hd, *dev[2:])



def test_auto_backend_is_cuda():
    backends._reset_for_tests()
    assert backends.resolve_backend(DEV, "auto") == "cuda", backends.cuda_ext_error()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(backend, dtype, shape):
    args = _inputs(*shape, dtype)
    ref = head_edit_reference(*args)
    out = head_edit(*args, backend=backend)
    assert out.dtype == dtype and out.shape == args[0].shape
    torch.testing.assert_close(out, ref, **tol(dtype))
    if backend == "cuda":  # fp32 math + one round-to-nearest-even, like the reference
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["scale", "add", "none"])
def test_table_modes(backend, mode):
    args = _inputs(3, 17, 8, 40, 3, torch.bfloat16, mode)
    torch.testing.assert_close(head_edit(*args, backend=backend), head_edit_reference(*args),
                               **tol(torch.bfloat16))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_poisoned_output_and_inplace(backend, dtype):
    args = _inputs(3, 33, 8, 96, 3, dtype)
    ref = head_edit_reference(*args)
    out = torch.full_like(args[0], float("nan"))
    he_mod._forward(backend, *args, out=out)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, ref, **tol(dtype))
    z2 = args[0].clone()
    with torch.no_grad():
        assert head_edit(z2, *args[1:], backend=backend, inplace=True) is z2
    torch.testing.assert_close(z2, ref, **tol(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_ids_are_loud_not_out_of_bounds(backend):
    z, hidx, hd, scale, add, row_idx, strength, pos_mask = _inputs(2, 3, 4, 40, 2, torch.float32)
    pos_mask[:] = True
    out = head_edit(z, hidx, hd, scale, add, torch.tensor([0, 99], device=DEV), strength,
                    pos_mask, backend=backend)
    torch.cuda.synchronize()
    h = int(hidx[0])
    assert torch.isnan(out[1, :, h * hd:(h + 1) * hd]).all() and not torch.isnan(out[0]).any()
    bad = torch.tensor([1 << 40, h], device=DEV)
    out = head_edit(z, bad, hd, scale, add, row_idx, strength, pos_mask, backend=backend)
    torch.cuda.synchronize()
    untouched = torch.ones(z.shape[-1], dtype=torch.bool, device=DEV)
    untouched[h * hd:(h + 1) * hd] = False
    assert torch.equal(out[..., untouched], z[..., untouched])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grad_matches_autograd_of_reference(backend, dtype):
    z, hidx, hd, scale, add, row_idx, strength, pos_mask = _inputs(2, 9, 6, 40, 3, dtype)
    g = torch.randn(z.shape, device=DEV).to(dtype)
    grads = []
    for fn in (lambda *x: head_edit(*x, backend=backend), head_edit_reference):
        lv = [t.clone().requires_grad_() for t in (z, scale, add, strength)]
        fn(lv[0], hidx, hd, lv[1], lv[2], row_idx, lv[3], pos_mask).backward(g)
        grads.append([t.grad for t in lv])
    for x, y in zip(*grads):
        torch.testing.assert_close(x, y, **tol(dtype))


def test_cpu_and_cuda_agree():
    args = _inputs(2, 5, 6, 40, 3, torch.bfloat16)
    cpu_args = tuple(t.cpu() if isinstance(t, torch.Tensor) else t for t in args)
    torch.testing.assert_close(head_edit(*args, backend="cuda").cpu(),
                               head_edit(*cpu_args, backend="cpu"), rtol=0, atol=0)


def test_cuda_graph_capture_inplace_decode():
    """The in-place decode path neither syncs nor allocates: it captures in a CUDA graph."""
    z, hidx, hd, scale, add, row_idx, strength, pos_mask = _inputs(4, 1, 24, 128, 12,
                                                                   torch.bfloat16)
    z0 = z.clone()
    buf = z.clone()
    with torch.no_grad():
        head_edit(buf, hidx, hd, scale, add, row_idx, strength, pos_mask, backend="cuda",
                  inplace=True)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            head_edit(buf, hidx, hd, scale, add, row_idx, strength, pos_mask, backend="cuda",
                      inplace=True)
        for rows, s in (([0, 1, 2, 3], 1.0), ([5, 5, 0, 2], -0.5)):
            row_idx.copy_(torch.tensor(rows))
            strength.fill_(s)
            buf.copy_(z0)
            graph.replay()
            torch.cuda.synchronize()
            ref = head_edit_reference(z0, hidx, hd, scale, add, row_idx, strength, pos_mask)
            torch.testing.assert_close(buf, ref, **tol(torch.bfloat16))
