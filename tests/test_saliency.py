"""Saliency methods, teachers and `satdata saliency`: encodings, no side effects, and
cross-checks against pytorch-grad-cam (Grad-CAM, Grad-CAM++) and Captum (guided
backprop, SmoothGrad)."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from click.testing import CliRunner

from satdata.saliency import generate as G
from satdata.saliency import methods as S
from satdata.cli_maps import METHOD_NAMES, saliency_cmd
from satdata.errors import SatkitError
from satdata.gc import collect
from satdata.store import MapInfo, ArrayWriter, open_store
from satdata.saliency.teacher import ImageNetNormalized, load_teacher
from satdata.verify import verify_digests
from sattrain.checkpoint import save_checkpoint
from sattrain.models import create_model

torch.set_num_threads(1)
CLASSES = [str(i) for i in range(10)]


def small_store(src: Path, out: Path, counts: dict[str, int]) -> Path:
    """The first samples of each split of the digits store, with its ink map."""
    st = open_store(src)
    w = ArrayWriter(out, dataset="digits", classes=st.info.classes, image_size=st.info.image_size,
                    label_kind="single", maps={"ink": MapInfo("ink", "binary", "mask")})
    for split, n in counts.items():
        w.create_split(split, n)
        w.write(split, 0, st.load(split, "images")[:n], st.load(split, "labels")[:n],
                [str(i) for i in st.load(split, "ids")[:n]], {"ink": st.load(split, "saliency", "ink")[:n]})
        w.close_split(split, n)
    w.finish({"source": "test subset"})
    return out


def train_teacher(store: Path, out: Path, name: str = "small-cnn", num_classes: int = 10, steps: int = 40) -> Path:
    """A small teacher trained for a few Adam steps on the store's train split."""
    st = open_store(store)
    x = torch.from_numpy(st.load("train", "images")).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(st.load("train", "labels")) % num_classes
    torch.manual_seed(0)
    model = create_model(name, num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        i = torch.randint(0, len(x), (64,))
        loss = F.cross_entropy(model(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():  # settle BatchNorm's running statistics for eval mode
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        model(x[:512])
    save_checkpoint(out, {
        "model": model.state_dict(), "epoch": 1, "config": {},
        "model_spec": {"name": name, "num_classes": num_classes, "label_kind": "single",
                       "image_size": list(st.info.image_size), "classes": CLASSES[:num_classes]},
    })
    return out


@pytest.fixture(scope="module")
def world(digits_store: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("sal")
    ckpt = train_teacher(digits_store, d / "teacher.pt")
    st = open_store(digits_store)
    x = torch.from_numpy(st.load("test", "images")[:8]).permute(0, 3, 1, 2).float() / 255
    return {"dir": d, "ckpt": ckpt, "x": x, "labels": torch.from_numpy(st.load("test", "labels")[:8]),
            "src": digits_store}


def live_model(ckpt: Path) -> nn.Module:
    """The teacher as a caller would hold it: in training mode, parameters requiring grad."""
    m = load_teacher(ckpt).model
    for p in m.parameters():
        p.requires_grad_(True)
    m.train()
    return m


def test_cli_method_names_match_the_registry() -> None:
    assert METHOD_NAMES == tuple(S.ALGORITHMS)


@pytest.mark.parametrize("method", list(S.ALGORITHMS))
def test_each_method_gives_its_encoding_shape_and_range_without_side_effects(world: dict, method: str) -> None:
    model = live_model(world["ckpt"])
    model.features[1].eval()  # a mixed state must come back exactly as it was
    flags = [m.training for m in model.modules()]
    x = world["x"]
    target = S.predict(model, x).argmax(1)
    m = S.get_algorithm(method)
    out = S.compute(m, model, x, target, generator=torch.Generator().manual_seed(0))
    assert [mm.training for mm in model.modules()] == flags
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert out.device == x.device and out.dtype == torch.float32
    q = G.to_stored(out, m.encoding)
    if m.encoding == "unit":
        shape = (8, 16, 16) if m.channels == 1 else (8, m.channels, 16, 16)
        stored = (8, 16, 16) if m.channels == 1 else (8, 16, 16, m.channels)
        assert out.shape == shape and q.shape == stored and q.dtype == torch.uint8
        assert float(out.min()) >= 0 and float(out.max()) <= 1
        # min-max per image (over all its channels): each image spans [0, 1] unless it is
        # constant (then all 0)
        per_max = out.flatten(1).amax(1)
        assert torch.all((out.flatten(1).amin(1) == 0) & ((per_max == 1) | (per_max == 0)))
        assert int((per_max == 1).sum()) >= 6
    else:
        assert out.shape == (8, 3, 16, 16) and q.shape == (8, 16, 16, 3) and q.dtype == torch.int8
        assert float(out.min()) == -1 and float(out.max()) <= 1
        if method == "gbp":
            assert set(out.unique().tolist()) == {-1.0, 1.0}
            assert set(q.unique().tolist()) == {-127, 127}
        else:  # the Grad-CAM++ value where the guided sign is +, -1 elsewhere
            cam = S.gradcampp(model, x, target)
            g = S.guided_gradient(model, x, target)
            expect = torch.where(g > 0, cam[:, None].expand_as(g), torch.full_like(g, -1.0))
            assert torch.equal(out, expect)


def test_grad_cam_and_grad_cam_pp_match_pytorch_grad_cam(world: dict) -> None:
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    torch.manual_seed(1)
    resnet = create_model("resnet10", 10).eval()
    for model in (load_teacher(world["ckpt"]).model, resnet):
        x = world["x"]
        target = S.predict(model, x).argmax(1)
        layer = S.find_cam_layer(model, x)
        for ours, theirs in ((S.gradcam, GradCAM), (S.gradcampp, GradCAMPlusPlus)):
            mine = ours(model, x, target, layer)
            other = copy.deepcopy(model).requires_grad_(True)  # it backpropagates into the weights
            cam = theirs(model=other, target_layers=[dict(other.named_modules())[layer.name]])
            ref = cam(input_tensor=x.clone(), targets=[ClassifierOutputTarget(int(t)) for t in target])
            assert np.abs(mine.numpy() - ref).max() < 1e-4, (type(model).__name__, ours.__name__)


@pytest.mark.filterwarnings("ignore::UserWarning:captum.*")
def test_guided_backprop_matches_captum_and_guides_functional_relus(world: dict) -> None:
    from captum.attr import GuidedBackprop

    model = load_teacher(world["ckpt"]).model
    x, target = world["x"], S.predict(model, world["x"]).argmax(1)
    mine = S.guided_gradient(model, x, target)
    other = copy.deepcopy(model)
    for mod in other.modules():  # Captum's module hooks cannot take in-place ReLUs
        if isinstance(mod, nn.ReLU):
            mod.inplace = False
    ref = GuidedBackprop(other).attribute(x.clone(), target=target)
    assert torch.allclose(mine, ref, atol=1e-7, rtol=1e-5)
    assert torch.equal(S.gbp(model, x, target), torch.where(ref > 0, 1.0, -1.0))

    # The same network written with F.relu gets the same guided gradient (Captum's hooks
    # on nn.ReLU modules would not see these ReLUs).
    class Functional(nn.Module):
        def __init__(self, seq: nn.Sequential, head: nn.Module) -> None:
            super().__init__()
            self.seq, self.head = seq, head

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for mod in self.seq:
                x = F.relu(x) if isinstance(mod, nn.ReLU) else mod(x)
            return self.head(x)

    functional = Functional(model.features, nn.Sequential(model.pool, model.fc)).eval()
    assert torch.allclose(S.guided_gradient(functional, x, target), mine, atol=1e-7, rtol=1e-5)
    with pytest.raises(SatkitError, match="no ReLU"):
        S.guided_gradient(nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10)), x, target)


def test_smoothgrad_matches_captum_noise_tunnel(world: dict) -> None:
    from captum.attr import NoiseTunnel, Saliency

    model = load_teacher(world["ckpt"]).model
    x, target = world["x"][:3], S.predict(model, world["x"][:3]).argmax(1)
    for i in range(3):
        xi, ti = x[i:i + 1], target[i:i + 1]
        sigma = 0.15 * float(xi.max() - xi.min())
        torch.manual_seed(123)  # Captum draws from the global generator
        ref = NoiseTunnel(Saliency(copy.deepcopy(model))).attribute(
            xi, nt_type="smoothgrad", nt_samples=10, stdevs=sigma, target=ti, abs=False)
        mine = S.smoothgrad_gradient(model, xi, ti, generator=torch.Generator().manual_seed(123))
        assert torch.allclose(mine, ref, atol=1e-8, rtol=1e-4)
        sg = S.smoothgrad(model, xi, ti, generator=torch.Generator().manual_seed(123))
        lo, hi = ref.min(), ref.max()  # the paper's: signed, min-max over all 3 channels
        assert sg.shape == (1, 3, 16, 16) and torch.allclose(sg, (ref - lo) / (hi - lo), atol=1e-5)
        sga = S.smoothgrad_abs(model, xi, ti, generator=torch.Generator().manual_seed(123))
        assert torch.allclose(sga, S.minmax(ref.abs().mean(1)), atol=1e-5)


def reference_smoothgrad(model: nn.Module, images: np.ndarray, targets: np.ndarray, noise: np.ndarray,
                         stdev_spread: float = 0.15) -> np.ndarray:
    """The SAT authors' SmoothGrad (gradcam.SmoothGrad.forward) from its equations, one
    image at a time in numpy: only the gradient of the target logit comes from torch.

    stdev = 0.15 * (max(x) - min(x)); g = mean_k d logit_t / dx at x + stdev * n_k;
    S = (g - min g) / max(g - min g) over the whole (3, H, W) image.
    """
    out = np.zeros_like(images, dtype=np.float64)
    for i in range(len(images)):
        x = images[i].astype(np.float32)
        stdev = stdev_spread * (np.max(x) - np.min(x))
        total = np.zeros_like(x, dtype=np.float64)
        for k in range(noise.shape[1]):
            xn = torch.from_numpy((x + stdev * noise[i, k]).astype(np.float32))[None].requires_grad_(True)
            logit = model(xn)[0, int(targets[i])]
            (g,) = torch.autograd.grad(logit, xn)
            total += g[0].numpy()
        avg = total / noise.shape[1]
        avg = avg - avg.min()
        out[i] = avg / avg.max()
    return out


def test_smoothgrad_is_the_sat_authors_map(world: dict) -> None:
    """The paper's SmoothGrad, per image against a reference written from its equations:
    signed, 3 channels kept, min-max over the whole image; the old |.|-mean map is
    another method and correlates poorly with it."""
    model = load_teacher(world["ckpt"]).model
    x = world["x"]
    target = S.predict(model, x).argmax(1)
    noise = torch.from_numpy(np.random.default_rng(7).standard_normal((8, 10, 3, 16, 16)).astype(np.float32))
    mine = S.smoothgrad(model, x, target, noise=noise)
    ref = reference_smoothgrad(model, x.numpy(), target.numpy(), noise.numpy())
    assert mine.shape == (8, 3, 16, 16)
    assert np.abs(mine.numpy() - ref).max() < 1e-4
    corr = [np.corrcoef(mine[i].flatten().numpy(), ref[i].flatten())[0, 1] for i in range(8)]
    assert min(corr) > 0.9999
    # not the abs-mean picture: its (channel-broadcast) correlation with the paper's is low
    old = S.smoothgrad_abs(model, x, target, noise=noise)
    old_corr = [np.corrcoef(old[i].expand(3, -1, -1).flatten().numpy(), ref[i].flatten())[0, 1] for i in range(8)]
    assert np.median(old_corr) < 0.8
    # a channel is not a copy of another (the map keeps colour), and the noise matters
    assert not torch.equal(mine[:, 0], mine[:, 1])
    assert not torch.allclose(S.smoothgrad(model, x, target, noise=noise * 2), mine)
    with pytest.raises(ValueError, match="noise must be"):
        S.smoothgrad(model, x, target, noise=noise[:, :, :2])
    # a generator and the same draws given as noise are the same map
    gen_noise = torch.randn((8, 10, 3, 16, 16), generator=torch.Generator().manual_seed(5))
    assert torch.equal(S.smoothgrad(model, x, target, generator=torch.Generator().manual_seed(5)),
                       S.smoothgrad(model, x, target, noise=gen_noise))


def test_smoothgrad_registry_and_parameters() -> None:
    sg, sga = S.get_algorithm("smoothgrad"), S.get_algorithm("smoothgrad-abs")
    assert (sg.encoding, sg.channels, sg.uses_noise, sg.uses_cam_layer) == ("unit", 3, True, False)
    assert (sga.encoding, sga.channels, sga.uses_noise) == ("unit", 1, True)
    assert "not the paper" in sga.summary
    opts = S.AlgorithmOptions(seed=4)
    p = S.algorithm_parameters(sg, opts, None)
    assert p["n_samples"] == 10 and p["noise_level"] == 0.15 and p["seed"] == 4
    assert p["sign"].startswith("signed") and p["channel_reduce"].startswith("none")
    assert p["scale"] == "min-max per image over all channels jointly"
    pa = S.algorithm_parameters(sga, opts, None)
    assert pa["channel_reduce"] == "mean |grad| over channels" and "sign" not in pa


def test_cam_layer_is_picked_by_spatial_size() -> None:
    torch.manual_seed(0)
    resnet = create_model("resnet10", 10)
    assert S.find_cam_layer(resnet, torch.rand(1, 3, 16, 16)).name == "layer4"  # 2x2
    small = S.find_cam_layer(resnet, torch.rand(1, 3, 8, 8))  # layer4 would be 1x1
    assert (small.name, small.hw) == ("layer3", (2, 2))
    cam = S.gradcampp(resnet, torch.rand(2, 3, 8, 8), torch.tensor([0, 1]), small)
    assert float(cam.amax()) == 1.0  # not the all-zero map of a 1x1 layer
    with pytest.raises(SatkitError, match="no feature map of at least 2x2 at 1x1"):
        S.find_cam_layer(resnet, torch.rand(1, 3, 1, 1))
    assert S.find_cam_layer(resnet, torch.rand(1, 3, 8, 8), "layer2").name == "layer2"
    with pytest.raises(SatkitError, match="--layer: the teacher has no module 'nope'"):
        S.find_cam_layer(resnet, torch.rand(1, 3, 8, 8), "nope")


def test_torchvision_teacher_from_a_local_weights_file(tmp_path: Path) -> None:
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=7).eval()
    f = tmp_path / "r18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, f)
    t = load_teacher(arch="resnet18", weights=f)
    assert t.kind == "torchvision" and t.num_classes == 7 and t.arch == "resnet18"
    assert t.sha256 == hashlib.sha256(f.read_bytes()).hexdigest()
    assert isinstance(t.model, ImageNetNormalized) and not t.model.training
    x = torch.rand(2, 3, 32, 32)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(t.model(x), net((x - mean) / std), atol=1e-5)
    # a standard ResNet ends at 1x1 on 32x32 input: Grad-CAM moves to layer3 (2x2)
    layer = S.find_cam_layer(t.model, x)
    assert (layer.name, layer.hw) == ("net.layer3", (2, 2))
    with pytest.raises(SatkitError, match="--arch: 'nonet' is not a torchvision"):
        load_teacher(arch="nonet", weights=f)
    with pytest.raises(SatkitError, match="do not fit torchvision resnet34"):
        load_teacher(arch="resnet34", weights=f)
    with pytest.raises(SatkitError, match="--arch and --weights go together"):
        load_teacher(arch="resnet18")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(SatkitError, match="bad.pth: not a weights file"):
        load_teacher(arch="resnet18", weights=bad)


def test_target_rules() -> None:
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0]])
    assert G.choose_target(logits, None, "predicted").tolist() == [1, 0]
    assert G.choose_target(logits, torch.tensor([2, 2]), "label").tolist() == [2, 2]
    multi = torch.tensor([[1, 0, 1], [0, 0, 0]], dtype=torch.uint8)
    assert G.choose_target(logits, multi, "label").tolist() == [2, 0]  # best labelled; none: predicted


