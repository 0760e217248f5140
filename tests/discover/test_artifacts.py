"""Issue 15: artifacts know their model, keep emotions by name, reject bad files, and the
components checkpoint survives a kill at any point of its write."""
import warnings

import pytest
import torch

from emokernels.control.modulation import compile_to_bias
from emokernels.control.steering import Steering
from emokernels.data.labels import EMOTIONS
from emokernels.discover.circuits import Circuit
from emokernels.discover.diffs import ComponentDiffs
from emokernels.discover.directions import EmotionDirections, unit_directions
from emokernels.io import CorruptArtifactError, load_tensors, save_tensors
from emokernels.models import Adapter
from emokernels.models.identity import ModelMismatchError, model_identity
from emokernels.models.tiny import tiny_model
from tests.helpers import tiny


def _directions(model, seed=0, identity=True):
    a = Adapter.of(model)
    g = torch.Generator().manual_seed(seed)
    v, n = unit_directions(torch.randn(2, a.num_layers, 6, a.hidden_size, generator=g))
    return EmotionDirections(directions=v, sigma=torch.rand(2, a.num_layers, generator=g) + 0.5, norms=n,
                             model="tiny-llama", model_identity=model_identity(model) if identity else None)


def _circuit(model, identity=True):
    a = Adapter.of(model)
    g = torch.Generator().manual_seed(1)
    return Circuit(emotions=EMOTIONS, shape=a.describe(),
                   neurons={"anger": {1: torch.tensor([0, 3])}, "fear": {2: torch.tensor([5])}},
                   delta_a={"anger": {1: torch.randn(2, generator=g)}, "fear": {2: torch.randn(1, generator=g)}},
                   heads={"anger": {1: torch.tensor([1])}}, delta_z={"anger": {1: torch.randn(1, a.head_dim, generator=g)}},
                   model_identity=model_identity(model) if identity else None)


@pytest.fixture(scope="module")
def models():
    """The model the artifacts come from, and two others of exactly the same shape."""
    model, _ = tiny("llama")
    renamed, _ = tiny_model("llama", with_tokenizer=False)
    renamed._emokernels_name = "SmolLM2-135M"  # same shape, another model
    reconfig, _ = tiny_model("llama", with_tokenizer=False)
    reconfig.config.rope_theta = 1234.5  # same shape, another architecture setting
    return model, renamed, reconfig


APPLY = {  # how an artifact meets a model
    "EmotionDirections.load(model=)": lambda tmp, m, other, **kw: EmotionDirections.load(
        _directions(m).save(tmp / "d"), model=other, **kw),
    "Steering.to_interventions": lambda tmp, m, other, **kw: Steering(
        EmotionDirections.load(_directions(m).save(tmp / "d"), **kw), "anger").to_interventions(other),
    "Circuit.load(model=)": lambda tmp, m, other, **kw: Circuit.load(_circuit(m).save(tmp / "c"), model=other, **kw),
    "Circuit.to_interventions": lambda tmp, m, other, **kw: Circuit.load(_circuit(m).save(tmp / "c"), **kw)
    .to_interventions(other, emotion="anger"),
}
MISMATCH = [  # (case, which other model, substrings of the message)
    ("another name", 1, ["tiny-llama", "SmolLM2-135M", "allow_model_mismatch=True", "--allow-model-mismatch"]),
    ("another config", 2, ["rope_theta", "1234.5", "allow_model_mismatch=True"]),
]


