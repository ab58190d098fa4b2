"""The SAT perturbation (docs/method.md): schedule, sign, clamping, S per encoding, statistics, no host sync."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from satdata.errors import SatkitError
from satdata.store import MapInfo
from sattrain.data import MapCodec, RawBatch, prepare_batch, saliency_from_stored
from sattrain.methods import StepContext, get_method, method_names
from sattrain.models import create_model
from sattrain.perturb import (
    curriculum_p,
    rademacher_like,
    sat_direction,
    sat_perturb,
    uniform_delta,
    uniform_noise,
)

EPS = 8 / 255


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def codec_for(encoding: str, channels: int = 1) -> MapCodec:
    info = MapInfo(name="m", encoding=encoding, kind="mask", channels=channels)
    scale, offset = info.affine()
    return MapCodec("m", "mask", encoding, scale, offset, channels)


# --------------------------------------------------------------------------- schedule


def test_schedule_values_from_sat_md() -> None:
    assert curriculum_p(0, 0.6) == 0.0
    assert curriculum_p(10, 0.6) == pytest.approx(0.4, abs=1e-12)
    assert curriculum_p(50, 0.6) == pytest.approx(1 - 0.6**5)  # ~0.922
    assert round(curriculum_p(50, 0.6), 2) == 0.92
    assert round(curriculum_p(100, 0.6), 3) == 0.994
    assert curriculum_p(37, 1.0) == 0.0  # alpha = 1: noise forever


@given(st.integers(0, 500), st.floats(0.01, 0.99))
def test_schedule_is_a_probability_rising_with_epochs(epoch: int, alpha: float) -> None:
    p, p_next = curriculum_p(epoch, alpha), curriculum_p(epoch + 1, alpha)
    assert 0.0 <= p <= 1.0  # reaches 1.0 only by float rounding, for small alpha and late epochs
    assert p_next >= p
    assert p == pytest.approx(1 - alpha ** (epoch / 10))


@pytest.mark.parametrize("epoch, alpha", [(-1, 0.6), (3, 0.0), (3, 1.5)])
def test_schedule_rejects_bad_values(epoch: int, alpha: float) -> None:
    with pytest.raises(SatkitError):
        curriculum_p(epoch, alpha)


# --------------------------------------------------------------------------- the formula


@given(st.floats(0.0, 0.5))
def test_saliency_is_subtracted(eps: float) -> None:
    x = torch.full((2, 3, 4, 5), 0.5)
    ones = torch.ones(2, 1, 4, 5)
    out = sat_perturb(x, ones, eps=eps, p=1.0, generator=gen())
    assert torch.allclose(out, torch.full_like(x, 0.5 - eps), atol=1e-7)
    out = sat_perturb(x, -ones, eps=eps, p=1.0, generator=gen())
    assert torch.allclose(out, torch.full_like(x, 0.5 + eps), atol=1e-7)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 2**31 - 1),
    st.floats(0.0, 1.0),
    st.floats(0.0, 0.3),
    st.sampled_from(["binary", "unit", "signed"]),
)
def test_result_is_clamp_of_x_minus_eps_g(seed: int, p: float, eps: float, encoding: str) -> None:
    rng = np.random.default_rng(seed)
    # Pixel values include the clamping edges exactly.
    x = torch.from_numpy(rng.choice([0.0, 1.0, 0.02, 0.5, 0.98], size=(3, 3, 6, 6)).astype(np.float32))
    dtype = np.int8 if encoding == "signed" else np.uint8
    hi = {"binary": 2, "unit": 256, "signed": 128}[encoding]
    lo = -127 if encoding == "signed" else 0
    q = torch.from_numpy(rng.integers(lo, hi, size=(3, 6, 6)).astype(dtype))
    S = saliency_from_stored(q, codec_for(encoding))
    g = sat_direction(x, S, p=p, generator=gen(seed))
    out = sat_perturb(x, S, eps=eps, p=p, generator=gen(seed))
    assert torch.equal(out, (x - eps * g).clamp(0, 1))
    assert out.min() >= 0 and out.max() <= 1
    # g is either a random sign or S, element by element (and S is shared by the channels)
    Sx = S.expand_as(x)
    assert torch.all((g == 1) | (g == -1) | (g == Sx))
    assert g.min() >= -1 and g.max() <= 1
    # no projection beyond the clamp: every element moved by exactly eps * |g| or hit 0 / 1
    moved = (out - x).abs()
    inside = (out > 0) & (out < 1)
    assert torch.allclose(moved[inside], (eps * g.abs())[inside], atol=1e-6)


def test_clamping_at_both_ends() -> None:
    x = torch.tensor([0.0, 1.0, 0.01, 0.99]).view(1, 1, 2, 2).repeat(1, 3, 1, 1)
    S = torch.tensor([-1.0, 1.0, 1.0, -1.0]).view(1, 1, 2, 2)  # push 0 up, 1 down, 0.01 below 0, 0.99 above 1
    out = sat_perturb(x, S, eps=0.1, p=1.0, generator=gen())
    expect = torch.tensor([0.1, 0.9, 0.0, 1.0]).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    assert torch.allclose(out, expect)


def test_unit_map_scales_the_step_no_projection() -> None:
    # A unit map of 0.5 moves a pixel by eps / 2; a signed map of -1 moves it up by eps.
    x = torch.full((1, 3, 2, 2), 0.5)
    half = saliency_from_stored(torch.full((1, 2, 2), 255 // 2 + 1, dtype=torch.uint8), codec_for("unit"))
    out = sat_perturb(x, half, eps=0.2, p=1.0, generator=gen())
    assert torch.allclose(out, torch.full_like(x, 0.5 - 0.2 * 128 / 255))
    neg = saliency_from_stored(torch.full((1, 2, 2), -127, dtype=torch.int8), codec_for("signed"))
    assert torch.allclose(sat_perturb(x, neg, eps=0.2, p=1.0, generator=gen()), torch.full_like(x, 0.7))


# --------------------------------------------------------------------------- S from the store's encodings


def test_saliency_per_encoding() -> None:
    q = torch.tensor([[[0, 1]]], dtype=torch.uint8)
    assert saliency_from_stored(q, codec_for("binary")).flatten().tolist() == [-1.0, 1.0]
    q = torch.tensor([[[0, 51, 255]]], dtype=torch.uint8)
    assert torch.allclose(saliency_from_stored(q, codec_for("unit")).flatten(), torch.tensor([0.0, 0.2, 1.0]))
    q = torch.tensor([[[-127, 0, 127]]], dtype=torch.int8)
    assert saliency_from_stored(q, codec_for("signed")).flatten().tolist() == [-1.0, 0.0, 1.0]


def test_single_channel_map_broadcasts_and_multichannel_maps_do_not() -> None:
    x = torch.full((1, 3, 2, 2), 0.5)
    one = saliency_from_stored(torch.tensor([[[1, 0], [0, 1]]], dtype=torch.uint8), codec_for("binary"))
    assert one.shape == (1, 1, 2, 2)
    out = sat_perturb(x, one, eps=0.1, p=1.0, generator=gen())
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    # a per-channel (guided-backprop) map: each channel follows its own sign
    q = torch.tensor([1, -1, 1], dtype=torch.int8).view(1, 1, 1, 3).expand(1, 2, 2, 3).mul(127)
    three = saliency_from_stored(q, codec_for("signed", 3))
    assert three.shape == (1, 3, 2, 2)
    out = sat_perturb(x, three, eps=0.1, p=1.0, generator=gen())
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([0.4, 0.6, 0.4]))
    with pytest.raises(SatkitError, match="does not fit"):
        sat_perturb(x, torch.ones(1, 2, 2, 2), eps=0.1, p=1.0)


# --------------------------------------------------------------------------- statistics


def test_rademacher_and_bernoulli_statistics() -> None:
    n = 3 * 64 * 64 * 16  # 196,608 elements: 5 sigma of a share is about 0.006
    x = torch.full((16, 3, 64, 64), 0.5)
    r = rademacher_like(x, gen(1))
    assert set(r.unique().tolist()) == {-1.0, 1.0}
    assert abs(float((r == 1).float().mean()) - 0.5) < 5 * 0.5 / math.sqrt(n)
    for p in (0.0, 0.3, 0.9, 1.0):
        # With S = 0, the elements that follow S are exactly those with g == 0: a Bernoulli(p) share.
        g = sat_direction(x, torch.zeros(16, 1, 64, 64), p=p, generator=gen(2))
        follow = g == 0
        share = float(follow.float().mean())
        assert abs(share - p) <= 5 * math.sqrt(p * (1 - p) / n) + 1e-9
        if p < 1:
            signs = g[~follow]
            assert abs(float((signs == 1).float().mean()) - 0.5) < 5 * 0.5 / math.sqrt(signs.numel())
    # w is drawn per element, not per pixel: the channels of a pixel choose independently
    g = sat_direction(x, torch.zeros(16, 1, 64, 64), p=0.5, generator=gen(3))
    f = (g == 0).float()
    both = float((f[:, 0] * f[:, 1]).mean())
    assert abs(both - 0.25) < 0.01


def test_seeded_and_repeatable() -> None:
    x = torch.rand(4, 3, 8, 8, generator=gen(9))
    S = torch.ones(4, 1, 8, 8)
    a = sat_perturb(x, S, eps=EPS, p=0.3, generator=gen(5))
    b = sat_perturb(x, S, eps=EPS, p=0.3, generator=gen(5))
    c = sat_perturb(x, S, eps=EPS, p=0.3, generator=gen(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


@given(st.floats(0.0, 0.2), st.integers(0, 1000))
def test_uniform_noise_control(eps: float, seed: int) -> None:
    x = torch.rand(2, 3, 5, 5, generator=gen(seed))
    d = uniform_delta(x, eps=eps, generator=gen(seed))
    assert d.abs().max() <= eps + 1e-7
    out = uniform_noise(x, eps=eps, generator=gen(seed))
    assert torch.equal(out, (x + d).clamp(0, 1))


def test_uniform_noise_is_uniform() -> None:
    d = uniform_delta(torch.zeros(200_000), eps=0.1, generator=gen(4))
    assert abs(float(d.mean())) < 0.002 and abs(float(d.std()) - 0.1 / math.sqrt(3)) < 0.001


# --------------------------------------------------------------------------- no host synchronisation


def test_whole_sat_step_runs_on_the_meta_device() -> None:
    """The meta device has no data: any .item(), bool(tensor), nonzero or CPU tensor in the
    path raises. So this proves that augmentation, S, the perturbation, each method's loss
    and its backward pass never wait for the device (the coin uses a CPU generator)."""
    dev = torch.device("meta")
    raw = RawBatch(torch.empty(4, 16, 16, 3, dtype=torch.uint8, device=dev),
                   torch.empty(4, dtype=torch.long, device=dev),
                   torch.empty(4, 16, 16, dtype=torch.uint8, device=dev))
    batch = prepare_batch(raw, codec_for("binary"), multilabel=False, augment=True, generator=None)
    assert batch.x.device == dev and batch.S is not None and batch.S.shape == (4, 1, 16, 16)
    out = sat_perturb(batch.x, batch.S, eps=EPS, p=0.4)
    assert out.device == dev and out.shape == batch.x.shape
    model = create_model("small-cnn", 10).to(dev)
    for name in method_names():
        ctx = StepContext(epoch=3, p=0.4, eps0=EPS, eps=EPS, step_size=2 / 255, steps=2, beta=1.0,
                          multilabel=False, generator=None, coin=gen(0))
        res = get_method(name).fn(model, batch, ctx)
        res.loss.backward()
        assert res.loss.device == dev, name


def test_a_host_sync_would_be_caught_on_meta() -> None:
    # the premise of the test above
    t = torch.empty(3, device="meta")
    with pytest.raises(Exception):
        t.sum().item()
    with pytest.raises(Exception):
        _ = t + torch.ones(3)


def test_generator_on_another_device_is_refused() -> None:
    with pytest.raises(SatkitError, match="generator is on cpu"):
        sat_perturb(torch.empty(1, 3, 2, 2, device="meta"), torch.empty(1, 1, 2, 2, device="meta"),
                    eps=EPS, p=0.5, generator=gen())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_sync_on_cuda() -> None:
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    raw = RawBatch(torch.randint(0, 256, (64, 32, 32, 3), dtype=torch.uint8, device=dev),
                   torch.randint(0, 10, (64,), device=dev),
                   torch.randint(0, 2, (64, 32, 32), dtype=torch.uint8, device=dev))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        batch = prepare_batch(raw, codec_for("binary"), multilabel=False, augment=True, generator=g)
        sat_perturb(batch.x, batch.S, eps=EPS, p=0.4, generator=g)
        uniform_noise(batch.x, eps=EPS, generator=g)
    finally:
        torch.cuda.set_sync_debug_mode(0)