def test_saliency_cli_adds_verifiable_maps_with_provenance(world: dict, tmp_path: Path) -> None:
    store = small_store(world["src"], tmp_path / "s.zarr", {"train": 40, "test": 24})
    r = CliRunner()
    res = r.invoke(saliency_cmd, [str(store), "--teacher", str(world["ckpt"]), "--method", "gradcampp",
                                  "--name", "cam", "--batch-size", "16", "-q"])
    assert res.exit_code == 0, res.output
    assert "added map cam" in res.output and "layer features 8x8" in res.output
    res = r.invoke(saliency_cmd, [str(store), "--teacher", str(world["ckpt"]), "--method", "gbp",
                                  "--target", "label", "-q"])
    assert res.exit_code == 0, res.output
    st = open_store(store)
    assert verify_digests(st).ok
    cam, gbp = st.info.maps["cam"], st.info.maps["gbp"]
    assert (cam.encoding, cam.kind, cam.channels) == ("unit", "gradcampp", 1)
    assert (gbp.encoding, gbp.kind, gbp.channels) == ("signed", "gbp", 3)
    assert st.load("test", "saliency", "gbp").shape == (24, 16, 16, 3)
    assert set(np.unique(st.load("train", "saliency", "gbp"))) == {-127, 127}
    p = cam.provenance
    assert p["teacher"]["sha256"] == hashlib.sha256(world["ckpt"].read_bytes()).hexdigest()
    assert p["teacher"]["path"] == str(world["ckpt"].resolve()) and p["teacher"]["arch"] == "small-cnn"
    assert p["method"] == "gradcampp" and p["parameters"]["layer"] == "features" and p["target"] == "predicted"
    assert p["tool"].startswith("satkit ") and p["created"] and set(p["teacher_accuracy"]) == {"train", "test"}
    assert gbp.provenance["target"] == "label"
    # the maps in the store are what the method computes for those images
    model = load_teacher(world["ckpt"]).model
    x = torch.from_numpy(st.load("test", "images")).permute(0, 3, 1, 2).float() / 255
    expect = G.to_stored(S.gradcampp(model, x, S.predict(model, x).argmax(1)), "unit").numpy()
    assert np.abs(st.load("test", "saliency", "cam").astype(int) - expect).max() <= 1
    # each map is stored with the class it was computed for: the prediction, or the label
    assert cam.targets and gbp.targets and not st.info.maps["ink"].targets
    assert np.array_equal(st.map_targets("test", "cam"), S.predict(model, x).argmax(1).numpy())
    assert np.array_equal(st.map_targets("train", "gbp"), st.load("train", "labels"))
    assert st.map_targets("test", "ink") is None
    assert f"test/map_targets/{cam.array_name}" in st.info.digests

    res = r.invoke(saliency_cmd, [str(store), "--teacher", str(world["ckpt"]), "--method", "gradcampp",
                                  "--name", "cam", "-q"])
    assert res.exit_code == 1 and "already has a map 'cam'" in res.output
    old_array, old_test, old_targets = cam.array, st.load("test", "saliency", "cam"), st.map_targets("test", "cam")
    res = r.invoke(saliency_cmd, [str(store), "--teacher", str(world["ckpt"]), "--method", "gradcampp",
                                  "--name", "cam", "--overwrite", "--splits", "train", "-q"])
    assert res.exit_code == 0, res.output
    st2 = open_store(store)
    assert st2.info.maps["cam"].array != old_array and (store / "train" / "saliency" / old_array).is_dir()
    assert np.array_equal(st2.load("test", "saliency", "cam"), old_test)  # kept, now under the new array
    assert np.array_equal(st2.map_targets("test", "cam"), old_targets)  # and its targets
    assert verify_digests(st2).ok
    # the replaced version stays for readers that opened it, until `satdata gc`
    assert (store / "test" / "map_targets" / old_array).is_dir()
    collect(store)
    assert not (store / "train" / "saliency" / old_array).exists()
    assert not (store / "test" / "map_targets" / old_array).exists()
    res = r.invoke(saliency_cmd, [str(store), "--teacher", str(world["ckpt"]), "--method", "gradcam",
                                  "--name", "new", "--splits", "train", "-q"])
    assert res.exit_code == 1 and "must cover every split" in res.output


