"""Common image distortions for robustness sweeps: contrast, low-pass and high-pass filtering.

All functions take and return float NCHW batches in [0, 1] on any device, keep the input's
device, dtype and channel count, and are exact definitions (no randomness), so a sweep is
reproducible. The derivation and the reasons for each choice are in docs/method.md,
section "Distortions".

The defaults (``DEFAULT_DISTORTIONS``) are the SAT authors' evaluation definitions, which
they took from Geirhos et al. 2018 ("Generalisation in humans and deep neural networks"):

``contrast`` -- ``contrast(x, c)``
    ``x' = (1 - c) / 2 + c * x`` per channel and pixel: colour is kept and the image fades
    towards flat grey 0.5 as ``c -> 0``. For ``c`` in [0, 1] the result stays in [0, 1].
    ``c = 1`` is the identity and is kept in the default sweep as the authors' reference
    point (labelled ``"identity": True``). Levels ``c`` = 0.1, 0.3, 0.5, 0.7, 0.9, 1.0.

``lowpass`` -- ``low_pass(x, sigma)``
    Convert to greyscale ``g = 0.2125 R + 0.7154 G + 0.0721 B`` (scikit-image's
    ``rgb2gray`` weights; a 1-channel input is used as is), blur it with a Gaussian of
    standard deviation ``sigma`` pixels exactly as
    ``scipy.ndimage.gaussian_filter(g, sigma, mode="constant", cval=0.4423)`` does
    (see ``gaussian_blur``), clip to [0, 1] and repeat the grey channel to the input's
    channel count. Levels ``sigma`` = 1, 2, 4, 8, 16, 32.

``highpass`` -- ``high_pass(x, sigma)``
    ``d = g - blur(g)`` with the same grey ``g`` and blur, then
    ``d + (0.4423 - mean(d))`` (mean over the image's pixels), so every image has mean
    grey 0.4423 before the clip to [0, 1]; repeated to the input's channel count. Levels
    ``sigma`` = 2.82, 2, 1.414, 1, 0.7, 0.5 (weakest filtering first: a smaller sigma leaves only finer detail).

0.4423 (``BACKGROUND_GREY``) is the mean pixel value of Geirhos et al.'s image set; the
authors used it unchanged on every dataset, so it is used here too.

Other definitions, available by name in ``DISTORTIONS`` but not swept by default:

``contrast-mean`` -- ``contrast_mean(x, c)``
    ``x' = (x - m) * c + m`` with ``m`` the mean of each image over its channels and
    pixels: fades to flat grey at the image's own mean. ``c = 1`` is the identity.

``lowpass-fft`` / ``highpass-fft`` -- ``low_pass_fft(x, r)`` / ``high_pass_fft(x, r)``
    Ideal filters per image and colour channel. Take the 2-D DFT ``X[u, v]`` with integer
    frequencies ``u`` in ``-H/2 .. H/2 - 1`` and ``v`` in ``-W/2 .. W/2 - 1`` (cycles per
    image, as ``torch.fft.fftfreq(H, 1 / H)``), and its radius ``rho = sqrt(u^2 + v^2)``.
    ``low_pass_fft`` keeps the coefficients with ``rho <= r`` and zeroes the rest;
    ``high_pass_fft`` zeroes those with ``0 < rho <= r`` and keeps the rest **and the DC
    term** (the channel mean). The inverse DFT is real (the mask is symmetric) and is
    clamped to [0, 1]. Hence ``low_pass_fft(x, r)`` is the identity for
    ``r >= max_radius(H, W)`` and ``high_pass_fft(x, 0)`` is the identity. Their sweeps
    give radii as fractions of the Nyquist radius ``min(H, W) / 2``.

``default_levels`` returns, per distortion, a list of entries. Every entry has
``"level"``, the number to pass as the function's second argument; the Gaussian filters
also carry ``"sigma"`` (the same value), the FFT filters ``"radius"`` (the same value) and
``"fraction"`` (of the Nyquist radius), and a level at which the function is the identity
is marked ``"identity": True``.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from satdata.errors import SatkitError

__all__ = [
    "contrast",
    "low_pass",
    "high_pass",
    "to_grey",
    "gaussian_blur",
    "gaussian_kernel1d",
    "contrast_mean",
    "low_pass_fft",
    "high_pass_fft",
    "frequency_radius",
    "max_radius",
    "default_levels",
    "DISTORTIONS",
    "DEFAULT_DISTORTIONS",
    "BACKGROUND_GREY",
    "GREY_WEIGHTS",
    "CONTRAST_LEVELS",
    "LOW_PASS_SIGMAS",
    "HIGH_PASS_SIGMAS",
    "CONTRAST_MEAN_LEVELS",
    "LOW_PASS_FRACTIONS",
    "HIGH_PASS_FRACTIONS",
]

# The authors' grey: the mean pixel value of Geirhos et al.'s images. It is both the
# constant the blur pads with and the mean a high-passed image is shifted to.
BACKGROUND_GREY: float = 0.4423
# scikit-image rgb2gray (ITU-R BT.709 luma) weights for R, G, B.
GREY_WEIGHTS: tuple[float, float, float] = (0.2125, 0.7154, 0.0721)
# scipy.ndimage.gaussian_filter's default: the kernel reaches truncate * sigma pixels.
TRUNCATE: float = 4.0

# The authors' sweeps (their evaluation's test_dict).
CONTRAST_LEVELS: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9, 1.0)
LOW_PASS_SIGMAS: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
HIGH_PASS_SIGMAS: tuple[float, ...] = (2.82, 2.0, 1.414, 1.0, 0.7, 0.5)

# Sweeps of the non-default definitions.
CONTRAST_MEAN_LEVELS: tuple[float, ...] = tuple(round(0.1 * k, 1) for k in range(1, 11))
# Cut-off radii as fractions of the Nyquist radius min(H, W) / 2. 1.0 leaves only the
# corners of the spectrum out; low_pass_fft at max_radius would be the identity.
LOW_PASS_FRACTIONS: tuple[float, ...] = (0.125, 0.25, 0.5, 0.75, 1.0)
# 0.0 is the identity (only the DC term is "removed" and it is always kept).
HIGH_PASS_FRACTIONS: tuple[float, ...] = (0.0, 0.125, 0.25, 0.5, 0.75)


def _check(x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise SatkitError(f"distortion input: expected NCHW images, got shape {tuple(x.shape)}")


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    """Float32 at least: half-precision sums over a 257-tap kernel would lose the 1e-5 match."""
    if not x.is_floating_point():
        raise SatkitError(f"distortion input: expected float images in [0, 1], got {x.dtype}")
    return torch.promote_types(x.dtype, torch.float32)


# --------------------------------------------------------------------------- the authors' definitions


def contrast(x: torch.Tensor, c: float) -> torch.Tensor:
    """``(1 - c) / 2 + c * x`` per channel: colour kept, fading to grey 0.5 (``c = 1``: unchanged).

    ``c`` must be in [0, 1] (outside it the formula leaves [0, 1] or inverts the image).
    """
    _check(x)
    if not 0.0 <= c <= 1.0:
        raise SatkitError(f"contrast: level must be in [0, 1], got {c}")
    return ((1.0 - c) / 2.0 + c * x).clamp(0.0, 1.0)


def to_grey(x: torch.Tensor) -> torch.Tensor:
    """Luminance ``0.2125 R + 0.7154 G + 0.0721 B`` as an (N, 1, H, W) batch; 1-channel input as is."""
    _check(x)
    if x.shape[1] == 1:
        return x
    if x.shape[1] != 3:
        raise SatkitError(f"greyscale: expected 1 or 3 channels, got {x.shape[1]}")
    r, g, b = GREY_WEIGHTS
    return r * x[:, 0:1] + g * x[:, 1:2] + b * x[:, 2:3]


def gaussian_kernel1d(sigma: float, truncate: float = TRUNCATE) -> torch.Tensor:
    """scipy.ndimage's Gaussian kernel, float64 on the CPU: radius ``int(truncate * sigma + 0.5)``,
    weights ``exp(-x^2 / (2 sigma^2))`` for integer ``x`` in ``[-radius, radius]``, normalised to sum 1."""
    if not sigma > 0 or not math.isfinite(sigma):
        raise SatkitError(f"gaussian filter: sigma must be a finite number > 0, got {sigma}")
    radius = int(truncate * float(sigma) + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 / (float(sigma) ** 2) * t**2)
    return k / k.sum()


def gaussian_blur(x: torch.Tensor, sigma: float, cval: float = BACKGROUND_GREY) -> torch.Tensor:
    """Blur each channel as ``scipy.ndimage.gaussian_filter(img, sigma, mode="constant", cval=cval)``.

    Separable, like scipy: a 1-D correlation along H, then along W, each reading ``cval``
    beyond the image border (the padding is applied before each pass, so the corners see
    ``cval`` too, as in scipy). Kernel from ``gaussian_kernel1d``. Computed in float32 or
    wider and returned in the input's dtype.
    """
    _check(x)
    n, ch, h, w = x.shape
    dtype = _work_dtype(x)
    k = gaussian_kernel1d(sigma).to(dtype=dtype).to(x.device)
    r = (k.numel() - 1) // 2
    z = x.to(dtype).reshape(n * ch, 1, h, w)
    z = F.conv2d(F.pad(z, (0, 0, r, r), mode="constant", value=cval), k.view(1, 1, -1, 1))
    z = F.conv2d(F.pad(z, (r, r, 0, 0), mode="constant", value=cval), k.view(1, 1, 1, -1))
    return z.reshape(n, ch, h, w).to(x.dtype)


def _stack(grey: torch.Tensor, channels: int) -> torch.Tensor:
    return grey.expand(-1, channels, -1, -1).contiguous()


def low_pass(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Greyscale, Gaussian blur (constant 0.4423 border), clip to [0, 1], repeat to x's channels."""
    g = to_grey(x)
    dtype = _work_dtype(x)
    out = gaussian_blur(g.to(dtype), sigma).clamp(0.0, 1.0)
    return _stack(out.to(x.dtype), x.shape[1])


