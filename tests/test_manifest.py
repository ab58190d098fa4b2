"""Manifests: strict loading, the shipped recipes, and checking stores against them."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import pytest
from click.testing import CliRunner

from satdata.build import BuildConfig
from satdata.cli import main
from satdata.errors import SatkitError
from satdata.manifest import check_store, draft_manifest, load_manifest, parse_manifest
from satdata.sources import SourceOptions, get_source_class
from satdata.store import open_store
from satdata.verify import verify_digests

MANIFESTS = Path(__file__).resolve().parent.parent / "manifests"
DIGITS = MANIFESTS / "digits.json"

# The published counts each shipped manifest must pin (see each file's notes).
PUBLISHED: dict[str, dict[str, Any]] = {
    "digits": {"source": "digits", "splits": {"train": 1442, "test": 355}, "classes": 10, "maps": {"ink", "box"}},
    "tiny-imagenet-boxes": {"source": "tiny-imagenet-boxes", "splits": {"train": 100000, "val": 10000},
                            "classes": 200, "maps": {"boxes"}},
    "flowers17-masks": {"source": "flowers17-masks", "splits": {"train": None, "val": None, "test": None},
                        "total": 848, "classes": 17, "maps": {"mask"}, "options": {"unmasked": "skip"}},
    "cifar10": {"source": "cifar10", "splits": {"train": 50000, "test": 10000}, "classes": 10, "maps": set()},
    "cifar100": {"source": "cifar100", "splits": {"train": 50000, "test": 10000}, "classes": 100, "maps": set()},
    "voc2012-boxes": {"source": "voc-boxes", "splits": {"train": 5717, "val": 5823}, "classes": 20,
                      "maps": {"boxes"}},
    "voc2012-masks": {"source": "voc-masks", "splits": {"train": 1464, "val": 1449}, "classes": 20,
                      "maps": {"mask", "boxes"}},
}


def digits_raw() -> dict[str, Any]:
    return json.loads(DIGITS.read_text())


# --------------------------------------------------------------------------- shipped files


def test_every_shipped_manifest_loads_and_pins_the_published_counts() -> None:
    files = sorted(MANIFESTS.glob("*.json"))
    assert {f.stem for f in files} == set(PUBLISHED)
    for f in files:
        m = load_manifest(f)
        want = PUBLISHED[f.stem]
        assert m.name == f.stem
        assert m.source == want["source"], f
        assert m.split_counts == want["splits"], f
        assert m.total == want.get("total", sum(v for v in want["splits"].values() if v is not None)), f
        n_classes = len(m.classes) if m.classes is not None else m.num_classes
        assert n_classes == want["classes"], f
        assert set(m.maps) == want["maps"] == set(get_source_class(m.source).maps), f
        assert m.image_size == (32, 32) and m.fit == "stretch", f
        assert m.options == want.get("options", m.options), f
        assert m.description and m.notes, f"{f}: say what it is and where the numbers come from"
        cfg = m.recipe_config()
        assert cfg["size"] == [32, 32] and cfg["fit"] == "stretch"
        assert set(cfg["splits"]) == set(want["splits"])


def test_flowers_recipe_says_which_unmasked_mode_its_counts_assume() -> None:
    m = load_manifest(MANIFESTS / "flowers17-masks.json")
    assert m.recipe_config()["options"] == {"unmasked": "skip"}
    assert any("--unmasked" in n for n in m.notes)
    base = BuildConfig(source="flowers17-masks", root="flowers", out="f.zarr",
                       options=SourceOptions(unmasked="skip"))
    m.check_config(base)
    with pytest.raises(SatkitError, match="--unmasked whole contradicts .*unmasked=skip"):
        m.check_config(BuildConfig(source="flowers17-masks", root="flowers", out="f.zarr",
                                   options=SourceOptions(unmasked="whole")))


def test_fresh_digits_build_matches_the_shipped_manifest(tmp_path: Path) -> None:
    """The digits data and builder are deterministic: the shipped digests must reproduce."""
    runner = CliRunner()
    out = tmp_path / "digits.zarr"
    res = runner.invoke(main, ["build", "--manifest", str(DIGITS), "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    st = open_store(out)
    assert check_store(st, load_manifest(DIGITS)) == []
    assert verify_digests(st).ok
    res = runner.invoke(main, ["verify", str(out), "--manifest", str(DIGITS)])
    assert res.exit_code == 0, res.output
    assert f"matches {DIGITS}" in res.output

    # a wrong count and a wrong digest are named, with expected and found values
    raw = digits_raw()
    raw["expect"]["splits"]["train"] = 1441
    raw["expect"]["total"] = 1796
    raw["expect"]["digests"]["test/saliency/ink"] = "0" * 64
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(raw))
    problems = check_store(st, load_manifest(bad))
    assert "split train: expected 1,441 samples, found 1,442" in problems
    assert "total: expected 1,796 samples over all splits, found 1,797" in problems
    assert any(p.startswith("test/saliency/ink: expected sha256 0000000000000000..., found ") for p in problems)
    assert len(problems) == 3, problems
    res = runner.invoke(main, ["verify", str(out), "--manifest", str(bad)])
    assert res.exit_code == 1
    assert "split train: expected 1,441 samples, found 1,442" in res.output
    assert "test/saliency/ink: expected sha256" in res.output


def test_build_refuses_overrides_that_contradict_the_recipe(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "x.zarr"
    for extra, message in (
        (["--size", "16"], "--size 16x16 contradicts"),
        (["--fit", "crop"], "--fit crop contradicts"),
        (["--splits", "train"], "--splits train contradicts"),
    ):
        res = runner.invoke(main, ["build", "--manifest", str(DIGITS), "--out", str(out), "-q", *extra])
        assert res.exit_code == 1 and message in res.output and str(DIGITS) in res.output, res.output
        assert not out.exists()
    m = load_manifest(DIGITS)
    with pytest.raises(SatkitError, match="--source voc-boxes contradicts"):
        m.check_config(BuildConfig(source="voc-boxes", root="r", out="o"))
    with pytest.raises(SatkitError, match="--label largest contradicts .*label=multi"):
        m.check_config(BuildConfig(source="digits", root="", out="o", options=SourceOptions(label="largest")))
    m.check_config(BuildConfig(source="digits", root="", out="o", workers=3, overwrite=True, skip_bad=True))


# --------------------------------------------------------------------------- checking


def test_check_store_names_each_difference(digits_store: Path) -> None:
    st = open_store(digits_store)  # 16x16
    draft = draft_manifest(st, name="d16")
    assert check_store(st, parse_manifest(draft, "draft")) == []
    raw = copy.deepcopy(draft)
    raw["recipe"]["size"] = raw["expect"]["image_size"] = [32, 32]
    raw["expect"]["classes"][3] = "three"
    raw["expect"]["label_kind"] = "multi"
    raw["expect"]["digests"] = {"train/images": "f" * 64}
    del raw["expect"]["splits"]["test"]
    del raw["expect"]["total"]
    raw["recipe"]["splits"] = ["train"]
    # a manifest for a source with other maps (loading checks them against digits' own)
    m = dataclasses.replace(parse_manifest(raw, "m.json"), maps=("ink",))
    problems = check_store(st, m)
    assert "image_size: expected 32x32, found 16x16" in problems
    assert "classes: class 3 expected 'three', found '3'" in problems
    assert "label_kind: expected multi, found single" in problems
    assert "maps: expected ink, found box, ink" in problems
    assert "split test: found 355 samples, but the manifest expects no such split" in problems
    assert any(p.startswith("train/images: expected sha256 ffffffffffffffff..., found ") for p in problems)
    assert len(problems) == 6, problems
    raw = copy.deepcopy(draft)
    del raw["expect"]["classes"]
    raw["expect"]["num_classes"] = 12
    raw["expect"]["splits"]["val"] = None
    del raw["expect"]["total"]
    raw["recipe"]["splits"].append("val")
    problems = check_store(st, parse_manifest(raw, "m.json"))
    assert problems == ["classes: expected 12 classes, found 10",
                        "split val: expected a split, the store has no such split (it has: train, test)"]


# --------------------------------------------------------------------------- strict loading


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def f(raw: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        d = raw
        for p in parents:
            d = d[p]
        d[last] = value
    return f


def _del(path: str) -> Callable[[dict[str, Any]], None]:
    def f(raw: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        d = raw
        for p in parents:
            d = d[p]
        del d[last]
    return f


SHA = "a" * 64
MALFORMED = [
    (_set("colour", "red"), "colour: unknown key"),
    (_set("recipe.sise", [32, 32]), "recipe.sise: unknown key"),
    (_set("expect.count", 3), "expect.count: unknown key"),
    (_del("manifest_version"), "manifest_version: missing"),
    (_set("manifest_version", 2), "manifest_version: version 2 is newer"),
    (_set("manifest_version", "1"), "manifest_version: expected an integer"),
    (_set("name", ""), "name: must not be empty"),
    (_del("recipe"), "recipe: missing"),
    (_set("recipe.source", "mnist"), "recipe.source: unknown source 'mnist'"),
    (_set("recipe.source", 7), "recipe.source: expected a string"),
    (_set("recipe.options", {"unmasked": "skip"}), "recipe.options.unmasked: not an option of source 'digits'"),
    (_set("recipe.options", {"colour": 1}), "recipe.options.colour: unknown key"),
    (_set("recipe.options", []), "recipe.options: expected an object"),
    (_set("recipe.size", [32]), "recipe.size: expected [H, W]"),
    (_set("recipe.size", [16, 16]), "recipe.size: is 16x16 but expect.image_size is 32x32"),
    (_set("recipe.fit", "squash"), "recipe.fit: unknown fit mode 'squash'"),
    (_set("recipe.splits", ["train"]), "recipe.splits: builds train but expect.splits lists train, test"),
    (_set("recipe.splits", ["train", "dev"]), "recipe.splits: unknown split 'dev'"),
    (_set("expect.image_size", [32, 0]), "expect.image_size: expected [H, W]"),
    (_del("expect.image_size"), "expect.image_size: missing"),
    (_set("expect.splits", {"train": "1442", "test": 355}), "expect.splits.train: expected an integer, got a string"),
    (_set("expect.splits", {"train": True, "test": 355}), "expect.splits.train: expected an integer, got a boolean"),
    (_set("expect.splits", {"train": 1442, "dev": 355}), "expect.splits.dev: unknown split"),
    (_set("expect.splits", {}), "expect.splits: expected a non-empty object"),
    (_set("expect.total", 1800), "expect.total: is 1800 but the split counts add up to 1797"),
    (_del("expect.classes"), "expect.classes: missing"),
    (_set("expect.classes", ["0", "0"]), "expect.classes: lists '0' twice"),
    (_set("expect.num_classes", 9), "expect.num_classes: is 9 but expect.classes lists 10"),
    (_set("expect.label_kind", "hot"), "expect.label_kind: unknown label kind 'hot'"),
    (lambda raw: (_set("expect.maps", ["ink"])(raw), _del("expect.digests")(raw)),
     "expect.maps: lists ink but source 'digits' produces ink, box"),
    (_set("expect.maps", "ink"), "expect.maps: expected a list of strings"),
    (_set("expect.digests", {"train/images": "abc"}), "expect.digests.train/images: expected a sha256"),
    (_set("expect.digests", {"val/images": SHA}), "expect.digests.val/images: names split 'val'"),
    (_set("expect.digests", {"train/saliency/mask": SHA}), "expect.digests.train/saliency/mask: names map 'mask'"),
    (_set("expect.digests", {"train/pixels": SHA}), "expect.digests.train/pixels: not an array path"),
    (_set("notes", 5), "notes: expected a string or a list of strings"),
]


@pytest.mark.parametrize("mutate,message", MALFORMED, ids=[m for _, m in MALFORMED])
def test_malformed_manifests_are_rejected_naming_the_key(tmp_path: Path, mutate: Callable, message: str) -> None:
    raw = digits_raw()
    mutate(raw)
    path = tmp_path / "m.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(SatkitError) as e:
        load_manifest(path)
    assert str(e.value).startswith(f"{path}: "), str(e.value)
    assert message in str(e.value), str(e.value)


def test_unreadable_manifest_files(tmp_path: Path, digits_store: Path) -> None:
    with pytest.raises(SatkitError, match="no such manifest file"):
        load_manifest(tmp_path / "nope.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"manifest_version": 1,\n "name": }')
    with pytest.raises(SatkitError, match=r"broken.json: not valid JSON \(line 2, column"):
        load_manifest(broken)
    top = tmp_path / "list.json"
    top.write_text("[1, 2]")
    with pytest.raises(SatkitError, match=r"list.json: \(top level\): expected an object, got a list"):
        load_manifest(top)
    res = CliRunner().invoke(main, ["verify", str(digits_store), "--manifest", str(broken)])
    assert res.exit_code == 1 and "not valid JSON" in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_map_targets_are_digest_keys_by_map_name(digits_store: Path, tmp_path: Path) -> None:
    """A map with targets (teacher maps) is pinned by its map name, like its values, even
    though both live under a fresh array name; a changed target is a named difference."""
    import shutil

    import numpy as np

    from satdata.addmap import NewMap, add_map

    store = tmp_path / "t.zarr"
    shutil.copytree(digits_store, store)
    st = open_store(store)
    add_map(store, NewMap("t", "binary", "mask", targets=True),
            lambda s: iter([(st.load(s, "saliency", "ink"), st.load(s, "labels"))]))
    st = open_store(store)
    draft = draft_manifest(st, name="t")
    keys = set(draft["expect"]["digests"])
    assert {"train/saliency/t", "train/map_targets/t", "test/map_targets/t"} <= keys
    assert not any(st.info.maps["t"].array in k for k in keys)
    m = dataclasses.replace(parse_manifest({**draft, "expect": {**draft["expect"], "maps": ["ink", "box"],
                                                                "digests": {}}}, "m.json"),
                            maps=("ink", "box", "t"), digests=draft["expect"]["digests"])
    assert check_store(st, m) == []
    add_map(store, NewMap("t", "binary", "mask", targets=True), overwrite=True,
            produce=lambda s: iter([(st.load(s, "saliency", "ink"), np.zeros(st.info.splits[s], np.int64))]))
    problems = check_store(open_store(store), m)
    assert [p.split(":")[0] for p in problems] == ["train/map_targets/t", "test/map_targets/t"]
    # the key is checked like a saliency key: it must name a map the manifest lists
    base = draft_manifest(open_store(digits_store), name="d")
    ok = copy.deepcopy(base)
    ok["expect"]["digests"]["train/map_targets/ink"] = "a" * 64
    assert parse_manifest(ok, "m.json").digests["train/map_targets/ink"] == "a" * 64
    bad = copy.deepcopy(base)
    bad["expect"]["digests"]["train/map_targets/zzz"] = "a" * 64
    with pytest.raises(SatkitError, match="names map 'zzz', which expect.maps does not list"):
        parse_manifest(bad, "m.json")


# --------------------------------------------------------------------------- list options


def test_recipe_options_of_repeated_flags_are_lists_of_strings(tmp_path: Path) -> None:
    """`--annotations SPLIT=FILE` / `--images SPLIT=DIR` (repeatable) are lists in a recipe: a
    manifest drafted from such a build loads, builds the same store again, and refuses
    other values and other types, naming the key."""
    import shutil

    from satdata.build import build
    from tests.fixtures.coco import make_coco

    coco = make_coco(tmp_path / "coco")
    root = tmp_path / "export"
    (root / "labels").mkdir(parents=True)
    for split in ("train", "val"):
        shutil.copy(coco.ann_files[split], root / "labels" / f"{split}.json")
        shutil.copytree(coco.image_dirs[split], root / "pics" / split)
    opts = SourceOptions(annotations=("train=labels/train.json", "val=labels/val.json"),
                         images=("train=pics/train", "val=pics/val"))
    first = build(BuildConfig(source="coco-boxes", root=str(root), out=str(tmp_path / "a.zarr"), size=(16, 16),
                              options=opts, given_options=("annotations", "images"), progress=False))
    raw = draft_manifest(open_store(first.path), name="coco-export")
    assert raw["recipe"]["options"] == {"annotations": list(opts.annotations), "images": list(opts.images)}
    path = tmp_path / "coco-export.json"
    path.write_text(json.dumps(raw))

    m = load_manifest(path)
    assert m.options == {"annotations": opts.annotations, "images": opts.images}
    assert m.recipe_config()["options"] == {"annotations": opts.annotations, "images": opts.images}
    m.check_config(BuildConfig(source="coco-boxes", root=str(root), out="x", size=(16, 16), options=opts))
    with pytest.raises(SatkitError, match=r"--images \[\"train=pics/train\"\] contradicts .*its recipe has images="):
        m.check_config(BuildConfig(source="coco-boxes", root=str(root), out="x", size=(16, 16),
                                   options=dataclasses.replace(opts, images=("train=pics/train",))))

    res = CliRunner().invoke(main, ["build", "--manifest", str(path), "--root", str(root),
                                    "--out", str(tmp_path / "b.zarr"), "-q"])
    assert res.exit_code == 0, res.output
    assert open_store(tmp_path / "b.zarr").info.digests == open_store(first.path).info.digests

    for value, message in [("train=labels/train.json", "recipe.options.annotations: expected a list of strings, "
                                                        "got a string"),
                           (["train=labels/train.json", 3], "recipe.options.annotations[1]: expected a string, "
                                                            "got an integer"),
                           (["train=a.json", "train=a.json"], "recipe.options.annotations: lists 'train=a.json' twice")]:
        bad = copy.deepcopy(raw)
        bad["recipe"]["options"]["annotations"] = value
        path.write_text(json.dumps(bad))
        with pytest.raises(SatkitError) as e:
            load_manifest(path)
        assert str(e.value) == f"{path}: {message}", str(e.value)
