"""Hostile, damaged and unlucky input (issue 9): an adversarial corpus, generated here.

Each case crafts an input (store attributes, chunk files, JSON metadata, checkpoints,
options), runs the real CLI on it, and asserts what satkit promises for every failure a
user can cause:

* a non-zero exit and exactly one line on stderr, starting with "Error:", no traceback;
* nothing created, changed or deleted anywhere in the sandbox (which holds the damaged
  store, an untouched good store, the working directory and an "outside" directory that
  crafted names aim at), except what the command is meant to write;
* the good store still passes `satdata verify`;
* a crafted pickle never runs its payload (a marker file never appears).

Inputs come from parametrised tables and from hypothesis strategies (names that try to
leave the store, random bytes as checkpoints, cut points of a checkpoint). The store is
tiny (4x4 images, 24 samples) so that the whole module runs in seconds.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner, Result
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from satdata.cli import main as satdata_main
from satdata.clikit import DEBUG_HINT, error_line, format_error, one_line
from satdata.store import MapInfo, ArrayWriter, is_plain_name, open_store, resolve_inside
from sattrain.cli import main as sattrain_main
from sattrain.models import create_model
from tests.fixtures import untrained_checkpoint

CLASSES = ["a", "b", "c"]
SPLITS = {"train": 16, "test": 8}
SIZE = (4, 4)
HYPO = settings(max_examples=12, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def make_store(path: Path) -> Path:
    """A complete tiny store: splits train 16 / test 8 of 4x4 images, map 'ink' (binary)."""
    rng = np.random.default_rng(0)
    w = ArrayWriter(path, dataset="tiny", classes=CLASSES, image_size=SIZE, label_kind="single",
                    maps={"ink": MapInfo(name="ink", encoding="binary", kind="mask")})
    for split, n in SPLITS.items():
        w.create_split(split, n)
        images = rng.integers(1, 255, size=(n, *SIZE, 3), dtype=np.uint8)
        labels = np.arange(n, dtype=np.int64) % len(CLASSES)
        ink = (images[..., 0] > 127).astype(np.uint8)
        w.write(split, 0, images, labels, [f"{split}{i}" for i in range(n)], {"ink": ink})
        w.close_split(split, n)
    w.finish({"source": "test_hostile"})
    return path


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_store(tmp_path_factory.mktemp("pristine") / "tiny.zarr")


@pytest.fixture(scope="module")
def good_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid (untrained) small-cnn checkpoint for the tiny store: the base of crafted ones."""
    return untrained_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint.pt", CLASSES, SIZE)


