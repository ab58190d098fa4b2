"""Map comparison: pointing game, IoU and energy share on constructed cases with known answers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from satdata.cli_maps import compare_cmd
from satdata.compare import compare_maps
from satdata.errors import SatkitError
from satdata.store import MapInfo, ArrayWriter, open_store

H = W = 8


def objects() -> np.ndarray:
    """Six 8x8 object masks: rectangles of known areas, and an empty one (sample 5)."""
    m = np.zeros((6, H, W), np.uint8)
    m[0, 2:4, 2:4] = 1  # area 4
    m[1, 0:4, 0:8] = 1  # area 32
    m[2, 5:8, 1:3] = 1  # area 6
    m[3, 1:2, 1:2] = 1  # area 1
    m[4, :, :] = 1  # the whole image
    return m


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    obj = objects()
    n = len(obj)
    peak_in = np.zeros((n, H, W), np.uint8)
    peak_out = np.zeros((n, H, W), np.uint8)
    for i in range(n):
        ys, xs = np.nonzero(obj[i])
        if len(ys):
            peak_in[i, ys[0], xs[0]] = 255
        ys, xs = np.nonzero(obj[i] == 0)
        if len(ys):
            peak_out[i, ys[-1], xs[-1]] = 255
    signed3 = np.where(obj[..., None] == 1, 127, -127).repeat(3, axis=3).astype(np.int8)
    maps = {
        "obj": obj, "same": obj.copy(), "peak_in": peak_in, "peak_out": peak_out,
        "const": np.full((n, H, W), 128, np.uint8), "signed3": signed3,
    }
    infos = {
        "obj": MapInfo("obj", "binary", "mask"), "same": MapInfo("same", "binary", "mask"),
        "peak_in": MapInfo("peak_in", "unit", "test"), "peak_out": MapInfo("peak_out", "unit", "test"),
        "const": MapInfo("const", "unit", "test"), "signed3": MapInfo("signed3", "signed", "test", channels=3),
    }
    path = tmp_path_factory.mktemp("cmp") / "made.zarr"
    w = ArrayWriter(path, dataset="made", classes=["a", "b"], image_size=(H, W), label_kind="single", maps=infos)
    w.create_split("test", n)
    labels = np.array([0, 0, 1, 1, 1, 0], np.int64)
    w.write("test", 0, np.zeros((n, H, W, 3), np.uint8), labels, [f"s{i}" for i in range(n)], maps)
    w.close_split("test", n)
    w.finish({"source": "test"})
    return path, maps


def test_a_map_against_itself_scores_one(made: tuple[Path, dict], digits_store: Path) -> None:
    path, _ = made
    c = compare_maps(open_store(path), "same", "obj")
    sc = c.splits["test"]
    assert sc.no_object == 1 and sc.overall.n == 5
    assert (sc.overall.pointing, sc.overall.iou, sc.overall.energy) == (1.0, 1.0, 1.0)
    for k in ("a", "b"):
        assert (sc.classes[k].pointing, sc.classes[k].iou, sc.classes[k].energy) == (1.0, 1.0, 1.0)
    # a real store: the ink mask against itself, every split and class
    d = compare_maps(open_store(digits_store), "ink", "ink")
    for split in ("train", "test"):
        s = d.splits[split]
        assert s.overall.n == s.n_images and s.no_object == 0
        assert all((v.pointing, v.iou, v.energy) == (1.0, 1.0, 1.0) for v in [s.overall, *s.classes.values()])
        assert sorted(s.classes) == [str(i) for i in range(10)]


def test_known_answers(made: tuple[Path, dict]) -> None:
    path, maps = made
    st = open_store(path)
    area = maps["obj"][:5].reshape(5, -1).sum(1).astype(float)  # images with an object
    share = area / (H * W)

    inside = compare_maps(st, "peak_in", "obj").splits["test"].overall
    assert inside.pointing == 1.0 and inside.energy == 1.0
    assert inside.iou == pytest.approx(np.mean(1 / area))  # one pixel of the object

    outside = compare_maps(st, "peak_out", "obj").splits["test"].overall
    # sample 4's object is the whole image: no background pixel, so its map is all zero
    # (a constant map: pointing = area share = 1, IoU of empty prediction = 0, no energy)
    assert outside.pointing == pytest.approx(np.mean([0, 0, 0, 0, 1]))
    assert outside.iou == 0.0
    assert outside.energy == 0.0 and outside.n_energy == 4

    const = compare_maps(st, "const", "obj", threshold=0.5).splits["test"].overall
    assert const.pointing == pytest.approx(share.mean())  # ties: the object's area share (chance)
    assert const.iou == pytest.approx(share.mean())  # 128/255 >= 0.5: every pixel predicted
    assert const.energy == pytest.approx(share.mean())
    high = compare_maps(st, "const", "obj", threshold=0.6).splits["test"].overall
    assert high.iou == 0.0

    signed = compare_maps(st, "signed3", "obj").splits["test"].overall
    assert (signed.pointing, signed.iou, signed.energy) == (1.0, 1.0, 1.0)

    # per class: samples 0, 1 are class a (5 has no object); 2, 3, 4 class b
    per = compare_maps(st, "peak_in", "obj").splits["test"].classes
    assert per["a"].n == 2 and per["b"].n == 3
    assert per["a"].iou == pytest.approx(np.mean(1 / area[:2]))
    assert per["b"].iou == pytest.approx(np.mean(1 / area[2:]))


def test_multi_label_images_count_for_each_class(tmp_path: Path) -> None:
    obj = objects()[:3]
    path = tmp_path / "multi.zarr"
    w = ArrayWriter(path, dataset="m", classes=["a", "b", "c"], image_size=(H, W), label_kind="multi",
                    maps={"obj": MapInfo("obj", "binary", "mask")})
    w.create_split("train", 3)
    labels = np.array([[1, 1, 0], [0, 1, 0], [1, 0, 0]], np.uint8)
    w.write("train", 0, np.zeros((3, H, W, 3), np.uint8), labels, ["x", "y", "z"], {"obj": obj})
    w.close_split("train", 3)
    w.finish({})
    c = compare_maps(open_store(path), "obj", "obj").splits["train"]
    assert {k: v.n for k, v in c.classes.items()} == {"a": 2, "b": 2}  # class c has no image


def test_cli_table_json_and_errors(made: tuple[Path, dict]) -> None:
    path, _ = made
    r = CliRunner()
    res = r.invoke(compare_cmd, [str(path), "--map", "peak_in", "--against", "obj"])
    assert res.exit_code == 0, res.output
    assert "pointing" in res.output and "1 with no object left out" in res.output
    lines = [ln.split() for ln in res.output.splitlines()]
    assert ["all", "5", "1.000"] == lines[2][:3]
    res = r.invoke(compare_cmd, [str(path), "--map", "const", "--against", "obj", "--json", "--threshold", "0.6"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert d["threshold"] == 0.6 and d["splits"]["test"]["overall"]["iou"] == 0.0
    assert math.isclose(d["splits"]["test"]["overall"]["energy"], float(objects()[:5].mean()), rel_tol=1e-5)
    res = r.invoke(compare_cmd, [str(path), "--map", "nope", "--against", "obj"])
    assert res.exit_code == 1 and "--map" in res.output and "no map 'nope'" in res.output
    res = r.invoke(compare_cmd, [str(path), "--map", "obj", "--against", "obj", "--split", "val"])
    assert res.exit_code == 1 and "no split 'val'" in res.output
    with pytest.raises(SatkitError, match="--threshold"):
        compare_maps(open_store(path), "obj", "obj", threshold=2)
