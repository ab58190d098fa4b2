"""Hostile input to `sattrain run`, `--resume` and `sattrain report`: a generated corpus.

The training and reporting half of the hostile-input issue (tests/test_hostile.py has the
store, checkpoint-evaluation and one-line machinery half). Each case crafts an input (an
option value, a diverging run, a damaged or crafted checkpoint or run directory, a
malformed run file, a planted symbolic link), runs the real CLI on it in a sandbox, and
asserts what satkit promises for every failure a user can cause:

* a non-zero exit and exactly one stderr line starting with "Error:" (the last line; a
  run that started may have logged progress before it), never a traceback;
* nothing created, changed or deleted in the sandbox outside what the command may write
  (for refusals before training: nothing at all), the victim file that planted links aim
  at intact, and no temporary file left behind;
* a diverged run never leaves NaN weights as a checkpoint nor a metrics.json that says
  it finished;
* `sattrain report` skips a run whose files are malformed with one warning line naming
  the file and reports the others (and fails in one line when no run is readable).

Inputs come from parametrised tables and hypothesis strategies (option values, random
JSON for the report). The store is tiny (4x4 images, 24 samples) so that a training run
takes a fraction of a second and the module runs in well under a minute and a half.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import math
import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sattrain import checkpoint as ckpt_mod
from satdata.atomic import atomic_write, write_json_atomic
from sattrain.checkpoint import NonFiniteState, load_checkpoint, save_checkpoint
from sattrain.cli import main
from sattrain.config import parse_eps
from sattrain.models import create_model
from tests.fixtures import minimal_run
from test_hostile import make_store, tree_snapshot  # the same tiny store and sandbox snapshot

pytestmark = pytest.mark.usefixtures("one_thread")

# One epoch of two steps on the tiny store, a one-step monitor, no end-of-run summary.
QUICK = ["--batch-size", "8", "--eval-samples", "8", "--eval-steps", "1", "--steps", "1", "--summary-samples", "0",
         "--device", "cpu", "--threads", "1", "-q"]
# SATKIT_HYPOTHESIS_EXAMPLES=500 explores further (and without derandomize, new examples each run).
HYPO = settings(max_examples=int(os.environ.get("SATKIT_HYPOTHESIS_EXAMPLES", "10")), deadline=None,
                derandomize="SATKIT_HYPOTHESIS_EXAMPLES" not in os.environ,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.filter_too_much])
TEMP_MARKERS = (".tmp-", ".write-probe-")


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The tiny store, shared read-only: its files must be unchanged after the module."""
    path = make_store(tmp_path_factory.mktemp("store") / "tiny.zarr")
    before = _tree_digest(path)
    yield path
    assert _tree_digest(path) == before, "a test changed the shared store"