def test_saliency_errors_are_one_line(world: dict, tmp_path: Path) -> None:
    store = small_store(world["src"], tmp_path / "s.zarr", {"train": 8, "test": 8})
    five = train_teacher(store, tmp_path / "five.pt", num_classes=5, steps=1)
    r = CliRunner()
    cases = [
        (["--teacher", str(five), "--method", "gbp", "--target", "label"], "the teacher has 5 classes"),
        (["--method", "gbp"], "--teacher: required"),
        (["--teacher", str(tmp_path / "none"), "--method", "gbp"], "no checkpoint"),
        (["--teacher", str(world["ckpt"]), "--method", "gbp", "--layer", "features"], "uses no CAM layer"),
        (["--teacher", str(world["ckpt"]), "--method", "gbp", "--name", "a/b"], "--name"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--teacher", str(world["ckpt"]), "--method", "gbp", "--device", "cuda"], "no CUDA device"))
    before = sorted(p.name for p in (store / "train" / "saliency").iterdir())
    for args, msg in cases:
        res = r.invoke(saliency_cmd, [str(store), *args, "-q"])
        assert res.exit_code != 0 and msg in res.output, (args, res.output)
    assert sorted(p.name for p in (store / "train" / "saliency").iterdir()) == before
    res = r.invoke(saliency_cmd, [str(tmp_path / "s.zip"), "--teacher", str(world["ckpt"]), "--method", "gbp"])
    assert res.exit_code == 1 and "local store directory" in res.output


def test_smoothgrad_cli_stores_the_papers_three_channel_map_that_training_reads(world: dict, tmp_path: Path) -> None:
    from sattrain.data import map_codec, saliency_from_stored

    store = small_store(world["src"], tmp_path / "s.zarr", {"train": 20, "test": 12})
    r = CliRunner()
    res = r.invoke(saliency_cmd, [str(store), "--teacher", str(world["ckpt"]), "--method", "smoothgrad",
                                  "--name", "sg", "--seed", "3", "-q"])
    assert res.exit_code == 0, res.output
    assert "smoothgrad (unit, 3 channels)" in res.output
    res = r.invoke(saliency_cmd, [str(store), "--teacher", str(world["ckpt"]), "--method", "smoothgrad-abs",
                                  "-q"])
    assert res.exit_code == 0, res.output
    st = open_store(store)
    assert verify_digests(st).ok
    sg = st.info.maps["sg"]
    assert (sg.kind, sg.encoding, sg.channels) == ("smoothgrad", "unit", 3)
    assert sg.provenance["parameters"]["seed"] == 3 and sg.provenance["parameters"]["noise_level"] == 0.15
    assert sg.provenance["parameters"]["channel_reduce"].startswith("none")
    assert st.info.maps["smoothgrad-abs"].channels == 1
    q = st.load("test", "saliency", "sg")
    assert q.shape == (12, 16, 16, 3) and q.dtype == np.uint8
    # what generate_maps stored is the method on those images, each batch's noise seeded by
    # its split and first sample (one batch per split here)
    model = load_teacher(world["ckpt"]).model
    for split in ("train", "test"):
        gen = torch.Generator().manual_seed(G.noise_seed(3, split, 0))
        x = torch.from_numpy(st.load(split, "images")).permute(0, 3, 1, 2).float() / 255
        want = G.to_stored(S.smoothgrad(model, x, S.predict(model, x).argmax(1), generator=gen), "unit").numpy()
        assert np.abs(st.load(split, "saliency", "sg").astype(int) - want).max() <= 1
    # the trainer's codec reads an (N, H, W, 3) unit map as one S per channel in [0, 1]
    codec = map_codec(st, "sg")
    s = saliency_from_stored(torch.from_numpy(q), codec)
    assert s.shape == (12, 3, 16, 16) and float(s.min()) == 0.0 and float(s.max()) == 1.0
    assert torch.allclose(s, torch.from_numpy(q).permute(0, 3, 1, 2).float() / 255)


def lagging_teacher(ckpt: Path, out: Path) -> Path:
    """The teacher with BatchNorm running statistics reset to their initial values: the
    weights are trained, the statistics are not (a run stopped early)."""
    obj = torch.load(ckpt, map_location="cpu", weights_only=False)
    sd = obj["model"]
    for k in list(sd):
        if k.endswith("running_mean"):
            sd[k] = torch.zeros_like(sd[k])
        elif k.endswith("running_var"):
            sd[k] = torch.ones_like(sd[k])
    save_checkpoint(out, obj)
    return out


def test_teacher_accuracy_is_checked_on_the_held_out_split_before_any_map(world: dict, tmp_path: Path) -> None:
    store = small_store(world["src"], tmp_path / "s.zarr", {"train": 16, "test": 40})
    st = open_store(store)
    model = load_teacher(world["ckpt"]).model
    x = torch.from_numpy(st.load("test", "images")).permute(0, 3, 1, 2).float() / 255
    want = float((S.predict(model, x).argmax(1).numpy() == st.load("test", "labels")).mean())
    r = CliRunner()
    res = r.invoke(saliency_cmd, [str(store), "--teacher", str(world["ckpt"]), "--method", "gradcam", "-q"])
    assert res.exit_code == 0, res.output
    assert f"teacher accuracy on test: {want:.3f} (40 of 40 samples, eval mode)" in res.output
    assert want >= 0.55 and "warning" not in res.output and "LOW" not in res.output
    held = open_store(store).info.maps["gradcam"].provenance["teacher_heldout"]
    assert held["split"] == "test" and held["samples"] == 40 and held["mode"] == "eval"
    assert held["accuracy"] == pytest.approx(want) and held["low"] is False and held["threshold"] == 0.55

    # BatchNorm statistics that lag the weights: low in eval mode (which the maps use),
    # high with batch statistics; the warning says so and suggests training longer
    lag = lagging_teacher(world["ckpt"], tmp_path / "lag.pt")
    check = G.check_teacher_accuracy(load_teacher(lag).model, st)
    assert check.low and check.accuracy < 0.4 and check.batch_stats_accuracy is not None
    assert check.batch_stats_accuracy >= 0.55
    res = r.invoke(saliency_cmd, [str(store), "--teacher", str(lag), "--method", "gradcam", "--name", "lag", "-q"])
    assert res.exit_code == 0, res.output
    assert f"teacher accuracy on test: {check.accuracy:.3f} (40 of 40 samples, eval mode)" in res.output
    assert "warning: the teacher's accuracy on test is" in res.output and "Train the teacher longer" in res.output
    assert "BatchNorm running statistics lag" in res.output and "(LOW: see the warning above)" in res.output
    held = open_store(store).info.maps["lag"].provenance["teacher_heldout"]
    assert held["low"] is True and held["batch_stats_accuracy"] == pytest.approx(check.batch_stats_accuracy)

    # a seeded subset of at most max_samples, the same for the same seed
    a = G.check_teacher_accuracy(model, st, max_samples=10, seed=1)
    assert (a.split, a.n, a.of) == ("test", 10, 40) and "a random 10 of 40 samples, seed 1" in a.summary()
    assert a == G.check_teacher_accuracy(model, st, max_samples=10, seed=1)
    assert G.low_accuracy_threshold(10) == 0.55 and G.low_accuracy_threshold(2) == 0.75
    # a store without test or val: scored on train
    only_train = small_store(world["src"], tmp_path / "t.zarr", {"train": 12})
    assert G.check_teacher_accuracy(model, open_store(only_train)).split == "train"
    # a teacher of other classes is not scored (its class indices do not name the store's)
    five = train_teacher(store, tmp_path / "five.pt", num_classes=5, steps=1)
    res = r.invoke(saliency_cmd, [str(store), "--teacher", str(five), "--method", "gradcam", "--name", "five", "-q"])
    assert res.exit_code == 0, res.output
    assert "teacher accuracy: not measured (the teacher has 5 classes, the store 10)" in res.output
    assert open_store(store).info.maps["five"].provenance["teacher_heldout"] == {
        "not_measured": "the teacher has 5 classes, the store 10"}


@pytest.mark.parametrize("method", ["gradcampp", "smoothgrad"])
def test_maps_on_dask_workers_equal_one_process(world: dict, tmp_path: Path, method: str, one_thread: None) -> None:
    """`satdata saliency --dask local:2`: the same map array (digests over every chunk
    file) as one process: the same batches, the noise seeded per batch, one torch thread
    per process on both sides. Several tasks per split (batches of 8)."""
    pytest.importorskip("distributed")
    from satdata.saliency.generate import SaliencyConfig, generate_maps

    here = small_store(world["src"], tmp_path / "here.zarr", {"train": 28, "test": 12})
    there = small_store(world["src"], tmp_path / "there.zarr", {"train": 28, "test": 12})
    base = dict(method=method, teacher=str(world["ckpt"]), batch_size=8, progress=False, seed=5)
    a = generate_maps(SaliencyConfig(store=str(here), **base))
    b = generate_maps(SaliencyConfig(store=str(there), dask="local:2", **base))
    for split in ("train", "test"):
        ka, kb = open_store(here).array_key(split, "saliency", method), open_store(there).array_key(split, "saliency", method)
        assert a.info.digests[ka] == b.info.digests[kb], split
        np.testing.assert_array_equal(open_store(here).map_targets(split, method),
                                      open_store(there).map_targets(split, method))
    assert a.teacher_accuracy == b.teacher_accuracy and a.teacher_accuracy["train"] > 0.5
    assert "Dask" in b.info.maps[method].provenance["device"]
    assert verify_digests(open_store(there)).ok
