r"""Component scores and difference vectors from emotional *text* (for models that ignore emotion prompts).

The paper reads components at the readout token of emotion-*instructed* prompts. On small
models that ignore the instruction, that contrast mostly encodes which emotion word sits in
the system prompt (METHOD §11 item 19), and a circuit built on it makes the model *say* the
word ("Disgusting disgusts! ...") rather than take the tone. Here the contexts are the same
SEV (skeleton, valence) groups under the neutral prompt, each continued by emotional replies
(``discover.capture.reference_text_units``); activations are averaged over the reply tokens.

For layer ℓ, context g and emotion e (mean over e's replies in g, then over reply tokens)::

    ā_{g,e,ℓ} ∈ R^{d_ff}   (down_proj input)          z̄_{g,e,ℓ} ∈ R^{H·hd}   (o_proj input)
    Δa_{e,ℓ} = mean_g ( ā_{g,e,ℓ} − mean_{e'} ā_{g,e',ℓ} )     Δz likewise      (METHOD §7.2)

Scores rank a component by what its emotion-specific mean shift writes along the emotion's
direction v (the text-source directions; mlp point for neurons, attn point for heads)::

    C_{ℓ,e,j}  = Δa_{e,ℓ,j} · (W_D,ℓᵀ v^mlp_{e,ℓ})_j                      neurons  [L, E, d_ff]
    I_{ℓ,e,k}  = ⟨ W_O,ℓ[:, k·hd:(k+1)·hd] Δz^{(k)}_{e,ℓ}, v^attn_{e,ℓ} ⟩   heads    [L, E, H]

Both sum exactly to ⟨W_D Δa, v⟩ and ⟨W_O Δz, v⟩: the additive decompositions of §6 applied to
the mean shift. Tables are layer-major, as ``assemble_circuit`` takes them. Groups are streamed:
only the current group's sums are held (memory O(E · L · (d_ff + H·hd))).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..data.labels import EMOTIONS
from ..models.adapters import Adapter
from .diffs import ComponentDiffs


def text_component_tables(model, tokenizer, units: Sequence, directions, *, prompt_config=None, batch_size: int = 8,
                          progress: bool = True):
    """Return ``(C [L, E, d_ff], I [L, E, H], ComponentDiffs)`` from text ``units`` (with replies).

    ``directions``: an ``EmotionDirections`` (text source recommended) of the same model.
    """
    from ..data.prompts import PromptConfig
    from ..patch import Intervention, patch
    from .capture import _render_batch, order_by_group

    if not units or any(u.reply is None for u in units):
        raise ValueError("text components need text units (CaptureUnit with a reply)")
    directions.check_model(model)
    directions = directions.select(EMOTIONS)  # rows by name: the tables below are in EMOTIONS order
    cfg = prompt_config or PromptConfig()
    a = Adapter.of(model)
    L, E, H, hd, F = a.num_layers, len(EMOTIONS), a.num_heads, a.head_dim, a.intermediate_size
    units = order_by_group(units)
    eid = {e: i for i, e in enumerate(EMOTIONS)}
    dev = next(model.parameters()).device

    sums = {"a": torch.zeros(E, L, F, dtype=torch.float64), "z": torch.zeros(E, L, H * hd, dtype=torch.float64)}
    counts = torch.zeros(E, dtype=torch.float64)
    total = {"a": torch.zeros(E, L, F, dtype=torch.float64), "z": torch.zeros(E, L, H * hd, dtype=torch.float64)}
    n_groups = n_incomplete = 0
    rows: dict[str, torch.Tensor] = {}

    def close_group():
        nonlocal n_groups, n_incomplete
        if counts.sum() == 0:
            return
        if (counts > 0).all():
            for k in ("a", "z"):
                m = sums[k] / counts[:, None, None]
                total[k] += m - m.mean(0, keepdim=True)
            n_groups += 1
        else:
            n_incomplete += 1
        for k in ("a", "z"):
            sums[k].zero_()
        counts.zero_()

    def make_cb(kind):
        def cb(layer, x, pos_mask, state):
            m = pos_mask.to(x.dtype)[..., None]
            rows.setdefault(kind, torch.zeros(x.shape[0], L, x.shape[-1], dtype=torch.float64))
            rows[kind][:, layer] = ((x.float() * m).sum(1) / m.sum(1).clamp(min=1)).double().cpu()

        return cb

    ivs = [Intervention(site="neurons", op="capture", layers=range(L), positions="generated", fn=make_cb("a")),
           Intervention(site="heads", op="capture", layers=range(L), positions="generated", fn=make_cb("z"))]
    current = None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(units), desc="components (text)", unit="unit")
    with torch.no_grad(), patch(model, *ivs) as handle:
        for i in range(0, len(units), batch_size):
            chunk = units[i : i + batch_size]
            batch = _render_batch(tokenizer, chunk, cfg, "text")
            mask = batch["attention_mask"].to(dev)
            handle.set_readout(batch["readout"].to(dev))
            rows.clear()
            a.backbone(input_ids=batch["input_ids"].to(dev), attention_mask=mask,
                       position_ids=(mask.long().cumsum(-1) - 1).clamp(min=0), use_cache=False)
            for b, u in enumerate(chunk):
                if u.group != current:
                    close_group()
                    current = u.group
                e = eid[u.emotion]
                sums["a"][e] += rows["a"][b]
                sums["z"][e] += rows["z"][b]
                counts[e] += 1
            if bar is not None:
                bar.update(len(chunk))
    close_group()
    if bar is not None:
        bar.close()
    if n_groups == 0:
        raise ValueError("no context had replies of all six emotions")
    da = (total["a"] / n_groups).float().transpose(0, 1).contiguous()  # [L, E, d_ff]
    dz = (total["z"] / n_groups).float().transpose(0, 1).contiguous()  # [L, E, H·hd]

    v_attn = directions.directions[directions.point_index("attn")].float()  # [L, E, d]
    v_mlp = directions.directions[directions.point_index("mlp")].float()
    C = torch.empty(L, E, F)
    I = torch.empty(L, E, H)
    for l in range(L):
        s = a.sites(l)
        WD = s.down_proj.weight.float().cpu()  # [d, d_ff]
        WO = s.o_proj.weight.float().cpu()  # [d, H·hd]
        C[l] = da[l] * (v_mlp[l] @ WD)  # Δa_j · β_j
        proj = v_attn[l] @ WO  # [E, H·hd]: W_Oᵀ v per channel
        I[l] = (dz[l] * proj).view(E, H, hd).sum(-1)
    diffs = ComponentDiffs(dz=dz, da=da, layers=tuple(range(L)), n_groups=n_groups, n_incomplete=n_incomplete,
                           head_dim=hd, meta={"source": "text"})
    return C, I, diffs
