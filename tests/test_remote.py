"""Stores at URLs: read-only through a real HTTP server and a real S3-compatible server on 127.0.0.1.

Every reading command takes a URL; --storage-option (or the AWS_* variables) carries the
endpoint and credentials; unreachable, no credentials, forbidden and not found are told
apart from "not a satkit store"; writing to a URL or a .zip is refused up front.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from satdata.cli import main as satdata_main
from satdata.errors import SatkitError, StoreError
from satdata.clikit import parse_storage_options
from satdata.remote import is_url, is_zip, network_problem, redact, refuse_remote_output
from satdata.store import open_store, store_digest
from tests.httpserver import serve

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def satdata(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(satdata_main, list(args))
    return res.exit_code, res.output


def s_opts(opts: dict) -> list[str]:
    return [x for k, v in opts.items() for x in ("-S", f"{k}={v}")]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, digits_store: Path):
    """digits_store (16x16) copied into a directory served over HTTP as /d.zarr."""
    root = tmp_path_factory.mktemp("www")
    shutil.copytree(digits_store, root / "d.zarr")
    with serve(root) as http:
        yield http, root


@pytest.fixture(scope="module")
def bucket(s3, digits_store: Path) -> str:
    """digits_store uploaded to s3://remote-test/d.zarr."""
    s3.make_bucket("remote-test")
    s3.upload(digits_store, "remote-test/d.zarr")
    return "s3://remote-test/d.zarr"


# --------------------------------------------------------------------------- units


def test_parse_storage_options_reads_json_values_and_nested_keys() -> None:
    got = parse_storage_options(["endpoint_url=http://127.0.0.1:9000", "anon=true", "client_kwargs.region_name=eu",
                                 "config_kwargs={\"retries\": {\"max_attempts\": 2}}", "key=0123", "secret=42",
                                 "default_block_size=1024"])
    assert got == {"endpoint_url": "http://127.0.0.1:9000", "anon": True, "client_kwargs": {"region_name": "eu"},
                   "config_kwargs": {"retries": {"max_attempts": 2}}, "key": "0123", "secret": "42",
                   "default_block_size": 1024}
    with pytest.raises(SatkitError, match="--storage-option 'endpoint_url': expected KEY=VALUE"):
        parse_storage_options(["endpoint_url"])
    with pytest.raises(SatkitError, match="KEY=VALUE"):
        parse_storage_options(["=x"])


def test_url_and_zip_recognition_and_redaction() -> None:
    assert is_url("s3://b/x.zarr") and is_url("https://h/x.zarr") and is_url("gcs://b/x")
    assert not is_url("x.zarr") and not is_url("/data/s3:/x") and not is_url("C:\\x")
    assert is_zip("x.zip") and is_zip("https://h/x.ZIP") and not is_zip("x.zarr")
    assert redact("https://alice:hunter2@host/x.zarr") == "https://alice:***@host/x.zarr"
    assert redact("s3://bucket/x.zarr") == "s3://bucket/x.zarr"


def test_network_problems_are_told_apart() -> None:
    class NoCredentialsError(Exception):
        pass

    class EndpointConnectionError(Exception):
        pass

    class ClientResponseError(Exception):
        status = 401

    assert network_problem(NoCredentialsError("Unable to locate credentials")).startswith("no credentials")
    assert network_problem(EndpointConnectionError("x")).startswith("unreachable")
    assert network_problem(ConnectionRefusedError(111, "refused")).startswith("unreachable")
    assert network_problem(PermissionError("Forbidden")).startswith("forbidden")
    assert network_problem(ClientResponseError("401")).startswith("forbidden")
    assert network_problem(FileNotFoundError("x")) == "not found on the server"
    assert network_problem(ValueError("bad value")) is None


@pytest.mark.parametrize("out,what", [("s3://lab/x.zarr", "URL"), ("https://h/x.zarr", "URL"), ("x.zip", ".zip")])
def test_writing_to_a_url_or_zip_is_refused_up_front(tmp_path: Path, out: str, what: str) -> None:
    os.chdir(tmp_path)
    code, text = satdata("build", "--source", "digits", "--size", "8", "--out", out, "-q")
    assert code == 1 and what in text and "satdata pack" in text, text
    assert list(tmp_path.iterdir()) == []  # no local directory named "s3:" or "https:", no partial
    with pytest.raises(SatkitError, match="URL"):
        refuse_remote_output("s3://lab/x.h5", "--to", what="an HDF5 file")


