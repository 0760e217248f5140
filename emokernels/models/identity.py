"""Which model an artifact belongs to: a name and a hash of the architecture-defining config.

Directions and circuits of one model are only meaningful on that model. A shape check alone
accepts another model of the same shape (SmolLM2-135M base vs Instruct, Qwen2.5 vs
Qwen2.5-Coder), so artifacts record :func:`model_identity` and :func:`check_identity` refuses
a mismatch unless the caller passes ``allow_model_mismatch=True`` (CLI ``--allow-model-mismatch``).

* ``name``: the name the model was loaded by (zoo name, Hub id or folder; ``model_name_of``).
  Names are compared by their last path component, case-insensitively, with zoo names standing
  for their checkpoint, so a zoo name, its Hub id and a local folder of it agree.
* ``config_hash``: sha256 (16 hex) over the fields in :data:`CONFIG_FIELDS` of the (text) config:
  everything that fixes the tensor shapes or the forward computation. Not dtype, paths,
  generation settings or the transformers version, so reloading in another precision or on
  another machine gives the same hash.
"""
from __future__ import annotations

import hashlib
import json
import warnings

CONFIG_FIELDS = (
    "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "intermediate_size", "vocab_size", "hidden_act", "hidden_activation", "rms_norm_eps", "rope_theta",
    "tie_word_embeddings", "sliding_window", "attention_bias", "mlp_bias", "query_pre_attn_scalar",
    "attn_logit_softcapping", "final_logit_softcapping",
)


class ModelMismatchError(ValueError):
    """An artifact was made on another model than the one it is applied to."""


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def config_fields(config) -> dict:
    """The :data:`CONFIG_FIELDS` of ``config`` (a ``PretrainedConfig`` or a dict); absent ones are None."""
    if not isinstance(config, dict):
        config = _text_config(config).to_dict()
    out = {}
    for k in CONFIG_FIELDS:
        v = config.get(k)
        if isinstance(v, float):  # 6 significant digits: a GGUF stores eps as fp32 (1e-05 -> 9.9999997e-06)
            v = float(f"{v:.6g}")
        out[k] = v if isinstance(v, (bool, int, float, str)) or v is None else str(v)
    return out


def config_hash(config) -> str:
    return hashlib.sha256(json.dumps(config_fields(config), sort_keys=True).encode()).hexdigest()[:16]


def model_identity(model) -> dict:
    """``{"name", "config_hash", "config"}`` of a loaded model (``config`` = the hashed fields)."""
    from .loader import model_name_of

    fields = config_fields(model.config)
    return {"name": str(model_name_of(model)), "config_hash": config_hash(fields), "config": fields}


def _name_key(name: str | None) -> str:
    """What two names must share to name one model: the last path component, lower case, without
    ``.gguf`` and a quantisation suffix; a zoo name stands for its checkpoint (``smollm2-135m`` ->
    ``smollm2-135m-instruct``, as its Hub id ``HuggingFaceTB/SmolLM2-135M-Instruct``)."""
    import re

    from .loader import ZOO

    name = (name or "").rstrip("/\\")
    if name in ZOO:
        name = ZOO[name].gguf_name
    base = name.replace("\\", "/").rsplit("/", 1)[-1].lower()
    base = base[:-5] if base.endswith(".gguf") else base
    return re.sub(r"[.-](q\d\w*|f16|f32|bf16)$", "", base)


def describe(identity: dict | None) -> str:
    if not identity:
        return "an unrecorded model"
    return f"{identity.get('name') or '?'} (config {identity.get('config_hash')})"


def mismatch(stored: dict, actual: dict) -> list[str]:
    """What differs between two identities: the name and the differing config fields."""
    out = []
    sn, an = _name_key(stored.get("name")), _name_key(actual.get("name"))
    if sn and an and sn != an:
        out.append(f"name {stored.get('name')!r} vs {actual.get('name')!r}")
    # The stored fields are hashed again: a file written before the float rounding of
    # config_fields (or by hand) compares by what its fields say, not by its old hash.
    sc, ac = (config_fields(x["config"]) if x.get("config") else {} for x in (stored, actual))
    stored_hash = config_hash(sc) if sc else stored.get("config_hash")
    if stored_hash != (config_hash(ac) if ac else actual.get("config_hash")):
        diff = [f"{k} {sc.get(k)!r} vs {ac.get(k)!r}" for k in CONFIG_FIELDS if sc.get(k) != ac.get(k)]
        out.append("config " + ("; ".join(diff) if diff else f"hash {stored.get('config_hash')} vs {actual.get('config_hash')}"))
    return out


def check_identity(stored: dict | None, model, what: str, allow_mismatch: bool = False) -> None:
    """Raise :class:`ModelMismatchError` if ``stored`` (an artifact's identity) is not ``model``.

    ``stored=None`` (an artifact from before identities were recorded, or built in memory
    without one) passes: such files are warned about when loaded (:func:`warn_unrecorded`).
    ``allow_mismatch=True`` turns the error into a warning.
    """
    if not stored:
        return
    actual = model_identity(model)
    diff = mismatch(stored, actual)
    if not diff:
        return
    msg = (f"{what} was made on {describe(stored)}, not on this model {describe(actual)}: " + "; ".join(diff)
           + ". Directions and circuits do not transfer between models; pass allow_model_mismatch=True "
           "(CLI --allow-model-mismatch) to apply it anyway")
    if allow_mismatch:
        warnings.warn(msg.split(". Directions")[0] + " (allowed by allow_model_mismatch)", stacklevel=3)
        return
    raise ModelMismatchError(msg)


def warn_unrecorded(path, what: str) -> None:
    warnings.warn(f"{path}: this {what} records no model identity (written before identities were "
                  "stored); only its shape can be checked against a model", stacklevel=3)


__all__ = ["CONFIG_FIELDS", "ModelMismatchError", "model_identity", "config_hash", "config_fields", "check_identity",
           "mismatch", "warn_unrecorded"]
