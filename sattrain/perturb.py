"""The SAT perturbation (docs/method.md), built for a whole batch on the batch's device.

For epoch t (counted from 0), per element of the batch x (images in [0, 1])::

    p_t     = 1 - alpha ** (t / 10)            # curriculum: p_0 = 0, p_10 = 1 - alpha
    n       ~ Rademacher(+-1)                   # random sign, per pixel and channel
    w       ~ Bernoulli(p_t)                    # independent per element
    g       = (1 - w) * n + w * S               # S broadcast over channels if single-channel
    x_tilde = clamp(x - eps * g, 0, 1)          # the saliency is SUBTRACTED; no eps-ball projection

``alpha`` is exactly the base above (default 0.6, so p_10 = 0.4, p_50 ~ 0.92): the
authors' plots label the curriculum axis alpha^10, so a paper value "alpha" may mean
this alpha to the tenth power.

How it is drawn (one random number per element, few kernels): a single
``u ~ U[0, 1)`` per element of x decides both choices::

    w = u < p                                   # P(w) = p
    n = +1 if u < p + (1 - p) / 2 else -1       # given not-w, u is uniform on [p, 1): a fair sign

so w is Bernoulli(p) and, given ``not w``, u is uniform on [p, 1) and the sign is +1 or
-1 with probability 1/2 each, whatever p (up to float32's grid of 2^-24 for u). n is
only used where w is false, so g has exactly the distribution of the formula above with
n and w drawn independently: P(g = S) = p, P(g = +1) = P(g = -1) = (1 - p) / 2 where S
is not +-1, and elements are independent of each other. ``p = 0`` gives pure random
signs and ``p = 1`` exactly S (u is in [0, 1)). On a device, ``sat_perturb`` is one
random-number kernel and six elementwise ones (two comparisons, one select of S or +1,
one in-place fill of -1, ``x - eps * g`` as a single add, the in-place clamp) plus the
one-element fill behind the select's scalar, where drawing n and w separately took two
random kernels and seven elementwise ones. Until this change n and w were two
separate draws, so a seeded SAT run now sees other random numbers (the same
distribution).

Every result keeps x's shape, dtype, device and memory format (a channels_last batch
stays channels_last), and the random numbers are float32 whatever x's dtype, so p keeps
its resolution under reduced precision. The noise functions draw once per element too
(``uniform_delta``: the same numbers as before, in x's memory format).

Everything here is elementwise on the device: no ``.item()``, no CPU tensors, no
data-dependent Python control flow, so a CUDA step never waits for the host (the tests
run the functions on the ``meta`` device, where any of those would raise). Randomness
comes from a ``torch.Generator`` on the batch's device, which the trainer seeds per epoch.
"""

from __future__ import annotations

import torch

from satdata.errors import SatkitError


def curriculum_p(epoch: int, alpha: float) -> float:
    """p_t = 1 - alpha ** (epoch / 10): the share of elements that follow the saliency map.

    >>> curriculum_p(0, 0.6), round(curriculum_p(10, 0.6), 6)
    (0.0, 0.4)
    """
    if epoch < 0:
        raise SatkitError(f"curriculum: epoch must be >= 0, got {epoch}")
    if not 0 < alpha <= 1:
        raise SatkitError(f"--alpha: must be in (0, 1], got {alpha}")
    return 1.0 - float(alpha) ** (epoch / 10.0)


def _check_generator(x: torch.Tensor, generator: torch.Generator | None) -> None:
    # A generator on another device would either fail inside torch or silently force a
    # host round trip; say which one is wrong instead.
    if generator is not None and generator.device.type != x.device.type:
        raise SatkitError(
            f"perturbation: generator is on {generator.device}, the batch on {x.device}; "
            "seed a generator on the batch's device"
        )


