"""Shared test utilities: tiny models and prompt batches."""
from __future__ import annotations

import functools

import torch

from emokernels.data.prompts import chat_messages, encode, render
from emokernels.models import load

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3")


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
