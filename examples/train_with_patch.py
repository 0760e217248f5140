"""Train through a fused patch: learn a steering direction (and fine-tune one layer) by gradient descent.

A custom training loop on a tiny random-weight Llama (no download) with an emotion-steering
patch active on the fused backend. The interventions ride inside the fused residual-add + RMSNorm
kernels of the patched decoder layers, and gradients flow through them to

* ``direction`` — a trainable [E, d] table: one steering vector per "emotion" (per batch row),
  added as ``h += s · rms(h) · v_e`` after layers 1 and 2 (``add_rms`` at ``resid_post``);
* ``strength`` — the per-row steering strength;
* every parameter of decoder layer 2 (LoRA-free fine-tuning of one layer).

The objective is next-token cross-entropy on a few texts, plus a small penalty keeping the
readout projection onto the direction (read in the same fused pass, ``project`` at
``resid_mid``) bounded. Run ``python examples/train_with_patch.py --steps 20``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emokernels import Intervention, patch  # noqa: E402
from emokernels.models import Adapter, load  # noqa: E402

TEXTS = [
    "I waited two hours and nobody even said sorry.",
    "They cancelled my flight again, for the third time.",
    "My neighbour played loud music all night long.",
]


def batch_for(tok, vocab: int):
    if tok is not None:
        enc = tok(TEXTS, return_tensors="pt", padding=True)
        return enc["input_ids"], enc["attention_mask"]
    g = torch.Generator().manual_seed(0)  # no tokenizer installed: random token ids
    ids = torch.randint(10, vocab, (len(TEXTS), 12), generator=g)
    return ids, torch.ones_like(ids)


def main(steps: int = 20, lr: float = 0.05, backend: str = "fused", log: bool = True) -> list[float]:
    torch.manual_seed(0)
    model, tok = load("tiny-llama", dtype=torch.float32)
    model.train()
    a = Adapter.of(model)
    ids, mask = batch_for(tok, model.config.vocab_size)
    B = ids.shape[0]

    direction = torch.nn.Parameter(0.05 * torch.randn(B, a.hidden_size))   # one row per "emotion"
    strength = torch.nn.Parameter(torch.ones(B))
    layer = a.layers[2]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in layer.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW([{"params": [direction, strength], "lr": lr},
                             {"params": list(layer.parameters()), "lr": lr / 10}])

    rows = torch.arange(B)  # row b steers with emotion b
    ivs = [
        Intervention(site="resid_post", op="add_rms", layers=(1, 2), positions="all",
                     vectors={1: direction, 2: direction}, rows=rows, strength=strength),
        Intervention(site="resid_mid", op="project", layers=(3,), positions="readout",
                     directions={3: direction}, name="proj"),
    ]
    labels = ids.masked_fill(mask == 0, -100)
    position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
    losses = []
    with patch(model, *ivs, backend=backend) as h:
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, labels=labels)
            proj = h.captures["proj"][3].pop()            # [B, E] fp32, read in the fused pass
            loss = out.loss + 1e-3 * proj.square().mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if log:
                print(f"step {step:3d}  loss {loss.item():.4f}  |v| {direction.norm(dim=-1).mean():.3f}  "
                      f"s {strength.detach().tolist()}")
    return losses


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--backend", default="fused", help="fused (default) or reference (the hook oracle)")
    a = p.parse_args()
    main(a.steps, a.lr, a.backend)
