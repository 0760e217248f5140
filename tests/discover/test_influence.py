"""Sublayer influence: the KV-cache-reusing fast path equals the paper's naive loop."""
import pytest
import torch

from emokernels.data.prompts import chat_messages, render
from emokernels.discover.influence import (InfluenceResult, influence_fast, influence_grad, influence_naive, late_window,
                                           prefix_copy_attention, reference_directions, sublayer_influence)
from tests.helpers import USERS, tiny


def _setup(model, E=3, seed=0):
    L, d = model.config.num_hidden_layers, model.config.hidden_size
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(2, L, E, d, generator=g)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    sigma = torch.rand(2, L, generator=g) + 0.5
    return dirs, sigma


def _prompts(tok):
    """Four prompts of three lengths (two identical lengths exercise grouping) as token lists."""
    texts = [render(tok, chat_messages(u, None)) for u in USERS] + [render(tok, chat_messages(USERS[0], None))]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def _padded(seqs, side="left"):
    T = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(T - len(s), T) if side == "left" else slice(0, len(s))
        ids[i, sl], mask[i, sl] = torch.tensor(s), 1
    return {"input_ids": ids, "attention_mask": mask}


def test_late_window_matches_paper_and_scales():
    assert late_window(28) == (21, 22, 23, 24, 25)
    assert late_window(30) == tuple(range(22, 28))
    assert late_window(4) == (3,)
    assert all(0 <= l < 24 for l in late_window(24))


def test_reference_direction_is_unit_and_sign_aligned():
    g = torch.Generator().manual_seed(1)
    dirs = torch.randn(2, 8, 6, 32, generator=g)
    v_ref, u = reference_directions(dirs, window=(5, 6))
    torch.testing.assert_close(v_ref.norm(dim=-1), torch.ones(6))
    assert ((u * v_ref[None, None]).sum(-1) >= 0).all()
    unit = dirs / dirs.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(u.abs(), unit.abs())
    # v_ref = normalise(sum of window vectors sign-aligned to the first one (attn of layer 5))
    vs = [unit[p, l] for l in (5, 6) for p in (0, 1)]
    ref = sum(torch.where((v * vs[0]).sum(-1, keepdim=True) < 0, -v, v) for v in vs)
    torch.testing.assert_close(v_ref, ref / ref.norm(dim=-1, keepdim=True))


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "phi3", "gemma2", "gemma3"])
def test_fast_equals_naive(family):
    model, tok = tiny(family)
    attn_impl = model.config._attn_implementation
    seqs = _prompts(tok)
    dirs, sigma = _setup(model, E=2)
    v_ref, u = reference_directions(dirs)
    members = torch.tensor([[1, 1], [1, 0], [0, 1], [1, 1]], dtype=torch.bool)
    alphas = (0.1, 0.7)
    naive = influence_naive(model, _padded(seqs, "left"), u, sigma, v_ref, alphas=alphas, members=members,
                            batch_size=4, progress=False)
    rows = {}
    for layout, chunk in (("tree", 11), ("batch", 16), ("staged", 7), ("auto", 512)):
        fast = influence_fast(model, _padded(seqs, "right"), u, sigma, v_ref, alphas=alphas, members=members,
                              layout=layout, chunk=chunk, progress=False)
        torch.testing.assert_close(fast.s_base, naive.s_base, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fast.s_inj, naive.s_inj, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(fast.I, naive.I, rtol=1e-4, atol=1e-3)
        assert fast.stats["token_rows"] * 5 < naive.stats["token_rows"]
        rows[fast.stats["layout"]] = fast.stats["token_rows"]
    assert set(rows) == {"tree", "batch", "staged"}  # auto = staged
    assert model.config._attn_implementation == attn_impl  # the staged copies' attention was switched back
    assert rows["staged"] < 0.75 * rows["tree"]  # the layers below each injection are skipped
    assert naive.Ibar.shape == (2, 2, 4) and torch.isfinite(naive.Ibar).all()
    assert naive.I.abs().max() > 1e-2  # the injections do move the score
    assert naive.stats["forward_calls"] == 1 + 2 * 2 * 4 * 2


def _tree_attention_reference(q, k, v, K, V, scaling):
    """The copies as extra keys behind a [n, T0 + n] tree mask (prefix + self visible), SDPA, GQA by repeat."""
    G, H, n, hd = q.shape
    T0, rep = K.shape[2], H // K.shape[1]
    keys = torch.cat([K, k], 2).repeat_interleave(rep, 1)
    values = torch.cat([V, v], 2).repeat_interleave(rep, 1)
    visible = torch.cat([torch.ones(n, T0, dtype=torch.bool), torch.eye(n, dtype=torch.bool)], 1)
    out = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=visible, scale=scaling)
    return out.transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("G,H,kvh,n,T0,hd", [(1, 4, 4, 1, 1, 8), (3, 6, 2, 5, 7, 16), (2, 9, 3, 33, 13, 64)])
