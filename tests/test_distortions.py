"""sattrain.distortions: the SAT authors' contrast / Gaussian low-pass / high-pass against
reference implementations written from their equations with numpy and scipy.ndimage, the
sweeps, and the ideal FFT filters and mean-contrast kept under their own names."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from satdata.errors import SatkitError
from sattrain.distortions import (
    BACKGROUND_GREY,
    DEFAULT_DISTORTIONS,
    DISTORTIONS,
    contrast,
    contrast_mean,
    default_levels,
    frequency_radius,
    gaussian_blur,
    gaussian_kernel1d,
    high_pass,
    high_pass_fft,
    low_pass,
    low_pass_fft,
    max_radius,
    to_grey,
)

# --------------------------------------------------------------------------- references (HWC numpy, float64)


def ref_contrast(img: np.ndarray, c: float) -> np.ndarray:
    return (1 - c) / 2.0 + img * c


def ref_grey(img: np.ndarray) -> np.ndarray:
    if img.shape[2] == 1:
        return img[:, :, 0]
    return img @ np.array([0.2125, 0.7154, 0.0721])


def ref_low_pass(img: np.ndarray, sigma: float) -> np.ndarray:
    out = np.clip(gaussian_filter(ref_grey(img), sigma, mode="constant", cval=0.4423), 0, 1)
    return np.dstack([out] * img.shape[2])


def ref_high_pass(img: np.ndarray, sigma: float) -> np.ndarray:
    g = ref_grey(img)
    d = g - gaussian_filter(g, sigma, mode="constant", cval=0.4423)
    d = np.clip(d + (0.4423 - d.mean()), 0, 1)
    return np.dstack([d] * img.shape[2])


REFERENCES = {"contrast": ref_contrast, "lowpass": ref_low_pass, "highpass": ref_high_pass}


def _apply_ref(name: str, x: torch.Tensor, level: float) -> torch.Tensor:
    imgs = x.double().permute(0, 2, 3, 1).numpy()
    out = np.stack([REFERENCES[name](img, level) for img in imgs])
    return torch.from_numpy(out).permute(0, 3, 1, 2)


# --------------------------------------------------------------------------- the authors' definitions


@pytest.mark.parametrize("shape", [(3, 3, 16, 16), (2, 3, 32, 32), (2, 3, 12, 20), (2, 1, 16, 16)])
@pytest.mark.parametrize("name", DEFAULT_DISTORTIONS)
def test_defaults_match_scipy_references_at_every_level(name: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    x = torch.rand(shape)
    x[0, :, :3] = 0.0  # saturated rows: exercise the clip in the high-pass
    x[0, :, -3:] = 1.0
    for entry in default_levels(shape[2:])[name]:
        ours = DISTORTIONS[name](x, entry["level"])
        ref = _apply_ref(name, x, entry["level"])
        assert ours.shape == x.shape and ours.dtype == x.dtype
        err = (ours.double() - ref).abs().max().item()
        assert err < 1e-5, f"{name} at {entry}: max error {err}"


def test_gaussian_blur_is_scipys_gaussian_filter_in_double() -> None:
    rng = np.random.default_rng(0)
    img = rng.random((9, 14))
    for sigma in (0.5, 1.414, 3.0, 32.0):
        ours = gaussian_blur(torch.from_numpy(img)[None, None], sigma)[0, 0].numpy()
        ref = gaussian_filter(img, sigma, mode="constant", cval=BACKGROUND_GREY)
        np.testing.assert_allclose(ours, ref, atol=1e-12)
    k = gaussian_kernel1d(1.0)
    assert k.numel() == 9 and abs(k.sum().item() - 1) < 1e-15  # radius int(4 * 1 + 0.5) = 4
    assert gaussian_kernel1d(2.82).numel() == 2 * 11 + 1  # int(11.78) = 11
    # a flat image at the border grey stays flat: the kernel is normalised
    flat = torch.full((1, 1, 5, 7), BACKGROUND_GREY)
    assert torch.allclose(gaussian_blur(flat, 8.0), flat, atol=1e-6)


def test_contrast_is_the_exact_formula_on_a_known_image() -> None:
    x = torch.tensor([0.0, 0.25, 0.5, 1.0]).view(1, 1, 2, 2).expand(1, 3, 2, 2).clone()
    x[0, 1] = 1 - x[0, 1]  # different channels keep different values: colour is kept
    out = contrast(x, 0.7)
    assert torch.allclose(out, 0.15 + 0.7 * x, atol=1e-7)
    assert torch.allclose(out[0, 0].flatten(), torch.tensor([0.15, 0.325, 0.5, 0.85]), atol=1e-7)
    assert torch.equal(contrast(x, 1.0), x)
    assert torch.allclose(contrast(x, 0.0), torch.full_like(x, 0.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_range_device_dtype_and_grey_channels(dtype: torch.dtype) -> None:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    torch.manual_seed(1)
    for device in devices:
        x = torch.rand(2, 3, 16, 16).to(device=device, dtype=dtype)
        for name in DEFAULT_DISTORTIONS:
            for entry in default_levels((16, 16))[name]:
                out = DISTORTIONS[name](x, entry["level"])
                assert out.device == x.device and out.dtype == dtype and out.shape == x.shape
                assert out.min() >= 0 and out.max() <= 1
                if name != "contrast":  # filtered images are grey: three equal channels
                    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 0], out[:, 2])


def test_high_pass_sets_the_mean_grey_and_low_pass_smooths() -> None:
    torch.manual_seed(2)
    x = torch.rand(4, 3, 32, 32) * 0.4 + 0.3  # mid-range: the clip stays idle for sigma 0.5
    hp = high_pass(x, 0.5)
    assert torch.allclose(hp.mean(dim=(1, 2, 3)), torch.full((4,), BACKGROUND_GREY), atol=1e-5)
    g = to_grey(x)
    lp = low_pass(x, 2.0)[:, :1]
    # pixel-to-pixel differences shrink under a blur
    assert lp.diff(dim=-1).abs().mean() < 0.5 * g.diff(dim=-1).abs().mean()
    # wider blur, flatter image
    assert low_pass(x, 8.0).std() < low_pass(x, 1.0).std()


def test_grey_conversion() -> None:
    x = torch.zeros(1, 3, 2, 2)
    x[0, 0] = 1.0
    assert torch.allclose(to_grey(x), torch.full((1, 1, 2, 2), 0.2125))
    x = torch.ones(1, 3, 2, 2)
    assert torch.allclose(to_grey(x), torch.ones(1, 1, 2, 2))  # weights sum to 1
    one = torch.rand(2, 1, 4, 4)
    assert to_grey(one) is one
    with pytest.raises(SatkitError, match="1 or 3 channels"):
        low_pass(torch.rand(1, 2, 4, 4), 1.0)


def test_bad_arguments_are_rejected() -> None:
    x = torch.rand(1, 3, 4, 4)
    with pytest.raises(SatkitError, match="NCHW"):
        contrast(torch.rand(3, 4, 4), 0.5)
    with pytest.raises(SatkitError, match=r"\[0, 1\]"):
        contrast(x, 1.5)
    with pytest.raises(SatkitError, match="sigma"):
        low_pass(x, 0.0)
    with pytest.raises(SatkitError, match="sigma"):
        high_pass(x, -1.0)
    with pytest.raises(SatkitError, match="float"):
        low_pass((x * 255).to(torch.uint8), 1.0)
    with pytest.raises(SatkitError, match="unknown distortion"):
        default_levels((8, 8), names=("blur",))


# --------------------------------------------------------------------------- sweeps


def test_default_levels_are_the_authors_sweeps() -> None:
    lv = default_levels((32, 32))
    assert tuple(lv) == DEFAULT_DISTORTIONS == ("contrast", "lowpass", "highpass")
    assert [e["level"] for e in lv["contrast"]] == [0.1, 0.3, 0.5, 0.7, 0.9, 1.0]
    assert [e["level"] for e in lv["lowpass"]] == [1, 2, 4, 8, 16, 32]
    assert [e["level"] for e in lv["highpass"]] == [2.82, 2, 1.414, 1, 0.7, 0.5]
    for name in ("lowpass", "highpass"):
        assert all(e["sigma"] == e["level"] for e in lv[name])
    identities = [(n, e["level"]) for n, rows in lv.items() for e in rows if e.get("identity")]
    assert identities == [("contrast", 1.0)]


def test_identity_labels_are_true_and_complete() -> None:
    """A level is labelled identity exactly when the function leaves images unchanged."""
    torch.manual_seed(3)
    x = torch.rand(2, 3, 16, 16) * 0.6 + 0.2
    lv = default_levels((16, 16), names=tuple(DISTORTIONS))
    assert set(lv) == set(DISTORTIONS)
    for name, rows in lv.items():
        for e in rows:
            assert isinstance(e["level"], float)
            unchanged = torch.allclose(DISTORTIONS[name](x, e["level"]), x, atol=1e-5)
            assert unchanged == bool(e.get("identity")), (name, e)
    radii = [e["radius"] for e in default_levels((32, 32), ("lowpass-fft",))["lowpass-fft"]]
    assert radii == [2.0, 4.0, 8.0, 12.0, 16.0]


# --------------------------------------------------------------------------- other definitions
# (moved from test_evaluate.py, renamed with the functions)


def test_contrast_mean_definition() -> None:
    torch.manual_seed(0)
    x = torch.rand(4, 3, 8, 8)
    assert torch.allclose(contrast_mean(x, 1.0), x, atol=1e-7)
    half = contrast_mean(x, 0.5)
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(half, (x - m) * 0.5 + m, atol=1e-7)
    assert torch.allclose(half.mean(dim=(1, 2, 3)), m.flatten(), atol=1e-6)  # mean kept
    flat = contrast_mean(x, 0.0)
    assert torch.allclose(flat, m.expand_as(x), atol=1e-7)
    assert DISTORTIONS["contrast-mean"] is contrast_mean


@pytest.mark.parametrize("h, w", [(8, 8), (16, 12), (7, 9)])
def test_fft_filters_identities_and_complements(h: int, w: int) -> None:
    torch.manual_seed(0)
    x = torch.rand(2, 3, h, w) * 0.6 + 0.2  # away from the box so clamping stays idle
    assert torch.allclose(low_pass_fft(x, max_radius(h, w)), x, atol=1e-5)
    assert torch.allclose(high_pass_fft(x, 0.0), x, atol=1e-5)
    # low-pass at radius 0 leaves the channel mean (the DC term) only
    assert torch.allclose(low_pass_fft(x, 0.0), x.mean(dim=(2, 3), keepdim=True).expand_as(x), atol=1e-5)
    # unclamped, low-pass(r) + high-pass(r) = x + mean: the DC term is in both
    r = 2.0
    lp, hp = low_pass_fft(x, r), high_pass_fft(x, r)
    if 0 < lp.min() and lp.max() < 1 and 0 < hp.min() and hp.max() < 1:
        assert torch.allclose(lp + hp, x + x.mean(dim=(2, 3), keepdim=True), atol=1e-5)
    if h % 2 or w % 2:
        return  # a checkerboard is periodic on the DFT grid only for even sizes
    # a pure high-frequency pattern is removed by low-pass and kept by high-pass
    checker = (torch.arange(h)[:, None] + torch.arange(w)[None, :]) % 2
    img = (0.5 + 0.2 * (2 * checker - 1).float()).expand(1, 3, h, w)
    assert low_pass_fft(img, 1.0).std() < 1e-4
    assert torch.allclose(high_pass_fft(img, 1.0), img, atol=1e-5)
    assert DISTORTIONS["lowpass-fft"] is low_pass_fft and DISTORTIONS["highpass-fft"] is high_pass_fft


def test_frequency_radius() -> None:
    rho = frequency_radius(4, 6)
    assert rho.shape == (4, 4)
    assert rho[0, 0] == 0 and rho[1, 0] == 1 and rho[0, 3] == 3 and rho[2, 0] == 2  # u = -2 at row 2
    lv = default_levels((32, 32), ("highpass-fft",))
    assert lv["highpass-fft"][0]["radius"] == 0.0 and lv["highpass-fft"][0]["identity"]
