import torch

from emokernels.data.sev import load_split
from emokernels.discover.capture import reference_text_units
from emokernels.discover.directions import estimate
from emokernels.discover.text_components import text_component_tables
from emokernels.models import Adapter
from tests.helpers import tiny


def _refs():
    return {e: [f"This is a short {e} reply number {k}." for k in range(2)]
            for e in ("anger", "sadness", "happiness", "fear", "surprise", "disgust")}


def test_text_components_are_exact_decompositions_of_the_mean_shift():
    model, tok = tiny("llama")
    units = reference_text_units(load_split("train", limit=2), _refs())
    dirs, _ = estimate(model, tok, units, source="text", progress=False)
    C, I, diffs = text_component_tables(model, tok, units, dirs, batch_size=5, progress=False)
    a = Adapter.of(model)
    assert C.shape == (4, 6, a.intermediate_size) and I.shape == (4, 6, a.num_heads)
    assert diffs.n_groups == 6 and diffs.n_incomplete == 0
    torch.testing.assert_close(diffs.da.sum(1), torch.zeros_like(diffs.da[:, 0]), atol=1e-5, rtol=0)  # Σ_e Δ = 0
    for l in range(4):
        s = a.sites(l)
        v_mlp = dirs.directions[1, l]  # [E, d]
        v_attn = dirs.directions[0, l]
        want_n = ((diffs.da[l] @ s.down_proj.weight.float().T) * v_mlp).sum(-1)  # ⟨W_D Δa, v⟩ per emotion
        want_h = ((diffs.dz[l] @ s.o_proj.weight.float().T) * v_attn).sum(-1)
        torch.testing.assert_close(C[l].sum(-1), want_n, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(I[l].sum(-1), want_h, rtol=1e-4, atol=1e-5)


def test_batching_does_not_change_the_tables():
    model, tok = tiny("qwen2")
    units = reference_text_units(load_split("train", limit=1), _refs())
    dirs, _ = estimate(model, tok, units, source="text", progress=False)
    C1, I1, d1 = text_component_tables(model, tok, units, dirs, batch_size=1, progress=False)
    C2, I2, d2 = text_component_tables(model, tok, units, dirs, batch_size=7, progress=False)
    torch.testing.assert_close(d1.da, d2.da, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(I1, I2, rtol=1e-4, atol=1e-5)