def test_prefix_copy_attention_equals_the_tree_mask(G, H, kvh, n, T0, hd, dtype):
    g = torch.Generator().manual_seed(G * 100 + n)
    q, k, v = (torch.randn(G, h, n, hd, generator=g) for h in (H, kvh, kvh))
    K, V = (torch.randn(G, kvh, T0, hd, generator=g) for _ in range(2))
    scaling = hd ** -0.5
    ref = _tree_attention_reference(q, k, v, K, V, scaling)  # fp32
    low = [t.to(dtype) for t in (q, k, v, K, V)]
    out, weights = prefix_copy_attention(None, *low[:3], scaling=scaling, prefix_kv=tuple(low[3:]))
    assert out.shape == (G, n, H, hd) and out.dtype == dtype and weights is None
    torch_err = (_tree_attention_reference(*low, scaling).float() - ref).abs().max()
    assert (out.float() - ref).abs().max() <= max(2 * torch_err, 1e-5)


def test_prefix_copy_attention_rejects_a_mask_and_a_missing_prefix():
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match="prefix_kv"):
        prefix_copy_attention(None, q, q, q)
    with pytest.raises(ValueError, match="no attention mask"):
        prefix_copy_attention(None, q, q, q, torch.zeros(1, 1, 3, 3), prefix_kv=(q, q))


