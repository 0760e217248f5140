"""Models dispatched by accelerate (``device_map`` with CPU and disk offload) patch with every backend.

Offloaded weights sit on ``meta`` until accelerate's forward wrapper materialises them, so the
fused layers must leave those layers to hooks and no native kernel may see a meta pointer. The
dispatched model must give what the undispatched one gives (bitwise on the reference backend,
within the kernels' fp32 error on the others) and be restored exactly.
"""
import warnings

import pytest
import torch

from emokernels import Intervention, patch
from emokernels.models.adapters import Adapter
from emokernels.models.tiny import FAMILIES, tiny_model

accelerate = pytest.importorskip("accelerate")

BACKENDS = ["reference", "fused", "cpu", "triton"]


def offload_map(model, where=lambda l: "disk" if l % 2 else "cpu") -> dict[str, str]:
    """A complete device_map: decoder layer ℓ -> ``where(ℓ)``, every other module -> cpu."""
    layers = {id(m): l for l, m in enumerate(Adapter.of(model).layers)}
    holds = {id(m) for m in model.modules() if any(id(x) in layers for x in m.modules())}
    out = {}

    def walk(module, prefix):
        for name, child in module.named_children():
            path = f"{prefix}{name}"
            if id(child) in layers:
                out[path] = where(layers[id(child)])
            elif id(child) in holds:
                walk(child, path + ".")
            else:
                out[path] = "cpu"

    walk(model, "")
    return out


def interventions(model, g=None):
    a = Adapter.of(model)
    g = g or torch.Generator().manual_seed(0)
    L, d, H = a.num_layers, a.hidden_size, a.num_heads
    rows = torch.tensor([0, 3])
    vec = {l: torch.nn.functional.normalize(torch.randn(6, d, generator=g), dim=-1) for l in range(L)}
    return [
        Intervention(site="resid_post", op="add_rms", layers=range(L), positions="all", vectors=vec, rows=rows,
                     strength=2.0),
        Intervention(site="neurons", op="edit", layers=range(L), positions="all",
                     index={l: torch.tensor([1, 5, 7]) for l in range(L)},
                     add={l: torch.randn(6, 3, generator=g) for l in range(L)}, rows=rows),
        Intervention(site="heads", op="edit", layers=range(L), positions="all",
                     index={l: torch.tensor([0, H - 1]) for l in range(L)},
                     scale={l: torch.rand(6, 2, generator=g) for l in range(L)}, rows=rows),
        Intervention(site="resid_mid", op="project", layers=range(L), positions="readout",
                     directions={l: vec[l] for l in range(L)}, name="proj"),
    ]


def _run(model, ids, backend):
    with torch.no_grad(), warnings.catch_warnings(), patch(model, *interventions(model), backend=backend) as h:
        warnings.simplefilter("ignore")
        logits = model(ids).logits
        proj = h.pop_captures()["proj"]
        gen = model.generate(ids, max_new_tokens=4, do_sample=False)
    return logits, proj, gen


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(request, tmp_path_factory):
    """(undispatched model, the same weights dispatched with half the layers on disk, ids)."""
    plain, _ = tiny_model(request.param, with_tokenizer=False)
    moved, _ = tiny_model(request.param, with_tokenizer=False)
    moved = accelerate.dispatch_model(moved, device_map=offload_map(moved),
                                      offload_dir=str(tmp_path_factory.mktemp("offload")))
    assert any(p.is_meta for p in moved.parameters()), "nothing was offloaded: the test would prove nothing"
    ids = torch.randint(10, 400, (2, 7), generator=torch.Generator().manual_seed(1))
    return plain, moved, ids


@pytest.mark.parametrize("backend", BACKENDS)
def test_offloaded_model_patches_like_the_plain_one(pair, backend):
    plain, moved, ids = pair
    with torch.no_grad():
        before = moved(ids).logits
    want, got = _run(plain, ids, backend), _run(moved, ids, backend)
    if backend == "reference":
        assert all(torch.equal(w, g) for w, g in zip(want, got))
    else:  # fused layers on the plain model, hooks on the offloaded layers: rounding may differ
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
        assert torch.equal(got[2], want[2])
    with torch.no_grad():
        assert torch.equal(moved(ids).logits, before)  # restored exactly


def test_fused_backend_names_the_dispatched_layers(pair):
    _, moved, ids = pair
    with pytest.warns(RuntimeWarning, match="dispatched by accelerate"):
        with patch(moved, interventions(moved)[0], backend="fused"):
            pass


def test_native_kernels_refuse_meta_tensors():
    """The fused layers call the unchecked op (checked once at patch time): a meta weight reaching
    it, as an offloaded norm weight would, is an error and not a segfault in C++."""
    from emokernels.ops.fused_residual import fused_add_rmsnorm_unchecked

    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="meta device"):
        fused_add_rmsnorm_unchecked("cpu", "", x, x.clone(), None, None, None, None, False,
                                    torch.empty(8, device="meta"), 1e-6, False, None, None)


def test_offloaded_smollm2_generates_like_the_plain_one(tmp_path):
    from emokernels.assets import ready_directions
    from emokernels.control.steering import Steering
    from emokernels.models import load

    model, tok = load("smollm2-135m", dtype="fp32")
    ids = tok(["My flight was moved to tomorrow."] * 2, return_tensors="pt")["input_ids"]
    steer = Steering(ready_directions(model=model), ["anger", "happiness"], alpha=3.0)
    out = {}
    for backend in ("reference", "fused"):
        with torch.no_grad(), patch(model, steer, backend=backend):
            out[backend] = model.generate(ids, max_new_tokens=8, do_sample=False)
    dm = offload_map(model, lambda l: "disk" if l >= 15 else "cpu")
    model = accelerate.dispatch_model(model, device_map=dm, offload_dir=str(tmp_path))
    for backend in ("reference", "fused"):
        with torch.no_grad(), warnings.catch_warnings(), patch(model, steer, backend=backend):
            warnings.simplefilter("ignore")
            assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), out[backend])