def tree_snapshot(root: Path) -> dict[str, str]:
    """Every entry under root, links not followed and special files never opened: a
    file's content digest, a link's target, a directory's or special file's kind."""
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st_ = os.lstat(p)
            if stat.S_ISLNK(st_.st_mode):
                found[rel] = "link:" + os.readlink(p)
            elif stat.S_ISREG(st_.st_mode):
                found[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif stat.S_ISDIR(st_.st_mode):
                found[rel] = "dir"
            else:
                found[rel] = f"mode:{stat.S_IFMT(st_.st_mode):o}"
    return found


@dataclass
class Sandbox:
    """One test's world: every path a command could touch lies under ``root``."""

    root: Path
    good: Path  # a store no case touches: must still verify after each
    bad: Path  # the store a case damages
    work: Path  # the working directory of the command
    outside: Path  # what crafted names aim at
    pristine: Path

    def snapshot(self) -> dict[str, str]:
        return tree_snapshot(self.root)

    def meta(self) -> dict[str, Any]:
        return json.loads((self.pristine / "zarr.json").read_text())

    def write_attrs(self, mutate: Callable[[dict[str, Any]], None]) -> None:
        """The bad store's zarr.json: the pristine one with attrs['satkit'] changed by ``mutate``."""
        meta = self.meta()
        mutate(meta["attributes"]["satkit"])
        (self.bad / "zarr.json").write_text(json.dumps(meta))


@pytest.fixture
def sandbox(tmp_path: Path, pristine: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Sandbox]:
    root = tmp_path / "sandbox"
    box = Sandbox(root=root, good=root / "good.zarr", bad=root / "bad.zarr", work=root / "work",
                  outside=root / "outside", pristine=pristine)
    shutil.copytree(pristine, box.good)
    shutil.copytree(pristine, box.bad)
    box.work.mkdir()
    box.outside.mkdir()
    (box.outside / "victim.txt").write_text("must survive\n")
    monkeypatch.chdir(box.work)
    monkeypatch.delenv("SATKIT_DEBUG", raising=False)
    yield box


def invoke(cli: Any, args: list[str], env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


def expect_one_line(box: Sandbox, cli: Any, args: list[Any], *, may_change: tuple[str, ...] = (),
                    report_lines: bool = False) -> str:
    """Run a failing command; assert the promises of issue 9; return its error line.

    ``may_change``: sandbox paths (relative) the command may write. ``report_lines``: the
    command prints a report on stderr before its error line (verify's problems).
    """
    before = box.snapshot()
    res = invoke(cli, args)
    after = box.snapshot()
    assert res.exit_code not in (0, None), res.output
    assert isinstance(res.exception, SystemExit), f"escaped: {res.exception!r}"
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in res.stderr and "Traceback" not in res.stdout
    assert lines and lines[-1].startswith("Error: "), res.stderr
    if not report_lines:
        assert len(lines) == 1, res.stderr
    assert sum(ln.startswith("Error:") for ln in lines) == 1, res.stderr
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert {c for c in changed if not c.startswith(may_change)} == set() if may_change else changed == set(), changed
    assert (box.outside / "victim.txt").read_text() == "must survive\n"
    ok = invoke(satdata_main, ["verify", box.good])
    assert ok.exit_code == 0, ok.stderr
    return lines[-1]


# --------------------------------------------------------------------------- store attributes


def _rename_split(old: str, new: str) -> Callable[[dict[str, Any]], None]:
    def f(a: dict[str, Any]) -> None:
        a["splits"] = {new if k == old else k: v for k, v in a["splits"].items()}
        a["digests"] = {k.replace(f"{old}/", f"{new}/", 1) if k.startswith(f"{old}/") else k: v
                        for k, v in a["digests"].items()}
    return f


def _rename_map(new: str) -> Callable[[dict[str, Any]], None]:
    def f(a: dict[str, Any]) -> None:
        m = a["maps"].pop("ink")
        m["name"] = new
        a["maps"][new] = m
    return f


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def f(a: dict[str, Any]) -> None:
        a[key] = value
    return f


def _set_map(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def f(a: dict[str, Any]) -> None:
        a["maps"]["ink"][key] = value
    return f


def _set_split(name: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def f(a: dict[str, Any]) -> None:
        a["splits"][name] = value
    return f


def _add_digest(key: str) -> Callable[[dict[str, Any]], None]:
    def f(a: dict[str, Any]) -> None:
        a["digests"][key] = {"sha256": "0" * 64, "chunk_size": 1, "chunks": ["abc"]}
    return f


def _drop(key: str) -> Callable[[dict[str, Any]], None]:
    def f(a: dict[str, Any]) -> None:
        del a[key]
    return f


ATTRIBUTE_CASES: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "split ../x": (_rename_split("train", "../x"), "not a plain name"),
    "split ../../outside": (_rename_split("train", "../../outside"), "not a plain name"),
    "split absolute": (_rename_split("train", "/tmp/abs"), "not a plain name"),
    "split NUL": (_rename_split("train", "tr\x00ain"), "not a plain name"),
    "split ..": (_rename_split("test", ".."), "not a plain name"),
    "split empty": (_rename_split("test", ""), "not a plain name"),
    "split backslash": (_rename_split("test", "..\\..\\x"), "not a plain name"),
    "map name traversal": (_rename_map("../../outside/victim.txt"), "not a plain name"),
    "map name slash": (_rename_map("a/b"), "not a plain name"),
    "map array traversal": (_set_map("array", "../../../outside"), "not a plain name"),
    "map array absolute": (_set_map("array", "/etc"), "not a plain name"),
    "map kind traversal": (_set_map("kind", "../k"), "not a plain name"),
    "map name mismatch": (_set_map("name", "other"), "calls itself"),
    "digest key traversal": (_add_digest("../../outside/victim.txt"), "digest key"),
    "digest key absolute": (_add_digest("/etc/passwd"), "digest key"),
    "digest key deep": (_add_digest("train/saliency/ink/c/0"), "digest key"),
    "dataset traversal": (_set("dataset", "../../outside"), "dataset"),
    "dataset slash": (_set("dataset", "a/b"), "dataset"),
    "dataset not a string": (_set("dataset", ["x"]), "dataset"),
    "format_version 1.9": (_set("format_version", 1.9), "format_version 1.9"),
    "format_version true": (_set("format_version", True), "format_version True"),
    "format_version '1'": (_set("format_version", "1"), "format_version '1'"),
    "format_version 3": (_set("format_version", 3), "newer"),
    "format_version 0": (_set("format_version", 0), "invalid store format version"),
    "format_version null": (_set("format_version", None), "format_version None"),
    "classes duplicate": (_set("classes", ["a", "a", "c"]), "twice"),
    "classes a string": (_set("classes", "abc"), "classes"),
    "classes empty": (_set("classes", []), "classes"),
    "classes numbers": (_set("classes", [1, 2, 3]), "classes"),
    "classes empty name": (_set("classes", ["a", "", "c"]), "classes"),
    "image_size one value": (_set("image_size", [4]), "image_size"),
    "image_size negative": (_set("image_size", [4, -4]), "image_size"),
    "image_size float": (_set("image_size", [4.0, 4]), "image_size"),
    "image_size bool": (_set("image_size", [True, 4]), "image_size"),
    "image_size huge": (_set("image_size", [4, 10**9]), "image_size"),
    "split size negative": (_set_split("train", -1), "non-negative integer"),
    "split size huge": (_set_split("train", 10**12), "shape"),
    "split size float": (_set_split("train", 16.0), "non-negative integer"),
    "split size string": (_set_split("train", "16"), "non-negative integer"),
    "split size bool": (_set_split("test", True), "non-negative integer"),
    "splits a list": (_set("splits", ["train"]), "splits"),
    "label_kind unknown": (_set("label_kind", "both"), "label kind"),
    "map encoding unknown": (_set_map("encoding", "rot13"), "encoding"),
    "map channels 0": (_set_map("channels", 0), "channels"),
    "map channels float": (_set_map("channels", 1.0), "channels"),
    "map targets string": (_set_map("targets", "yes"), "targets"),
    "hflip string": (_set("hflip", "no"), "hflip"),
    "digests a list": (_set("digests", ["x"]), "digests"),
    "no classes": (_drop("classes"), "no classes"),
}


@pytest.mark.parametrize("case", sorted(ATTRIBUTE_CASES))
def test_crafted_store_attributes_are_refused_in_one_line(sandbox: Sandbox, case: str) -> None:
    mutate, fragment = ATTRIBUTE_CASES[case]
    sandbox.write_attrs(mutate)
    line = expect_one_line(sandbox, satdata_main, ["info", sandbox.bad])
    assert fragment in line and str(sandbox.bad) in line, line


def test_satkit_attribute_of_the_wrong_type_is_refused(sandbox: Sandbox) -> None:
    meta = sandbox.meta()
    meta["attributes"]["satkit"] = ["format_version", 1]
    (sandbox.bad / "zarr.json").write_text(json.dumps(meta))
    assert "expected an object" in expect_one_line(sandbox, satdata_main, ["info", sandbox.bad])


_ESCAPES = ["../", "..\\", "/", "./../", "a/../../", "\x00", "~/", "%2e%2e/", ".", " ", "\n"]
hostile_names = st.one_of(
    st.builds(lambda pre, rest: pre + rest, st.sampled_from(_ESCAPES), st.text(max_size=12)),
    st.text(min_size=1, max_size=20).filter(lambda s: not is_plain_name(s)),
    st.text(alphabet="ab.", min_size=1, max_size=6).filter(lambda s: ".." in s or s.startswith(".")),
)


@HYPO
@given(name=hostile_names, where=st.sampled_from(["split", "map", "array"]))
def test_generated_hostile_names_never_leave_the_store(sandbox: Sandbox, name: str, where: str) -> None:
    mutate = {"split": _rename_split("test", name), "map": _rename_map(name),
              "array": _set_map("array", name)}[where]
    sandbox.write_attrs(mutate)
    line = expect_one_line(sandbox, satdata_main, ["preview", sandbox.bad, "--out", sandbox.work / "p.png"])
    assert "not a plain name" in line or "calls itself" in line, line


@settings(max_examples=200, deadline=None, derandomize=True)
@given(name=st.text(max_size=40))
def test_a_plain_name_always_resolves_inside_its_root(name: str) -> None:
    """Property: a name the check accepts stays strictly inside the root, alone or as a component."""
    root = Path("/srv/store.zarr")
    if is_plain_name(name):
        assert resolve_inside(root, name).parent == root.resolve()
        assert resolve_inside(root, f"train/saliency/{name}").parent == root.resolve() / "train" / "saliency"


@settings(max_examples=100, deadline=None, derandomize=True)
@given(head=st.text(max_size=10), sep=st.sampled_from(["/", "\\", "\x00", "..", "\n"]), tail=st.text(max_size=10))
def test_no_name_with_a_separator_or_dots_is_plain(head: str, sep: str, tail: str) -> None:
    assert not is_plain_name(head + sep + tail)


def test_a_symlink_out_of_the_store_is_refused(sandbox: Sandbox) -> None:
    ink = sandbox.bad / "train" / "saliency" / "ink"
    shutil.move(str(ink), sandbox.outside / "ink")
    ink.symlink_to(sandbox.outside / "ink")
    line = expect_one_line(sandbox, satdata_main, ["preview", sandbox.bad, "--split", "train", "--out", "p.png"])
    assert "leads outside the store" in line


# --------------------------------------------------------------------------- damaged files


def _chunk(box: Sandbox, array: str) -> Path:
    files = sorted(p for p in (box.bad / array / "c").rglob("*") if p.is_file())
    assert files, array
    return files[0]


def _delete(array: str) -> Callable[[Sandbox], None]:
    return lambda box: _chunk(box, array).unlink()


def _truncate(array: str, keep: float) -> Callable[[Sandbox], None]:
    def f(box: Sandbox) -> None:
        p = _chunk(box, array)
        data = p.read_bytes()
        p.write_bytes(data[: int(len(data) * keep)])
    return f


def _append(array: str) -> Callable[[Sandbox], None]:
    def f(box: Sandbox) -> None:
        with _chunk(box, array).open("ab") as fh:
            fh.write(b"\0" * 7)
    return f


def _garble(array: str) -> Callable[[Sandbox], None]:
    def f(box: Sandbox) -> None:
        p = _chunk(box, array)
        p.write_bytes(bytes(range(256)) * (p.stat().st_size // 256 + 1))
    return f


def _write_json(rel: str, text: str | bytes) -> Callable[[Sandbox], None]:
    def f(box: Sandbox) -> None:
        p = box.bad / rel
        p.write_bytes(text if isinstance(text, bytes) else text.encode())
    return f


def _relabel(values: np.ndarray | None = None, dtype: str | None = None) -> Callable[[Sandbox], None]:
    def f(box: Sandbox) -> None:
        g = zarr.open_group(str(box.bad), mode="r+")
        if dtype is not None:
            del g["train/labels"]
            g.create_array("train/labels", shape=(SPLITS["train"],), dtype=dtype, chunks=(4096,))
            g["train/labels"][...] = np.full(SPLITS["train"], 1.7)
        else:
            g["train/labels"][: len(values)] = values
    return f


BOMB = "[" * 200_000 + "]" * 200_000
DAMAGE_CASES: dict[str, tuple[Callable[[Sandbox], None], list[str], str]] = {
    # name: (damage, command after 'satdata', fragment of the error line)
    "images chunk missing": (_delete("train/images"), ["preview", "{bad}", "--split", "train"], "is missing"),
    "images chunk missing (compare)": (_delete("test/images"), ["preview", "{bad}", "--split", "test"], "is missing"),
    "images chunk truncated": (_truncate("train/images", 0.5), ["preview", "{bad}", "--split", "train"],
                               "truncated or damaged"),
    "images chunk emptied": (_truncate("train/images", 0.0), ["preview", "{bad}", "--split", "train"],
                             "truncated or damaged"),
    "images chunk appended to": (_append("train/images"), ["preview", "{bad}", "--split", "train"],
                                 "truncated or damaged"),
    "labels chunk missing": (_delete("train/labels"), ["compare", "{bad}", "--map", "ink", "--against", "ink"],
                             "is missing"),
    "labels chunk truncated": (_truncate("train/labels", 0.5), ["compare", "{bad}", "--map", "ink", "--against", "ink"],
                               "train/labels"),
    "labels chunk garbled": (_garble("train/labels"), ["compare", "{bad}", "--map", "ink", "--against", "ink"],
                             "train/labels"),
    "map chunk missing": (_delete("train/saliency/ink"), ["preview", "{bad}", "--split", "train"], "is missing"),
    "map chunk garbled": (_garble("train/saliency/ink"), ["preview", "{bad}", "--split", "train"],
                          "the store is damaged"),
    "float labels": (_relabel(dtype="float64"), ["info", "{bad}"], "dtype float64, expected int64"),
    "label out of range": (_relabel(np.array([7])), ["compare", "{bad}", "--map", "ink", "--against", "ink"],
                           "holds 7 at sample 0"),
    "label negative": (_relabel(np.array([0, 0, -1])), ["preview", "{bad}", "--split", "train"],
                       "holds -1 at sample 2"),
    "root zarr.json garbage": (_write_json("zarr.json", "{not json"), ["info", "{bad}"], "not a satkit store"),
    "root zarr.json empty": (_write_json("zarr.json", ""), ["info", "{bad}"], "not a satkit store"),
    "root zarr.json not UTF-8": (_write_json("zarr.json", b"\xff\xfe{\x00}"), ["info", "{bad}"], "not a satkit store"),
    "root zarr.json nested bomb": (_write_json("zarr.json", '{"zarr_format": 3, "node_type": "group", '
                                               f'"attributes": {{"satkit": {BOMB}}}}}'), ["info", "{bad}"],
                                   "not a satkit store"),
    "array zarr.json garbage": (_write_json("train/images/zarr.json", "]]"), ["info", "{bad}"],
                                "unreadable metadata"),
    "array zarr.json nested bomb": (_write_json("train/labels/zarr.json", BOMB), ["info", "{bad}"],
                                    "unreadable metadata"),
    "array zarr.json not UTF-8": (_write_json("test/ids/zarr.json", b"\x80\x81"), ["verify", "{bad}"],
                                  "unreadable metadata"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE_CASES))
def test_damaged_store_files_end_in_one_line_never_in_zeros(sandbox: Sandbox, case: str) -> None:
    damage, args, fragment = DAMAGE_CASES[case]
    damage(sandbox)
    args = [a.format(bad=sandbox.bad) for a in args]
    if args[0] == "preview":
        args += ["--out", str(sandbox.work / "p.png")]
    line = expect_one_line(sandbox, satdata_main, args)
    assert fragment in line, line


def test_load_refuses_a_missing_chunk_instead_of_fill_values(sandbox: Sandbox) -> None:
    """The library path the trainer and evaluation use: no block of zeros, ever."""
    _delete("train/images")(sandbox)
    with pytest.raises(Exception, match=r"train/images chunk 0 \(samples \[0, 16\)\) is missing"):
        open_store(sandbox.bad).load("train", "images")


def test_verify_still_reports_damage_chunk_by_chunk(sandbox: Sandbox) -> None:
    """Opening checks must not hide verify's own report: it lists the damage, then one Error line."""
    _truncate("train/images", 0.5)(sandbox)
    line = expect_one_line(sandbox, satdata_main, ["verify", sandbox.bad], report_lines=True)
    assert "verification failed" in line


def test_unwritable_output_path_is_one_line_naming_it(sandbox: Sandbox) -> None:
    blocker = sandbox.work / "file.txt"
    blocker.write_text("x")
    line = expect_one_line(sandbox, satdata_main, ["preview", sandbox.good, "--out", blocker / "p.png"])
    assert str(blocker) in line


# --------------------------------------------------------------------------- checkpoints


class _Payload:
    """Unpickling this would create the marker file: satkit must never do it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def _ckpt_dict(good: Path) -> dict[str, Any]:
    return torch.load(good, weights_only=True)


def _save(obj: Any) -> Callable[[Path, Path], None]:
    return lambda good, out: torch.save(obj, out)


def _edit(fn: Callable[[dict[str, Any]], None]) -> Callable[[Path, Path], None]:
    def f(good: Path, out: Path) -> None:
        d = _ckpt_dict(good)
        fn(d)
        torch.save(d, out)
    return f


def _cut(frac: float) -> Callable[[Path, Path], None]:
    return lambda good, out: out.write_bytes(good.read_bytes()[: int(good.stat().st_size * frac)])


def _other_arch(d: dict[str, Any]) -> None:
    d["model"] = torch.nn.Sequential(torch.nn.Linear(48, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).state_dict()


def _missing_key(d: dict[str, Any]) -> None:
    d["model"].pop(sorted(d["model"])[0])


def _other_classes(d: dict[str, Any]) -> None:
    d["model"] = create_model("small-cnn", 5).state_dict()


def _spec(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def f(d: dict[str, Any]) -> None:
        d["model_spec"][key] = value
    return f


def _top(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def f(d: dict[str, Any]) -> None:
        if value is _DELETE:
            del d[key]
        else:
            d[key] = value
    return f


_DELETE = object()
CKPT_CASES: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "empty file": (lambda good, out: out.write_bytes(b""), "not a readable satkit checkpoint"),
    "text file": (lambda good, out: out.write_text("hello\n"), "not a readable satkit checkpoint"),
    "truncated zip 10%": (_cut(0.1), "not a readable satkit checkpoint"),
    "truncated zip 50%": (_cut(0.5), "not a readable satkit checkpoint"),
    "truncated zip 99%": (_cut(0.99), "not a readable satkit checkpoint"),
    "a plain tensor": (_save(torch.zeros(3)), "not a satkit checkpoint"),
    "another format": (_save({"format": "other", "model": {}}), "not a satkit checkpoint"),
    "version 2": (_edit(_top("version", 2)), "newer"),
    "version string": (_edit(_top("version", "1")), "version"),
    "another architecture": (_edit(_other_arch), "weights do not fit"),
    "missing weight": (_edit(_missing_key), "missing"),
    "weights of 5 classes": (_edit(_other_classes), "other shape"),
    "no model_spec": (_edit(_top("model_spec", _DELETE)), "model_spec"),
    "no model": (_edit(_top("model", _DELETE)), "'model' is missing"),
    "model not a dict": (_edit(_top("model", [1, 2])), "'model' is"),
    "model values not tensors": (_edit(_top("model", {"w": 1.0})), "'model' is"),
    "num_classes string": (_edit(_spec("num_classes", "3")), "num_classes"),
    "num_classes huge": (_edit(_spec("num_classes", 10**12)), "num_classes"),
    "num_classes zero": (_edit(_spec("num_classes", 0)), "num_classes"),
    "unknown model name": (_edit(_spec("name", "evil-net")), "cannot build"),
    "label_kind unknown": (_edit(_spec("label_kind", "both")), "label_kind"),
    "epoch negative": (_edit(_top("epoch", -1)), "'epoch'"),
    "optimizer a string": (_edit(_top("optimizer", "adam")), "'optimizer'"),
}


@pytest.mark.parametrize("case", sorted(CKPT_CASES))
def test_crafted_checkpoints_end_in_one_line(sandbox: Sandbox, good_ckpt: Path, case: str) -> None:
    make, fragment = CKPT_CASES[case]
    ckpt = sandbox.root / "ckpt" / "checkpoint.pt"
    ckpt.parent.mkdir()
    make(good_ckpt, ckpt)
    line = expect_one_line(sandbox, sattrain_main, ["eval", ckpt, "--store", sandbox.good, "--device", "cpu", "-q"])
    assert fragment in line and str(ckpt) in line, line
    assert "weights_only" not in line


@HYPO
@given(data=st.binary(max_size=4096))
def test_random_bytes_as_a_checkpoint(sandbox: Sandbox, data: bytes) -> None:
    ckpt = sandbox.root / "rand.pt"
    ckpt.write_bytes(data)
    try:
        line = expect_one_line(sandbox, sattrain_main, ["eval", ckpt, "--store", sandbox.good, "--device", "cpu"],
                               may_change=("rand.pt",))
    finally:
        ckpt.unlink()
    assert "rand.pt" in line and "weights_only" not in line


@pytest.mark.parametrize("protocol", ["torch-zip", "pickle-2", "pickle-5"])
def test_a_pickle_payload_never_runs(sandbox: Sandbox, protocol: str) -> None:
    marker = sandbox.outside / "PWNED"
    evil = sandbox.root / "evil.pt"
    payload = {"format": "satkit-checkpoint", "version": 1, "model": _Payload(marker)}
    if protocol == "torch-zip":
        torch.save(payload, evil)
    else:
        evil.write_bytes(pickle.dumps(payload, protocol=int(protocol[-1])))
    line = expect_one_line(sandbox, sattrain_main, ["eval", evil, "--store", sandbox.good, "--device", "cpu"])
    assert not marker.exists()
    assert "evil.pt" in line and "weights_only" not in line and "trusted" not in line


def test_a_pickle_payload_never_runs_in_a_real_process(sandbox: Sandbox) -> None:
    """The same through a real `sattrain` process: its whole stderr is one line."""
    marker = sandbox.outside / "PWNED"
    evil = sandbox.root / "evil.pt"
    torch.save({"format": "satkit-checkpoint", "version": 1, "model": _Payload(marker)}, evil)
    proc = subprocess.run([sys.executable, "-m", "sattrain.cli", "eval", str(evil), "--store", str(sandbox.good),
                           "--device", "cpu"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 1 and not marker.exists()
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "evil.pt" in lines[0], proc.stderr


# --------------------------------------------------------------------------- options


OPTION_CASES: dict[str, tuple[Any, list[str]]] = {
    "satdata unknown command": (satdata_main, ["frobnicate"]),
    "satdata unknown option": (satdata_main, ["build", "--frob"]),
    "build without --out": (satdata_main, ["build", "--source", "digits"]),
    "build unknown source": (satdata_main, ["build", "--source", "nope", "--out", "x.zarr"]),
    "build negative workers": (satdata_main, ["build", "--source", "digits", "--out", "x.zarr", "--workers", "-1"]),
    "build bad fit": (satdata_main, ["build", "--source", "digits", "--out", "x.zarr", "--fit", "zoom"]),
    "preview zero samples": (satdata_main, ["preview", "{good}", "-n", "0"]),
    "preview unknown split": (satdata_main, ["preview", "{good}", "--split", "nope"]),
    "preview unknown map": (satdata_main, ["preview", "{good}", "--map", "../ink"]),
    "compare unknown map": (satdata_main, ["compare", "{good}", "--map", "nope", "--against", "ink"]),
    "info of a file": (satdata_main, ["info", "{victim}"]),
    "info of nothing": (satdata_main, ["info", "{work}/none.zarr"]),
    "run lr not a number": (sattrain_main, ["run", "{good}", "--lr", "abc"]),
    "run zero epochs": (sattrain_main, ["run", "{good}", "--epochs", "0"]),
    "run unknown method": (sattrain_main, ["run", "{good}", "--method", "nope"]),
    "run eps garbage": (sattrain_main, ["run", "{good}", "--eps", "1/zero"]),
    "run unknown model": (sattrain_main, ["run", "{good}", "--model", "nope", "--out", "{work}/run"]),
    "run unknown eval split": (sattrain_main, ["run", "{good}", "--eval-split", "../x", "--out", "{work}/run",
                                              "--epochs", "1", "--summary-samples", "0"]),
    "eval without store": (sattrain_main, ["eval", "{work}"]),
    "eval of no checkpoint": (sattrain_main, ["eval", "{work}", "--store", "{good}"]),
}


@pytest.mark.parametrize("case", sorted(OPTION_CASES))
def test_bad_options_are_one_line(sandbox: Sandbox, case: str) -> None:
    cli, args = OPTION_CASES[case]
    fmt = dict(good=sandbox.good, work=sandbox.work, victim=sandbox.outside / "victim.txt")
    expect_one_line(sandbox, cli, [a.format(**fmt) for a in args])


# --------------------------------------------------------------------------- the one-line machinery


def test_debug_flag_and_variable_show_the_traceback(sandbox: Sandbox) -> None:
    missing = sandbox.work / "none.zarr"
    plain = invoke(satdata_main, ["info", missing])
    assert plain.exit_code == 1 and isinstance(plain.exception, SystemExit)
    debug = invoke(satdata_main, ["--debug", "info", missing])
    assert debug.exit_code == 1 and type(debug.exception).__name__ == "StoreError"
    env = invoke(satdata_main, ["info", missing], env={"SATKIT_DEBUG": "1"})
    assert type(env.exception).__name__ == "StoreError"
    again = invoke(satdata_main, ["info", missing])  # --debug does not outlive its call
    assert isinstance(again.exception, SystemExit)


def test_an_unexpected_error_is_one_line_with_the_hint(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    import satdata.inspect

    def boom(*a: Any, **k: Any) -> None:
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(satdata.inspect, "describe", boom)
    line = expect_one_line(sandbox, satdata_main, ["info", sandbox.good])
    assert line == f"Error: unexpected ZeroDivisionError: division by zero {DEBUG_HINT}"
    res = invoke(sattrain_main, ["--debug", "eval", sandbox.work, "--store", sandbox.good])
    assert res.exit_code == 1 and type(res.exception).__name__ == "SatkitError"


@pytest.mark.parametrize("exc, expect", [
    (OSError(28, "No space left on device", "/mnt/full/store.zarr"), "no space left on device (ENOSPC), /mnt/full/store.zarr"),
    (PermissionError(13, "Permission denied", "/ro/x"), "permission denied (EACCES), /ro/x"),
    (OSError(30, "Read-only file system", "/ro/x"), "read-only file system (EROFS), /ro/x"),
    (FileNotFoundError(2, "No such file or directory", "a", None, "b"), "no such file or directory (ENOENT), a -> b"),
    (MemoryError(), "out of memory (MemoryError)"),
    (RecursionError("maximum recursion depth exceeded"), "data nested too deeply to read (RecursionError)"),
    (UnicodeDecodeError("utf-8", b"\xffabc", 0, 1, "invalid start byte"),
     "text is not valid utf-8 (byte 0xff at position 0)"),
    (json.JSONDecodeError("Expecting value", "x", 0), "not valid JSON (Expecting value at line 1 column 1)"),
    (pickle.UnpicklingError("Weights only load failed. Re-running `torch.load` with `weights_only` set to `False` "
                            "will likely succeed, but it can result in arbitrary code execution."),
     "refused to unpickle: Weights only load failed"),
])
def test_error_lines_of_os_text_json_and_pickle_errors(exc: BaseException, expect: str) -> None:
    msg, expected = error_line(exc)
    assert expected and msg == expect
    assert "\n" not in format_error(exc) and "weights_only" not in format_error(exc)


def test_one_line_escapes_control_characters_and_bounds_length() -> None:
    assert one_line("a\x1b[2Jb\x00c\nd") == "a\\x1b[2Jb\\x00c d"
    assert len(one_line("x" * 10_000)) == 1000
    assert one_line("refused.\nRe-running with weights_only=False will work\nend") == "refused. end"
