"""The saliency algorithms: maps from a frozen classifier, batched on the input's device.

These are the generated maps of docs/method.md ("S from a store's map"), computed once per
image for one target class (the teacher's predicted class by default):

=================  ========  ========  ===================================================
algorithm          encoding  channels  what is stored (S units)
=================  ========  ========  ===================================================
gradcampp          unit      1         Grad-CAM++ at the CAM layer, ReLU, bilinear
                                       upsampling to H x W, min-max per image to [0, 1]
gradcam            unit      1         the same with Grad-CAM weights
gbp                signed    3         sign of the guided-backprop gradient: +1 where it is
                                       > 0, -1 elsewhere (zeros included), per channel
smoothgrad         unit      3         the SAT authors' SmoothGrad: mean over 10 noisy
                                       copies of the (signed) gradient of the target logit,
                                       min-max per image over all 3 channels jointly to
                                       [0, 1], channels kept
smoothgrad-abs     unit      1         NOT the paper's map: the same mean gradient, |.|
                                       averaged over channels, min-max per image (the usual
                                       greyscale SmoothGrad picture; satkit's former
                                       ``smoothgrad``)
guided-gradcampp   signed    3         the Grad-CAM++ value where the guided-backprop sign
                                       is +1, -1 elsewhere
=================  ========  ========  ===================================================

Every function here takes images ``x`` as float (B, 3, H, W) in [0, 1] on some device and
a target class per image ``target`` (B,) on the same device, and returns a tensor on that
device. None has side effects on the model: it runs in eval mode and every module's
``training`` flag is restored afterwards, gradients are taken with
``torch.autograd.grad`` (no parameter ``.grad`` is touched), and every hook or mode is
removed in a ``finally``. The score that is differentiated is always the target class's
*logit* (not a softmax probability), as in Grad-CAM, Grad-CAM++ and pytorch-grad-cam.

The registry (``ALGORITHMS``, ``get_algorithm``) names them as ``satdata saliency
--method`` does; it is not sattrain's registry of training methods.

>>> maps = gradcampp(model, x, target)                 # doctest: +SKIP
>>> q = to_stored(maps, "unit")                        # uint8 (B, H, W) for a store (generate.py)
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from satdata.errors import SatkitError

SMOOTHGRAD_SAMPLES = 10
SMOOTHGRAD_NOISE = 0.15  # sigma = 0.15 * (max - min) of each image (docs/method.md)
# Grad-CAM++'s eps in the alpha denominator: the value pytorch-grad-cam uses, so the two
# agree where the denominator vanishes.
GRADCAMPP_EPS = 1e-6


# --------------------------------------------------------------------------- helpers


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode, then restore every module's own ``training`` flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def _check_inputs(x: torch.Tensor, target: torch.Tensor) -> None:
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"images must be float in [0, 1], got {x.dtype}")
    if target.shape != (x.shape[0],):
        raise ValueError(f"target must be ({x.shape[0]},), got {tuple(target.shape)}")


def _target_score(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of each image's target logit (images are independent in eval)."""
    if logits.ndim != 2:
        raise SatkitError(f"the teacher returned {tuple(logits.shape)}, not (batch, classes) logits")
    if int(target.max()) >= logits.shape[1] or int(target.min()) < 0:
        raise SatkitError(f"target class out of range for a teacher with {logits.shape[1]} classes")
    return logits.gather(1, target.long()[:, None]).sum()


def minmax(a: torch.Tensor) -> torch.Tensor:
    """Scale each image of (B, ...) to [0, 1]: (a - min) / (max - min); a constant image -> 0."""
    flat = a.flatten(1)
    lo = flat.amin(1).view(-1, *([1] * (a.ndim - 1)))
    span = flat.amax(1).view(-1, *([1] * (a.ndim - 1))) - lo
    return torch.where(span > 0, (a - lo) / torch.where(span > 0, span, torch.ones_like(span)),
                       torch.zeros_like(a))


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's logits for x in eval mode, with no graph and no side effects."""
    with frozen(model):
        return model(x)