@pytest.fixture(scope="module")
def trained(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-epoch run (Adam, constant schedule): the base of the crafted resumes."""
    out = tmp_path_factory.mktemp("trained") / "run"
    res = CliRunner().invoke(main, ["run", str(store), "--out", str(out), "--epochs", "1", *QUICK])
    assert res.exit_code == 0, res.output
    return out


@dataclass
class Sandbox:
    """One test's world: the working directory, the run directories, and an "outside"
    directory with a victim file that crafted links aim at."""

    root: Path
    work: Path
    outside: Path
    store: Path

    @property
    def victim(self) -> Path:
        return self.outside / "victim.txt"

    def snapshot(self) -> dict[str, str]:
        return tree_snapshot(self.root)

    def temp_files(self) -> list[str]:
        return [str(p) for p in self.root.rglob("*") if any(m in p.name for m in TEMP_MARKERS) and not p.is_symlink()]


@pytest.fixture
def box(tmp_path: Path, store: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Sandbox]:
    root = tmp_path / "sandbox"
    sb = Sandbox(root=root, work=root / "work", outside=root / "outside", store=store)
    sb.work.mkdir(parents=True)
    sb.outside.mkdir()
    sb.victim.write_text("must survive\n")
    monkeypatch.chdir(sb.work)
    monkeypatch.delenv("SATKIT_DEBUG", raising=False)
    yield sb


def invoke(args: list[Any]) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def _nonblank(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def expect_error(box: Sandbox, args: list[Any], *, may_change: tuple[str, ...] = (), only_line: bool = True) -> str:
    """Run a failing command; assert the promises above; return its Error line.

    ``may_change``: sandbox paths (relative to its root) the command may write.
    ``only_line``: stderr is the Error line alone (a refusal before the run started).
    """
    before = box.snapshot()
    res = invoke(args)
    after = box.snapshot()
    assert res.exit_code not in (0, None), res.output
    assert isinstance(res.exception, SystemExit), f"escaped: {res.exception!r}"
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    lines = _nonblank(res.stderr)
    assert lines and lines[-1].startswith("Error: "), res.stderr
    assert sum(ln.startswith("Error") for ln in lines) == 1, res.stderr
    if only_line:
        assert len(lines) == 1, res.stderr
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert {c for c in changed if not (may_change and c.startswith(may_change))} == set(), changed
    assert box.victim.read_text() == "must survive\n"
    assert box.temp_files() == []
    return lines[-1]


def run_args(box: Sandbox, out: Path | str, *extra: Any, epochs: int = 1) -> list[Any]:
    return ["run", box.store, "--out", out, "--epochs", str(epochs), *QUICK, *extra]


# --------------------------------------------------------------------------- 1. options

OPTION_CASES: dict[str, tuple[list[str], str]] = {
    # click parses "nan" and "inf" (and 1e999, as inf) as floats: TrainConfig.resolved() refuses them
    "lr nan": (["--lr", "nan"], "--lr: must be a finite number > 0, got nan"),
    "lr inf": (["--lr", "inf"], "--lr: must be a finite number > 0, got inf"),
    "lr 1e999": (["--lr", "1e999"], "--lr: must be a finite number > 0, got inf"),
    "lr -inf": (["--lr", "-inf"], "--lr: must be a finite number > 0, got -inf"),
    "lr negative": (["--lr", "-0.1"], "--lr: must be a finite number > 0, got -0.1"),
    "lr zero": (["--lr", "0"], "--lr: must be a finite number > 0, got 0.0"),
    "momentum nan": (["--momentum", "nan"], "--momentum: must be in [0, 1), got nan"),
    "momentum 1": (["--momentum", "1"], "--momentum: must be in [0, 1), got 1.0"),
    "momentum negative": (["--momentum", "-0.5"], "--momentum: must be in [0, 1)"),
    "weight decay nan": (["--weight-decay", "nan"], "--weight-decay: must be a finite number >= 0, got nan"),
    "weight decay inf": (["--weight-decay", "inf"], "--weight-decay: must be a finite number >= 0, got inf"),
    "weight decay negative": (["--weight-decay", "-1e-4"], "--weight-decay: must be a finite number >= 0"),
    "beta nan": (["--method", "trades", "--beta", "nan"], "--beta: must be a finite number >= 0, got nan"),
    "beta inf": (["--method", "trades", "--beta", "inf"], "--beta: must be a finite number >= 0, got inf"),
    "beta negative": (["--method", "trades", "--beta", "-6"], "--beta: must be a finite number >= 0"),
    "step size zero for pgd": (["--method", "pgd", "--step-size", "0"], "--step-size: must be > 0 for --method pgd"),
    "alpha nan": (["--alpha", "nan"], "--alpha: must be in (0, 1], got nan"),
    "alpha zero": (["--alpha", "0"], "--alpha: must be in (0, 1], got 0.0"),
    "alpha above 1": (["--alpha", "1.5"], "--alpha: must be in (0, 1], got 1.5"),
    "alpha -inf": (["--alpha", "-inf"], "--alpha: must be in (0, 1]"),
    "eps0 (noise scale) nan": (["--eps0", "nan"], "'--eps0': cannot read 'nan'"),
    "eps0 (noise scale) inf": (["--eps0", "inf"], "'--eps0': cannot read 'inf'"),
    "eps 1e400": (["--eps", "1e400"], "'--eps': '1e400' is above 1"),
    "eps 8": (["--eps", "8"], "did you mean 8/255?"),
    "eps 1/0": (["--eps", "1/0"], "divides by zero"),
    "step size negative": (["--step-size", "-1/255"], "'--step-size': cannot read '-1/255'"),
    "step size 1e999/255": (["--step-size", "1e999/255"], "'--step-size': '1e999/255' is above 1"),
    "epochs 0": (["--epochs", "0"], "'--epochs'"),
    "epochs negative": (["--epochs", "-3"], "'--epochs'"),
    "epochs absurd": (["--epochs", "2000000"], "--epochs: must be in [1, 1000000], got 2000000"),
    "batch size 1": (["--batch-size", "1"], "'--batch-size'"),
    "batch size nan": (["--batch-size", "nan"], "'--batch-size'"),
    "threads absurd": (["--threads", "100000"], "--threads: must be in [1, 1024], got 100000"),
    "memory budget 0": (["--memory-budget", "0"], "--memory-budget: must be >= 1, got 0"),
    "memory budget 400 digits": (["--memory-budget", "9" * 400 + "T"], "more memory than any machine has"),
    "memory budget nan": (["--memory-budget", "nan"], "cannot read 'nan' as a size"),
    "seed nan": (["--seed", "nan"], "'--seed'"),
    "eval samples negative": (["--eval-samples", "-1"], "'--eval-samples'"),
    "train samples 1": (["--train-samples", "1"], "'--train-samples'"),
    "out empty": (["--out", ""], "--out: '' is an empty path"),
}


@pytest.mark.parametrize("case", sorted(OPTION_CASES))
def test_bad_option_values_are_refused_naming_the_option(box: Sandbox, case: str) -> None:
    extra, fragment = OPTION_CASES[case]
    # the option comes last: it overrides QUICK's value of the same option
    line = expect_error(box, run_args(box, box.work / "run", *extra))
    assert fragment in line, line
    assert not (box.work / "run").exists()


_VALID: dict[str, Callable[[float], bool]] = {
    "--lr": lambda v: math.isfinite(v) and v > 0,
    "--momentum": lambda v: 0 <= v < 1,
    "--weight-decay": lambda v: math.isfinite(v) and v >= 0,
    "--alpha": lambda v: 0 < v <= 1,
    "--beta": lambda v: math.isfinite(v) and v >= 0,
}


@HYPO
@given(option=st.sampled_from(sorted(_VALID)),
       value=st.one_of(st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1.0, 2.0]), st.floats()))
def test_generated_bad_numbers_are_refused(box: Sandbox, option: str, value: float) -> None:
    assume(not _VALID[option](value))
    extra = ["--method", "trades"] if option == "--beta" else []
    line = expect_error(box, run_args(box, box.work / "run", *extra, option, repr(value)))
    assert line.startswith(f"Error: {option}: must be"), line


@HYPO
@given(text=st.one_of(st.text(max_size=12), st.sampled_from(["nan", "inf", "-inf", "1e999", "NaN/255", "8/nan",
                                                               "0x10", "1e-400/0", "+1", "½"])))
def test_generated_bad_epsilons_are_refused(box: Sandbox, text: str) -> None:
    try:
        parse_eps(text)
    except Exception:  # noqa: BLE001 - refused: what the CLI must say in one line
        pass
    else:
        assume(False)
    assume("\x00" not in text and not text.startswith("-"))  # not representable as an argv option value
    line = expect_error(box, run_args(box, box.work / "run", "--eps0", text))
    assert "--eps0" in line, line


# --------------------------------------------------------------------------- 2. divergence


def _no_non_finite(path: Path) -> dict[str, Any]:
    ck = load_checkpoint(path)
    assert ckpt_mod.non_finite_tensors({"m": ck["model"], "o": ck["optimizer"]}) == [], path
    return ck


def test_a_huge_lr_diverges_in_one_line_and_writes_no_checkpoint(box: Sandbox) -> None:
    run = box.work / "run"
    line = expect_error(box, run_args(box, run, "--optimizer", "sgd", "--lr", "1e12", epochs=3),
                        may_change=("work/run",), only_line=False)
    assert "training diverged; try a lower --lr" in line and "epoch 1 (t = 0)" in line, line
    assert f"no checkpoint was saved in {run}" in line and "the run is not finished" in line
    assert not (run / "checkpoint.pt").exists() and not (run / "best.pt").exists()
    assert not (run / "metrics.json").exists() and (run / "metrics.jsonl").read_text() == ""


def _poison(monkeypatch: pytest.MonkeyPatch, *, epoch: int, how: str) -> None:
    """From epoch ``epoch`` (from 0) on, the loss becomes NaN/inf, or the weights become inf
    after the epoch's last step while every loss stays finite."""
    import sattrain.trainer as train_mod

    if how in ("nan", "inf"):
        real_get = train_mod.get_method

        def get_method(name: str) -> Any:
            m = real_get(name)

            def fn(model: Any, batch: Any, ctx: Any) -> Any:
                res = m.fn(model, batch, ctx)
                if ctx.epoch >= epoch:
                    bad = res.loss * math.nan if how == "nan" else res.loss + math.inf
                    res = res._replace(loss=bad)
                return res

            return replace(m, fn=fn)

        monkeypatch.setattr(train_mod, "get_method", get_method)
    else:
        real_epoch = train_mod.train_one_epoch

        def train_one_epoch(model: Any, *a: Any, **k: Any) -> Any:
            stats = real_epoch(model, *a, **k)
            if a[2].epoch >= epoch:  # (data, method, ctx, ...)
                with torch.no_grad():
                    next(model.parameters()).fill_(math.inf)
            return stats

        monkeypatch.setattr(train_mod, "train_one_epoch", train_one_epoch)


@pytest.mark.parametrize("how, fragment", [
    ("nan", "epoch 2 (t = 1), step 1 of 2: the training loss is not finite (loss is nan): training diverged"),
    ("inf", "epoch 2 (t = 1), step 1 of 2: the training loss is not finite (loss is inf): training diverged"),
    ("weights", "epoch 2 (t = 1), after step 2 of 2: the weights hold NaN or infinite values"),
])
def test_divergence_keeps_the_last_finite_checkpoint(box: Sandbox, monkeypatch: pytest.MonkeyPatch, how: str,
                                                     fragment: str) -> None:
    _poison(monkeypatch, epoch=1, how=how)
    run = box.work / "run"
    line = expect_error(box, run_args(box, run, epochs=3), may_change=("work/run",), only_line=False)
    assert fragment in line and f"{run / 'checkpoint.pt'} keeps epoch 1 (the last finite one)" in line, line
    assert _no_non_finite(run / "checkpoint.pt")["epoch"] == 1
    assert _no_non_finite(run / "best.pt")["epoch"] == 1
    assert not (run / "metrics.json").exists()
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [0]


def test_a_resumed_run_that_diverges_no_longer_claims_it_finished(box: Sandbox, trained: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    run = box.work / "run"
    shutil.copytree(trained, run)
    assert (run / "metrics.json").exists()  # the one-epoch run finished
    _poison(monkeypatch, epoch=1, how="nan")
    line = expect_error(box, run_args(box, run, "--resume", epochs=2), may_change=("work/run",), only_line=False)
    assert "training diverged" in line and "keeps epoch 1" in line
    assert not (run / "metrics.json").exists()  # its end-of-run record described a shorter run
    assert _no_non_finite(run / "checkpoint.pt")["epoch"] == 1


def test_save_checkpoint_refuses_non_finite_state(tmp_path: Path) -> None:
    model = create_model("small-cnn", 3)
    state = {"model": model.state_dict(), "optimizer": None, "epoch": 1, "model_spec": {}}
    save_checkpoint(tmp_path / "c.pt", state)
    before = (tmp_path / "c.pt").read_bytes()
    bad = {k: v.clone() for k, v in state["model"].items()}
    bad[next(iter(bad))].view(-1)[0] = math.nan
    with pytest.raises(NonFiniteState, match=r"c\.pt: not written: the state holds NaN or infinite values"):
        save_checkpoint(tmp_path / "c.pt", {**state, "model": bad})
    assert (tmp_path / "c.pt").read_bytes() == before and sorted(os.listdir(tmp_path)) == ["c.pt"]


# --------------------------------------------------------------------------- 4. crafted checkpoints on --resume

Craft = Callable[[Path], None]


def _ck(mutate: Callable[[dict[str, Any]], None]) -> Craft:
    """Rewrite the run's checkpoint.pt with ``mutate`` applied (plain torch.save: no checks)."""
    def f(run: Path) -> None:
        d = torch.load(run / "checkpoint.pt", weights_only=True)
        mutate(d)
        torch.save(d, run / "checkpoint.pt")
    return f


def _set(*path: Any, value: Any) -> Craft:
    def mutate(d: dict[str, Any]) -> None:
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value() if callable(value) else value
    return _ck(mutate)


def _opt_state(name: str, value: Callable[[torch.Tensor], Any]) -> Craft:
    def mutate(d: dict[str, Any]) -> None:
        entry = d["optimizer"]["state"][0]
        entry[name] = value(entry["exp_avg"])
    return _ck(mutate)


def _model(fn: Callable[[dict[str, Any]], dict[str, Any]]) -> Craft:
    def mutate(d: dict[str, Any]) -> None:
        d["model"] = fn(d["model"])
    return _ck(mutate)


def _first_nan(m: dict[str, Any]) -> dict[str, Any]:
    k = next(iter(m))
    m[k] = m[k].clone().fill_(math.nan)
    return m


def _first_int(m: dict[str, Any]) -> dict[str, Any]:
    k = next(iter(m))
    m[k] = m[k].to(torch.int64)
    return m


def _five_classes(d: dict[str, Any]) -> None:
    d["model"] = create_model("small-cnn", 5).state_dict()
    d["model_spec"]["num_classes"] = 5
    d["model_spec"]["classes"] = list("abcde")


def _file(name: str, data: bytes | None) -> Craft:
    def f(run: Path) -> None:
        if data is None:
            (run / name).unlink()
        else:
            (run / name).write_bytes(data)
    return f


_LINE = b'{"epoch": 0, "seconds": 1.0, "loss": 1.0}\n'
RESUME_CASES: dict[str, tuple[Craft, str]] = {
    "optimizer buffer of another shape": (_opt_state("exp_avg", lambda t: torch.zeros(3)),
                                          "parameter 0: exp_avg is a torch.float32 tensor of shape (3,)"),
    "optimizer buffer a string": (_opt_state("exp_avg", lambda t: "adam"), "exp_avg is 'adam'; expected a tensor"),
    "optimizer buffer of integers": (_opt_state("exp_avg_sq", lambda t: t.to(torch.int64)),
                                     "expected a floating-point tensor"),
    "optimizer buffer NaN": (_opt_state("exp_avg", lambda t: torch.full_like(t, math.nan)),
                             "exp_avg holds NaN or infinite values"),
    "optimizer step negative": (_opt_state("step", lambda t: torch.tensor(-3.0)), "step"),
    "optimizer step NaN": (_opt_state("step", lambda t: math.nan), "has step nan"),
    "optimizer state of parameter 999": (_set("optimizer", "state", 999, value={}), "state for parameter 999"),
    "optimizer no parameter groups": (_set("optimizer", "param_groups", value=[]), "expected a list of 1 group"),
    "optimizer lr NaN": (_set("optimizer", "param_groups", 0, "lr", value=math.nan), "has lr nan"),
    "optimizer lr not the scheduler's": (_set("optimizer", "param_groups", 0, "lr", value=10.0),
                                         "but the scheduler's last lr is 0.001"),
    "optimizer weight decay changed": (_set("optimizer", "param_groups", 0, "weight_decay", value=5.0),
                                       "has weight_decay 5.0; the run's options give 0.0"),
    "optimizer betas garbage": (_set("optimizer", "param_groups", 0, "betas", value="fast"), "has betas 'fast'"),
    "optimizer of another network": (_set("optimizer", "param_groups", 0, "params", value=[0, 1]),
                                      "(another network's optimizer?)"),
    "optimizer missing (a best.pt)": (_set("optimizer", value=None), "holds no optimizer state (a best.pt?)"),
    "optimizer a list": (_set("optimizer", value=[1, 2]), "'optimizer' is [1, 2]; expected a dict or None"),
    "scheduler a string": (_set("scheduler", value="cosine"), "'scheduler' is 'cosine'; expected a dict or None"),
    "scheduler unknown key": (_set("scheduler", "get_lr", value=1), "scheduler state: unknown key 'get_lr'"),
    "scheduler last_epoch float": (_set("scheduler", "last_epoch", value=1.0), "last_epoch is 1.0"),
    "scheduler last_epoch huge": (_set("scheduler", "last_epoch", value=10**18), "last_epoch is 1000000000000000000"),
    "scheduler base_lrs garbage": (_set("scheduler", "base_lrs", value=["x"]), "base_lrs is ['x']"),
    "scheduler lr_lambdas garbage": (_set("scheduler", "lr_lambdas", value=[{"__code__": 1}]), "lr_lambdas is"),
    "scheduler last lr NaN": (_set("scheduler", "_last_lr", value=[math.nan]), "_last_lr is [nan]"),
    "epoch negative": (_set("epoch", value=-1), "'epoch' is -1"),
    "epoch float": (_set("epoch", value=1.0), "'epoch' is 1.0"),
    "epoch true": (_set("epoch", value=True), "'epoch' is True"),
    "epoch huge": (_set("epoch", value=10**18), "'epoch' says 1000000000000000000 epochs are done of a run of 1"),
    "rng state a string": (_set("rng", "torch", value="seed"), "rng state 'torch' is 'seed'"),
    "rng state of floats": (_set("rng", "torch", value=lambda: torch.zeros(4)), "a torch.float32 tensor"),
    "rng a list": (_set("rng", value=[1]), "'rng' is [1]; expected a dict"),
    "model of another network": (_model(lambda m: torch.nn.Linear(48, 3).state_dict()), "weights do not fit"),
    "model of 5 classes": (_model(lambda m: create_model("small-cnn", 5).state_dict()), "other shape"),
    "model NaN weights": (_model(_first_nan), "the weights hold NaN or infinite values"),
    "model integer weights": (_model(_first_int), "another kind of dtype"),
    "checkpoint of a 5-class store": (_ck(_five_classes), "the checkpoint's network has num_classes 5"),
    "checkpoint of another store": (_set("extra", "arrays", "train/images", value="0" * 64),
                                    "store whose contents differ from the run's in an array it trains or evaluates "
                                    "from: train/images has sha256"),
    "checkpoint of another store, before per-array digests": (
        _ck(lambda d: (d["extra"].pop("arrays"), d["extra"].update(store_digest="0" * 64))),
        "store whose contents differ"),
    "checkpoint arrays garbage": (_set("extra", "arrays", value=[1]), "'extra' has arrays [1]; expected an object"),
    "config lr NaN": (_set("config", "lr", value=math.nan),
                      "the run options it records are invalid (--lr: must be a finite number > 0, got nan)"),
    "config epochs a string": (_set("config", "epochs", value="ten"), "(--epochs: must be an integer, got 'ten')"),
    "config maps a number": (_set("config", "maps", value=5), "(--map: must be a list of map names, got 5)"),
    "config a list": (_set("config", value=["lr"]), "'config' is ['lr']; expected a dict"),
    "best record garbage": (_set("best", value={"epoch": 0, "pgd1_monitor": "high"}), "best record"),
    "best epoch in the future": (_set("best", "epoch", value=7), "best record"),
    "checkpoint truncated": (lambda run: (run / "checkpoint.pt").write_bytes((run / "checkpoint.pt").read_bytes()[:999]),
                             "not a readable satkit checkpoint"),
    "metrics.jsonl not JSON": (_file("metrics.jsonl", b"{oops\n" + _LINE), "metrics.jsonl:1: not a JSON line"),
    "metrics.jsonl not UTF-8": (_file("metrics.jsonl", b"\xff\xfe\x00"), "metrics.jsonl: not UTF-8 text"),
    "metrics.jsonl missing": (_file("metrics.jsonl", None), "metrics.jsonl: missing"),
    "metrics.jsonl epoch a string": (_file("metrics.jsonl", b'{"epoch": "0", "seconds": 1}\n'),
                                     "metrics.jsonl:1: not an epoch record"),
    "metrics.jsonl an epoch twice": (_file("metrics.jsonl", _LINE + _LINE), "holds epochs 0, 0"),
    "metrics.jsonl nested bomb": (_file("metrics.jsonl", b"[" * 100_000 + b"\n" + _LINE), "metrics.jsonl:1"),
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_crafted_run_directories_on_resume_end_in_one_line(box: Sandbox, trained: Path, case: str) -> None:
    craft, fragment = RESUME_CASES[case]
    run = box.work / "run"
    shutil.copytree(trained, run)
    craft(run)
    line = expect_error(box, run_args(box, run, "--resume", epochs=2))
    assert fragment in line and str(run) in line, line
    assert "weights_only" not in line


# Where a generated value is put in checkpoint.pt, and what values (tensors by recipe, from the original).
FUZZ_PATHS = [("epoch",), ("best",), ("optimizer",), ("scheduler",), ("rng",), ("extra",), ("config",),
              ("model_spec",), ("best", "epoch"), ("best", "pgd1_monitor"), ("optimizer", "state", 0, "step"),
              ("optimizer", "state", 0, "exp_avg"), ("optimizer", "state", 1), ("optimizer", "param_groups", 0, "lr"),
              ("optimizer", "param_groups", 0, "eps"), ("optimizer", "param_groups", 0, "params"),
              ("scheduler", "last_epoch"), ("scheduler", "_last_lr"), ("scheduler", "base_lrs"),
              ("scheduler", "_step_count"), ("scheduler", "_is_initial"), ("rng", "torch"), ("extra", "store_digest"),
              ("extra", "arrays"), ("extra", "arrays", "train/images"),
              ("config", "lr"), ("config", "epochs"), ("config", "maps"), ("config", "seed"), ("config", "alpha"),
              ("model_spec", "num_classes"), ("model_spec", "classes"), ("model_spec", "image_size")]
_TENSORS: dict[str, Callable[[Any], Any]] = {
    "zeros(3)": lambda old: torch.zeros(3),
    "same, NaN": lambda old: (torch.full(old.shape, math.nan) if isinstance(old, torch.Tensor)
                              else torch.tensor(math.nan)),
    "same, int64": lambda old: old.to(torch.int64) if isinstance(old, torch.Tensor) else torch.tensor(1),
    "same, uint8": lambda old: old.to(torch.uint8) if isinstance(old, torch.Tensor) else torch.tensor(1),
    "scalar -1": lambda old: torch.tensor(-1.0),
}
fuzz_values = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**20), max_value=10**20), st.floats(), st.text(max_size=6),
    st.lists(st.integers(-2, 3), max_size=3), st.just({}), st.sampled_from(sorted(_TENSORS)).map(lambda k: ("tensor", k)),
)


