"""Shared test utilities: tiny models and prompt batches."""
from __future__ import annotations

import functools

import torch

from emokernels.data.prompts import chat_messages, encode, render
from emokernels.models import load
from emokernels.models.tiny import FAMILIES  # noqa: F401  (the tiny model of every family row)


@functools.lru_cache(maxsize=None)
def tiny(family: str = "llama", dtype=torch.float32):
    model, tok = load(f"tiny-{family}", dtype=dtype)
    return model, tok


@functools.lru_cache(maxsize=None)
def smollm(dtype=torch.float32):
    return load("smollm2-135m", dtype=dtype)


USERS = [
    "I sent the report to my manager.\nShe replied within an hour.",
    "My train was scheduled for eight.\nIt left on time and I found a seat.",
    "I ordered a chair online.\nThe package arrived with a broken leg.",
]


def prompt_batch(tok, emotions=(None, "anger", "fear"), padding_side="left"):
    texts = [render(tok, chat_messages(u, e)) for u, e in zip(USERS, emotions)]
    return encode(tok, texts, padding_side=padding_side)


def emotion_batch(tok, emotions=(0, 3, 5)):
    """:func:`prompt_batch` plus the emotion index each row is scored for (``"emotion"`` [B])."""
    b = prompt_batch(tok)
    b["emotion"] = torch.tensor(emotions)
    return b


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def random_directions(model, seed: int = 0) -> torch.Tensor:
    """Unit random directions [L, 6, d] for the model's residual width."""
    from emokernels.models import Adapter

    a = Adapter.of(model)
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(a.num_layers, 6, a.hidden_size, generator=g)
    return d / d.norm(dim=-1, keepdim=True)


def op_backends() -> list[str]:
    """Backends the op tests run here: reference and C++, plus Triton when interpreted."""
    from emokernels.ops import backends

    out = ["reference", "cpu"]
    if backends.triton_available() and backends.triton_interpreting():
        out.append("triton")
    return out


def op_cases(gpu_backends=("cuda", "triton")) -> list:
    """``(device, backend)`` pairs of the op tests: :func:`op_backends` on the CPU, then
    ``gpu_backends`` on ``cuda`` (marked ``gpu``: skipped without a CUDA device). One test body
    serves both machines."""
    import pytest

    cpu = [pytest.param("cpu", b, id=f"cpu-{b}") for b in op_backends()]
    return cpu + [pytest.param("cuda", b, id=f"cuda-{b}", marks=pytest.mark.gpu) for b in gpu_backends]


def compile_matches_eager(f, inputs, rtol=1e-4, atol=1e-5) -> set[str]:
    """``torch.compile(f, fullgraph=True)`` against eager ``f`` on leaf copies of ``inputs``: the
    value and every input's gradient. Returns the op names in the compiled graph (to tell a traced
    reference from the opaque ``emokernels::*`` custom op)."""
    seen: set[str] = set()

    def recording(gm, example_inputs):
        seen.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    cf = torch.compile(f, fullgraph=True, backend=recording)
    leaves = [t.clone().requires_grad_() for t in inputs]
    ref_leaves = [t.clone().requires_grad_() for t in inputs]
    out = cf(*leaves)
    out.backward()
    ref = f(*ref_leaves)
    ref.backward()
    torch.testing.assert_close(out, ref)
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, b.grad, rtol=rtol, atol=atol)
    return seen


def uses_custom_op(graph_ops: set[str]) -> bool:
    return any("emokernels" in t for t in graph_ops)


# fused_add_rmsnorm test configurations: (edit, rms_scale, norm, gemma, project)
FUSED_CONFIGS = {
    "add_norm": (False, False, True, False, False),          # plain HF residual add + RMSNorm
    "edit_norm": (True, False, True, False, False),          # compiled bias at attn_out/resid_mid
    "steer_norm_proj": (True, True, True, False, True),      # steering + readout projections
    "gemma_proj": (True, False, True, True, True),
    "post_edit": (True, True, False, False, False),          # post-MLP add (gamma=None)
    "post_proj": (False, False, False, False, True),
}


def fused_residual_inputs(B, T, d, dtype, cfg, table_dtype=torch.float32, E=4, K=3, seed=0, device="cpu"):
    """``(residual, delta, kwargs)`` for ``fused_add_rmsnorm`` under ``cfg`` (a FUSED_CONFIGS value),
    drawn on the CPU from ``seed`` and moved to ``device``."""
    edit, rms, norm, gemma, proj = cfg
    g = torch.Generator().manual_seed(seed)
    res = (torch.randn(B, T, d, generator=g) * 2).to(dtype)
    delta = torch.randn(B, T, d, generator=g).to(dtype)
    kw = dict(rms_scale=rms, gemma=gemma, eps=1e-6)
    if edit:
        kw["table"] = torch.randn(E, d, generator=g).to(table_dtype)
        kw["row_idx"] = torch.randint(0, E, (B,), generator=g)
        kw["strength"] = torch.rand(B, generator=g) * 2 - 0.5
        pm = torch.rand(B, T, generator=g) > 0.35
        pm[0, -1] = True  # at least one edited position
        if T > 1:
            pm[-1, 0] = False  # at least one kept position
        kw["pos_mask"] = pm
    if norm:
        kw["gamma"] = (torch.rand(d, generator=g) + 0.5).to(dtype)
    if proj:
        kw["directions"] = torch.randn(K, d, generator=g)
        kw["readout"] = torch.randint(0, T, (B,), generator=g)
    mv = lambda t: t.to(device) if torch.is_tensor(t) else t  # noqa: E731
    return res.to(device), delta.to(device), {k: mv(v) for k, v in kw.items()}
