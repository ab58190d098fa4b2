"""Smoke tests of the bench/ scripts: each runs end to end at tiny sizes and prints its JSON.

They check that the scripts work and report what BENCHMARKS.md reads from them (keys,
ratios consistent with the raw numbers, goals with flags); they never assert a timing.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_bench(script: str, *args: str, tmp_path: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True,
                       cwd=tmp_path, env=env, timeout=300)
    assert r.returncode == 0, f"bench/{script} failed:\n{r.stderr[-3000:]}"
    return json.loads(r.stdout)


def test_read_smoke(tmp_path: Path) -> None:
    out = tmp_path / "read.json"
    res = run_bench("read.py", "--samples", "2048", "--repeats", "1", "--zarr-batches", "1", "--loader-workers", "0",
                    "--batch-size", "64", "--memory-budget", "2M", "--data", str(tmp_path / "data"), "--json", str(out), tmp_path=tmp_path)
    assert json.loads(out.read_text()) == res
    assert res["benchmark"] == "read" and res["samples"] == 2048 and res["batch_size"] == 64
    expected = {"numpy_in_memory", "satkit_in_memory", "satkit_in_memory_prepared", "satkit_streaming", "npy_memmap",
                "h5py_chunked", "zarr_per_sample", "torch_dataloader_0_workers"}
    assert set(res["batches"]) == expected
    limit = res["batches"]["numpy_in_memory"]["batches_per_s"]
    for name, v in res["batches"].items():
        assert v["batches_per_s"] > 0, name
        assert math.isclose(v["vs_limit"], v["batches_per_s"] / limit, rel_tol=1e-2, abs_tol=1e-3), name
    assert res["batches"]["zarr_per_sample"]["extrapolated"] is True
    # the streaming contender really streamed: the budget forces blocks smaller than the split
    assert res["batches"]["satkit_streaming"]["block_samples"] < 2048
    for key in ("satkit_open_and_load", "raw_np_load", "raw_np_fromfile"):
        assert res["load_seconds_cold"][key] > 0 and res["load_seconds_warm"][key] > 0
    goals = res["goals"]
    assert set(goals) == {"in_memory_vs_limit", "load_vs_raw_cold", "load_vs_raw_warm"}
    assert all(isinstance(g["goal_met"], bool) for g in goals.values())
    assert res["goal_met"] == all(g["goal_met"] for g in goals.values())
    assert res["bytes"]["raw"] == 2048 * (32 * 32 * 4 + 8)
    assert res["machine"]["cpus"] >= 1 and res["machine"]["zarr"]


def test_step_smoke(tmp_path: Path) -> None:
    res = run_bench("step.py", "--methods", "standard,sat,pgd,pgd+sat", "--steps", "2", "--repeats", "1",
                    "--batch-size", "8", "--image-size", "16", "--threads", "1", tmp_path=tmp_path)
    assert res["benchmark"] == "step" and res["device"] == "cpu" and res["amp"] is False
    assert set(res["results"]) == {"standard", "sat", "pgd", "pgd+sat", "sat_device", "sat_host_numpy"}
    assert res["results"]["standard"]["vs_standard"] == 1.0
    for name, v in res["results"].items():
        assert v["ms_per_step"] > 0 and v["repeats"] == 1, name
    assert res["results"]["pgd"]["attack_share"] == 1.0
    assert res["results"]["sat"]["attack_share"] == 0.0
    assert 0.0 <= res["results"]["pgd+sat"]["attack_share"] <= 1.0
    assert set(res["goals"]) == {"sat_vs_standard", "pgd+sat_position", "sat_device_vs_host_numpy"}
    assert res["perturbation_only"]["device_ms"] > 0 and res["perturbation_only"]["host_numpy_and_copy_ms"] > 0


def test_step_accel_options_and_fast_methods(tmp_path: Path) -> None:
    """--precision/--channels-last reach the step (recorded as sattrain.accel resolved them); the
    fast baselines are measured where sattrain.methods has them; fp16 on the CPU is refused."""
    from sattrain.methods import method_names

    fast = "fgsm-rs" in method_names()
    methods = "standard,fgsm-rs" if fast else "standard"
    res = run_bench("step.py", "--methods", methods, "--steps", "2", "--repeats", "1", "--batch-size", "8",
                    "--image-size", "16", "--threads", "1", "--channels-last", "on", "--precision", "fp32",
                    tmp_path=tmp_path)
    assert res["accel"]["channels_last"] is True and res["accel"]["precision"] == "fp32" and res["amp"] is False
    if fast:
        g = res["goals"]["fgsm-rs_vs_standard"]
        assert g["value"] == res["results"]["fgsm-rs"]["vs_standard"] and g["goal_met"] == (g["value"] <= 2.1)
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "step.py"), "--precision", "fp16", "--steps", "1"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode != 0 and "--precision fp16" in r.stderr


def test_step_rejects_unknown_method(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "step.py"), "--methods", "standard,nope", "--steps", "1"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode != 0 and "nope" in r.stderr


def test_evidence_smoke(tmp_path: Path) -> None:
    out, md, png = tmp_path / "ev.json", tmp_path / "ev.md", tmp_path / "ev.png"
    res = run_bench("evidence.py", "--epochs", "1", "--seeds", "0,1", "--configs", "standard,sat-ink,sat-gcpp-std",
                    "--train-samples", "64", "--eval-samples", "32", "--eps", "2/255,8/255", "--workers", "1",
                    "--work", str(tmp_path / "work"), "--json", str(out), "--markdown", str(md), "--plot", str(png),
                    tmp_path=tmp_path)
    assert json.loads(out.read_text()) == res
    assert set(res["table"]) == {"standard", "sat-ink", "sat-gcpp-std"}
    assert res["eps"] == ["2/255", "8/255"]
    for name, row in res["table"].items():
        assert row["clean"]["n"] == 2 and 0 <= row["clean"]["mean"] <= 1, name
        for k in ("2/255", "8/255"):
            assert row["pgd"][k]["mean"] <= row["clean"]["mean"] + 1e-9, name
            assert row["pgd_paper"][k]["mean"] <= row["clean"]["mean"] + 1e-9, name
        # the strong protocol's headline never exceeds its own PGD at the same radius by more than a sample
        assert row["autoattack"]["mean"] <= row["pgd"]["8/255"]["mean"] + 1 / 32 + 1e-9, name
        assert row["train_seconds_per_epoch"]["mean"] > 0
    assert res["table"]["standard"]["final_p_t"] is None
    assert res["table"]["sat-ink"]["final_p_t"] == 0.0  # epoch 0 of the curriculum: pure noise
    assert len(res["runs"]) == 6 and {r["seed"] for r in res["runs"]} == {0, 1}
    # the teacher's Grad-CAM++ map was added by `satdata saliency` and scored against the ink
    assert "gcpp_std" in res["teachers"] and "pointing" in res["teachers"]["gcpp_std"]["compare_vs_ink"]
    claims = {(c["a"], c["b"]) for c in res["claims"]}
    assert ("sat-ink", "standard") in claims
    assert "| sat-ink" in md.read_text() and png.stat().st_size > 0
    assert any(c.startswith("satdata saliency ") for c in res["commands"])
    assert any(c.startswith("sattrain run ") and "--method standard" in c for c in res["commands"])  # the teacher
    # finished runs are reused: a second invocation trains nothing
    evals = sorted((tmp_path / "work" / "runs").glob("*/eval.json"))
    assert len(evals) == 6
    stamps = [p.stat().st_mtime_ns for p in evals]
    res2 = run_bench("evidence.py", "--epochs", "1", "--seeds", "0,1", "--configs", "standard,sat-ink,sat-gcpp-std",
                     "--train-samples", "64", "--eval-samples", "32", "--eps", "2/255,8/255", "--workers", "1",
                     "--work", str(tmp_path / "work"), "--json", str(out), "--markdown", str(md), "--plot", str(png),
                     tmp_path=tmp_path)
    assert res2["table"]["standard"]["clean"] == res["table"]["standard"]["clean"]
    assert "teachers" not in res2["seconds"]
    assert [p.stat().st_mtime_ns for p in evals] == stamps
    assert len(sorted((tmp_path / "work" / "runs").glob("*/eval-paper.json"))) == 6


def test_attack_strength_smoke(tmp_path: Path, digits_store: Path) -> None:
    """bench/attack_strength.py on a 1-epoch run: every budget, monotone in budget, the verdict fields."""
    from sattrain.config import TrainConfig
    from sattrain.trainer import train

    run = train(TrainConfig(store=str(digits_store), out=str(tmp_path / "run"), method="standard", epochs=1,
                            batch_size=64, device="cpu", eval_samples=16, summary_samples=0, progress=False),
                log=lambda _m: None)
    res = run_bench("attack_strength.py", str(run), "--store", str(digits_store), "--samples", "24", "--eps", "8/255",
                    "--no-autoattack", "--json", str(tmp_path / "s.json"), tmp_path=tmp_path)
    m = res["models"][str(run)]
    nums = m["numbers"]
    assert set(nums) >= {"paper pgd 5x2/255", "strong pgd 50xeps/4 R2", "doubled pgd 100xeps/4 R4", "fgsm"}
    strong, doubled = nums["strong pgd 50xeps/4 R2"]["8/255"], nums["doubled pgd 100xeps/4 R4"]["8/255"]
    assert doubled <= strong + 1 / 24 and strong <= nums["paper pgd 5x2/255"]["8/255"] + 1 / 24
    assert m["doubling_change_samples"]["8/255"] == round((strong - doubled) * 24)
    assert isinstance(m["doubling_changes_at_most_tolerance"], bool) and m["sanity"]["pgd-beats-fgsm"]


def test_remote_smoke(tmp_path: Path) -> None:
    """bench/remote.py at 2,048 samples: its own S3 server and delaying proxy, every row, ratios from the seconds."""
    out = tmp_path / "remote.json"
    res = run_bench("remote.py", "--samples", "2048", "--repeats", "1", "--memory-budget", "1M", "--no-before",
                    "--train-samples", "1024",
                    "--data", str(tmp_path / "data"), "--json", str(out), tmp_path=tmp_path)
    assert json.loads(out.read_text()) == res
    assert res["benchmark"] == "remote" and res["samples"] == 2048 and res["proxy_requests"] > 0
    assert set(res["results"]) == {"fetch", "stream", "train", "load", "verify"}
    for what, rows in res["results"].items():
        assert set(rows) == {"local", "s3", "s3_delayed"}, what
        for name, v in rows.items():
            assert v["seconds"] > 0 and math.isclose(v["vs_local"], rows["local"]["seconds"] / v["seconds"],
                                                     rel_tol=1e-2, abs_tol=1e-3), (what, name)
    assert res["results"]["stream"]["local"]["block_samples"] < 2048  # it really streamed
    assert all(v["samples"] >= 1023 for v in res["results"]["train"].values())  # a whole (sub)epoch trained
    assert res["goal_met"] == all(g["goal_met"] for g in res["goals"].values())


def test_scale_smoke(tmp_path: Path) -> None:
    """bench/scale.py --quick at 32x32 and 224x224: Dask builds on 1 and 2 workers against
    decode-only, streaming, files per array (224x224: sharded), and bench/ddp_step.py's rows."""
    pytest.importorskip("distributed")
    out = tmp_path / "scale.json"
    res = run_bench("scale.py", "--quick", "--sizes", "32,224", "--data", str(tmp_path / "data"), "--json", str(out),
                    tmp_path=tmp_path)
    assert json.loads(out.read_text()) == res and res["images"] == 200
    for size, v in res["sizes"].items():
        assert set(v["workers"]) == {"1", "2"}
        for w in v["workers"].values():
            assert math.isclose(w["build_vs_decode_only"], w["build_img_per_s"] / w["decode_only_img_per_s"],
                                rel_tol=0.02)
        assert v["goal_met"] == all(w["build_vs_decode_only"] >= 0.8 for w in v["workers"].values())
        assert v["streaming"]["samples"] == 200 and v["streaming"]["img_per_s"] > 0
    assert res["sizes"]["224"]["files_per_array"]["format_version"] == 2
    assert res["sizes"]["224"]["files_per_array"]["imagenet_1k_files"] == 2503
    assert res["sizes"]["32"]["files_per_array"]["format_version"] == 1
    assert {r["processes"] for r in res["ddp"]["rows"]} == {1, 2}
    assert res["goal_met"] == all(v["goal_met"] for v in res["sizes"].values())