def high_pass(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Greyscale ``g - blur(g)`` shifted to mean 0.4423 per image, clipped to [0, 1], repeated to x's channels."""
    g = to_grey(x).to(_work_dtype(x))
    d = g - gaussian_blur(g, sigma)
    d = d + (BACKGROUND_GREY - d.mean(dim=(1, 2, 3), keepdim=True))
    return _stack(d.clamp(0.0, 1.0).to(x.dtype), x.shape[1])


# --------------------------------------------------------------------------- other definitions


def contrast_mean(x: torch.Tensor, c: float) -> torch.Tensor:
    """Scale each image's deviation from its own mean by ``c`` (``c = 1``: unchanged)."""
    _check(x)
    if c < 0:
        raise SatkitError(f"contrast-mean: factor must be >= 0, got {c}")
    m = x.mean(dim=(1, 2, 3), keepdim=True)
    return ((x - m) * c + m).clamp(0.0, 1.0)


def frequency_radius(h: int, w: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Radius ``sqrt(u^2 + v^2)`` (cycles per image) of each coefficient of ``torch.fft.rfft2``.

    Shape ``(h, w // 2 + 1)``: rows are ``fftfreq(h)`` frequencies, columns ``rfftfreq(w)``.
    """
    u = torch.fft.fftfreq(h, d=1.0 / h, device=device)
    v = torch.fft.rfftfreq(w, d=1.0 / w, device=device)
    return torch.sqrt(u[:, None] ** 2 + v[None, :] ** 2)


def max_radius(h: int, w: int) -> float:
    """The largest frequency radius of an h x w DFT: low-pass at this radius keeps everything."""
    return math.hypot(h // 2, w // 2)


def _filter(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    spec = torch.fft.rfft2(x.float(), dim=(-2, -1))
    out = torch.fft.irfft2(spec * keep, s=(h, w), dim=(-2, -1))
    return out.to(x.dtype).clamp(0.0, 1.0)


def low_pass_fft(x: torch.Tensor, radius: float) -> torch.Tensor:
    """Keep spatial frequencies with radius <= ``radius`` (cycles per image); see module doc."""
    _check(x)
    if radius < 0:
        raise SatkitError(f"lowpass-fft: radius must be >= 0, got {radius}")
    rho = frequency_radius(x.shape[-2], x.shape[-1], x.device)
    return _filter(x, (rho <= radius + 1e-9).to(torch.float32))


def high_pass_fft(x: torch.Tensor, radius: float) -> torch.Tensor:
    """Remove spatial frequencies with 0 < radius <= ``radius``, keeping the DC term; see module doc."""
    _check(x)
    if radius < 0:
        raise SatkitError(f"highpass-fft: radius must be >= 0, got {radius}")
    rho = frequency_radius(x.shape[-2], x.shape[-1], x.device)
    keep = (rho > radius + 1e-9) | (rho == 0)
    return _filter(x, keep.to(torch.float32))


# --------------------------------------------------------------------------- registry and sweeps

# name -> function(x, level), with level an entry's "level" from default_levels.
DISTORTIONS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "contrast": contrast,
    "lowpass": low_pass,
    "highpass": high_pass,
    "contrast-mean": contrast_mean,
    "lowpass-fft": low_pass_fft,
    "highpass-fft": high_pass_fft,
}

# What an evaluation sweeps unless told otherwise: the SAT authors' definitions.
DEFAULT_DISTORTIONS: tuple[str, ...] = ("contrast", "lowpass", "highpass")


def _levels(name: str, image_size: tuple[int, int]) -> list[dict]:
    if name == "contrast":
        return [{"level": c, "identity": True} if c == 1.0 else {"level": c} for c in CONTRAST_LEVELS]
    if name == "lowpass":
        return [{"level": s, "sigma": s} for s in LOW_PASS_SIGMAS]
    if name == "highpass":
        return [{"level": s, "sigma": s} for s in HIGH_PASS_SIGMAS]
    if name == "contrast-mean":
        return [{"level": c, "identity": True} if c == 1.0 else {"level": c} for c in CONTRAST_MEAN_LEVELS]
    nyquist = min(image_size) / 2
    if name == "lowpass-fft":
        rows = [{"level": f * nyquist, "radius": f * nyquist, "fraction": f} for f in LOW_PASS_FRACTIONS]
        return [{**e, "identity": True} if e["radius"] >= max_radius(*image_size) else e for e in rows]
    if name == "highpass-fft":
        rows = [{"level": f * nyquist, "radius": f * nyquist, "fraction": f} for f in HIGH_PASS_FRACTIONS]
        return [{**e, "identity": True} if e["radius"] == 0 else e for e in rows]
    raise SatkitError(f"unknown distortion {name!r} (known: {', '.join(DISTORTIONS)})")


def default_levels(
    image_size: tuple[int, int], names: Sequence[str] = DEFAULT_DISTORTIONS
) -> dict[str, list[dict]]:
    """The sweep of each named distortion for images of ``image_size`` (H, W), in sweep order.

    Every entry has ``"level"`` (pass it to ``DISTORTIONS[name]``); Gaussian filters add
    ``"sigma"``, FFT filters ``"radius"`` and ``"fraction"``, and identity levels
    ``"identity": True`` (among the defaults only contrast ``c = 1``, the authors'
    reference point). The image size matters only for the FFT filters' radii.
    """
    if len(image_size) != 2 or min(image_size) < 1:
        raise SatkitError(f"distortion sweep: image size must be (H, W) >= 1, got {tuple(image_size)}")
    return {name: _levels(name, (int(image_size[0]), int(image_size[1]))) for name in names}
