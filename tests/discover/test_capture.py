"""Streaming capture: the right states at the right positions, and sums equal to the batch formula."""
import random

import pytest
import torch

from emokernels.data.labels import EMOTIONS
from emokernels.discover import capture as cap
from emokernels.discover.capture import CaptureUnit, GroupAccumulator, capture
from emokernels.discover.directions import directions_batch, from_accumulator, unit_directions
from emokernels.io import append_jsonl
from tests.helpers import tiny

WORDS = "report train chair manager package seat hour window office ticket door meeting".split()


def _random_units(n_groups, seed=0, drop=()):
    rng = random.Random(seed)
    units = []
    for g in range(n_groups):
        user = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + ".\n" + " ".join(
            rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
        valence = ("positive", "negative", "neutral")[g % 3]
        theme = ("work", "travel")[g % 2]
        for e in EMOTIONS:
            key = f"s{g}__{valence}__{e}"
            if key not in drop:
                units.append(CaptureUnit(key, f"s{g}__{valence}", e, user, valence, theme))
    return units


def _reference_states(model, tok, unit, paper_final_norm=False):
    """One unpadded forward with HF hooks: m_ℓ and h_{ℓ+1} at t* = last prompt token. [2, L, d]."""
    from emokernels.data.prompts import chat_messages, encode, render
    from emokernels.models import Adapter

    a = Adapter.of(model)
    batch = encode(tok, [render(tok, chat_messages(unit.user, unit.emotion))])
    h_in, A, h_out = {}, {}, {}
    hooks = []
    for l in range(a.num_layers):
        s = a.sites(l)
        hooks.append(s.layer.register_forward_pre_hook(lambda m, args, kw, l=l: h_in.__setitem__(l, (args[0] if args else kw["hidden_states"])), with_kwargs=True))
        hooks.append(s.attn_out.register_forward_hook(lambda m, i, o, l=l: A.__setitem__(l, o[0] if isinstance(o, tuple) else o)))
        hooks.append(s.layer.register_forward_hook(lambda m, i, o, l=l: h_out.__setitem__(l, o[0] if isinstance(o, tuple) else o)))
    try:
        with torch.no_grad():
            out = model(input_ids=batch["input_ids"], output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    L = a.num_layers
    st = torch.zeros(2, L, a.hidden_size)
    for l in range(L):
        st[0, l] = (h_in[l] + A[l])[0, -1]
        st[1, l] = h_out[l][0, -1]
        if l < L - 1:  # HF hidden_states[l+1] is the block output except at the last layer
            torch.testing.assert_close(st[1, l], out.hidden_states[l + 1][0, -1])
    if paper_final_norm:
        st[1, L - 1] = out.hidden_states[L][0, -1]  # = RMSNorm_final(h_L)
    return st


@pytest.mark.parametrize("family,paper_final_norm", [("llama", False), ("qwen2", True), ("gemma2", False)])
def test_captured_states_are_m_and_h_at_readout(family, paper_final_norm):
    model, tok = tiny(family)
    units = _random_units(2, seed=1)[:5]
    res = capture(model, tok, units, batch_size=5, keep_states=True, paper_final_norm=paper_final_norm,
                  progress=False)
    for i, u in enumerate(res.keys):
        unit = next(x for x in units if x.key == u)
        ref = _reference_states(model, tok, unit, paper_final_norm)
        torch.testing.assert_close(res.states[i], ref, rtol=1e-4, atol=1e-5)


def test_last_layer_pre_norm_differs_from_paper_switch():
    model, tok = tiny("llama")
    units = _random_units(1)
    pre = capture(model, tok, units, keep_states=True, progress=False)
    post = capture(model, tok, units, keep_states=True, paper_final_norm=True, progress=False)
    L = pre.num_layers
    assert torch.equal(pre.states[:, :, : L - 1], post.states[:, :, : L - 1])
    assert not torch.allclose(pre.states[:, 1, L - 1], post.states[:, 1, L - 1])
    torch.testing.assert_close(post.accumulator.sigma()[1, L - 1],
                               post.states[:, 1, L - 1].pow(2).mean(-1).sqrt().mean(), rtol=1e-5, atol=1e-6)


def _batch_from_states(res, complete_groups):
    """X [G, E, P, L, d] in group order, from per-unit states."""
    idx = {(g, e): i for i, (g, e) in enumerate(zip(res.groups, res.emotions))}
    return torch.stack([torch.stack([res.states[idx[(g, e)]] for e in EMOTIONS]) for g in complete_groups])


def test_streaming_equals_batch_formula_on_tiny_llama():
    model, tok = tiny("llama")
    drop = {"s2__neutral__fear", "s4__negative__anger"}  # two incomplete groups: dropped
    units = _random_units(7, seed=3, drop=drop)
    random.Random(0).shuffle(units)  # capture reorders by group; batches straddle groups
    res = capture(model, tok, units, batch_size=4, keep_states=True, progress=False)
    acc = res.accumulator
    assert acc.n_groups == 5 and sorted(acc.dropped) == ["s2__neutral", "s4__negative"]
    complete = [g for g in dict.fromkeys(res.groups) if g not in acc.dropped]
    X = _batch_from_states(res, complete)
    v_ref, n_ref = directions_batch(X)
    dirs = from_accumulator(acc)
    torch.testing.assert_close(dirs.directions, v_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(dirs.norms, n_ref, rtol=1e-6, atol=1e-7)
    sigma_ref = X.double().pow(2).mean(-1).sqrt().mean(dim=(0, 1)).float()
    torch.testing.assert_close(dirs.sigma, sigma_ref, rtol=1e-6, atol=1e-7)
    # per-valence partial sums = the batch formula on that valence's groups
    pos = [i for i, g in enumerate(complete) if g.endswith("__positive")]
    torch.testing.assert_close(unit_directions(acc.centroids(valence="positive"))[0], directions_batch(X[pos])[0],
                               rtol=0, atol=1e-6)


def test_batch_size_does_not_change_the_result():
    model, tok = tiny("qwen3")
    units = _random_units(3, seed=5)
    a = from_accumulator(capture(model, tok, units, batch_size=1, progress=False).accumulator)
    b = from_accumulator(capture(model, tok, units, batch_size=7, progress=False).accumulator)
    torch.testing.assert_close(a.directions, b.directions, rtol=0, atol=2e-5)


def _synthetic_stream(seed=0, n_groups=9, P=2, L=3, d=16, per_cell=(1, 3)):
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    items = []
    for gi in range(n_groups):
        valence = ("positive", "negative", "neutral")[gi % 3]
        theme = ("a", "b", "c")[gi % 3 - 1]
        ctx = torch.randn(P, L, d, generator=g) * 5
        for e in range(len(EMOTIONS)):
            if gi == 4 and e == 2:
                continue  # incomplete group
            for _ in range(rng.randint(*per_cell)):
                x = ctx + torch.randn(P, L, d, generator=g)
                items.append((f"g{gi}", EMOTIONS[e], x, x.pow(2).mean(-1).sqrt(), valence, theme))
    return items


def _batch_reference(items, keep=lambda it: True):
    cells = {}
    for grp, e, x, rms, v, t in items:
        if keep((grp, v, t)):
            cells.setdefault(grp, {}).setdefault(e, []).append(x.double())
    X = torch.stack([torch.stack([torch.stack(c[e]).mean(0) for e in EMOTIONS]) for c in cells.values()
                     if len(c) == len(EMOTIONS)])
    return directions_batch(X)[0]


def test_synthetic_accumulator_equals_batch_formula_with_repeats_and_subsets():
    items = _synthetic_stream()
    rng = random.Random(1)
    order = sorted(items, key=lambda it: (it[0], rng.random()))  # group-major, shuffled inside groups
    acc = GroupAccumulator(2, 3, 16)
    for it in order:
        acc.add(*it)
    acc.finish()
    assert acc.n_groups == 8 and acc.dropped == ["g4"]
    torch.testing.assert_close(unit_directions(acc.centroids())[0], _batch_reference(items), rtol=0, atol=1e-6)
    torch.testing.assert_close(unit_directions(acc.centroids(valence="negative"))[0],
                               _batch_reference(items, lambda k: k[1] == "negative"), rtol=0, atol=1e-6)
    torch.testing.assert_close(unit_directions(acc.centroids(without_theme="a"))[0],
                               _batch_reference(items, lambda k: k[2] != "a"), rtol=0, atol=1e-6)


def test_accumulator_state_dict_round_trip_mid_stream():
    items = _synthetic_stream(seed=2)
    full = GroupAccumulator(2, 3, 16)
    for it in items:
        full.add(*it)
        if it is items[len(items) // 2]:
            t, m = full.state_dict()
            half = GroupAccumulator.from_state_dict({k: v.clone() for k, v in t.items()}, m)
    full.finish()
    for it in items[len(items) // 2 + 1:]:
        half.add(*it)
    half.finish()
    assert half.n_groups == full.n_groups and half.counts() == full.counts()
    assert torch.equal(half.sum, full.sum) and torch.equal(half.sigma_sum, full.sigma_sum)


def test_accumulator_rejects_bad_input():
    acc = GroupAccumulator(2, 3, 16)
    with pytest.raises(ValueError, match="unknown emotion"):
        acc.add("g", "joy", torch.zeros(2, 3, 16), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="shape"):
        acc.add("g", "anger", torch.zeros(3, 16), torch.zeros(2, 3))
    acc.add("g", "anger", torch.zeros(2, 3, 16), torch.zeros(2, 3))
    acc.finish()
    with pytest.raises(ValueError, match="no complete context groups"):
        acc.centroids()


def test_checkpoint_resume_equals_uninterrupted(tmp_path, monkeypatch):
    model, tok = tiny("llama")
    units = _random_units(4, seed=7)
    ref = capture(model, tok, units, batch_size=5, keep_states=True, progress=False)
    calls = {"n": 0}
    real = cap._render_batch

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt("simulated kill")
        return real(*a, **k)

    monkeypatch.setattr(cap, "_render_batch", flaky)
    ck = tmp_path / "ck"
    with pytest.raises(KeyboardInterrupt):
        capture(model, tok, units, batch_size=5, keep_states=True, checkpoint=ck, checkpoint_every=1, progress=False)
    monkeypatch.setattr(cap, "_render_batch", real)
    resumed = capture(model, tok, units, batch_size=5, keep_states=True, checkpoint=ck, progress=False)
    assert resumed.accumulator.n_groups == ref.accumulator.n_groups == 4
    torch.testing.assert_close(resumed.accumulator.sum, ref.accumulator.sum, rtol=0, atol=1e-9)
    torch.testing.assert_close(resumed.states, ref.states, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="different inputs"):
        capture(model, tok, units[:-1], batch_size=5, checkpoint=ck, progress=False)


def test_text_units_average_the_reply_tokens():
    from emokernels.data.prompts import chat_messages, render

    model, tok = tiny("llama")
    u = CaptureUnit("k", "g", "anger", "My train was late.\nIt was cancelled.", reply="How dare they cancel it again!")
    u2 = CaptureUnit("k2", "g", "sadness", "My train was late.\nIt was cancelled.", reply="That is so sad.")
    res = capture(model, tok, [u, u2], keep_states=True, progress=False)
    assert res.mode == "text"
    prefix = render(tok, chat_messages(u.user, None))
    ids_p = tok(prefix, add_special_tokens=False)["input_ids"]
    ids = tok(prefix + u.reply, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    ref = hs[2][0, len(ids_p):].mean(0)  # mlp point of layer 1 = block-1 output, reply tokens only
    torch.testing.assert_close(res.states[0, 1, 1], ref, rtol=1e-4, atol=1e-5)


def test_units_helpers_and_accepted_keys(tmp_path):
    from emokernels.data.sev import load_split

    sk = load_split("train", 2)
    units = cap.prompt_units(sk)
    assert len(units) == 2 * 3 * 6 and units[0].group == f"{sk[0].skeleton_id}__positive"
    from emokernels.data.sev import iter_units

    assert cap.prompt_units(list(iter_units(sk))) == units
    path = tmp_path / "judged.jsonl"
    append_jsonl(path, [{"key": u.key, "match": i % 5 != 0} for i, u in enumerate(units)])
    keys = cap.load_accepted_keys(path)
    assert len(keys) == len(units) - len(range(0, len(units), 5))
    assert len(cap.prompt_units(sk, accepted=keys)) == len(keys)
    refs = cap.default_references()
    assert all(refs[e] for e in EMOTIONS)
    tu = cap.reference_text_units(sk[:1], refs, valences=("negative",))
    assert len(tu) == sum(len(v) for v in refs.values()) and all(t.reply for t in tu)
    with pytest.raises(FileNotFoundError):
        cap.load_accepted_keys(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="mixing"):
        capture(None, None, [units[0], tu[0]])