@pytest.mark.parametrize("window,softcap", [(4, None), (None, 1.5), (3, 0.7), (100, None)])
def test_prefix_copy_attention_window_and_softcap(window, softcap):
    """Against the eager formula: scores·scaling, c·tanh(·/c), window mask (key i visible from the
    copies at t* = T0 when i > T0 − W), softmax."""
    G, H, kvh, n, T0, hd = 2, 4, 2, 5, 9, 8
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(G, h, n, hd, generator=g) * 2 for h in (H, kvh, kvh))
    K, V = (torch.randn(G, kvh, T0, hd, generator=g) for _ in range(2))
    keys = torch.cat([K, k], 2).repeat_interleave(H // kvh, 1)
    values = torch.cat([V, v], 2).repeat_interleave(H // kvh, 1)
    s = q @ keys.transpose(-1, -2) * hd ** -0.5
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    visible = torch.cat([torch.ones(n, T0, dtype=torch.bool), torch.eye(n, dtype=torch.bool)], 1)
    if window:
        visible[:, :T0] &= torch.arange(T0) > T0 - window
    ref = (torch.softmax(s.masked_fill(~visible, float("-inf")), -1) @ values).transpose(1, 2)
    out, _ = prefix_copy_attention(None, q, k, v, scaling=hd ** -0.5, prefix_kv=(K, V), sliding_window=window,
                                   softcap=softcap)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_staged_layout_restores_the_attention_implementation_on_error(monkeypatch):
    model, tok = tiny("llama")
    dirs, sigma = _setup(model, E=1)
    v_ref, u = reference_directions(dirs)
    mlp = model.model.layers[2].mlp
    forward = mlp.forward

    def broken(x):  # fails inside the staged passes, where the copies' attention is switched in
        if model.config._attn_implementation == "emokernels_prefix_copies":
            raise RuntimeError("boom")
        return forward(x)

    monkeypatch.setattr(mlp, "forward", broken)
    with pytest.raises(RuntimeError, match="boom"):
        influence_fast(model, _prompts(tok)[:1], u, sigma, v_ref, layout="staged", alphas=(0.5,), progress=False)
    assert model.config._attn_implementation == "sdpa"


def test_fast_subset_of_layers_and_kinds_and_list_input():
    model, tok = tiny("llama")
    seqs = _prompts(tok)
    dirs, sigma = _setup(model, E=2)
    v_ref, u = reference_directions(dirs)
    kw = dict(alphas=(0.3,), kinds=("mlp",), layers=(1, 3), progress=False)
    fast = influence_fast(model, seqs, u, sigma, v_ref, **kw)
    naive = influence_naive(model, seqs, u, sigma, v_ref, **kw)
    torch.testing.assert_close(fast.I, naive.I, rtol=1e-4, atol=1e-3, equal_nan=True)
    assert torch.isnan(fast.I[:, 0]).all() and torch.isnan(fast.I[:, 1, 0]).all()
    assert torch.isfinite(fast.I[:, 1, [1, 3]]).all()


def test_grad_is_the_small_dose_limit():
    model, tok = tiny("qwen2")
    seqs = _prompts(tok)[:2]
    dirs, sigma = _setup(model, E=2)
    v_ref, u = reference_directions(dirs)
    grad = influence_grad(model, seqs, u, sigma, v_ref, progress=False)
    # central finite difference: mean of I(+α) and I(−α) is the derivative up to O(α²)
    fd = influence_fast(model, seqs, u, sigma, v_ref, alphas=(1e-2, -1e-2), progress=False)
    torch.testing.assert_close(grad.I[..., 0], fd.Ibar, rtol=2e-2, atol=2e-2)
    assert grad.I.abs().max() > 0.1


def test_sublayer_influence_wrapper_and_roundtrip(tmp_path):
    model, tok = tiny("llama")
    dirs, sigma = _setup(model, E=2)
    res = sublayer_influence(model, _prompts(tok)[:2], dirs, sigma, method="fast", alphas=(0.5,), progress=False,
                             emotions=("anger", "fear"))
    res.save(tmp_path / "inf")
    back = InfluenceResult.load(tmp_path / "inf")
    torch.testing.assert_close(back.I, res.I)
    assert back.alphas == (0.5,) and back.emotions == ("anger", "fear") and back.method == "fast-staged"
    torch.testing.assert_close(back.probability.nansum(dim=(1, 2)), torch.ones(2))


def test_bad_inputs_raise_clear_errors():
    model, tok = tiny("llama")
    seqs = _prompts(tok)[:1]
    dirs, sigma = _setup(model, E=2)
    v_ref, u = reference_directions(dirs)
    with pytest.raises(ValueError, match="sigma must be"):
        influence_fast(model, seqs, u, sigma[:, :2], v_ref, progress=False)
    with pytest.raises(ValueError, match="directions u must be"):
        influence_fast(model, seqs, u[:, :2], sigma, v_ref, progress=False)
    with pytest.raises(ValueError, match="alphas"):
        influence_fast(model, seqs, u, sigma, v_ref, alphas=(0.0,), progress=False)
    with pytest.raises(ValueError, match="no member prompts"):
        influence_fast(model, seqs, u, sigma, v_ref, members=torch.tensor([[True, False]]), progress=False)
    with pytest.raises(ValueError, match="layout"):
        influence_fast(model, seqs, u, sigma, v_ref, layout="pyramid", progress=False)
    with pytest.raises(ValueError, match=r"directions must be a tensor \[2"):
        reference_directions(dirs[0])


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_prompts_longer_than_the_sliding_window(family):
    """Staged copies see only the window of the prefix (Gemma 2 alternates windowed and global
    layers and soft-caps the scores; Gemma 3 has windowed layers with their own rotary base);
    the tree layout falls back to replicated rows, whose mask keeps the window."""
    model, tok = tiny(family)  # sliding window 64
    long_user = " ".join(USERS * 3)
    seqs = [tok(render(tok, chat_messages(long_user, None)), add_special_tokens=False)["input_ids"]] + _prompts(tok)[:1]
    assert len(seqs[0]) > model.config.sliding_window
    dirs, sigma = _setup(model, E=1)
    v_ref, u = reference_directions(dirs)
    kw = dict(alphas=(0.5,), layers=(0, 3), progress=False)
    naive = influence_naive(model, seqs, u, sigma, v_ref, **kw)
    for layout, ran in (("auto", "staged"), ("tree", "batch")):
        fast = influence_fast(model, seqs, u, sigma, v_ref, layout=layout, **kw)
        assert fast.stats["layout"] == ran
        torch.testing.assert_close(fast.I, naive.I, rtol=1e-4, atol=1e-3, equal_nan=True)
        torch.testing.assert_close(fast.s_inj, naive.s_inj, rtol=1e-4, atol=1e-5, equal_nan=True)