@HYPO
@given(where=st.sampled_from(FUZZ_PATHS), value=fuzz_values)
def test_generated_checkpoint_damage_resumes_or_ends_in_one_line(box: Sandbox, trained: Path, where: tuple[Any, ...],
                                                                 value: Any) -> None:
    """Any one value of checkpoint.pt replaced: the resume either works (and leaves finite
    weights) or is refused in one line naming the run, changing nothing."""
    run = box.work / f"run-{next(_EXAMPLE)}"
    shutil.copytree(trained, run)
    d = torch.load(run / "checkpoint.pt", weights_only=True)
    parent = d
    for k in where[:-1]:
        parent = parent[k]
    if isinstance(value, tuple):
        value = _TENSORS[value[1]](parent.get(where[-1]))
    parent[where[-1]] = value
    torch.save(d, run / "checkpoint.pt")
    before = box.snapshot()
    res = invoke(run_args(box, run, "--resume", epochs=2))
    assert "Traceback" not in res.output and isinstance(res.exception, (SystemExit, type(None))), repr(res.exception)
    if res.exit_code == 0:
        assert _no_non_finite(run / "checkpoint.pt")["epoch"] == 2
    else:
        lines = _nonblank(res.stderr)
        assert len(lines) == 1 and lines[0].startswith("Error: ") and str(run) in lines[0], res.stderr
        assert box.snapshot() == before
    assert box.temp_files() == [] and box.victim.read_text() == "must survive\n"
    shutil.rmtree(run)


