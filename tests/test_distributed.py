"""Training in many processes (torchrun, gloo on the CPU): the data partition, equivalence with one
process, exact replica agreement, kill and --resume, a lost process, one-line errors, `python -m`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch

from satdata.errors import SatkitError
from satdata.store import Store, open_store
from sattrain.checkpoint import load_checkpoint, load_model
from sattrain.config import TrainConfig
from sattrain.data import (
    InMemorySplit,
    StreamingSplit,
    derive_seed,
    epoch_samples,
    num_batches,
    open_train_split,
    partition,
    select_indices,
)
from sattrain.distributed import World, params_digest, world_from_env
from tests.test_data import indexed_store, sample_ids

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
TIMING = {"seconds", "images_per_s", "train_seconds"}
# The equivalence runs: the whole digits train split (1,442), 4 epochs of batch 32 (16 per
# process), the whole test split (355) for the held-out numbers.
EQUIV = ["--method", "standard", "--augment", "none", "--epochs", "4", "--batch-size", "32", "--eval-samples", "0",
         "--eval-steps", "1", "--summary-samples", "0", "--seed", "5"]
# The kill-and-resume runs: every random stream (shuffle, crop, coin, SAT, PGD) on a subset.
RESUME = ["--method", "pgd+sat", "--epochs", "3", "--batch-size", "32", "--train-samples", "512", "--eval-samples",
          "64", "--steps", "2", "--eval-steps", "1", "--summary-samples", "0", "--seed", "11"]

pytestmark = pytest.mark.usefixtures("one_thread")


def env(**extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    e["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else []))
    e["OMP_NUM_THREADS"] = "1"  # two cores, shared: one thread per process
    e.update(extra)
    return e


def one(store: Path, out: Path, *opts: str) -> list[str]:
    return [sys.executable, "-m", "sattrain", "run", str(store), "--out", str(out), "--device", "cpu",
            "--threads", "1", "-q", *opts]


def torchrun(store: Path, out: Path, *opts: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            *one(store, out, *opts)[1:]]


def lines(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if k not in TIMING}
            for x in (run / "metrics.jsonl").read_text().splitlines()]


def errors(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("Error:")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


# --------------------------------------------------------------------------- the partition


@pytest.mark.parametrize("n, world", [(1442, 2), (101, 3), (7, 4), (5, 5)])
def test_partition_is_disjoint_balanced_seeded_and_covers(n: int, world: int) -> None:
    idx = select_indices(2000, n, 1)
    parts = [partition(idx, world, r, seed=9) for r in range(world)]
    assert sum(len(p) for p in parts) == n and np.array_equal(np.sort(np.concatenate(parts)), idx)  # disjoint, cover
    assert max(map(len, parts)) - min(map(len, parts)) <= 1 and max(map(len, parts)) == epoch_samples(n, world)
    assert all(np.all(np.diff(p) > 0) for p in parts)  # sorted: loaded in the store's order
    assert [partition(idx, world, r, seed=9).tolist() for r in range(world)] == [p.tolist() for p in parts]
    assert any(not np.array_equal(partition(idx, world, r, seed=10), parts[r]) for r in range(world)) or n <= world
    assert np.array_equal(partition(idx, 1, 0, seed=9), idx)


@pytest.fixture(scope="module")
def istore(tmp_path_factory: pytest.TempPathFactory) -> Store:
    return open_store(indexed_store(tmp_path_factory.mktemp("idx") / "idx.zarr"))


def test_in_memory_parts_take_equal_steps(istore: Store) -> None:
    idx = select_indices(150, 101, seed=1)
    world, batch = 3, 8
    m = epoch_samples(101, world)  # 34: the 33-sample parts repeat one sample per epoch
    seen: list[list[int]] = []
    for r in range(world):
        split = open_train_split(istore, "train", ["idx"], idx, CPU, 1 << 30, progress=False, rank=r,
                                 world_size=world, seed=4)
        assert isinstance(split, InMemorySplit) and split.n == m
        assert np.array_equal(split.indices, partition(idx, world, r, 4))  # only its part was loaded
        ids = [i for raw in split.batches(batch, torch.Generator().manual_seed(r), "idx") for i in sample_ids(raw.images)]
        assert len(ids) == (m // batch) * batch + (m % batch if m % batch >= 2 else 0)
        assert sum(1 for _ in split.batches(batch, torch.Generator().manual_seed(r), "idx")) == num_batches(m, batch)
        assert set(ids) == set(split.indices.tolist())
        assert len(ids) - len(set(ids)) == m - split.part  # the padding: one repeat in a short part
        seen.append(ids)
    assert sorted(set().union(*map(set, seen))) == idx.tolist()


def test_streamed_parts_cover_each_epoch_and_read_only_their_chunks(istore: Store) -> None:
    from sattrain import data as D

    idx = select_indices(150, 120, seed=2)
    world, batch = 3, 8
    budget = world * 2 * 10 * D.sample_bytes(istore, "train", ["idx"])  # streamed: blocks of ~10 samples each
    splits = [open_train_split(istore, "train", ["idx"], idx, CPU, budget, progress=False, rank=r, world_size=world,
                               seed=6) for r in range(world)]
    assert all(isinstance(s, StreamingSplit) and s.n == 40 for s in splits)
    mine_by_epoch = []
    for epoch in (0, 1):
        got, reads = [], 0
        for r, split in enumerate(splits):
            split.set_epoch(epoch)
            plan = split.plan(torch.Generator().manual_seed(100 + r))
            reads += len({split.chunks[c][0] for blk in plan for c in blk})  # chunks this process reads
            ids = []
            for raw in split.batches(batch, torch.Generator().manual_seed(100 + r), "idx"):
                batch_ids = sample_ids(raw.images)
                assert raw.labels.tolist() == [i % 5 for i in batch_ids]
                ids += batch_ids
            assert len(ids) == 40 == len(set(ids))  # 120 / 3: no padding needed, equal steps
            got.append(ids)
        assert sorted(sum(got, [])) == idx.tolist()  # disjoint and covering, this epoch
        # each process reads its run's chunks: a chunk at the edge of two runs is read twice
        assert reads <= splits[0].whole_chunks + (world - 1)
        mine_by_epoch.append(set(got[0]))
    assert mine_by_epoch[0] != mine_by_epoch[1]  # the shares are dealt anew each epoch

    # an uneven split: the short run repeats one sample, so every process has ceil(n / world)
    odd = select_indices(150, 119, seed=2)
    counts = []
    for r in range(world):
        s = StreamingSplit(istore, "train", ["idx"], odd, CPU, budget // world, rank=r, world_size=world, seed=6)
        s.set_epoch(3)
        counts.append(sum(len(s.chunks[c][2]) for blk in s.plan(torch.Generator().manual_seed(r)) for c in blk))
    assert counts == [40, 40, 40]


# --------------------------------------------------------------------------- the environment and options


def test_world_from_the_environment() -> None:
    assert world_from_env({}) == World() and world_from_env({"WORLD_SIZE": "1"}) == World()
    w = world_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (w.rank, w.size, w.local_rank, w.local_size, w.main, w.distributed) == (3, 4, 1, 2, False, True)
    for bad, words in [({"WORLD_SIZE": "2", "LOCAL_RANK": "0"}, "RANK is not set"),
                       ({"WORLD_SIZE": "2", "RANK": "2", "LOCAL_RANK": "0"}, "RANK: must be in [0, 2)"),
                       ({"WORLD_SIZE": "two"}, "WORLD_SIZE: 'two' is not a whole number")]:
        with pytest.raises(SatkitError, match=words.replace("[", r"\[").replace(")", r"\)")):
            world_from_env(bad)


def test_batch_size_must_split_over_the_processes() -> None:
    assert TrainConfig(store="s", batch_size=64, world_size=2).resolved().world_size == 2
    with pytest.raises(SatkitError, match=r"^--batch-size: 33 does not split evenly over the 2 training processes"):
        TrainConfig(store="s", batch_size=33, world_size=2).resolved()
    with pytest.raises(SatkitError, match=r"^--batch-size: 2 over 2 processes is 1 sample\(s\) per process"):
        TrainConfig(store="s", batch_size=2, world_size=2).resolved()


def test_python_m_entry_points() -> None:
    for pkg, words in (("sattrain", "Saliency-based adversarial training"), ("satdata", "Usage: satdata")):
        res = subprocess.run([sys.executable, "-m", pkg, "--help"], env=env(), capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 0 and words in res.stdout, res.stderr
    res = subprocess.run([sys.executable, "-m", "sattrain", "run", "--help"], env=env(), capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0 and "torchrun --nproc-per-node" in res.stdout


def test_a_bad_batch_size_is_one_line_from_rank_0(digits_store: Path, tmp_path: Path) -> None:
    # the processes torchrun would start, started here: rank 0 says it, rank 1 exits quietly
    procs = [subprocess.Popen(one(digits_store, tmp_path / "run", "--batch-size", "33"),
                              env=env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), LOCAL_WORLD_SIZE="2",
                                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    (_, err0), (_, err1) = (p.communicate(timeout=120) for p in procs)
    assert procs[0].returncode == 1 and err0.strip().splitlines() == [
        "Error: --batch-size: 33 does not split evenly over the 2 training processes (torchrun --nproc-per-node x "
        "--nnodes); give a multiple of 2, e.g. 32"]
    assert procs[1].returncode == 1 and err1 == ""
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- two processes against one


@pytest.fixture(scope="module")
def runs(digits_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """The same run in one process and (torchrun) in two, started together."""
    tmp = tmp_path_factory.mktemp("ddp")
    single, double = tmp / "one", tmp / "two"
    started = time.monotonic()
    p1 = subprocess.Popen(one(digits_store, single, *EQUIV), env=env(), cwd=tmp, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    p2 = subprocess.Popen(torchrun(digits_store, double, *EQUIV), env=env(), cwd=tmp, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    err1, err2 = p1.communicate(timeout=600)[1], p2.communicate(timeout=600)[1]
    assert p1.returncode == 0, err1
    assert p2.returncode == 0, err2
    yield {"one": single, "two": double, "stderr_two": err2, "seconds": time.monotonic() - started}


def test_two_processes_train_like_one(runs: dict, digits_store: Path) -> None:
    a, b = lines(runs["one"]), lines(runs["two"])
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b] == [0, 1, 2, 3]
    # Tolerance of the loss curves: 0.1 + 10% of the one-process loss per epoch. The two runs
    # differ in ways that are not errors: batch norm normalises over 16 samples per process
    # instead of 32, the processes draw their own sample order, and an epoch is 1,440 samples
    # (two parts of 721, batches of 16, a lone last sample dropped) instead of 1,442. Measured:
    # at most 0.06 apart (epoch 1, loss ~1.3), 0.01 by epoch 4.
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) <= 0.1 + 0.1 * ra["loss"], (ra["epoch"], ra["loss"], rb["loss"])
    assert [r["samples"] for r in b] == [1440] * 4 and [r["samples"] for r in a] == [1442] * 4
    assert b[-1]["loss"] < b[0]["loss"] / 3  # it learns
    # Final held-out accuracy (all 355 test images, chance 0.1): well above chance in both, and
    # within 0.12 of each other (measured 0.01; a run's accuracy moves by up to ~0.07 from epoch
    # to epoch on these small models, so a tighter bound would test noise)
    assert a[-1]["clean_acc"] > 0.8 and b[-1]["clean_acc"] > 0.8
    assert abs(a[-1]["clean_acc"] - b[-1]["clean_acc"]) <= 0.12
    assert a[-1]["monitor"]["samples"] == b[-1]["monitor"]["samples"] == 355


def test_replicas_identical_and_parts_disjoint(runs: dict, digits_store: Path) -> None:
    run = runs["two"]
    # Exact: after every epoch the processes compared digests of their weights (the run stops
    # if they differ), and the last one is the digest of the weights checkpoint.pt holds.
    recs = lines(run)
    assert all(r["replicas"]["processes"] == 2 and r["replicas"]["equal"] is True for r in recs)
    assert len({r["replicas"]["params_blake2b"] for r in recs}) == 4  # the weights moved every epoch
    model, _ = load_model(run)
    assert params_digest(model) == recs[-1]["replicas"]["params_blake2b"]
    assert "replicas" not in lines(runs["one"])[0]  # one process: metrics lines as before

    # Exact: each process loaded its part of the seeded partition, the parts disjoint and covering
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["options"]["world_size"] == 2 and json.loads((runs["one"] / "config.json").read_text())[
        "options"]["world_size"] == 1
    procs = cfg["processes"]
    assert (procs["world_size"], procs["backend"], procs["batch_size_per_process"]) == (2, "gloo", 16)
    idx = select_indices(open_store(digits_store).info.splits["train"], None, 0)
    parts = [partition(idx, 2, r, derive_seed(5, "partition")) for r in (0, 1)]
    from sattrain.trainer import _indices_digest

    assert procs["parts"] == [{"samples": len(p), "indices_blake2b": _indices_digest(p)} for p in parts]
    assert not set(parts[0].tolist()) & set(parts[1].tolist()) and len(parts[0]) + len(parts[1]) == len(idx) == 1442

    # rank 0 alone logged and wrote: each epoch's line once, the run directory's files only
    err = runs["stderr_two"]
    assert [ln.split(":")[0] for ln in err.splitlines() if ln.startswith("epoch ")] == [f"epoch {k}/4" for k in
                                                                                       range(1, 5)]
    assert "Error" not in err
    assert {p.name for p in run.iterdir()} == {"config.json", "metrics.jsonl", "checkpoint.pt", "best.pt",
                                               "metrics.json"}


def test_resume_with_another_number_of_processes_is_refused(runs: dict, digits_store: Path, tmp_path: Path) -> None:
    run = tmp_path / "two"
    shutil.copytree(runs["two"], run)
    res = subprocess.run(one(digits_store, run, *EQUIV, "--epochs", "5", "--resume"), env=env(), cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1
    assert errors(res.stderr) == [f"Error: {run}: --resume in 1 process(es), but the run was trained in 2: each "
                                  "process trains on its own part of the samples with its own noise, so another "
                                  "number would not continue the same run; resume it in torchrun --nproc-per-node 2 "
                                  "(x --nnodes: 2 processes in all)"]
    assert lines(run) == lines(runs["two"])  # untouched


# --------------------------------------------------------------------------- kill, resume, lost processes


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds torchrun's workers in /proc")
def test_sigkill_under_torchrun_then_resume_equals_uninterrupted(digits_store: Path, tmp_path: Path) -> None:
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    proc = subprocess.Popen(torchrun(digits_store, cut, *RESUME), env=env(), cwd=tmp_path, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ref = subprocess.Popen(torchrun(digits_store, whole, *RESUME), env=env(), cwd=tmp_path,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (cut / "checkpoint.pt").exists():  # kill as soon as epoch 1's checkpoint is in place
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "the run wrote no checkpoint in time"
        time.sleep(0.005)
    victims = [proc.pid] + descendants(proc.pid)  # torchrun and its workers (in sessions of their own)
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.wait(timeout=30) == -signal.SIGKILL
    while not all(gone(pid) for pid in victims):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert len(victims) >= 3  # torchrun and two workers
    ref_err = ref.communicate(timeout=600)[1]
    assert ref.returncode == 0, ref_err

    assert not (cut / "metrics.json").exists()  # the kill interrupted the run
    done = load_checkpoint(cut)["epoch"]
    assert 1 <= done < 3
    res = subprocess.run(torchrun(digits_store, cut, *RESUME, "--resume"), env=env(), cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert res.stderr.count(f"resuming {cut} after epoch {done} of 3") == 1
    # every process took rank 0's model, optimizer and schedule, and re-derived its random streams
    # from (seed, epoch, rank): the resumed run ends exactly where the uninterrupted one does
    assert lines(cut) == lines(whole)
    assert [r["epoch"] for r in lines(cut)] == [0, 1, 2] and lines(cut)[-1]["clean_acc"] > 0.5
    assert json.loads((cut / "config.json").read_text())["resumed_after_epoch"] == done


def test_a_hung_process_ends_the_other_with_one_line(digits_store: Path, tmp_path: Path) -> None:
    """Without torchrun to stop them, a process that stops answering ends the other one after
    SATKIT_DIST_TIMEOUT with one line, not a hang."""
    out = tmp_path / "run"
    port = free_port()
    procs = [subprocess.Popen(one(digits_store, out, *EQUIV, "--epochs", "20", "--train-samples", "256", "--eval-samples", "64"),
                              env=env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), LOCAL_WORLD_SIZE="2",
                                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), SATKIT_DIST_TIMEOUT="5"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoint.pt").exists():
            assert procs[0].poll() is None and procs[1].poll() is None, procs[0].stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.005)
        os.kill(procs[1].pid, signal.SIGSTOP)  # alive, but silent
        t = time.monotonic()
        err = procs[0].communicate(timeout=120)[1]
        assert procs[0].returncode == 1 and time.monotonic() - t < 60
        (line,) = errors(err)
        assert line.startswith("Error: rank 0 of 2: lost contact with the other processes while ")
        assert "SATKIT_DIST_TIMEOUT=5 s" in line and "Traceback" not in err
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)


def test_free_at_under_torchrun_keeps_each_process_perturbation_across_resume(digits_store: Path,
                                                                                 tmp_path: Path) -> None:
    """Free-AT's persistent perturbation is per process: all of them are checkpointed by rank 0
    and each gets its own back on --resume, so 2 passes + resume to 3 equal 3 passes."""
    base = ("--method", "free", "--replays", "2", "--batch-size", "32", "--train-samples", "256",
            "--eval-samples", "32", "--eval-steps", "1", "--summary-samples", "0", "--seed", "7")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    ref = subprocess.Popen(torchrun(digits_store, whole, *base, "--epochs", "6"), env=env(), cwd=tmp_path,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = subprocess.run(torchrun(digits_store, cut, *base, "--epochs", "4"), env=env(), cwd=tmp_path,
                           capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    states = load_checkpoint(cut)["method_state"]
    assert len(states) == 2 and not torch.equal(states[0]["free_delta"], states[1]["free_delta"])
    again = subprocess.run(torchrun(digits_store, cut, *base, "--epochs", "6", "--resume"), env=env(),
                           cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert ref.wait(timeout=600) == 0, ref.stderr.read() if ref.stderr else ""
    assert lines(cut) == lines(whole) and len(lines(whole)) == 3
