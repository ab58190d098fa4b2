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
    broadcast_saliency,
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
    # x - eps * g is one fused add in sat_perturb: equal up to one float32 rounding
    assert torch.allclose(out, (x - eps * g).clamp(0, 1), rtol=0, atol=2e-7)
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


def _categories(p: float, seed: int, shape: tuple[int, ...] = (16, 3, 64, 64)) -> torch.Tensor:
    """sat_direction with S = 0: each element is 0 (follows S), +1 or -1 (a random sign)."""
    x = torch.full(shape, 0.5)
    return sat_direction(x, torch.zeros(shape[0], 1, *shape[2:]), p=p, generator=gen(seed))


@pytest.mark.parametrize("p", [0.05, 0.4, 0.92])
def test_one_draw_gives_the_three_way_distribution(p: float) -> None:
    """P(g = S) = p and P(g = +1) = P(g = -1) = (1 - p) / 2: a chi-square test on 196,608 elements."""
    g = _categories(p, 11)
    n = g.numel()
    counts = [int((g == 0).sum()), int((g == 1).sum()), int((g == -1).sum())]
    assert sum(counts) == n  # nothing else
    expected = [p * n, (1 - p) / 2 * n, (1 - p) / 2 * n]
    chi2 = sum((c - e) ** 2 / e for c, e in zip(counts, expected))
    assert chi2 < 18.4  # chi-square with 2 degrees of freedom: P(> 18.4) = 1e-4
    # the sign is balanced among the elements that do not follow S, for this p
    signs = counts[1] + counts[2]
    assert abs(counts[1] / signs - 0.5) < 5 * 0.5 / math.sqrt(signs)


def test_sign_and_w_independent_across_elements() -> None:
    """One draw per element and no draw shared: the choice (S or not) of an element says nothing
    about its neighbours' choices or signs (pairs along the width, and channel 0 against 1)."""
    p = 0.4
    g = _categories(p, 12)
    for a, b in ((g[..., :-1], g[..., 1:]), (g[:, 0], g[:, 1])):
        wa = a == 0
        nb_plus, nb_sign = b == 1, b != 0
        m = float(wa.float().mean())
        # P(neighbour follows S | this one does) = p, whether this one does or not
        for cond in (wa, ~wa):
            k = int(cond.sum())
            share = float((b[cond] == 0).float().mean())
            assert abs(share - p) < 5 * math.sqrt(p * (1 - p) / k)
        # the neighbour's sign is balanced whether this element follows S or not
        for cond in (wa, ~wa):
            sel = cond & nb_sign
            k = int(sel.sum())
            assert abs(float(nb_plus[sel].float().mean()) - 0.5) < 5 * 0.5 / math.sqrt(k)
        assert abs(m - p) < 0.01


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_p_zero_and_p_one_are_exact(seed: int) -> None:
    x = torch.rand(4, 3, 8, 8, generator=gen(100 + seed))
    S = torch.rand(4, 1, 8, 8, generator=gen(200 + seed)) * 1.6 - 0.8  # never +-1, never 0
    g0 = sat_direction(x, S, p=0.0, generator=gen(seed))
    assert torch.all(g0.abs() == 1)  # p = 0: only random signs, S never
    assert torch.equal(g0, rademacher_like(x, gen(seed)))  # the same rule as rademacher_like
    g1 = sat_direction(x, S, p=1.0, generator=gen(seed))
    assert torch.equal(g1, S.expand_as(x))  # p = 1: exactly S, whatever the random numbers
    out = sat_perturb(x, S, eps=EPS, p=1.0, generator=gen(seed + 7))
    assert torch.equal(out, sat_perturb(x, S, eps=EPS, p=1.0, generator=gen(seed + 8)))
    assert torch.allclose(out, (x - EPS * S).clamp(0, 1), rtol=0, atol=2e-7)


def test_random_numbers_in_one_call_and_few_kernels() -> None:
    """Every aten call of sat_perturb: one random draw (uniform_) for both n and w, and at
    most eight calls that launch a kernel on a device (the fused form; the two-draw form had nine)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    x = torch.rand(2, 3, 8, 8, generator=gen(1))
    S = torch.rand(2, 1, 8, 8, generator=gen(2))
    with Record() as rec:
        sat_perturb(x, S, eps=EPS, p=0.4, generator=gen(3))
    random_ops = [o for o in rec.ops if o in ("uniform_", "rand", "randint", "random_", "bernoulli_", "bernoulli",
                                               "normal_", "randn", "rand_like", "randint_like")]
    assert random_ops == ["uniform_"], rec.ops
    no_kernel = {"expand", "empty_like", "detach", "view", "alias"}
    assert len([o for o in rec.ops if o not in no_kernel]) <= 8, rec.ops
    with Record() as rec:
        uniform_noise(x, eps=EPS, generator=gen(3))
    assert [o for o in rec.ops if o in ("uniform_", "rand", "random_")] == ["uniform_"], rec.ops


LAYOUTS = [torch.contiguous_format, torch.channels_last]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_results_keep_memory_format_dtype_and_device(layout: torch.memory_format, dtype: torch.dtype) -> None:
    x = torch.rand(3, 3, 5, 6, generator=gen(4)).to(dtype).contiguous(memory_format=layout)
    S1 = torch.rand(3, 1, 5, 6, generator=gen(5)).mul(2).sub(1)
    S3 = torch.rand(3, 3, 5, 6, generator=gen(6)).mul(2).sub(1).contiguous(memory_format=torch.channels_last)
    outs = {
        "sat_perturb": sat_perturb(x, S1, eps=EPS, p=0.5, generator=gen(7)),
        "sat_perturb (3-channel S)": sat_perturb(x, S3, eps=EPS, p=0.5, generator=gen(7)),
        "sat_direction": sat_direction(x, S1, p=0.5, generator=gen(7)),
        "rademacher_like": rademacher_like(x, gen(7)),
        "uniform_delta": uniform_delta(x, eps=EPS, generator=gen(7)),
        "uniform_noise": uniform_noise(x, eps=EPS, generator=gen(7)),
    }
    for name, out in outs.items():
        assert out.shape == x.shape and out.dtype == dtype and out.device == x.device, name
        assert out.is_contiguous(memory_format=layout), (name, out.stride())
    # where nothing is random (p = 1), the same values in either layout (up to the rounding of
    # the dtype: CPU kernels for half types round differently in strided and contiguous loops)
    ref = sat_perturb(x.contiguous(), S1, eps=EPS, p=1.0, generator=gen(8))
    torch.testing.assert_close(sat_perturb(x, S1, eps=EPS, p=1.0, generator=gen(9)), ref)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_memory_format_kept_on_the_meta_device(layout: torch.memory_format) -> None:
    x = torch.empty(4, 3, 8, 8, device="meta").contiguous(memory_format=layout)
    S = torch.empty(4, 1, 8, 8, device="meta")
    for out in (sat_perturb(x, S, eps=EPS, p=0.3), uniform_noise(x, eps=EPS), rademacher_like(x)):
        assert out.device.type == "meta" and out.is_contiguous(memory_format=layout)
    assert broadcast_saliency(S, x).shape == x.shape


def test_uniform_delta_numbers_unchanged() -> None:
    """The noise control keeps its random numbers: for a contiguous batch the same values as
    torch.rand(shape) * 2 eps - eps from the same generator state, bit for bit."""
    x = torch.rand(4, 3, 8, 8, generator=gen(1))
    d = uniform_delta(x, eps=EPS, generator=gen(21))
    assert torch.equal(d, torch.rand(x.shape, generator=gen(21)).mul_(2 * EPS).sub_(EPS))


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
