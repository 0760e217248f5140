"""Distributed discovery: 2 gloo ranks give the single-process capture, directions and component sums.

The capture is sharded by context group and the fp64 accumulators are all-reduced
(``emokernels.discover.distributed``). The ranks are real processes: ``torch.multiprocessing``
spawns them for the library test, and ``torchrun`` runs ``emokernels directions`` for the
command-line test.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from emokernels.discover.distributed import rank_world, shard_by_group
from tests.discover.test_capture import _random_units

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("n_groups,world", [(5, 2), (2, 3), (6, 3), (1, 1)])
def test_shard_by_group_keeps_groups_whole_and_covers_every_unit(n_groups, world):
    units = _random_units(n_groups, drop={"s0__positive__fear"})
    shards = [shard_by_group(units, r, world) for r in range(world)]
    assert sorted(u.key for s in shards for u in s) == sorted(u.key for u in units)
    owner = {}
    for r, shard in enumerate(shards):
        for u in shard:
            assert owner.setdefault(u.group, r) == r, f"group {u.group} split over ranks"
    groups = list(dict.fromkeys(u.group for u in units))
    assert [owner[g] for g in groups] == [i % world for i in range(len(groups))]


@pytest.mark.parametrize("rank,world", [(2, 2), (-1, 2), (0, 0)])
def test_shard_by_group_rejects_a_rank_outside_the_world(rank, world):
    with pytest.raises(ValueError, match="out of range for world size"):
        shard_by_group(_random_units(1), rank, world)


def test_single_process_is_rank_0_of_1():
    assert rank_world() == (0, 1)


def _assert_same_capture(dist_res, ref, rtol=1e-5, atol=1e-6):
    assert dist_res.keys == ref.keys and dist_res.groups == ref.groups and dist_res.emotions == ref.emotions
    torch.testing.assert_close(dist_res.states, ref.states, rtol=rtol, atol=atol)
    a, b = dist_res.accumulator, ref.accumulator
    assert (a.n_groups, a.sigma_n, a.n_valence, a.n_theme, a.dropped) == (b.n_groups, b.sigma_n, b.n_valence,
                                                                          b.n_theme, b.dropped)
    torch.testing.assert_close(a.sum, b.sum, rtol=rtol, atol=atol)
    torch.testing.assert_close(a.sigma_sum, b.sigma_sum, rtol=rtol, atol=atol)
    for mine, theirs in ((a.by_valence, b.by_valence), (a.by_theme, b.by_theme)):
        assert sorted(mine) == sorted(theirs)
        for k in mine:
            torch.testing.assert_close(mine[k], theirs[k], rtol=rtol, atol=atol)


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One rank: sharded capture, directions and component sums equal the single-process ones
    (asserted here; ``mp.spawn`` re-raises a rank's failure in the parent)."""
    import torch.distributed as dist

    from emokernels.discover.capture import capture
    from emokernels.discover.directions import from_accumulator
    from tests.helpers import tiny

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, tok = tiny("llama")
        # 5 contexts; the last lacks one emotion, so it is dropped (on the rank that owns it)
        units = _random_units(5, seed=3, drop={"s4__negative__fear"})
        ck = Path(out_dir) / "ck"
        got = capture(model, tok, units, batch_size=4, keep_states=True, progress=False, distributed=True,
                      checkpoint=ck)
        ref = capture(model, tok, units, batch_size=4, keep_states=True, progress=False)
        assert got.accumulator.dropped == ["s4__negative"]
        _assert_same_capture(got, ref)
        # batch mates change a state by fp32 rounding (left padding); the rule of
        # test_capture.py::test_batch_size_does_not_change_the_result applies
        torch.testing.assert_close(from_accumulator(got.accumulator).directions,
                                   from_accumulator(ref.accumulator).directions, rtol=0, atol=2e-5)
        assert not list(Path(out_dir).glob("ck-rank*")), "per-rank checkpoints left behind"

        # one unit per batch: the same states bit for bit, so only the fp64 summation order differs
        got_b1 = capture(model, tok, units, batch_size=1, keep_states=True, progress=False, distributed=True)
        ref_b1 = capture(model, tok, units, batch_size=1, keep_states=True, progress=False)
        assert torch.equal(got_b1.states, ref_b1.states)
        _assert_same_capture(got_b1, ref_b1, rtol=1e-12, atol=1e-12)

        # more ranks than groups: rank 1 owns nothing and still joins every collective
        one = [u for u in units if u.group == units[0].group]
        got1 = capture(model, tok, one, batch_size=6, keep_states=True, progress=False, distributed=True)
        _assert_same_capture(got1, capture(model, tok, one, batch_size=6, keep_states=True, progress=False))

        # component scores: each rank streams its shard, the collectors' sums are all-reduced
        from emokernels.data.sev import load_split
        from emokernels.discover.distributed import all_reduce_collectors
        from emokernels.discover.heads import HeadAccumulator
        from emokernels.discover.collect import run_collectors, sev_units, unit_batches
        from emokernels.discover.neurons import NeuronAccumulator
        from tests.helpers import random_directions

        dirs, sev = random_directions(model), sev_units(load_split("train", 1))
        sharded = [NeuronAccumulator(model, dirs), HeadAccumulator(model, dirs)]
        run_collectors(model, unit_batches(tok, shard_by_group(sev, rank, world), batch_size=6), sharded,
                       progress=False)
        all_reduce_collectors(sharded)
        single = [NeuronAccumulator(model, dirs), HeadAccumulator(model, dirs)]
        run_collectors(model, unit_batches(tok, sev, batch_size=6), single, progress=False)
        for a, b in zip(sharded, single):
            sa, sb = a.state_dict(), b.state_dict()
            assert sorted(sa) == sorted(sb)
            for k in sa:
                torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")

        # prompt and text units mixed across groups (each rank's shard alone would be uniform)
        mixed = units[:6] + [replace(u, reply="It went fine.") for u in units[6:12]]
        try:
            capture(model, tok, mixed, progress=False, distributed=True)
        except ValueError as exc:
            assert "mixing prompt units and text units" in str(exc), exc
        else:
            raise AssertionError("prompt and text units mixed over the ranks were not detected")

        # ranks given different units: a clear error on every rank, before any capture
        mine = units if rank == 0 else units[:-1]
        try:
            capture(model, tok, mine, progress=False, distributed=True)
        except ValueError as exc:
            assert "ranks [1] were given other units than rank 0" in str(exc), exc
        else:
            raise AssertionError("different units on the ranks were not detected")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_equal_one_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)


