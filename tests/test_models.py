"""The model registry and checkpoints: shapes, errors, and weights-only loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from satdata.errors import SatkitError
from sattrain.checkpoint import load_checkpoint, load_model, resolve_checkpoint, save_checkpoint
from sattrain.models import create_model, last_conv_stage, model_names, model_summary


pytestmark = pytest.mark.usefixtures("one_thread")


def test_registry_lists_the_papers_models() -> None:
    assert {"small-cnn", "resnet10", "resnet18", "resnet34", "preact-resnet18", "wrn-28-10"} <= set(model_names())
    assert all(model_summary(m) for m in model_names())


@pytest.mark.parametrize("name", ["small-cnn", "resnet10", "resnet18", "preact-resnet18", "resnet34"])
def test_forward_shapes_any_size(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, 7).eval()
    for size in (16, 32):
        out = model(torch.rand(2, 3, size, size))
        assert out.shape == (2, 7) and torch.isfinite(out).all()
    feats: list[torch.Tensor] = []
    h = last_conv_stage(model).register_forward_hook(lambda m, i, o: feats.append(o))
    model(torch.rand(1, 3, 32, 32))
    h.remove()
    assert feats[0].dim() == 4 and feats[0].shape[-1] >= 2  # a spatial map for Grad-CAM at 32x32


def test_wide_resnet_builds() -> None:
    model = create_model("wrn-28-10", 10).eval()
    assert sum(p.numel() for p in model.parameters()) > 30e6
    with torch.no_grad():
        assert model(torch.rand(1, 3, 8, 8)).shape == (1, 10)


def test_unknown_model_and_bad_classes() -> None:
    with pytest.raises(SatkitError, match=r"--model: unknown model 'vgg' \(known: .*small-cnn"):
        create_model("vgg", 10)
    with pytest.raises(SatkitError, match="at least one class"):
        create_model("small-cnn", 0)


def test_checkpoint_round_trip_weights_only(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = create_model("small-cnn", 4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(8, 3, 16, 16)
    model(x).sum().backward()
    opt.step()
    spec = {"name": "small-cnn", "num_classes": 4, "label_kind": "single", "image_size": [16, 16],
            "classes": list("abcd")}
    save_checkpoint(tmp_path / "checkpoint.pt", {
        "model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3, "model_spec": spec,
        "config": {"method": "sat", "beta": None, "maps": ["ink"]},
        "rng": {"torch": torch.get_rng_state()}, "extra": {"store_digest": "ab" * 32},
    })
    assert not list(tmp_path.glob(".*tmp*"))  # the atomic write left no temporary file
    ck = load_checkpoint(tmp_path)
    assert ck["epoch"] == 3 and ck["config"]["maps"] == ["ink"] and torch.equal(ck["rng"]["torch"], torch.get_rng_state())
    opt2 = torch.optim.Adam(create_model("small-cnn", 4).parameters())
    opt2.load_state_dict(ck["optimizer"])
    loaded, spec2 = load_model(tmp_path / "checkpoint.pt")
    assert spec2 == spec and not loaded.training
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


class NotATensor:
    pass


def test_checkpoints_never_unpickle_objects(tmp_path: Path) -> None:
    bad = tmp_path / "evil.pt"
    torch.save({"format": "satkit-checkpoint", "version": 1, "payload": NotATensor()}, bad)
    with pytest.raises(SatkitError, match="not a readable satkit checkpoint"):
        load_checkpoint(bad)
    other = tmp_path / "other.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(SatkitError, match="not a satkit checkpoint"):
        load_checkpoint(other)
    newer = tmp_path / "newer.pt"
    torch.save({"format": "satkit-checkpoint", "version": 99}, newer)
    with pytest.raises(SatkitError, match="newer"):
        load_checkpoint(newer)
    with pytest.raises(SatkitError, match="no checkpoint"):
        resolve_checkpoint(tmp_path / "missing")
