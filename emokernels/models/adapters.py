"""Architecture adapters: where each intervention site lives in each model family.

Per decoder layer ℓ (notation of METHOD.md §0):

    x  = norm_in(h)                 attention input
    z  = concat_k head_k(x)         o_proj input, head k owns channels [k·hd, (k+1)·hd)
    A  = attn_post(W_O z)           attention sublayer output (attn_post = identity, or Gemma's post-attention norm)
    m  = h + A                      mid residual
    n  = norm_mlp(m)                MLP input
    a  = act(W_G n) ⊙ (W_U n)       neuron activations (down_proj input)
    F  = mlp_post(W_D a)            MLP sublayer output
    h' = m + F                      post-block residual (the next layer's h)

The adapter names the modules whose inputs/outputs are these tensors, so hooks (reference
engine) and patched layers (fused path) find them the same way in every family.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LayerSites:
    """Modules of one decoder layer. ``*_out`` modules produce the sublayer output that joins the residual."""

    layer: nn.Module
    norm_in: nn.Module
    attn: nn.Module
    o_proj: nn.Module  # input z [.., H*hd], output W_O z
    attn_out: nn.Module  # output = A
    norm_mlp: nn.Module  # output = n (MLP input)
    mlp: nn.Module
    down_proj: nn.Module  # input a [.., d_ff]
    mlp_out: nn.Module  # output = F
    attn_post: nn.Module | None = None  # Gemma's post-attention norm (A = attn_post(W_O z)); None elsewhere
    mlp_post: nn.Module | None = None  # Gemma's post-MLP norm (F = mlp_post(W_D a)); None elsewhere


@dataclass(frozen=True)
class FamilySpec:
    norm_mlp: str  # attribute of the layer: the norm producing the MLP input
    attn_post: str | None  # norm applied to the attention output before the residual add
    mlp_post: str | None  # norm applied to the MLP output before the residual add
    gemma_norm: bool = False  # Gemma RMSNorm scales by (1 + weight)


FAMILIES: dict[str, FamilySpec] = {
    "llama": FamilySpec("post_attention_layernorm", None, None),
    "qwen2": FamilySpec("post_attention_layernorm", None, None),
    "qwen3": FamilySpec("post_attention_layernorm", None, None),
    "mistral": FamilySpec("post_attention_layernorm", None, None),
    "phi3": FamilySpec("post_attention_layernorm", None, None),
    "gemma2": FamilySpec("pre_feedforward_layernorm", "post_attention_layernorm", "post_feedforward_layernorm", True),
    "gemma3_text": FamilySpec("pre_feedforward_layernorm", "post_attention_layernorm", "post_feedforward_layernorm", True),
    "gemma3": FamilySpec("pre_feedforward_layernorm", "post_attention_layernorm", "post_feedforward_layernorm", True),
}


class UnsupportedArchitectureError(ValueError):
    pass


class Adapter:
    """Uniform view of a decoder-only HF model. Build with ``Adapter.of(model)``."""

    def __init__(self, model: nn.Module):
        cfg = model.config
        family = getattr(cfg, "model_type", None)
        if family not in FAMILIES:
            raise UnsupportedArchitectureError(
                f"unsupported architecture {family!r} ({type(model).__name__}); supported model_type values: "
                + ", ".join(sorted(FAMILIES))
            )
        self.model = model
        self.family = family
        self.spec = FAMILIES[family]
        # LlamaModel & co (embed_tokens, layers, norm): ``model.model`` of a causal LM, or the model
        # itself when a bare backbone is passed (its forward is where the patch's pre-hook sits)
        backbone = getattr(model, "model", None)
        if not isinstance(getattr(backbone, "layers", None), nn.ModuleList):
            backbone = model if isinstance(getattr(model, "layers", None), nn.ModuleList) else None
        if backbone is None:
            raise UnsupportedArchitectureError(
                f"{type(model).__name__} has no decoder layers: pass the causal LM (e.g. LlamaForCausalLM, "
                "layers at model.model.layers) or its bare backbone (e.g. LlamaModel, layers at model.layers)")
        self.backbone = backbone
        self.layers = list(self.backbone.layers)
        self.num_layers = len(self.layers)
        self.hidden_size = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.intermediate_size = cfg.intermediate_size
        self.final_norm = self.backbone.norm
        # transformers >= 5.2x names the cache argument ``cache``; earlier 5.x ``past_key_values``
        self.cache_kwarg = "cache" if "cache" in inspect.signature(self.backbone.forward).parameters else "past_key_values"

    @classmethod
    def of(cls, model: nn.Module) -> "Adapter":
        cached = getattr(model, "_emokernels_adapter", None)
        if cached is None:
            cached = cls(model)
            model._emokernels_adapter = cached  # plain attribute, not a submodule/parameter
        return cached

    def sites(self, layer: int) -> LayerSites:
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range: the model has {self.num_layers} layers (0..{self.num_layers - 1})")
        L = self.layers[layer]
        s = self.spec
        attn = L.self_attn
        attn_post = getattr(L, s.attn_post) if s.attn_post else None
        mlp_post = getattr(L, s.mlp_post) if s.mlp_post else None
        return LayerSites(
            layer=L,
            norm_in=L.input_layernorm,
            attn=attn,
            o_proj=attn.o_proj,
            attn_out=attn_post or attn.o_proj,
            norm_mlp=getattr(L, s.norm_mlp),
            mlp=L.mlp,
            down_proj=L.mlp.down_proj,
            mlp_out=mlp_post or L.mlp,
            attn_post=attn_post,
            mlp_post=mlp_post,
        )

    def kv_head_of(self, head: int) -> int:
        """GQA: query head ``head`` reads key/value head ``head // (H / H_kv)``."""
        return head // (self.num_heads // self.num_kv_heads)

    def norm_gamma(self, norm: nn.Module) -> torch.Tensor:
        """The effective elementwise scale γ of an RMSNorm module (Gemma stores γ - 1)."""
        w = norm.weight.float()
        return (1.0 + w) if self.spec.gemma_norm else w

    @staticmethod
    def norm_eps(norm: nn.Module) -> float:
        for name in ("variance_epsilon", "eps"):
            if hasattr(norm, name):
                return float(getattr(norm, name))
        raise AttributeError(f"cannot find the epsilon of {type(norm).__name__}")

    def describe(self) -> dict:
        return dict(
            family=self.family, num_layers=self.num_layers, hidden_size=self.hidden_size,
            num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
            intermediate_size=self.intermediate_size,
        )