@pytest.mark.parametrize("apply", list(APPLY))
@pytest.mark.parametrize("case,which,needles", MISMATCH, ids=[c[0] for c in MISMATCH])
def test_artifact_of_another_model_of_the_same_shape_is_refused(tmp_path, models, apply, case, which, needles):
    model, other = models[0], models[which]
    with pytest.raises(ModelMismatchError) as err:
        APPLY[apply](tmp_path, model, other)
    for n in needles:
        assert n in str(err.value), (apply, str(err.value))
    assert isinstance(err.value, ValueError)
    with pytest.warns(UserWarning, match="allowed by allow_model_mismatch"):
        APPLY[apply](tmp_path, model, other, allow_model_mismatch=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        APPLY[apply](tmp_path, model, model)  # its own model: no error, no warning


def test_compiled_circuit_records_and_checks_its_model(models):
    model, renamed, _ = models
    compiled = compile_to_bias(_circuit(model), model)
    assert compiled.meta["model_identity"] == model_identity(model)
    compiled.to_interventions(model, emotion="anger")
    with pytest.raises(ModelMismatchError, match="compiled circuit"):
        compiled.to_interventions(renamed, emotion="anger")


def test_identity_ignores_dtype_and_is_stable():
    a, _ = tiny_model("llama", with_tokenizer=False)
    b, _ = tiny_model("llama", dtype=torch.bfloat16, seed=3, with_tokenizer=False)
    ia, ib = model_identity(a), model_identity(b)
    assert ia == ib and len(ia["config_hash"]) == 16 and ia["config"]["num_hidden_layers"] == 4
    assert model_identity(tiny_model("qwen2", with_tokenizer=False)[0])["config_hash"] != ia["config_hash"]


NAMES = [  # (case, stored name, model name, same model?)
    ("zoo name vs its Hub id", "smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", True),
    ("Hub id vs a local folder", "Qwen/Qwen2.5-Coder-0.5B-Instruct", "/models/qwen2.5-coder-0.5b-instruct/", True),
    ("zoo name vs its GGUF file", "smollm2-135m", "/m/SmolLM2-135M-Instruct.Q4_1.gguf", True),
    ("base vs instruct of one shape", "HuggingFaceTB/SmolLM2-135M", "smollm2-135m", False),
    ("Qwen2.5 vs Qwen2.5-Coder", "Qwen/Qwen2.5-0.5B-Instruct", "qwen2.5-coder-0.5b", False),
]


@pytest.mark.parametrize("case,stored,actual,same", NAMES, ids=[n[0] for n in NAMES])
def test_names_of_one_checkpoint_agree_and_of_two_differ(case, stored, actual, same):
    from emokernels.models.identity import mismatch

    diff = mismatch({"name": stored, "config_hash": "h"}, {"name": actual, "config_hash": "h"})
    assert diff == ([] if same else [f"name {stored!r} vs {actual!r}"])


@pytest.mark.parametrize("kind", ["directions", "circuit"])
def test_files_without_identity_load_with_a_warning(tmp_path, models, kind):
    model, renamed, _ = models
    art = _directions(model, identity=False) if kind == "directions" else _circuit(model, identity=False)
    path = art.save(tmp_path / kind)
    t, meta = load_tensors(path)
    del meta["model_identity"]  # as written before identities were recorded
    save_tensors(path, t, meta)
    loader = EmotionDirections.load if kind == "directions" else Circuit.load
    with pytest.warns(UserWarning, match="records no model identity"):
        back = loader(path, model=renamed)  # shape fits: only the warning
    assert back.model_identity is None


# -- emotion order ------------------------------------------------------------------------------
def test_directions_stored_in_another_order_map_by_name(tmp_path, models):
    from emokernels.discover.collect import direction_tensors

    model = models[0]
    d = _directions(model)
    order = tuple(reversed(EMOTIONS))
    d.select(order).save(tmp_path / "rev")
    back = EmotionDirections.load(tmp_path / "rev", model=model)
    assert back.emotions == EMOTIONS and torch.equal(back.directions, d.directions)
    for e in EMOTIONS:
        assert torch.equal(back.vector(e, 2), d.vector(e, 2))
    kept = EmotionDirections.load(tmp_path / "rev", emotions=order)
    assert kept.emotions == order and torch.equal(kept.vector("happiness", 1), d.vector("happiness", 1))
    two = EmotionDirections.load(tmp_path / "rev", emotions=["fear", "anger"])
    assert two.emotions == ("fear", "anger") and torch.equal(two.table(3)[1], d.vector("anger", 3))
    attn, mlp = direction_tensors(d.select(order))  # positional consumers get EMOTIONS order by name
    assert torch.equal(mlp, d.directions[1])


EMOTION_FAULTS = [  # (case, call, error type, substrings)
    ("directions lack an emotion", lambda p: EmotionDirections.load(p / "d", emotions=["anger", "awe", "envy"]),
     ValueError, ["'awe'", "'envy'", "they hold"]),
    ("circuit lacks an emotion", lambda p: Circuit.load(p / "c", emotions=["anger", "awe"]), ValueError,
     ["'awe'", "it holds"]),
    ("subset file asked for all six", lambda p: EmotionDirections.load(p / "sub", emotions=EMOTIONS), ValueError,
     ["'happiness'", "they hold anger, fear"]),
]


@pytest.mark.parametrize("case,call,etype,needles", EMOTION_FAULTS, ids=[c[0] for c in EMOTION_FAULTS])
def test_asking_for_emotions_a_file_lacks_names_them(tmp_path, models, case, call, etype, needles):
    model = models[0]
    _directions(model).save(tmp_path / "d")
    _circuit(model).save(tmp_path / "c")
    _directions(model).select(["anger", "fear"]).save(tmp_path / "sub")
    with pytest.raises(etype) as err:
        call(tmp_path)
    for n in needles:
        assert n in str(err.value), (case, str(err.value))


# -- bad files ----------------------------------------------------------------------------------
def _mutate(path, tensors=None, meta=None):
    t, m = load_tensors(path)
    if tensors:
        tensors(t)
    if meta:
        meta(m)
    save_tensors(path, t, m)
    return path


def _nan_at(key, index=0, value=float("nan")):
    def f(t):
        t[key].view(-1)[index] = value
    return f


def _relabel(m):
    m["emotions"] = list(reversed(m["emotions"]))  # names permuted, rows not: a silent relabelling


FILE_FAULTS = [  # (case, artifact, mutate(path), loader, error type, substrings)
    ("NaN in directions", "d", lambda p: _mutate(p, _nan_at("directions")), EmotionDirections.load,
     CorruptArtifactError, ["directions.safetensors", "'directions'", "non-finite"]),
    ("inf in sigma", "d", lambda p: _mutate(p, _nan_at("sigma", 1, float("inf"))), EmotionDirections.load,
     CorruptArtifactError, ["directions.safetensors", "'sigma'", "non-finite"]),
    ("directions metadata lacks emotions", "d", lambda p: _mutate(p, meta=lambda m: m.pop("emotions")),
     EmotionDirections.load, CorruptArtifactError, ["directions.safetensors", "metadata keys ['emotions']"]),
    ("emotion names permuted over the rows", "d", lambda p: _mutate(p, meta=_relabel), EmotionDirections.load,
     CorruptArtifactError, ["directions.safetensors", "disagree with the per-emotion tensors", ".direction.1"]),
    ("not a directions file", "c", lambda p: p, EmotionDirections.load, CorruptArtifactError,
     ["c.safetensors", "not an emotion-directions artifact"]),
    ("NaN in a circuit delta", "c", lambda p: _mutate(p, _nan_at("delta_a.fear.2")), Circuit.load,
     CorruptArtifactError, ["c.safetensors", "'delta_a.fear.2'", "non-finite"]),
    ("circuit metadata lacks keys", "c", lambda p: _mutate(p, meta=lambda m: (m.pop("shape"), m.pop("emotions"))),
     Circuit.load, CorruptArtifactError, ["c.safetensors", "lacks metadata keys ['emotions', 'shape']"]),
    ("non-finite circuit strength", "c", lambda p: _mutate(p, meta=lambda m: m["strengths"].update(anger=float("inf"))),
     Circuit.load, CorruptArtifactError, ["c.safetensors", "strengths of ['anger']"]),
    ("circuit tensor of an unlisted emotion", "c",
     lambda p: _mutate(p, meta=lambda m: m.update(emotions=["anger", "joy"])), Circuit.load, CorruptArtifactError,
     ["c.safetensors", "'delta_a.fear.2', 'neurons.fear.2'", "listed emotion"]),
    ("component diffs lack metadata and a tensor", "c",
     lambda p: save_tensors(p, {"dz": torch.ones(1), "da": torch.ones(1)}, {"kind": "component_diffs"}),
     ComponentDiffs.load,
     CorruptArtifactError, ["c.safetensors lacks tensors ['layers'] and metadata keys ['n_groups', 'head_dim']"]),
    ("truncated circuit file", "c", lambda p: p.write_bytes(p.read_bytes()[:100]) and p, Circuit.load,
     CorruptArtifactError, ["c.safetensors", "truncated or corrupt"]),
]


@pytest.mark.parametrize("case,art,mutate,loader,etype,needles", FILE_FAULTS, ids=[c[0] for c in FILE_FAULTS])
def test_bad_artifact_files_name_the_file_and_the_problem(tmp_path, models, case, art, mutate, loader, etype, needles):
    model = models[0]
    path = _directions(model).save(tmp_path) if art == "d" else _circuit(model).save(tmp_path / "c")
    mutate(path)
    with pytest.raises(etype) as err:
        loader(path)
    for n in needles:
        assert n in str(err.value), (case, str(err.value))


def test_gguf_control_vector_with_nan_is_refused(tmp_path, models):
    d = _directions(models[0])
    d.directions[1, 2, d.emotion_index("fear"), 0] = float("nan")
    with pytest.raises(ValueError, match=r"direction\.2.*non-finite"):
        d.export_gguf_control_vector(tmp_path / "f.gguf", "fear", layers=[1, 2])
    assert not (tmp_path / "f.gguf").exists()


# -- components checkpoint: a kill at any point of a checkpoint write ----------------------------
KILLS = [  # (case, checkpoint write that is killed, before or after its os.replace, prompts resumed after)
    ("first write, before replace", 1, "before", None),
    ("second write, before replace", 2, "before", 4),
    ("second write, after replace", 2, "after", 8),
    ("third write, after replace", 3, "after", 12),
]


@pytest.mark.parametrize("case,nth,when,resumed", KILLS, ids=[k[0] for k in KILLS])
def test_components_checkpoint_kill_resumes_exactly(tmp_path, monkeypatch, capsys, case, nth, when, resumed):
    import emokernels.io as io_mod
    from emokernels.data.sev import load_split
    from emokernels.discover.components import discover_components
    from emokernels.discover.collect import sev_units
    from tests.helpers import random_directions

    model, tok = tiny("llama")
    v = torch.stack([random_directions(model, 0), random_directions(model, 1)])
    units = sev_units(load_split("train", 1))  # 18 prompts: batches of 4, a checkpoint after each
    kw = dict(batch_size=4, checkpoint_every=1, fingerprint="fp", progress=False)
    ref = discover_components(model, tok, units, v[0], v[1], **kw)
    real, calls = io_mod.atomic_write_bytes, [0]

    def killed(path, data):
        calls[0] += 1
        if calls[0] != nth:
            return real(path, data)
        if when == "after":
            real(path, data)
        raise KeyboardInterrupt(f"killed {when} checkpoint write {nth}")

    monkeypatch.setattr(io_mod, "atomic_write_bytes", killed)
    with pytest.raises(KeyboardInterrupt):
        discover_components(model, tok, units, v[0], v[1], checkpoint=tmp_path / "ck", **kw)
    monkeypatch.setattr(io_mod, "atomic_write_bytes", real)
    assert sorted(p.name for p in tmp_path.iterdir()) == (["ck.safetensors"] if resumed else [])  # no temp, no lock
    capsys.readouterr()
    got = discover_components(model, tok, units, v[0], v[1], checkpoint=tmp_path / "ck", **kw)
    out = capsys.readouterr().out
    assert (f"resuming after {resumed} of 18" in out) if resumed else ("resuming" not in out)
    for a, b in ((got[0].C_mean, ref[0].C_mean), (got[0].counts, ref[0].counts), (got[1].mean, ref[1].mean),
                 (got[1].counts, ref[1].counts), (got[2].da, ref[2].da), (got[2].dz, ref[2].dz)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    assert got[2].n_groups == ref[2].n_groups == 3