def test_export_preview_and_saliency_refuse_urls(tmp_path: Path, digits_store: Path) -> None:
    os.chdir(tmp_path)
    code, text = satdata("export", str(digits_store), "--out", "s3://lab/x.h5")
    assert code == 1 and "--out s3://lab/x.h5" in text and "local" in text, text
    code, text = satdata("preview", str(digits_store), "--out", "https://h/p.png")
    assert code == 1 and "--out https://h/p.png" in text, text
    code, text = satdata("saliency", "s3://lab/d.zarr", "--teacher", "x", "--method", "gradcampp")
    assert code == 1 and "read-only" in text and "satdata fetch" in text, text
    assert list(tmp_path.iterdir()) == []


def test_storage_options_on_a_local_path_are_refused(digits_store: Path) -> None:
    code, text = satdata("info", str(digits_store), "-S", "anon=true")
    assert code == 1 and "storage options apply to URLs only" in text, text


# --------------------------------------------------------------------------- HTTP


def test_http_store_reads_like_the_local_one(served, digits_store: Path) -> None:
    http, _ = served
    url = http.url + "/d.zarr"
    local, remote = open_store(digits_store), open_store(url)
    assert store_digest(remote.info) == store_digest(local.info)
    for field, m in (("images", None), ("labels", None), ("saliency", "ink")):
        np.testing.assert_array_equal(remote.load("train", field, m), local.load("train", field, m))
    code, text = satdata("info", url, "--json")
    assert code == 0 and json.loads(text)["digest"] == store_digest(local.info)
    code, text = satdata("verify", url)
    assert code == 0 and "OK (12 arrays" in text, text


def test_http_errors_name_the_url_and_the_problem(served, tmp_path: Path) -> None:
    http, root = served
    code, text = satdata("info", http.url + "/missing.zarr")
    assert code == 1 and "missing.zarr: not found on the server" in text, text
    (root / "notastore").mkdir(exist_ok=True)
    (root / "notastore" / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group"}))
    code, text = satdata("info", http.url + "/notastore")
    assert code == 1 and "not a satkit store" in text, text
    code, text = satdata("info", "http://127.0.0.1:9/d.zarr")  # the discard port: nothing listens
    assert code == 1 and "127.0.0.1:9/d.zarr: unreachable" in text, text
    http.require_auth("alice", "s3cret")
    try:
        code, text = satdata("info", http.url + "/d.zarr")
        assert code == 1 and "forbidden" in text and "not a satkit store" not in text, text
        with_creds = http.url.replace("http://", "http://alice:s3cret@") + "/d.zarr"
        code, text = satdata("info", with_creds)
        assert code == 0 and "alice:s3cret" not in text, text
    finally:
        http.require_auth(None)


def test_a_chunk_missing_on_the_server_is_an_error_not_zeros(served, digits_store: Path, tmp_path: Path) -> None:
    http, root = served
    shutil.copytree(digits_store, root / "holed.zarr", dirs_exist_ok=True)
    victim = next(p for p in sorted((root / "holed.zarr" / "train" / "saliency" / "ink" / "c").rglob("*"))
                  if p.is_file())
    victim.unlink()
    st = open_store(http.url + "/holed.zarr")
    with pytest.raises(StoreError, match=r"saliency/ink chunk 0 .* is missing"):
        st.load("train", "saliency", "ink")
    code, text = satdata("verify", http.url + "/holed.zarr")
    assert code == 1 and "train/saliency/ink" in text, text


def test_missing_remote_extra_names_the_install_command(served) -> None:
    http, _ = served
    code = ("import sys; sys.modules['aiohttp'] = None; from satdata.cli import main; "
            f"sys.argv = ['satdata', 'info', {http.url + '/d.zarr'!r}]; main()")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 1, res.stderr
    assert 'pip install "satkit[remote]"' in res.stderr and "aiohttp" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def history(run: Path) -> list[tuple[float, float, float]]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["loss"], r["train_acc"], r["clean_acc"]) for r in lines]


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory, digits_store: Path) -> Path:
    """Two epochs of standard training on the local digits store: what a remote run must reproduce."""
    from sattrain.trainer import TrainConfig, train

    out = tmp_path_factory.mktemp("local") / "run"
    return train(TrainConfig(store=str(digits_store), method="standard", model="small-cnn", epochs=2, out=str(out),
                             summary_samples=0, eval_samples=200, threads=1, progress=False).resolved())