def _uniform(x: torch.Tensor, generator: torch.Generator | None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """U[0, 1) per element of x, drawn in one call, in x's memory format (``preserve_format``)."""
    out = torch.empty_like(x, dtype=dtype, memory_format=torch.preserve_format)
    return out.uniform_(0.0, 1.0, generator=generator)


def rademacher_like(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Independent +-1 signs (each with probability 1/2), shaped and typed like x.

    The same rule as ``sat_direction`` with p = 0: from one generator state both give the
    same signs.
    """
    _check_generator(x, generator)
    u = _uniform(x, generator)
    return torch.ones_like(x, memory_format=torch.preserve_format).masked_fill_(u >= 0.5, -1.0)


def broadcast_saliency(S: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """S as x's shape: (B, 1, H, W) is repeated over channels, (B, C, H, W) must match x.

    Shapes are checked from metadata only (no device sync).
    """
    if S.dim() == 3:
        S = S.unsqueeze(1)
    if S.dim() != 4 or S.shape[0] != x.shape[0] or S.shape[2:] != x.shape[2:] or S.shape[1] not in (1, x.shape[1]):
        raise SatkitError(
            f"perturbation: saliency of shape {tuple(S.shape)} does not fit images of shape {tuple(x.shape)} "
            "(expected (B, 1, H, W) or (B, C, H, W))"
        )
    if S.device != x.device:
        raise SatkitError(f"perturbation: saliency is on {S.device}, the images on {x.device}")
    return S.to(x.dtype).expand_as(x)


def sat_direction(
    x: torch.Tensor, S: torch.Tensor, *, p: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """g = (1 - w) * n + w * S with n Rademacher and w Bernoulli(p), per element of x.

    One uniform draw u per element: w = u < p, and n = +1 if u < p + (1 - p) / 2 else -1
    (the module docstring says why that is exactly the distribution above).
    """
    if not 0.0 <= p <= 1.0:
        raise SatkitError(f"perturbation: p must be in [0, 1], got {p}")
    _check_generator(x, generator)
    S = broadcast_saliency(S, x)
    u = _uniform(x, generator)
    # u is in [0, 1): with p = 0 no element follows S, with p = 1 every element does.
    # S where u < p, else +1; then -1 where u >= p + (1 - p) / 2 (never where u < p, as p <= that).
    # torch.where with a Python scalar keeps S's dtype; masked_fill_ takes its value by value (no kernel).
    return torch.where(u < p, S, 1.0).masked_fill_(u >= p + (1.0 - p) / 2.0, -1.0)


def sat_perturb(
    x: torch.Tensor,
    S: torch.Tensor,
    *,
    eps: float,
    p: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The SAT training batch x_tilde = clamp(x - eps * g, 0, 1) (see the module docstring).

    ``x``: (B, C, H, W) float images in [0, 1] (for PGD-AT + SAT, the uniform-noise start
    x + U(-eps, eps); only the result is clamped). ``S``: the saliency, (B, 1, H, W) or
    (B, C, H, W), values in [-1, 1] (binary maps give +-1). ``p``: the curriculum
    probability ``curriculum_p(epoch, alpha)``, a Python float.

    >>> x = torch.full((1, 3, 2, 2), 0.5); S = torch.ones(1, 1, 2, 2)
    >>> sat_perturb(x, S, eps=0.25, p=1.0)[0, 0, 0, 0].item()
    0.25
    """
    if eps < 0:
        raise SatkitError(f"--eps0: must be >= 0, got {eps}")
    g = sat_direction(x, S, p=p, generator=generator)
    # x - eps * g as one kernel (x + alpha * g); may differ from the two-step form by one float ulp
    return torch.add(x, g, alpha=-float(eps)).clamp_(0.0, 1.0).detach()


def uniform_delta(x: torch.Tensor, *, eps: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """U(-eps, eps) noise per element, shaped, typed and laid out like x (not added, not clamped).

    One draw per element; for a contiguous x the numbers are those of
    ``torch.rand(x.shape, generator=generator) * 2 eps - eps``, as before the draws kept x's
    memory format.
    """
    if eps < 0:
        raise SatkitError(f"noise: eps must be >= 0, got {eps}")
    _check_generator(x, generator)
    return _uniform(x, generator, x.dtype).mul_(2 * eps).sub_(eps)


def uniform_noise(x: torch.Tensor, *, eps: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """The noise control: clamp(x + U(-eps, eps), 0, 1), per element."""
    return (x + uniform_delta(x, eps=eps, generator=generator)).clamp_(0.0, 1.0).detach()


class SATPerturbation:
    """The SAT perturbation as an object for one's own training loop (docs/api.md).

    ``SATPerturbation(eps0=8/255, alpha=0.6)(x, S, epoch, generator)`` is
    ``sat_perturb(x, S, eps=eps0, p=curriculum_p(epoch, alpha), generator=generator)``:
    x (B, C, H, W) in [0, 1], S (B, 1 or C, H, W) in [-1, 1] on x's device, epoch from 0.

    >>> sat = SATPerturbation(eps0=0.25)
    >>> sat(torch.full((1, 3, 2, 2), 0.5), torch.ones(1, 1, 2, 2), epoch=0).shape
    torch.Size([1, 3, 2, 2])
    """

    def __init__(self, eps0: float = 8 / 255, alpha: float = 0.6) -> None:
        if not (isinstance(eps0, (int, float)) and 0 <= eps0 <= 1):
            raise SatkitError(f"eps0: must be a number in [0, 1], got {eps0!r}")
        curriculum_p(0, alpha)  # checks alpha
        self.eps0 = float(eps0)
        self.alpha = float(alpha)

    def __repr__(self) -> str:
        return f"SATPerturbation(eps0={self.eps0!r}, alpha={self.alpha!r})"

    def p(self, epoch: int) -> float:
        """The curriculum probability p_t of epoch ``epoch``."""
        return curriculum_p(epoch, self.alpha)

    def __call__(self, x: torch.Tensor, S: torch.Tensor, epoch: int,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        return sat_perturb(x, S, eps=self.eps0, p=curriculum_p(epoch, self.alpha), generator=generator)
