import pytest
import torch

from emokernels import Intervention, patch
from emokernels.models import Adapter, UnsupportedArchitectureError
from tests.helpers import FAMILIES, position_ids, prompt_batch, smollm, tiny


def _capture_all(model, batch, sites):
    L = Adapter.of(model).num_layers
    ivs = [Intervention(site=s, op="capture", layers=range(L), positions="readout", name=s) for s in sites]
    with patch(model, *ivs) as h, torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=position_ids(batch["attention_mask"]), output_hidden_states=True)
    return h.captures, out


@pytest.mark.parametrize("family", FAMILIES)
def test_captured_residuals_equal_hidden_states(family):
    model, tok = tiny(family)
    batch = prompt_batch(tok)
    sites = ["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"]
    caps, out = _capture_all(model, batch, sites)
    r = batch["readout"]
    rows = torch.arange(len(r))
    L = Adapter.of(model).num_layers
    for l in range(L):
        pre = caps["resid_pre"][l][0]
        assert torch.equal(pre, out.hidden_states[l][rows, r])
        if l < L - 1:  # HF's last hidden state is post-final-norm (METHOD §3)
            assert torch.equal(caps["resid_post"][l][0], out.hidden_states[l + 1][rows, r])
        mid = caps["resid_mid"][l][0]
        torch.testing.assert_close(mid, pre + caps["attn_out"][l][0])
        torch.testing.assert_close(caps["resid_post"][l][0], mid + caps["mlp_out"][l][0])


def test_a_llama_shaped_family_is_one_row(monkeypatch):
    """One FamilySpec row makes a new model_type load as a tiny model, adapt and run fused."""
    from emokernels.models import adapters
    from emokernels.models.tiny import tiny_model

    monkeypatch.setitem(adapters.FAMILIES, "newfam", adapters.FamilySpec("LlamaConfig"))
    monkeypatch.setitem(adapters.TINY_FAMILIES, "newfam", "newfam")
    model, _ = tiny_model("newfam", with_tokenizer=False)
    model.config.model_type = "newfam"  # what a new transformers class would report
    a = Adapter.of(model)
    assert a.family == "newfam" and a.sites(1).norm_mlp is a.layers[1].post_attention_layernorm
    ids = torch.randint(0, 512, (2, 5))
    iv = Intervention(site="resid_mid", op="add", layers=[1], positions="all",
                      vectors={1: torch.randn(3, a.hidden_size)}, rows=torch.tensor([0, 2]))
    with torch.no_grad():
        with patch(model, iv, backend="reference"):
            ref = model(input_ids=ids).logits
        with patch(model, iv, backend="fused"):
            assert "forward" in a.layers[1].__dict__  # the fused decoder layer is installed
            fused = model(input_ids=ids).logits
    torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-4)


def test_readout_right_and_left_padding_match_single_rows():
    model, tok = tiny("qwen2")
    for side in ("left", "right"):
        batch = prompt_batch(tok, padding_side=side)
        caps, _ = _capture_all(model, batch, ["resid_post"])
        for i in range(3):
            single = {k: v[i : i + 1][:, batch["attention_mask"][i].bool()] if v.dim() == 2 else v[i : i + 1]
                      for k, v in batch.items() if k != "readout"}
            single["readout"] = torch.tensor([int(batch["attention_mask"][i].sum()) - 1])
            c1, _ = _capture_all(model, single, ["resid_post"])
            torch.testing.assert_close(caps["resid_post"][2][0][i], c1["resid_post"][2][0][0], rtol=1e-5, atol=1e-5)


def test_adapter_describes_gqa_and_norms():
    model, _ = tiny("gemma2")
    a = Adapter.of(model)
    assert (a.num_heads, a.num_kv_heads, a.head_dim) == (4, 2, 16)
    assert a.kv_head_of(3) == 1
    s = a.sites(0)
    assert s.attn_out is s.layer.post_attention_layernorm  # Gemma normalises A before the residual add
    assert torch.allclose(a.norm_gamma(s.norm_in), 1 + s.norm_in.weight.float())
    with pytest.raises(IndexError, match="out of range"):
        a.sites(99)


def test_unsupported_architecture_lists_supported():
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(UnsupportedArchitectureError, match="llama.*qwen2"):
        Adapter.of(m)


def test_real_default_model_residuals_equal_hidden_states():
    model, tok = smollm()
    batch = prompt_batch(tok)
    caps, out = _capture_all(model, batch, ["resid_post"])
    r = batch["readout"]
    for l in (0, 11, 28):
        assert torch.equal(caps["resid_post"][l][0], out.hidden_states[l + 1][torch.arange(3), r])