def test_train_and_eval_from_a_url(served, tmp_path: Path, local_run: Path) -> None:
    from sattrain.evaluation import evaluate
    from sattrain.trainer import TrainConfig, train

    http, _ = served
    url = http.url + "/d.zarr"
    run = train(TrainConfig(store=url, method="standard", model="small-cnn", epochs=2, out=str(tmp_path / "run"),
                            summary_samples=0, eval_samples=200, threads=1, progress=False).resolved())
    assert history(run) == history(local_run)  # the same data, so bit for bit the same run
    assert history(run)[-1][1] > 0.5  # and it learned (train accuracy; chance is 0.1)
    res = evaluate(run, url, attacks=["pgd"], eps=[8 / 255], steps=3, restarts=1, samples=100, write=False)
    assert res["store"]["path"] == url and res["samples"] == 100


# --------------------------------------------------------------------------- S3


def test_s3_info_verify_manifest_train_eval(s3, bucket: str, tmp_path: Path, digits_store32: Path,
                                            local_run: Path) -> None:
    so = s3.storage_options()
    code, text = satdata("info", bucket, *s_opts(so))
    assert code == 0 and "digits" in text, text
    code, text = satdata("verify", bucket, *s_opts(s3.storage_options(readonly=True)))
    assert code == 0 and "OK" in text, text
    s3.upload(digits_store32, "remote-test/d32.zarr")  # the manifest pins the 32x32 build
    code, text = satdata("verify", "s3://remote-test/d32.zarr", "--manifest", str(REPO / "manifests" / "digits.json"),
                         *s_opts(so))
    assert code == 0 and "matches" in text, text
    # sattrain from S3, credentials from the environment this time
    env = {**os.environ, "AWS_ACCESS_KEY_ID": so["key"], "AWS_SECRET_ACCESS_KEY": so["secret"],
           "AWS_ENDPOINT_URL": so["endpoint_url"], "PYTHONPATH": str(REPO)}
    res = subprocess.run([str(BIN / "sattrain"), "run", bucket, "--method", "standard", "--model", "small-cnn",
                          "--epochs", "2", "--summary-samples", "0", "--eval-samples", "200", "--threads", "1",
                          "--out", str(tmp_path / "run"), "-q"], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert history(tmp_path / "run") == history(local_run)  # the same data as the local run, bit for bit
    res = subprocess.run([str(BIN / "sattrain"), "eval", str(tmp_path / "run"), "--store", bucket, *s_opts(so),
                          "--attacks", "pgd", "--steps", "3", "--restarts", "1", "--samples", "50", "-q"],
                         env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["store"]["path"] == bucket


def test_s3_errors_name_the_problem(s3, bucket: str, tmp_path: Path) -> None:
    so = s3.storage_options()
    code, text = satdata("info", bucket, *s_opts({**so, "secret": "wrong"}))
    assert code == 1 and "forbidden" in text and "not a satkit store" not in text, text
    code, text = satdata("info", "s3://remote-test/nothing-here.zarr", *s_opts(so))
    assert code == 1 and "nothing-here.zarr: not found on the server" in text, text
    code, text = satdata("info", bucket, *s_opts({**so, "endpoint_url": "http://127.0.0.1:9"}))
    assert code == 1 and "unreachable" in text, text
    code, text = satdata("info", bucket, *s_opts({**so, "no_such_option": 1}))
    assert code == 1 and "--storage-option no_such_option: the s3:// backend does not take this option" in text, text
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(PYTHONPATH=str(REPO), AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
               AWS_CONFIG_FILE=str(tmp_path / "none"), AWS_EC2_METADATA_DISABLED="true", HOME=str(tmp_path))
    res = subprocess.run([str(BIN / "satdata"), "info", bucket, "-S", f"endpoint_url={so['endpoint_url']}"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1 and "no credentials" in res.stderr and "AWS_ACCESS_KEY_ID" in res.stderr, res.stderr


def test_s3_fetch_interrupted_midway_resumes_with_what_is_missing(s3, bucket: str, tmp_path: Path,
                                                                 digits_store: Path) -> None:
    """The S3 server drops out of reach in the middle of a fetch (its proxy stops); the same
    command run again fetches only what the first run did not verify, and the store matches."""
    import threading
    import time

    from satdata.share import fetch, fetch_partial
    from tests.s3server import DelayProxy

    out = tmp_path / "d.zarr"
    chunks = sum(1 for p in digits_store.rglob("*") if p.is_file() and "/c/" in p.as_posix())
    metadata = sum(1 for p in digits_store.rglob("zarr.json"))
    with DelayProxy(s3.endpoint, 0.005) as proxy:
        def cut() -> None:  # stop answering once a part of the store has come through
            while proxy.requests < metadata + 4:  # the metadata, then a few chunks
                time.sleep(0.001)
            proxy.stop()

        cutter = threading.Thread(target=cut, daemon=True)
        cutter.start()
        with pytest.raises(SatkitError, match=r"s3://remote-test/d.zarr/\S+: unreachable"):
            fetch(bucket, out, storage_options={**s3.storage_options(), "endpoint_url": proxy.endpoint,
                                                 "config_kwargs": {"retries": {"max_attempts": 1}}},
                  jobs=2, retries=0, progress=False)
        cutter.join(timeout=10)
    assert not out.exists() and fetch_partial(out).is_dir()  # nothing opens at --out; the download is kept
    with pytest.raises(StoreError):
        open_store(fetch_partial(out))  # the partial never opens as a store
    res = fetch(bucket, out, storage_options=s3.storage_options(), progress=False)
    assert 0 < res.downloaded < chunks and res.reused > 0, res
    assert store_digest(open_store(out).info) == store_digest(open_store(digits_store).info)
    assert not fetch_partial(out).exists()


def streaming_over_http(served, digits_store: Path, name: str):
    """A copy of digits_store served as /NAME.zarr, its train split opened for streaming (ink map)."""
    import torch

    from sattrain.data import StreamingSplit, open_train_split, select_indices

    http, root = served
    shutil.copytree(digits_store, root / f"{name}.zarr")
    st = open_store(f"{http.url}/{name}.zarr")
    split = open_train_split(st, "train", ["ink"], select_indices(st.info.splits["train"], None, 0),
                             torch.device("cpu"), 64 * 1024, progress=False)
    assert isinstance(split, StreamingSplit)
    return split, root / f"{name}.zarr" / "train" / "saliency" / "ink" / "c" / "1" / "0" / "0"


def test_a_chunk_deleted_on_the_server_under_a_streaming_split_stops_it(served, digits_store: Path) -> None:
    """Streaming from a URL: a chunk that vanished from the server after the store was opened
    is an error naming it, never a block of fill values."""
    import torch

    split, chunk = streaming_over_http(served, digits_store, "vanish")
    chunk.unlink()
    with pytest.raises(SatkitError, match=r"train/saliency/ink chunk 1 \(samples \[1024, 1442\)\) is missing on the server"):
        list(split.batches(64, torch.Generator().manual_seed(0), "ink"))


def test_a_flooding_server_is_refused_after_a_bounded_read(served, digits_store: Path) -> None:
    """A chunk file on the server far larger than the chunk can hold: the streaming read asks
    for at most that many bytes (one bounded Range) and stops with an error naming the chunk."""
    import torch

    http, _ = served
    split, chunk = streaming_over_http(served, digits_store, "flood")
    chunk.write_bytes(bytes(8 << 20))
    http.clear_requests()
    with pytest.raises(SatkitError, match=r"train/saliency/ink chunk 1 \(samples \[1024, 1442\)\) is more than"):
        list(split.batches(64, torch.Generator().manual_seed(0), "ink"))
    ranges = [r.range for r in http.requests if r.path.endswith("/ink/c/1/0/0")]
    assert ranges and all(r and r.startswith("bytes=0-") and int(r.split("-")[1]) < (2 << 20) for r in ranges), ranges
