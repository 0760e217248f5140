"""Tiny random-weight configs of real architectures, for fast exact tests.

Each has 4 layers, hidden 64, 4 query heads of dim 16 with 2 KV heads (GQA), MLP 176
(not a power of two on purpose). They share SmolLM2's tokenizer when it is installed (so
chat-templated prompts work end to end), else a vocabulary of 512 and no tokenizer.
"""
from __future__ import annotations

import torch

FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "phi3")


def _config(family: str, vocab: int):
    import transformers as tf

    common = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=176, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rms_norm_eps=1e-6, tie_word_embeddings=False,
    )
    if family == "llama":
        return tf.LlamaConfig(**common)
    if family == "qwen2":
        return tf.Qwen2Config(**common)
    if family == "qwen3":
        return tf.Qwen3Config(**common, head_dim=16)
    if family == "mistral":
        return tf.MistralConfig(**common, sliding_window=None)
    if family == "gemma2":
        return tf.Gemma2Config(**common, head_dim=16, query_pre_attn_scalar=16, sliding_window=64)
    if family == "gemma3":
        # windowed and global layers alternate (the real model: 5 to 1), each kind with its rotary base
        return tf.Gemma3TextConfig(**common, head_dim=16, query_pre_attn_scalar=16, sliding_window=64,
                                   layer_types=["sliding_attention", "full_attention"] * 2)
    if family == "phi3":
        return tf.Phi3Config(**common, pad_token_id=0)
    raise ValueError(f"unknown tiny family {family!r}; choose one of {', '.join(FAMILIES)}")


_TOKENIZER = None


def shared_tokenizer():
    """SmolLM2's tokenizer (from the model cache or its GGUF), or None if not installed."""
    global _TOKENIZER
    if _TOKENIZER is None:
        from transformers import AutoTokenizer

        from .loader import ZOO, ModelNotInstalledError, _dequantized_cache_dir, gguf_path

        cached = _dequantized_cache_dir("smollm2-135m")
        try:
            if (cached / "tokenizer_config.json").exists():
                _TOKENIZER = AutoTokenizer.from_pretrained(cached, local_files_only=True)
            else:
                p = gguf_path(ZOO["smollm2-135m"])
                _TOKENIZER = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name, local_files_only=True)
        except ModelNotInstalledError:
            return None
        if _TOKENIZER.pad_token is None:
            _TOKENIZER.pad_token = _TOKENIZER.eos_token
    return _TOKENIZER


def tiny_model(family: str, dtype: torch.dtype = torch.float32, seed: int = 0, with_tokenizer: bool = True):
    """Return ``(model, tokenizer_or_None)``: a seeded random model of ``family``."""
    from transformers import AutoModelForCausalLM

    tok = shared_tokenizer() if with_tokenizer else None
    vocab = len(tok) if tok is not None else 512
    cfg = _config(family, vocab)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # Random init gives tiny RMSNorm-free signals; scale weights so activations are O(1).
    model = model.to(dtype).eval()
    model._emokernels_name = f"tiny-{family}"
    model.generation_config.pad_token_id = tok.pad_token_id if tok is not None else 0
    return model, tok
