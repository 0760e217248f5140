"""Bad arguments to ``patch()`` get a clear error before anything is installed, identically for
every backend, and the model is bitwise untouched afterwards (issue 15: no silent wrong result).

Each case is (id, a function model -> what to call, the error type, a substring of the message
that names the problem). The function builds the ``Intervention`` / ``Steering`` / circuit and
calls ``patch()`` inside ``pytest.raises``, so errors raised by the spec itself count as well.
The tiny Llama has 4 layers, d = 64, 4 heads of 16, d_ff = 176.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from emokernels import Intervention, patch
from emokernels.control.modulation import compile_to_bias
from emokernels.control.steering import Steering, parse_layers
from emokernels.discover.circuits import assemble_circuit
from emokernels.discover.directions import EmotionDirections, unit_directions
from emokernels.models import Adapter
from emokernels.models.adapters import UnsupportedArchitectureError
from emokernels.patch.rows import emotion_index, resolve_rows, resolve_strength
from tests.helpers import op_backends, position_ids, prompt_batch, tiny

NAN, INF = float("nan"), float("inf")
EMOS = ("anger", "sadness", "happiness", "fear", "surprise", "disgust")
BACKENDS = ["reference", "fused"] + [b for b in op_backends() if b != "reference"]


def _vec(E=6, d=64, seed=0):
    return torch.randn(E, d, generator=torch.Generator().manual_seed(seed))


def _with(t, idx, value):
    t = t.clone()
    t[idx] = value
    return t


def add(layers=(1,), vectors=None, op="add", site="resid_post", **kw):
    if vectors is None:  # extra layers in a table are fine: only missing ones are an error
        vectors = {l: _vec() for l in range(4)}
    return Intervention(site=site, op=op, layers=layers, vectors=vectors, **kw)


def neurons(ids=(3, 7), scale=None, add=None, **kw):
    idx = torch.as_tensor(ids)
    n = len(ids)
    if scale is None and add is None:
        add = torch.ones(2, n)
    return Intervention(site="neurons", op="edit", layers=(1,), index={1: idx},
                        scale=None if scale is None else {1: scale}, add=None if add is None else {1: add}, **kw)


def heads(ids=(1,), add=None, scale=None, **kw):
    n = len(ids)
    if scale is None and add is None:
        add = torch.ones(2, n, 16)
    return Intervention(site="heads", op="edit", layers=(2,), index={2: torch.as_tensor(ids)},
                        scale=None if scale is None else {2: scale}, add=None if add is None else {2: add}, **kw)


def _dirs(model, zero=None, nan=False):
    a = Adapter.of(model)
    v, n = unit_directions(torch.randn(2, a.num_layers, 6, a.hidden_size, generator=torch.Generator().manual_seed(0)))
    if zero is not None:
        v[:, :, zero] = 0.0
    if nan:
        v[:, 2, 0, 5] = NAN
    return EmotionDirections(directions=v, sigma=torch.ones(2, a.num_layers), norms=n, model="tiny")


def _circuit(model, nan_delta=False, strengths=None):
    a = Adapter.of(model)
    L, H, hd, F, E = a.num_layers, a.num_heads, a.head_dim, a.intermediate_size, len(EMOS)
    g = torch.Generator().manual_seed(0)
    Ibar = torch.rand(E, 2, L, generator=g)
    C, Ih = torch.randn(L, E, F, generator=g), torch.randn(L, E, H, generator=g)
    da, dz = torch.randn(L, E, F, generator=g), torch.randn(L, E, H * hd, generator=g)
    circ = assemble_circuit(Ibar, C, Ih, da, dz, shape=a.describe(), K_total=40, min_mlp=2, min_attn=1)
    if nan_delta:
        l = next(l for l, t in circ.delta_a["anger"].items() if t.numel())
        circ.delta_a["anger"][l] = _with(circ.delta_a["anger"][l], 0, NAN)
    if strengths:
        circ.strengths.update(strengths)
    return circ


def P(*makers, **kw):
    """A case body: ``patch(model, *[make() for make in makers], **kw)``."""
    def run(model, backend):
        items = [make() for make in makers]
        with patch(model, *items, backend=backend, **kw):
            pass
    return run


def C(fn):
    """A case body that builds something from the model and then patches (fn(model) -> (items, kwargs))."""
    def run(model, backend):
        items, kw = fn(model)
        with patch(model, *items, backend=backend, **kw):
            pass
    return run


# (case id, body, error type, substring of the message)
CASES = [
    # -- layers ---------------------------------------------------------------------------------
    ("layers-empty", lambda m, b: add(layers=[]), ValueError, "empty"),
    ("layers-float", lambda m, b: add(layers=[1.7], vectors={1: _vec()}), TypeError, "integer layer"),
    ("layers-integral-float", lambda m, b: add(layers=[1.0], vectors={1: _vec()}), TypeError, "integer layer"),
    ("layers-numpy-float", lambda m, b: add(layers=[np.float64(1.5)], vectors={1: _vec()}), TypeError, "integer layer"),
    ("layers-bool", lambda m, b: add(layers=[True], vectors={1: _vec()}), TypeError, "integer layer"),
    ("layers-bool-scalar", lambda m, b: add(layers=True, vectors={1: _vec()}), TypeError, "layers"),
    ("layers-string", lambda m, b: add(layers="1", vectors={1: _vec()}), TypeError, "string"),
    ("layers-duplicate", lambda m, b: add(layers=[1, 1]), ValueError, "more than once"),
    ("layers-negative", P(lambda: add(layers=[-1], vectors={-1: _vec()})), IndexError, "layer -1 out of range: the model has 4"),
    ("layers-too-big", P(lambda: add(layers=[4], vectors={4: _vec()})), IndexError, "layer 4 out of range: the model has 4"),
    ("second-intervention-bad", P(lambda: add(), lambda: add(strength=NAN)), ValueError, "not finite"),
    ("layers-missing-table", lambda m, b: add(layers=[1, 2], vectors={1: _vec()}), ValueError, "no entry for layers [2]"),
    # -- tables: non-finite, shapes, dtypes -----------------------------------------------------
    ("vectors-nan", P(lambda: add(vectors={1: _with(_vec(), (2, 5), NAN)})), ValueError, "vectors[1] holds 1 non-finite"),
    ("vectors-inf", P(lambda: add(vectors={1: _with(_vec(), (0, 0), -INF)})), ValueError, "non-finite"),
    ("vectors-width", P(lambda: add(vectors={1: _vec(d=65)})), ValueError, "width 64"),
    ("vectors-3d", P(lambda: add(vectors={1: torch.zeros(2, 3, 64)})), ValueError, "must be [E, 64]"),
    ("vectors-bool", P(lambda: add(vectors={1: torch.ones(6, 64, dtype=torch.bool)})), TypeError, "real float"),
    ("vectors-string", P(lambda: add(vectors={1: "v"})), TypeError, "must be a tensor"),
    ("directions-nan", P(lambda: Intervention(site="resid_post", op="project", layers=(1,), positions="readout",
                                      directions={1: _with(_vec(), (1, 1), NAN)})), ValueError, "directions[1]"),
    ("scale-nan", P(lambda: neurons(scale=_with(torch.ones(2, 2), (1, 0), NAN))), ValueError, "scale[1] holds"),
    ("add-inf", P(lambda: heads(add=_with(torch.ones(2, 1, 16), (0, 0, 3), INF))), ValueError, "add[2] holds"),
    ("scale-wrong-n", P(lambda: neurons(scale=torch.ones(2, 3))), ValueError, "must be [E, 2] for 2 ids"),
    ("add-heads-wrong-hd", P(lambda: heads(add=torch.ones(2, 1, 8))), ValueError, "width 16"),
    ("add-heads-2d", P(lambda: heads(add=torch.ones(2, 16))), ValueError, "must be [E, 1, 16]"),
    ("scale-add-rows-differ", P(lambda: neurons(scale=torch.ones(2, 2), add=torch.ones(3, 2))), ValueError, "rows"),
    # -- steering with a zero vector -----------------------------------------------------------
    ("add_rms-zero-table", P(lambda: add(op="add_rms", vectors={1: torch.zeros(6, 64)})), ValueError, "row 0 is all zeros"),
    ("add_rms-zero-row-used", P(lambda: add(op="add_rms", vectors={1: _with(_vec(), 3, 0.0)}, rows=torch.tensor([0, 3, 1]))),
     ValueError, "vectors[1] row 3 is all zeros"),
    # -- edit ids ------------------------------------------------------------------------------
    ("index-float", P(lambda: neurons(ids=(3.0, 7.0))), TypeError, "integer ids"),
    ("index-bool", P(lambda: neurons(ids=(True, False))), TypeError, "integer ids"),
    ("index-neuron-too-big", P(lambda: neurons(ids=(3, 176))), IndexError, "neuron id 176 outside [0, 176)"),
    ("index-neuron-negative", P(lambda: neurons(ids=(-1, 3))), IndexError, "neuron id -1 outside"),
    ("index-head-too-big", P(lambda: heads(ids=(4,))), IndexError, "head id 4 outside [0, 4)"),
    ("index-duplicate", P(lambda: neurons(ids=(3, 3))), ValueError, "more than once"),
    ("index-2d", P(lambda: neurons(ids=((3, 4),), add=torch.ones(2, 1))), ValueError, "1-D"),
    # -- rows ----------------------------------------------------------------------------------
    ("rows-negative", P(lambda: add(rows=-1)), IndexError, "rows=-1 out of range: the table has 6 rows"),
    ("rows-too-big", P(lambda: add(rows=6)), IndexError, "rows=6 out of range"),
    ("rows-tensor-too-big", P(lambda: add(rows=torch.tensor([0, 7, 1]))), IndexError, "holds 7, out of range"),
    ("rows-tensor-negative", P(lambda: add(rows=torch.tensor([0, -1, 1]))), IndexError, "holds -1"),
    ("rows-float", P(lambda: add(rows=1.0)), TypeError, "rows="),
    ("rows-bool", P(lambda: add(rows=True)), TypeError, "rows="),
    ("rows-float-tensor", P(lambda: add(rows=torch.tensor([0.0, 1.0, 2.0]))), TypeError, "integer tensor"),
    ("rows-bool-tensor", P(lambda: add(rows=torch.tensor([True, False, True]))), TypeError, "integer tensor"),
    ("rows-float-list", P(lambda: add(rows=[0, 1.5, 2])), TypeError, "hold integers"),
    ("rows-2d", P(lambda: add(rows=torch.zeros(3, 1, dtype=torch.long))), ValueError, "shape [B]"),
    ("rows-edit-table", P(lambda: neurons(rows=2)), IndexError, "the table has 2 rows"),
    ("rows-heads-table", P(lambda: heads(rows=torch.tensor([0, 1, 2]))), IndexError, "holds 2"),
    # -- strength ------------------------------------------------------------------------------
    ("strength-nan", P(lambda: add(strength=NAN)), ValueError, "strength=nan is not finite"),
    ("strength-inf", P(lambda: add(strength=INF)), ValueError, "not finite"),
    ("strength-string", P(lambda: add(strength="2")), TypeError, "strength= must be a real number"),
    ("strength-bool", P(lambda: add(strength=True)), TypeError, "strength="),
    ("strength-none", P(lambda: add(strength=None)), TypeError, "strength="),
    ("strength-tensor-nan", P(lambda: add(strength=torch.tensor([1.0, NAN, 1.0]))), ValueError, "non-finite"),
    ("strength-list-inf", P(lambda: add(strength=[1.0, INF, 1.0])), ValueError, "non-finite"),
    ("strength-2d", P(lambda: add(strength=torch.ones(3, 1))), ValueError, "shape [B]"),
    ("strength-edit-nan", P(lambda: neurons(strength=NAN)), ValueError, "not finite"),
    # -- readout --------------------------------------------------------------------------------
    ("readout-negative", P(lambda: add(), readout=torch.tensor([-1, 3, 3])), IndexError, "readout= holds -1"),
    ("readout-float", P(lambda: add(), readout=torch.tensor([1.0, 3.0, 3.0])), TypeError, "integer token positions"),
    ("readout-2d", P(lambda: add(), readout=torch.zeros(3, 1, dtype=torch.long)), ValueError, "shape [B]"),
    # -- steering ------------------------------------------------------------------------------
    ("steer-alpha-nan", lambda m, b: Steering(_dirs(m), "anger", alpha=NAN), ValueError, "alpha=nan is not finite"),
    ("steer-alpha-inf", lambda m, b: Steering(_dirs(m), "anger", alpha=INF), ValueError, "alpha=inf"),
    ("steer-alpha-string", lambda m, b: Steering(_dirs(m), "anger", alpha="2"), ValueError, "alpha must be a number"),
    ("steer-alpha-tensor", lambda m, b: Steering(_dirs(m), "anger", alpha=torch.ones(3)), TypeError, "one number"),
    ("steer-layers-float", lambda m, b: Steering(_dirs(m), "anger", layers=[1.7]), TypeError, "steering layers"),
    ("steer-layers-backwards", lambda m, b: Steering(_dirs(m), "anger", layers="3-1"), ValueError, "runs backwards"),
    ("steer-layers-empty", lambda m, b: Steering(_dirs(m), "anger", layers=[]), ValueError, "empty"),
    ("steer-strength-nan", C(lambda m: ([Steering(_dirs(m), "anger")], dict(strength=NAN))), ValueError, "not finite"),
    ("steer-strength-string", C(lambda m: ([Steering(_dirs(m), "anger")], dict(strength="2"))), TypeError,
     "steering strength= must be a real number"),
    ("steer-unknown-emotion", C(lambda m: ([Steering(_dirs(m))], dict(emotion="joy"))), ValueError,
     "unknown emotion 'joy' in these directions: use one of anger, sadness"),
    ("steer-emotion-id", C(lambda m: ([Steering(_dirs(m))], dict(emotion=6))), ValueError, "emotion id 6 out of range"),
    ("steer-emotion-bool", C(lambda m: ([Steering(_dirs(m))], dict(emotion=True))), TypeError, "an emotion is a name"),
    ("steer-emotion-float-ids", C(lambda m: ([Steering(_dirs(m))], dict(emotion=torch.tensor([0.0, 1.0])))),
     TypeError, "integer tensor"),
    ("steer-emotion-empty", C(lambda m: ([Steering(_dirs(m))], dict(emotion=[]))), ValueError, "empty"),
    ("steer-zero-direction", C(lambda m: ([Steering(_dirs(m, zero=3))], dict(emotion=["anger", "fear"]))),
     ValueError, "row 3 is all zeros"),
    ("steer-nan-direction", C(lambda m: ([Steering(_dirs(m, nan=True), layers=[2])], dict(emotion="fear"))),
     ValueError, "non-finite"),
    # -- circuits ------------------------------------------------------------------------------
    ("circuit-nan-delta", C(lambda m: ([_circuit(m, nan_delta=True)], dict(emotion="anger"))), ValueError,
     "non-finite"),
    ("circuit-nan-default-strength", C(lambda m: ([_circuit(m, strengths={"fear": NAN})], dict(emotion="fear"))),
     ValueError, "default strength"),
    ("circuit-strength-string", C(lambda m: ([_circuit(m)], dict(emotion="fear", strength="2"))), TypeError,
     "strength="),
    ("circuit-strength-rows", C(lambda m: ([_circuit(m)], dict(emotion=["fear", "anger"], strength=[1.0]))),
     ValueError, "strength has 1 entries, emotion has 2 rows"),
    ("circuit-unknown-emotion", C(lambda m: ([_circuit(m)], dict(emotion=["fear", "joy"]))), ValueError,
     "unknown emotion 'joy' in this circuit: use one of anger"),
    ("compiled-nan-strength", C(lambda m: ([compile_to_bias(_circuit(m), m)], dict(emotion="fear", strength=NAN))),
     ValueError, "not finite"),
]


def _snapshot(model):
    """What a patch could leave behind: hook counts and instance ``forward`` attributes."""
    mods = list(model.modules())
    return ([len(m._forward_pre_hooks) + len(m._forward_hooks) for m in mods],
            ["forward" in m.__dict__ for m in mods])


@pytest.fixture(scope="module")
def model_batch():
    model, tok = tiny("llama")
    batch = prompt_batch(tok)
    return model, batch


def _logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     position_ids=position_ids(batch["attention_mask"])).logits


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,body,exc,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_argument_is_a_clear_error_and_leaves_the_model_untouched(model_batch, case, body, exc, needle, backend):
    model, batch = model_batch
    before, hooks = _logits(model, batch), _snapshot(model)
    with pytest.raises(exc) as info:
        body(model, backend)
    assert needle in str(info.value), f"{case}: {info.value!s} does not name {needle!r}"
    assert _snapshot(model) == hooks
    assert torch.equal(_logits(model, batch), before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_readout_outside_the_sequence_fails_at_the_call_and_the_patch_still_restores(model_batch, backend):
    model, batch = model_batch
    before, hooks = _logits(model, batch), _snapshot(model)
    T = batch["input_ids"].shape[1]
    with pytest.raises(IndexError, match=f"readout= holds {T}, outside this call's sequence of {T} tokens"):
        with patch(model, add(positions="readout"), backend=backend, readout=torch.tensor([0, 1, T])):
            _logits(model, batch)
    assert _snapshot(model) == hooks
    assert torch.equal(_logits(model, batch), before)


# -- what is accepted ---------------------------------------------------------------------------
ACCEPTED = [
    ("int-layer", lambda: add(layers=1), lambda: add(layers=[1])),
    ("numpy-int-layers", lambda: add(layers=np.array([1, 2])), lambda: add(layers=(1, 2))),
    ("int-rows-list", lambda: add(rows=[0, 3, 5]), lambda: add(rows=torch.tensor([0, 3, 5]))),
    ("0d-strength", lambda: add(strength=torch.tensor(2.0)), lambda: add(strength=2.0)),
    ("strength-list", lambda: add(strength=[2.0, 2.0, 2.0]), lambda: add(strength=2)),
    # unused zero rows and zero rows of additive (non-steering) tables are legitimate
    ("add_rms-zero-row-unused", lambda: add(op="add_rms", vectors={1: _with(_vec(), 4, 0.0)}, rows=1),
     lambda: add(op="add_rms", vectors={1: _vec()}, rows=1)),
    ("add-zero-row", lambda: add(vectors={1: _with(_vec(), 0, 0.0)}, rows=1), lambda: add(vectors={1: _vec()}, rows=1)),
]


@pytest.mark.parametrize("backend", ["reference", "fused"])
@pytest.mark.parametrize("case,make,same_as", ACCEPTED, ids=[c[0] for c in ACCEPTED])
def test_accepted_spellings_equal_the_canonical_one(model_batch, case, make, same_as, backend):
    model, batch = model_batch
    with patch(model, make(), backend=backend):
        got = _logits(model, batch)
    with patch(model, same_as(), backend=backend):
        want = _logits(model, batch)
    assert torch.equal(got, want)
    assert not torch.equal(got, _logits(model, batch))


def test_bare_backbone_patches_like_the_causal_lm(model_batch):
    model, batch = model_batch
    ids, mask = batch["input_ids"], batch["attention_mask"]
    iv = add(op="add_rms", layers=(1, 2), vectors={1: _vec(), 2: _vec(seed=1)}, rows=torch.tensor([0, 2, 4]))
    with torch.no_grad():
        with patch(model, iv):
            want = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        with patch(model.model, iv):
            got = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
        plain = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(got, want) and not torch.equal(got, plain)


def test_a_model_without_decoder_layers_names_the_expected_classes(model_batch):
    model, _ = model_batch
    wrapper = nn.Module()
    wrapper.config = model.config
    wrapper.lm = model
    with pytest.raises(UnsupportedArchitectureError, match="pass the causal LM .*LlamaForCausalLM.* or its bare backbone"):
        patch(wrapper, add())


# -- the resolver itself ------------------------------------------------------------------------
RESOLVER_CASES = [
    ("emotion-unknown", lambda: emotion_index(EMOS, "joy"), ValueError, "use one of anger, sadness, happiness"),
    ("emotion-id-range", lambda: emotion_index(EMOS, -1), ValueError, "emotion id -1 out of range 0..5"),
    ("emotion-float", lambda: emotion_index(EMOS, 1.0), TypeError, "an emotion is a name"),
    ("rows-string", lambda: resolve_rows("0", 6), TypeError, "rows="),
    ("rows-object", lambda: resolve_rows(object(), 6), TypeError, "rows="),
    ("strength-object", lambda: resolve_strength(object()), TypeError, "strength="),
    ("strength-complex", lambda: resolve_strength(torch.ones(2, dtype=torch.complex64)), TypeError, "real tensor"),
    ("parse-layers-float", lambda: parse_layers([1, 2.5], 4), TypeError, "steering layers"),
    ("parse-layers-garbage", lambda: parse_layers("1-x", 4), ValueError, "not a layer or a range"),
    ("parse-layers-range", lambda: parse_layers("2-5", 4), ValueError, "[4, 5] invalid for a 4-layer model"),
]


@pytest.mark.parametrize("case,fn,exc,needle", RESOLVER_CASES, ids=[c[0] for c in RESOLVER_CASES])
def test_resolver_errors(case, fn, exc, needle):
    with pytest.raises(exc) as info:
        fn()
    assert needle in str(info.value)


def test_resolver_accepts_and_normalises():
    assert emotion_index(EMOS, "fear") == 3 and emotion_index(EMOS, np.int64(2)) == 2
    assert resolve_rows(None, 1) == 0 and resolve_rows(torch.tensor(2), 3) == 2
    assert resolve_rows([0, 2], 3).tolist() == [0, 2]
    assert resolve_strength(2) == 2.0 and isinstance(resolve_strength(2), float)
    assert resolve_strength([1, 2]).dtype == torch.float32
    assert parse_layers(2, 4) == [2] and parse_layers([3, 1, 3], 4) == [1, 3] and parse_layers("1-2,0,1", 4) == [0, 1, 2]