def test_gpu_smoke(tmp_path: Path) -> None:
    """bench/gpu.py --device cpu --quick: every section, the CUDA-only variants skipped with a
    reason, the goals computed from the rows they name, and the file equal to what was printed."""
    out = tmp_path / "gpu.json"
    res = run_bench("gpu.py", "--device", "cpu", "--quick", "--json", str(out), tmp_path=tmp_path)
    assert json.loads(out.read_text()) == res
    assert res["benchmark"] == "gpu" and res["complete"] is True and res["quick"] is True
    assert res["command"].startswith("python bench/gpu.py --device cpu --quick")
    assert res["device"]["type"] == "cpu" and res["torch"] and res["machine"]["cpus"] >= 1
    assert set(res["sections"]) == {"headroom", "trainer", "eval"}
    head = res["sections"]["headroom"]["b16"]
    assert head["eager_fp32_nchw"]["img_per_s"] > 0
    for name in ("eager_fp16_nchw", "eager_bf16_cl", "compile_bf16_cl", "cuda_graph_bf16_cl"):
        assert head[name]["skipped"], name  # CUDA only, with the reason
    assert head["best"] == {"variant": "eager_fp32_nchw", "img_per_s": head["eager_fp32_nchw"]["img_per_s"]}
    trainer = res["sections"]["trainer"]
    assert trainer["accel"]["precision"] == "fp32" and trainer["accel"]["channels_last"] is False
    rows = trainer["b16"]
    assert set(rows) == {"standard", "sat", "pgd"}
    assert all(rows[m]["img_per_s"] > 0 and rows[m]["steps_per_epoch"] == 2 for m in rows)
    assert rows["pgd"]["attack_share"] == 1.0 and rows["sat"]["attack_share"] == 0.0
    goals = res["goals"]
    assert set(goals) == {"standard_vs_best_headroom_b16", "sat_vs_standard_b16", "pgd_cost_b16"}
    std = rows["standard"]["img_per_s"]
    assert math.isclose(goals["standard_vs_best_headroom_b16"]["value"], std / head["best"]["img_per_s"], abs_tol=1e-3)
    assert math.isclose(goals["sat_vs_standard_b16"]["value"], rows["sat"]["img_per_s"] / std, abs_tol=1e-3)
    assert math.isclose(goals["pgd_cost_b16"]["value"], std / rows["pgd"]["img_per_s"], abs_tol=1e-3)
    assert res["goal_met"] == all(g["goal_met"] for g in goals.values())
    ev = res["sections"]["eval"]
    assert ev["default_batch_size"] == 256 and ev["pgd_fixed"]["rows"]["b16"]["samples_per_s"] > 0
    assert ev["evaluate"]["clean"] == 1.0  # labels are the model's own predictions
    assert set(ev["evaluate"]["samples_per_s"]) == {"clean", "pgd"} and ev["autoattack_skipped"] == "--quick"


def test_gpu_partial_sections_and_bad_section(tmp_path: Path) -> None:
    out = tmp_path / "h.json"
    res = run_bench("gpu.py", "--device", "cpu", "--quick", "--sections", "headroom", "--json", str(out),
                    tmp_path=tmp_path)
    assert set(res["sections"]) == {"headroom"} and res["goals"] == {} and res["goal_met"] is False
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--device", "cpu", "--sections", "speed"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode != 0 and "speed" in r.stderr


@pytest.mark.parametrize("script", ["read.py", "step.py", "evidence.py", "attack_strength.py", "scale.py",
                                    "ddp_step.py", "stream_memory.py", "gpu.py"])
def test_help(script: str) -> None:
    r = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "usage" in r.stdout.lower()