# --------------------------------------------------------------------------- CAM layer


@dataclass(frozen=True)
class CamLayer:
    """The module whose output Grad-CAM weighs, and that output's spatial size."""

    name: str
    module: nn.Module
    hw: tuple[int, int]


def _depth(name: str) -> int:
    return 0 if not name else name.count(".") + 1


def find_cam_layer(model: nn.Module, x: torch.Tensor, layer: str | None = None) -> CamLayer:
    """Pick the layer for Grad-CAM / Grad-CAM++ by what it outputs on x's size.

    ``layer`` names a module (as in ``model.named_modules()``) to use as is. Otherwise the
    model's last conv stage (its ``features_out``) is used if its output is at least
    2x2 on this input size; if it is smaller (a torchvision ResNet on 32x32 images ends
    at 1x1, where any CAM is constant and min-max scales it to all zeros), the last
    stage-level module that finishes before it with a feature map of at least 2x2 is used
    instead: candidates are the modules one or two levels below the root (stages and
    their blocks, not the layers inside a block), each called once per forward.
    Raises SatkitError when no such layer exists, saying why.
    """
    named = dict(model.named_modules())
    names = {id(m): n for n, m in model.named_modules()}
    if layer:
        if layer not in named:
            raise SatkitError(f"--layer: the teacher has no module {layer!r} "
                              f"(top-level modules: {', '.join(n for n, _ in model.named_children())})")
        candidates = {layer}
        pname = None
    else:
        preferred = getattr(model, "features_out", None)
        pname = names.get(id(preferred)) if preferred is not None else None
        candidates = {n for n in named if 1 <= _depth(n) <= 2}
        if pname:
            # a stage inside a wrapper (e.g. "net.layer4"): its siblings and their blocks too
            parent = pname.rsplit(".", 1)[0] if "." in pname else ""
            pd = _depth(parent)
            candidates |= {n for n in named
                           if (not parent or n.startswith(parent + ".")) and 1 <= _depth(n) - pd <= 2}
            candidates.add(pname)
    seen: dict[str, list[Any]] = {}
    order: list[str] = []

    def make_hook(n: str) -> Callable[..., None]:
        def hook(mod: nn.Module, inp: Any, out: Any) -> None:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else None
            seen.setdefault(n, []).append(shape)
            order.append(n)
        return hook

    handles = [named[n].register_forward_hook(make_hook(n)) for n in sorted(candidates)]
    try:
        predict(model, x[:1])
    finally:
        for h in handles:
            h.remove()
    in_hw = (int(x.shape[2]), int(x.shape[3]))
    if layer:
        shapes = seen.get(layer, [])
        if len(shapes) != 1 or shapes[0] is None or len(shapes[0]) != 4:
            raise SatkitError(f"--layer {layer}: must run once per forward and output a (B, C, H, W) "
                              f"feature map; it gave {shapes or 'nothing (never called)'}")
        hw = (shapes[0][2], shapes[0][3])
        return CamLayer(layer, named[layer], hw)
    # completion order of each module's (single) call
    done = [n for n in order if len(seen[n]) == 1]
    if pname is not None and pname in done:
        done = done[: done.index(pname) + 1]
    usable = [n for n in done if seen[n][0] is not None and len(seen[n][0]) == 4]
    good = [n for n in usable if seen[n][0][2] >= 2 and seen[n][0][3] >= 2]
    if not good:
        last = (f"its last conv stage {pname!r} is {seen[pname][0][2]}x{seen[pname][0][3]}"
                if pname in seen and seen[pname][0] is not None and len(seen[pname][0]) == 4
                else "it has no stage with a 4-D feature map")
        raise SatkitError(
            f"Grad-CAM: {type(model).__name__} has no feature map of at least 2x2 at "
            f"{in_hw[0]}x{in_hw[1]} input ({last}), so every map would be constant; "
            "use a store with larger images, a teacher that keeps more resolution, or --layer"
        )
    n = good[-1]
    return CamLayer(n, named[n], (seen[n][0][2], seen[n][0][3]))