def _directions_cli(out: Path, nproc: int) -> float:
    """Run ``emokernels directions`` on ``nproc`` processes (torchrun when > 1); returns wall seconds."""
    args = ["-m", "emokernels.cli", "directions", "--model", "tiny-llama", "--split", "train", "--limit", "4",
            "--batch-size", "4", "--probe-limit", "1", "--probe-steps", "20", "--no-plots", "--out", str(out)]
    if nproc > 1:  # torchrun --standalone: a local rendezvous on a free port
        args = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, f"directions on {nproc} process(es) failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    return wall


@pytest.mark.slow
def test_directions_cli_under_torchrun_equals_one_process(tmp_path):
    from emokernels.discover.directions import EmotionDirections

    wall1 = _directions_cli(tmp_path / "one", 1)
    wall2 = _directions_cli(tmp_path / "two", 2)
    one, two = EmotionDirections.load(tmp_path / "one"), EmotionDirections.load(tmp_path / "two")
    torch.testing.assert_close(two.directions, one.directions, rtol=0, atol=2e-5)  # batch-mate rounding
    torch.testing.assert_close(two.sigma, one.sigma, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(two.norms, one.norms, rtol=1e-5, atol=1e-6)
    assert (two.n_groups, two.extra["processes"], one.extra["processes"]) == (one.n_groups, 2, 1)
    assert not list((tmp_path / "two").glob("capture_checkpoint*")), "checkpoints left behind"
    # rank 0 trains the probe on the per-unit states gathered from both ranks (their order is
    # checked in test_two_gloo_ranks_equal_one_process)
    rep1, rep2 = (json.loads((tmp_path / d / "consistency.json").read_text()) for d in ("one", "two"))
    assert rep2["probe"]["layers"] == rep1["probe"]["layers"]
    assert len(rep2["probe"]["test_acc"]) == len(rep1["probe"]["test_acc"])
    print(f"directions wall time: 1 process {wall1:.1f} s, 2 processes {wall2:.1f} s")
