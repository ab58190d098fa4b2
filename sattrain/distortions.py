"""Common image distortions for robustness sweeps: contrast, low-pass and high-pass filtering.

All functions take and return float NCHW batches in [0, 1] on any device, and are exact
definitions (no randomness), so a sweep is reproducible:

contrast(x, c)
    ``x' = (x - m) * c + m`` with ``m`` the mean of each image over its channels and
    pixels (one scalar per image, so colours keep their balance). ``c = 1`` is the
    identity, ``c -> 0`` fades every image to flat grey at its own mean. For ``c`` in
    [0, 1] the result stays inside [min(x), max(x)], hence in [0, 1].

low_pass(x, r) / high_pass(x, r)
    Per image and channel, take the 2-D DFT ``X[u, v]`` with integer frequencies
    ``u`` in ``-H/2 .. H/2 - 1`` and ``v`` in ``-W/2 .. W/2 - 1`` (cycles per image, as
    ``torch.fft.fftfreq(H, 1 / H)``), and its radius ``rho = sqrt(u^2 + v^2)``.
    ``low_pass`` keeps the coefficients with ``rho <= r`` and zeroes the rest;
    ``high_pass`` zeroes those with ``0 < rho <= r`` and keeps the rest **and the DC term**
    (the channel mean), so a high-passed image keeps its average brightness and remains
    a plausible input instead of a zero-mean residual. The inverse DFT is real (the mask
    is symmetric) and is clamped to [0, 1], because filtering rings past the valid range
    and models are only defined on [0, 1]. Hence ``low_pass(x, r)`` is the identity for
    ``r >= max_radius(H, W)`` and ``high_pass(x, 0)`` is the identity.

The default sweeps (``default_levels``) give radii as fractions of the Nyquist radius
``min(H, W) / 2``, so 16x16 and 32x32 stores sweep comparable bands.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from satdata.errors import SatkitError

__all__ = [
    "contrast",
    "low_pass",
    "high_pass",
    "frequency_radius",
    "max_radius",
    "default_levels",
    "DISTORTIONS",
    "CONTRAST_LEVELS",
    "LOW_PASS_FRACTIONS",
    "HIGH_PASS_FRACTIONS",
]

# Contrast factors 0.1 .. 1.0 (SAT.md: "contrast 0.1 ... 1").
CONTRAST_LEVELS: tuple[float, ...] = tuple(round(0.1 * k, 1) for k in range(1, 11))
# Cut-off radii as fractions of the Nyquist radius min(H, W) / 2. 1.0 leaves only the
# corners of the spectrum out; low_pass at max_radius would be the identity.
LOW_PASS_FRACTIONS: tuple[float, ...] = (0.125, 0.25, 0.5, 0.75, 1.0)
# 0.0 is the identity (only the DC term is "removed" and it is always kept).
HIGH_PASS_FRACTIONS: tuple[float, ...] = (0.0, 0.125, 0.25, 0.5, 0.75)


def _check(x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise SatkitError(f"distortion input: expected NCHW images, got shape {tuple(x.shape)}")


def contrast(x: torch.Tensor, c: float) -> torch.Tensor:
    """Scale each image's deviation from its own mean by ``c`` (``c = 1``: unchanged)."""
    _check(x)
    if c < 0:
        raise SatkitError(f"contrast: factor must be >= 0, got {c}")
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


def low_pass(x: torch.Tensor, radius: float) -> torch.Tensor:
    """Keep spatial frequencies with radius <= ``radius`` (cycles per image); see module doc."""
    _check(x)
    if radius < 0:
        raise SatkitError(f"low-pass: radius must be >= 0, got {radius}")
    rho = frequency_radius(x.shape[-2], x.shape[-1], x.device)
    return _filter(x, (rho <= radius + 1e-9).to(torch.float32))


def high_pass(x: torch.Tensor, radius: float) -> torch.Tensor:
    """Remove spatial frequencies with 0 < radius <= ``radius``, keeping the DC term; see module doc."""
    _check(x)
    if radius < 0:
        raise SatkitError(f"high-pass: radius must be >= 0, got {radius}")
    rho = frequency_radius(x.shape[-2], x.shape[-1], x.device)
    keep = (rho > radius + 1e-9) | (rho == 0)
    return _filter(x, keep.to(torch.float32))


def default_levels(image_size: tuple[int, int]) -> dict[str, list[dict[str, float]]]:
    """The default sweep per distortion: ``{"contrast": [{"level": c}], "lowpass": [{"radius", "fraction"}], ...}``."""
    nyquist = min(image_size) / 2
    return {
        "contrast": [{"level": c} for c in CONTRAST_LEVELS],
        "lowpass": [{"radius": f * nyquist, "fraction": f} for f in LOW_PASS_FRACTIONS],
        "highpass": [{"radius": f * nyquist, "fraction": f} for f in HIGH_PASS_FRACTIONS],
    }


# name -> function(x, level) where level is the sweep entry's "level" or "radius".
DISTORTIONS: dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "contrast": contrast,
    "lowpass": low_pass,
    "highpass": high_pass,
}