# --------------------------------------------------------------------------- CAM methods


def _cam_inputs(model: nn.Module, x: torch.Tensor, target: torch.Tensor,
                layer: CamLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """(activations A, gradient of the target logits w.r.t. A) at the CAM layer."""
    _check_inputs(x, target)
    acts: list[torch.Tensor] = []

    def hook(mod: nn.Module, inp: Any, out: Any) -> None:
        acts.append(out)

    handle = layer.module.register_forward_hook(hook)
    try:
        with frozen(model), torch.enable_grad():
            # The input requires grad so a graph exists even if every parameter is frozen.
            xin = x.detach().requires_grad_(True)
            score = _target_score(model(xin), target)
            if len(acts) != 1 or not isinstance(acts[0], torch.Tensor):
                raise SatkitError(f"Grad-CAM layer {layer.name!r} ran {len(acts)} times in one forward")
            (grads,) = torch.autograd.grad(score, acts[0])
    finally:
        handle.remove()
    return acts[0].detach(), grads.detach()


def _finish_cam(cam: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """ReLU, bilinear upsampling (half-pixel centres) to hw, min-max per image."""
    cam = F.interpolate(cam.clamp(min=0)[:, None], size=hw, mode="bilinear", align_corners=False)[:, 0]
    return minmax(cam)


def gradcam(model: nn.Module, x: torch.Tensor, target: torch.Tensor,
            layer: CamLayer | None = None) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al. 2017): (B, H, W) in [0, 1].

    With A the CAM layer's activations (B, K, h, w) and g = d logit_target / dA:
    w_k = mean_ij g_kij, cam = ReLU(sum_k w_k A_k), upsampled bilinearly to H x W and
    min-max scaled per image (a constant cam becomes all zeros).
    """
    layer = layer or find_cam_layer(model, x)
    a, g = _cam_inputs(model, x, target, layer)
    w = g.mean(dim=(2, 3))
    return _finish_cam((w[:, :, None, None] * a).sum(1), (x.shape[2], x.shape[3]))


def gradcampp(model: nn.Module, x: torch.Tensor, target: torch.Tensor,
              layer: CamLayer | None = None) -> torch.Tensor:
    """Grad-CAM++ (Chattopadhyay et al. 2018, eq. 19): (B, H, W) in [0, 1].

    With A (B, K, h, w) and g = d logit_target / dA (the exponential of the paper folded
    into first-order terms, as pytorch-grad-cam does):
    alpha = g^2 / (2 g^2 + (sum_ij A) g^3 + 1e-6), set to 0 where g = 0;
    w_k = sum_ij ReLU(g) * alpha; cam = ReLU(sum_k w_k A_k), then bilinear upsampling to
    H x W and min-max per image, as in ``gradcam``.
    """
    layer = layer or find_cam_layer(model, x)
    a, g = _cam_inputs(model, x, target, layer)
    g2 = g * g
    g3 = g2 * g
    sum_a = a.sum(dim=(2, 3), keepdim=True)
    alpha = g2 / (2 * g2 + sum_a * g3 + GRADCAMPP_EPS)
    alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
    w = (g.clamp(min=0) * alpha).sum(dim=(2, 3))
    return _finish_cam((w[:, :, None, None] * a).sum(1), (x.shape[2], x.shape[3]))


# --------------------------------------------------------------------------- guided backprop


class _GuidedReLU(torch.autograd.Function):
    """ReLU whose backward passes only positive gradients through positive inputs."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        out = x.clamp(min=0)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (out,) = ctx.saved_tensors
        return grad.clamp(min=0) * (out > 0).to(grad.dtype)


_RELUS = {F.relu, torch.relu, torch.Tensor.relu, F.relu_, torch.relu_, torch.Tensor.relu_}


class _GuidedReLUMode(TorchFunctionMode):
    """Within the ``with``, every ReLU call becomes a guided ReLU.

    A torch-function mode sees ``nn.ReLU`` modules (they call ``F.relu``) and functional
    calls (``F.relu``, ``torch.relu``, ``Tensor.relu``) alike, so models that use either
    are guided; hooks on ``nn.ReLU`` modules (Captum's way) miss functional ReLUs. The
    guided ReLU is out of place: in-place calls return the new tensor, which every
    ``x = relu(x)`` pattern uses.
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _RELUS:
            self.count += 1
            x = args[0] if args else kwargs["input"]
            return _GuidedReLU.apply(x)
        return func(*args, **kwargs)


def guided_gradient(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Guided backpropagation (Springenberg et al. 2015): (B, 3, H, W) gradient.

    The gradient of the target logit w.r.t. the input where every ReLU's backward is
    ``grad_in = ReLU(grad_out) * [input > 0]``; other activations backpropagate normally.
    Raises SatkitError when the model runs no ReLU (nothing to guide).
    """
    _check_inputs(x, target)
    mode = _GuidedReLUMode()
    with frozen(model), torch.enable_grad():
        xin = x.detach().requires_grad_(True)
        with mode:
            logits = model(xin)
        score = _target_score(logits, target)
        (g,) = torch.autograd.grad(score, xin)
    if mode.count == 0:
        raise SatkitError(f"guided backprop: {type(model).__name__} applies no ReLU, so there is nothing to guide")
    return g.detach()


def gbp(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Guided-backprop sign map (the SAT authors' default): (B, 3, H, W) in {-1, +1}.

    +1 where the guided gradient is > 0, -1 elsewhere; an exact zero (no guided path
    reaches that pixel) counts as -1, as in guided Grad-CAM++'s "-1 elsewhere".
    """
    g = guided_gradient(model, x, target)
    return torch.where(g > 0, torch.ones_like(g), -torch.ones_like(g))


def guided_gradcampp(model: nn.Module, x: torch.Tensor, target: torch.Tensor,
                     layer: CamLayer | None = None) -> torch.Tensor:
    """Guided Grad-CAM++ as SAT defines it: (B, 3, H, W) in [-1, 1].

    Per channel: the Grad-CAM++ value (``gradcampp``, in [0, 1]) where the guided-backprop
    gradient is > 0, and -1 elsewhere.
    """
    cam = gradcampp(model, x, target, layer)
    g = guided_gradient(model, x, target)
    return torch.where(g > 0, cam[:, None].expand_as(g), -torch.ones_like(g))


# --------------------------------------------------------------------------- SmoothGrad


def smoothgrad_gradient(model: nn.Module, x: torch.Tensor, target: torch.Tensor, *,
                        n_samples: int = SMOOTHGRAD_SAMPLES, noise_level: float = SMOOTHGRAD_NOISE,
                        generator: torch.Generator | None = None,
                        noise: torch.Tensor | None = None) -> torch.Tensor:
    """SmoothGrad's averaged gradient (Smilkov et al. 2017): (B, 3, H, W).

    mean over k of d logit_target / dx evaluated at x + sigma * n_k, with n_k standard
    normal noise of x's shape and sigma = noise_level * (max - min) of each image (over
    its 3 channels, as the SAT authors' gradcam.SmoothGrad computes it per image). The
    noise is drawn as one (B, n_samples, 3, H, W) tensor from ``generator`` (the layout
    Captum's NoiseTunnel uses), or given as ``noise`` of that shape (standard normal;
    tests pass the same draws to a reference implementation). The noisy inputs are not
    clipped to [0, 1]. One forward and backward of batch B per sample keeps memory at
    one batch.
    """
    _check_inputs(x, target)
    b = x.shape[0]
    if noise is not None:
        if noise.ndim != 5 or noise.shape[0] != b or tuple(noise.shape[2:]) != tuple(x.shape[1:]):
            raise ValueError(f"noise must be (B, n_samples, 3, H, W) = ({b}, n, {', '.join(map(str, x.shape[1:]))}), "
                             f"got {tuple(noise.shape)}")
        n_samples = noise.shape[1]
        noise = noise.to(device=x.device, dtype=x.dtype)
    if n_samples < 1:
        raise ValueError("n_samples must be at least 1")
    flat = x.detach().flatten(1)
    sigma = (noise_level * (flat.amax(1) - flat.amin(1))).view(b, 1, 1, 1)
    if noise is None:
        noise = torch.randn((b, n_samples) + tuple(x.shape[1:]), generator=generator,
                            device=x.device, dtype=x.dtype)
    total = torch.zeros_like(x)
    with frozen(model), torch.enable_grad():
        for k in range(n_samples):
            xin = (x.detach() + sigma * noise[:, k]).requires_grad_(True)
            (g,) = torch.autograd.grad(_target_score(model(xin), target), xin)
            total += g.detach()
    return total / n_samples


def smoothgrad(model: nn.Module, x: torch.Tensor, target: torch.Tensor, *,
               n_samples: int = SMOOTHGRAD_SAMPLES, noise_level: float = SMOOTHGRAD_NOISE,
               generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """The SAT authors' SmoothGrad map: (B, 3, H, W) in [0, 1].

    The *signed* averaged gradient of ``smoothgrad_gradient`` (10 samples, sigma = 0.15
    of each image's range), min-max scaled per image over all three channels jointly:
    S = (g - min g) / (max g - min g), with min and max over (3, H, W), so a pixel with
    zero gradient lands between 0 and 1 and each channel keeps its own value. This is
    what the authors' ``gradcam.SmoothGrad.forward`` returns and their students train
    on (no absolute value, no channel reduction, no percentile clipping). An image whose
    averaged gradient is constant maps to all zeros (the authors' code divides by zero).
    """
    g = smoothgrad_gradient(model, x, target, n_samples=n_samples, noise_level=noise_level,
                            generator=generator, noise=noise)
    return minmax(g)


def smoothgrad_abs(model: nn.Module, x: torch.Tensor, target: torch.Tensor, *,
                   n_samples: int = SMOOTHGRAD_SAMPLES, noise_level: float = SMOOTHGRAD_NOISE,
                   generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """A greyscale SmoothGrad picture, *not* the paper's map: (B, H, W) in [0, 1].

    The averaged gradient of ``smoothgrad_gradient``, reduced over the colour channels by
    the mean of absolute values (|g_r| + |g_g| + |g_b|) / 3 (the usual SmoothGrad
    visualisation, without its percentile clipping), then min-max per image. Kept as
    ``smoothgrad-abs`` for comparison; it correlates poorly with the authors' map.
    """
    g = smoothgrad_gradient(model, x, target, n_samples=n_samples, noise_level=noise_level,
                            generator=generator, noise=noise)
    return minmax(g.abs().mean(1))


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class AlgorithmOptions:
    """Options of the algorithms (each reads the ones it needs)."""

    layer: str | None = None  # CAM layer (module name); None: chosen by find_cam_layer
    n_samples: int = SMOOTHGRAD_SAMPLES
    noise_level: float = SMOOTHGRAD_NOISE
    seed: int = 0  # SmoothGrad's noise


@dataclass(frozen=True)
class Algorithm:
    """A saliency algorithm (``--method``): how its maps are stored, and what it reads."""

    name: str
    encoding: str  # store encoding of its values
    channels: int  # 1: (H, W) maps; 3: one value per colour channel
    summary: str
    uses_cam_layer: bool = False
    uses_noise: bool = False


ALGORITHMS: dict[str, Algorithm] = {
    m.name: m
    for m in (
        Algorithm("gradcampp", "unit", 1, "Grad-CAM++ at the last conv stage, upsampled, min-max to [0, 1]",
               uses_cam_layer=True),
        Algorithm("gradcam", "unit", 1, "Grad-CAM at the last conv stage, upsampled, min-max to [0, 1]",
               uses_cam_layer=True),
        Algorithm("gbp", "signed", 3, "sign of the guided-backprop gradient, +-1 per channel"),
        Algorithm("smoothgrad", "unit", 3, "SmoothGrad as in SAT (10 samples, sigma 0.15 of the range): "
               "signed mean gradient, min-max to [0, 1] over all channels, 3 channels", uses_noise=True),
        Algorithm("smoothgrad-abs", "unit", 1, "not the paper's: SmoothGrad's mean |grad| over channels, "
               "min-max to [0, 1]", uses_noise=True),
        Algorithm("guided-gradcampp", "signed", 3, "Grad-CAM++ where the guided-backprop sign is +1, -1 elsewhere",
               uses_cam_layer=True),
    )
}


def get_algorithm(name: str) -> Algorithm:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise SatkitError(f"--method: unknown method {name!r} (one of {', '.join(ALGORITHMS)})") from None


def algorithm_parameters(method: Algorithm, options: AlgorithmOptions, cam_layer: CamLayer | None) -> dict[str, Any]:
    """The parameters that decided an algorithm's maps (recorded in the map's provenance)."""
    p: dict[str, Any] = {"score": "target logit"}
    if method.uses_cam_layer and cam_layer is not None:
        p.update(layer=cam_layer.name, layer_hw=list(cam_layer.hw), upsample="bilinear (half-pixel centres)",
                 scale="min-max per image")
    if method.name in ("gbp", "guided-gradcampp"):
        p.update(guided="ReLU backward: ReLU(grad) * [input > 0]", sign="+1 where > 0, -1 elsewhere")
    if method.uses_noise:
        p.update(n_samples=options.n_samples, noise_level=options.noise_level, seed=options.seed,
                 sigma="noise_level * (max - min) per image", gradient="mean over the noisy copies")
        if method.name == "smoothgrad":
            p.update(sign="signed (no absolute value)", channel_reduce="none (3 channels kept)",
                     scale="min-max per image over all channels jointly")
        else:
            p.update(channel_reduce="mean |grad| over channels", scale="min-max per image")
    return p


def compute(method: Algorithm | str, model: nn.Module, x: torch.Tensor, target: torch.Tensor, *,
            cam_layer: CamLayer | None = None, options: AlgorithmOptions = AlgorithmOptions(),
            generator: torch.Generator | None = None) -> torch.Tensor:
    """One batch of maps in S units: (B, H, W) for 1-channel methods, else (B, C, H, W)."""
    m = get_algorithm(method) if isinstance(method, str) else method
    if m.name == "gradcampp":
        return gradcampp(model, x, target, cam_layer)
    if m.name == "gradcam":
        return gradcam(model, x, target, cam_layer)
    if m.name == "gbp":
        return gbp(model, x, target)
    if m.name == "smoothgrad":
        return smoothgrad(model, x, target, n_samples=options.n_samples, noise_level=options.noise_level,
                          generator=generator)
    if m.name == "smoothgrad-abs":
        return smoothgrad_abs(model, x, target, n_samples=options.n_samples, noise_level=options.noise_level,
                              generator=generator)
    if m.name == "guided-gradcampp":
        return guided_gradcampp(model, x, target, cam_layer)
    raise SatkitError(f"--method: {m.name!r} has no implementation")  # pragma: no cover


__all__ = [
    "ALGORITHMS", "Algorithm", "AlgorithmOptions", "CamLayer", "GRADCAMPP_EPS", "SMOOTHGRAD_NOISE",
    "SMOOTHGRAD_SAMPLES", "algorithm_parameters", "compute", "find_cam_layer", "frozen", "gbp", "get_algorithm",
    "gradcam", "gradcampp", "guided_gradcampp", "guided_gradient", "minmax", "predict", "smoothgrad",
    "smoothgrad_abs", "smoothgrad_gradient",
]