def test_an_untouched_copy_resumes(box: Sandbox, trained: Path) -> None:
    """The control of the table above: the copied run itself resumes and finishes."""
    run = box.work / "run"
    shutil.copytree(trained, run)
    res = invoke(run_args(box, run, "--resume", epochs=2))
    assert res.exit_code == 0, res.output
    assert _no_non_finite(run / "checkpoint.pt")["epoch"] == 2 and box.temp_files() == []


# --------------------------------------------------------------------------- 5. atomic writes


def test_a_failed_write_leaves_no_temporary_file_and_names_the_file(tmp_path: Path) -> None:
    dest = tmp_path / "metrics.json"
    write_json_atomic(dest, {"ok": 1})

    def full(f: Any) -> None:
        f.write(b"{partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as info:
        atomic_write(dest, full)
    assert info.value.filename == str(dest)
    assert json.loads(dest.read_text()) == {"ok": 1} and sorted(os.listdir(tmp_path)) == ["metrics.json"]

    def interrupted(f: Any) -> None:
        f.write(b"{partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(dest, interrupted)
    assert json.loads(dest.read_text()) == {"ok": 1} and sorted(os.listdir(tmp_path)) == ["metrics.json"]


def test_a_full_disk_while_checkpointing_is_one_line_and_leaves_no_temp(box: Sandbox,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    real_save = torch.save

    def save(obj: Any, f: Any, *a: Any, **k: Any) -> None:
        if isinstance(obj, dict) and obj.get("format") == "satkit-checkpoint":
            f.write(b"PK\x03\x04partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckpt_mod.torch, "save", save)
    run = box.work / "run"
    line = expect_error(box, run_args(box, run), may_change=("work/run",), only_line=False)
    assert line == f"Error: no space left on device (ENOSPC), {run / 'checkpoint.pt'}", line
    assert not (run / "checkpoint.pt").exists()


def test_a_link_planted_at_the_temporary_name_does_not_redirect_the_write(box: Sandbox) -> None:
    """The temporary name of old (.checkpoint.pt.tmp-<pid>) was predictable: a link there
    sent the checkpoint to wherever it pointed. Now the name is random and created with O_EXCL."""
    run = box.work / "run"
    run.mkdir()
    for name in ("checkpoint.pt", "best.pt", "config.json", "metrics.json"):
        (run / f".{name}.tmp-{os.getpid()}").symlink_to(box.victim)
    res = invoke(run_args(box, run))
    assert res.exit_code == 0, res.output
    assert box.victim.read_text() == "must survive\n" and box.temp_files() == []
    assert load_checkpoint(run)["epoch"] == 1


def test_a_link_planted_at_metrics_jsonl_does_not_truncate_its_target(box: Sandbox) -> None:
    run = box.work / "run"
    run.mkdir()
    (run / "metrics.jsonl").symlink_to(box.victim)
    res = invoke(run_args(box, run))
    assert res.exit_code == 0, res.output
    assert box.victim.read_text() == "must survive\n"
    assert not (run / "metrics.jsonl").is_symlink() and len((run / "metrics.jsonl").read_text().splitlines()) == 1


# --------------------------------------------------------------------------- 6. the run directory


def test_out_an_existing_file(box: Sandbox) -> None:
    blocker = box.work / "file.txt"
    blocker.write_text("x")
    assert str(blocker) in expect_error(box, run_args(box, blocker))


def test_out_below_a_file(box: Sandbox) -> None:
    blocker = box.work / "file.txt"
    blocker.write_text("x")
    line = expect_error(box, run_args(box, blocker / "run"))
    assert f"--out: cannot create the run directory {blocker / 'run'} (not a directory" in line, line


@pytest.mark.parametrize("target", ["outside", "dangling"])
def test_out_a_symlink_is_refused(box: Sandbox, target: str) -> None:
    link = box.work / "run"
    link.symlink_to(box.outside if target == "outside" else box.root / "nowhere")
    line = expect_error(box, run_args(box, link))
    assert f"--out: {link} is a symbolic link" in line, line


def test_out_unwritable_is_refused_before_training(box: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """Root writes anywhere, so an unwritable directory is simulated at the probe; the real
    permission check follows where the tests do not run as root."""
    real_open = os.open

    def deny(path: Any, flags: int, *a: Any, **k: Any) -> int:
        if ".write-probe-" in str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", deny)
    run = box.work / "run"
    line = expect_error(box, run_args(box, run), may_change=("work/run",))
    assert line == f"Error: --out: cannot write in the run directory {run} (permission denied)", line
    assert os.listdir(run) == []  # nothing read, trained or written


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write into a mode-555 directory")
def test_out_in_a_read_only_directory(box: Sandbox) -> None:
    ro = box.work / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        line = expect_error(box, run_args(box, ro / "run"))
    finally:
        ro.chmod(0o755)
    assert str(ro / "run") in line


# --------------------------------------------------------------------------- 3. sattrain report


def _good_run(root: Path, name: str, seed: int) -> Path:
    """A minimal finished run directory (no epochs, no evaluation: no plots to draw, fast)."""
    return minimal_run(root / name, seed)


def _summary(**over: Any) -> str:
    s = {"protocol": "strong", "samples": 8, "split": "test", "complete": True, "clean": 0.5,
         "robust": {"pgd@8/255": 0.25}, "headline": {"name": "pgd@8/255", "value": 0.25}, **over}
    return json.dumps({"metric": "accuracy", "summary": s, "epochs": 1})


def _eval(**over: Any) -> dict[str, Any]:
    return {"version": 2, "protocol": "strong", "split": "test", "samples": 8, "split_size": 8, "complete": True,
            "metric": "accuracy", "clean": 0.5, "robust": {"pgd@8/255": 0.25},
            "pgd": {"steps": 50, "restarts": 2, "step_label": "eps/4", "loss": "ce",
                    "results": [{"eps": 8 / 255, "value": 0.25}]},
            "headline": {"name": "pgd@8/255", "value": 0.25}, **over}


_DEEP = "[" * 100_000
REPORT_CASES: dict[str, tuple[str, str | bytes, str]] = {
    # name: (file of the bad run, its content, fragment of the warning)
    "metrics.json truncated": ("metrics.json", _summary()[:40], "not valid JSON"),
    "metrics.json not JSON": ("metrics.json", "hello", "not valid JSON"),
    "metrics.json empty": ("metrics.json", "", "not valid JSON"),
    "metrics.json not UTF-8": ("metrics.json", b"\xff\xfe{\x00}", "not UTF-8 text (byte 0xff at position 0)"),
    "metrics.json nested bomb": ("metrics.json", _DEEP, "not readable JSON (nested too deeply)"),
    "metrics.json nested 40 deep": ("metrics.json", '{"a": ' + "[" * 40 + "]" * 40 + "}", "nested more than 32"),
    "metrics.json a list": ("metrics.json", "[1, 2]", "expected a JSON object, got a list of 2 item(s)"),
    "metrics.json epochs a string": ("metrics.json", '{"epochs": "ten"}', "'epochs' is 'ten'"),
    "metrics.json epochs 5000 digits": ("metrics.json", '{"epochs": 1' + "0" * 5000 + "}", "not readable JSON"),
    "metrics.json best epoch NaN": ("metrics.json", '{"best": {"epoch": NaN}}', "'epoch' is nan"),
    "metrics.json maps a number": ("metrics.json", '{"maps": 5}', "'maps' is 5"),
    "metrics.json summary clean NaN": ("metrics.json", _summary(clean=math.nan), "'clean' is nan"),
    "metrics.json summary clean a string": ("metrics.json", _summary(clean="high"), "'clean' is 'high'"),
    "metrics.json summary a list": ("metrics.json", '{"summary": [0.5]}', "'summary' is a list of 1 item(s)"),
    "metrics.json robust_acc above 1": ("metrics.json", '{"robust_acc": {"pgd@8/255": 7}}', "is 7; expected a score"),
    "metrics.jsonl cut mid-line": ("metrics.jsonl", '{"epoch": 0, "clean_acc": 0.5}\n{"epoch": 1, "clea',
                                   "metrics.jsonl:2: not valid JSON"),
    "metrics.jsonl a list per line": ("metrics.jsonl", "[1]\n", "metrics.jsonl:1: expected a JSON object per line"),
    "metrics.jsonl epoch a string": ("metrics.jsonl", '{"epoch": "3"}\n', "metrics.jsonl:1: not a sattrain epoch"),
    "metrics.jsonl no epoch": ("metrics.jsonl", '{"loss": 1}\n', "no 'epoch'"),
    "metrics.jsonl accuracy 7": ("metrics.jsonl", '{"epoch": 0, "clean_acc": 7}\n', "'clean_acc' is 7"),
    "metrics.jsonl seconds Infinity": ("metrics.jsonl", '{"epoch": 0, "seconds": Infinity}\n', "'seconds' is inf"),
    "metrics.jsonl not UTF-8": ("metrics.jsonl", b'{"epoch": 0}\n\xc3\x28\n', "not UTF-8 text"),
    "eval.json truncated": ("eval.json", json.dumps(_eval())[:60], "eval.json: not valid JSON"),
    "eval.json nested bomb": ("eval.json", _DEEP, "eval.json: not readable JSON"),
    "eval.json clean a string": ("eval.json", json.dumps(_eval(clean="high")), "'clean' is 'high'"),
    "eval.json clean NaN": ("eval.json", json.dumps(_eval(clean=math.nan)), "'clean' is nan"),
    "eval.json clean -Infinity": ("eval.json", json.dumps(_eval(clean=-math.inf)), "'clean' is -inf"),
    "eval.json robust a list": ("eval.json", json.dumps(_eval(robust=[0.1])), "'robust' is a list"),
    "eval.json robust eps huge": ("eval.json", json.dumps(_eval(robust={"pgd@" + "9" * 400 + "/255": 0.1})),
                                  "is not an eps in [0, 255]/255"),
    "eval.json pgd results an object": ("eval.json", json.dumps(_eval(pgd={"steps": 5, "results": {"a": 1}})),
                                        "'results' is an object"),
    "eval.json pgd without results": ("eval.json", json.dumps(_eval(pgd={"steps": 5})), "missing key 'results'"),
    "eval.json pgd eps 1e300": ("eval.json", json.dumps(_eval(pgd={"steps": 5, "results": [{"eps": 1e300}]})),
                                "'eps' is 1e+300"),
    "eval.json headline value 5": ("eval.json", json.dumps(_eval(headline={"name": "x", "value": 5})),
                                   "headline: 'value' is 5"),
    "eval.json distortions rows strings": ("eval.json", json.dumps(_eval(distortions={"contrast": ["a"]})),
                                           "contrast[0] is 'a'"),
    "eval.json samples negative": ("eval.json", json.dumps(_eval(samples=-8)), "'samples' is -8"),
    "eval.json split a list": ("eval.json", json.dumps(_eval(split=["test"])), "'split' is a list"),
    "eval-paper.json of the strong protocol": ("eval-paper.json", json.dumps(_eval()), "protocol is 'strong'"),
    "config.json options a list": ("config.json", '{"options": ["sat"]}', "'options' is a list"),
    "config.json seed a string": ("config.json", '{"options": {"seed": "zero"}}', "'seed' is 'zero'"),
    "config.json maps numbers": ("config.json", '{"options": {"maps": [1, 2]}}', "'maps' is a list"),
    "config.json not UTF-8": ("config.json", b"\x80", "config.json: not UTF-8 text"),
}


def _report(runs: list[Path], out: Path) -> Result:
    return invoke(["report", *runs, "--out", out])


@pytest.mark.parametrize("case", sorted(REPORT_CASES))
def test_report_skips_a_malformed_run_with_one_warning(box: Sandbox, case: str) -> None:
    name, content, fragment = REPORT_CASES[case]
    good = [_good_run(box.work, "good-s0", 0), _good_run(box.work, "good-s1", 1)]
    bad = _good_run(box.work, "bad", 2)
    (bad / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    out = box.work / "report"
    before = box.snapshot()
    res = _report([good[0], bad, good[1]], out)
    after = box.snapshot()
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output
    lines = _nonblank(res.stderr)
    assert len(lines) == 1 and lines[0].startswith("warning: "), res.stderr
    assert str(bad / name) in lines[0] and fragment in lines[0] and "run skipped" in lines[0], lines[0]
    md = (out / "report.md").read_text()
    assert "`good-s0`" in md and "`good-s1`" in md and "## Skipped runs" in md and f"- `bad`: {bad / name}" in md
    assert {c for c in changed if not c.startswith("work/report")} == set(), changed
    assert box.temp_files() == []


@pytest.mark.parametrize("case", ["metrics.json nested bomb", "eval.json clean NaN", "config.json not UTF-8"])
def test_report_of_one_malformed_run_is_one_error_line(box: Sandbox, case: str) -> None:
    name, content, fragment = REPORT_CASES[case]
    bad = _good_run(box.work, "bad", 0)
    (bad / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    line = expect_error(box, ["report", bad, "--out", box.work / "report"])
    assert str(bad / name) in line and fragment in line, line
    assert not (box.work / "report").exists()


def test_report_of_no_readable_run(box: Sandbox) -> None:
    a, b = _good_run(box.work, "a", 0), _good_run(box.work, "b", 1)
    (a / "metrics.json").write_text("{")
    (b / "eval.json").write_text("[]")
    before = box.snapshot()
    res = _report([a, b], box.work / "report")
    assert res.exit_code == 1 and "Traceback" not in res.output and before == box.snapshot()
    lines = _nonblank(res.stderr)
    assert [ln.split(":")[0] for ln in lines] == ["warning", "warning", "Error"], res.stderr
    assert str(a / "metrics.json") in lines[0] and str(b / "eval.json") in lines[1]
    assert lines[2] == "Error: report: none of the 2 run directories could be read (see the warnings above)"


def test_report_strict_refuses_instead(tmp_path: Path) -> None:
    from satdata.errors import SatkitError
    from sattrain.report import write_report

    good, bad = _good_run(tmp_path, "good", 0), _good_run(tmp_path, "bad", 1)
    (bad / "metrics.json").write_text("nope")
    with pytest.raises(SatkitError, match=r"bad/metrics\.json: not valid JSON"):
        write_report([good, bad], tmp_path / "out", strict=True)
    warned: list[str] = []
    write_report([good, bad], tmp_path / "out", warn=warned.append)
    assert len(warned) == 1 and "bad/metrics.json" in warned[0]


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(min_value=-(10**30), max_value=10**30),
              st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8)),
    lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=8), kids, max_size=4)),
    max_leaves=12,
)
# objects with the keys the report reads, holding random values
RUN_KEYS = ["epochs", "best", "summary", "metric", "maps", "method", "robust_acc", "attack", "clean", "pgd",
            "headline", "robust", "samples", "split", "sanity", "distortions", "autoattack", "cw", "options", "epoch",
            "clean_acc", "seconds", "monitor", "pgd5_monitor", "protocol", "version"]
keyed_objects = st.dictionaries(st.sampled_from(RUN_KEYS), json_values, max_size=6)
_EXAMPLE = itertools.count()


@HYPO
@given(name=st.sampled_from(["metrics.json", "eval.json", "config.json", "metrics.jsonl", "eval-paper.json"]),
       value=st.one_of(json_values, keyed_objects))
def test_generated_junk_in_a_run_file_never_breaks_the_report(box: Sandbox, name: str, value: Any) -> None:
    n = next(_EXAMPLE)
    good, bad = _good_run(box.work, f"good-{n}", 0), _good_run(box.work, f"junk-{n}", 1)
    (bad / name).write_text(json.dumps(value) + ("\n" if name.endswith("l") else ""))
    out = box.work / "report"
    res = _report([good, bad], out)
    assert res.exit_code == 0, res.output
    assert "Traceback" not in res.output
    lines = _nonblank(res.stderr)
    assert all(ln.startswith("warning: ") and str(bad / name) in ln for ln in lines) and len(lines) <= 1, res.stderr
    md = (out / "report.md").read_text()
    assert f"`{good.name}`" in md
    assert (f"`{bad.name}`" in md.split("## Skipped runs")[0]) == (not lines)  # reported, or skipped with a warning
    assert box.temp_files() == []
    shutil.rmtree(good)
    shutil.rmtree(bad)


def _full_eval() -> dict[str, Any]:
    """An eval.json with every section the report reads (plots included)."""
    return _eval(
        autoattack={"eps_label": "8/255", "value": 0.2, "package": "pyautoattack", "version": "standard",
                    "attacks": ["apgd-ce"], "norm": "Linf"},
        headline={"name": "autoattack@8/255", "value": 0.2},
        cw={"steps": 20, "search_steps": 9, "initial_c": 1e-3, "lr": 0.01, "value": 0.1, "median_l2": 0.3},
        distortions={"contrast": [{"level": 0.5, "value": 0.3}], "lowpass": [{"sigma": 1.0, "value": 0.4}],
                     "highpass": [{"sigma": 2.0, "value": 0.2}]},
        sanity={"passed": False, "checks": [{"name": "pgd-beats-fgsm", "passed": False, "detail": "x"}]},
        protocol_description="AutoAttack headline")


EVAL_PATHS = [("clean",), ("samples",), ("split",), ("split_size",), ("complete",), ("metric",), ("protocol",),
              ("version",), ("robust",), ("robust", "pgd@8/255"), ("pgd",), ("pgd", "steps"), ("pgd", "restarts"),
              ("pgd", "results"), ("pgd", "results", 0), ("pgd", "results", 0, "eps"), ("pgd", "results", 0, "value"),
              ("pgd", "step_label"), ("autoattack",), ("autoattack", "eps_label"), ("autoattack", "value"),
              ("autoattack", "attacks"), ("headline",), ("headline", "name"), ("headline", "value"), ("cw",),
              ("cw", "initial_c"), ("cw", "median_l2"), ("distortions",), ("distortions", "lowpass"),
              ("distortions", "lowpass", 0, "sigma"), ("distortions", "contrast", 0, "value"), ("sanity",),
              ("sanity", "checks"), ("sanity", "checks", 0), ("sanity", "checks", 0, "name"),
              ("protocol_description",)]


@HYPO
@given(where=st.sampled_from(EVAL_PATHS), value=json_values)
def test_generated_damage_to_a_valid_eval_never_breaks_the_report(box: Sandbox, where: tuple[Any, ...],
                                                                   value: Any) -> None:
    n = next(_EXAMPLE)
    good, bad = _good_run(box.work, f"good-{n}", 0), _good_run(box.work, f"damaged-{n}", 1)
    data = _full_eval()
    (good / "eval.json").write_text(json.dumps(data))
    parent = data
    for k in where[:-1]:
        parent = parent[k]
    parent[where[-1]] = value
    (bad / "eval.json").write_text(json.dumps(data))
    res = _report([good, bad], box.work / "report")
    assert res.exit_code == 0 and "Traceback" not in res.output, res.output
    lines = _nonblank(res.stderr)
    assert len(lines) <= 1 and all(ln.startswith("warning: ") and str(bad / "eval.json") in ln for ln in lines), lines
    md = (box.work / "report" / "report.md").read_text()
    assert (f"`{bad.name}`" in md.split("## Skipped runs")[0]) == (not lines)
    shutil.rmtree(good)
    shutil.rmtree(bad)

