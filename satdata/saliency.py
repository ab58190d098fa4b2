"""Saliency maps from a frozen classifier, batched on the input's device.

These are the generated maps of docs/method.md ("S from a store's map"), computed once per
image for one target class (the teacher's predicted class by default):

=================  ========  ========  ===================================================
method             encoding  channels  what is stored (S units)
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

>>> maps = gradcampp(model, x, target)                 # doctest: +SKIP
>>> q = to_stored(maps, "unit")                        # uint8 (B, H, W) for a store
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
from sattrain.device import resolve_device

TARGET_RULES = ("predicted", "label")
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


def choose_target(logits: torch.Tensor, labels: torch.Tensor | None, rule: str) -> torch.Tensor:
    """The class each map is computed for.

    ``predicted``: the teacher's argmax. ``label``: the true label; with multi-hot labels
    (B, K), the labelled class the teacher scores highest (an image with no label falls
    back to the prediction).
    """
    if rule == "predicted":
        return logits.argmax(1)
    if rule != "label":
        raise SatkitError(f"--target: unknown rule {rule!r} (one of {', '.join(TARGET_RULES)})")
    if labels is None:
        raise SatkitError("--target label: no labels given")
    if labels.ndim == 1:
        return labels.long()
    if labels.shape[1] != logits.shape[1]:
        raise SatkitError(f"--target label: labels have {labels.shape[1]} classes, the teacher {logits.shape[1]}")
    masked = torch.where(labels.bool(), logits, torch.full_like(logits, float("-inf")))
    return torch.where(labels.bool().any(1), masked.argmax(1), logits.argmax(1))


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
class MethodOptions:
    """Options of the methods (each method reads the ones it needs)."""

    layer: str | None = None  # CAM layer (module name); None: chosen by find_cam_layer
    n_samples: int = SMOOTHGRAD_SAMPLES
    noise_level: float = SMOOTHGRAD_NOISE
    seed: int = 0  # SmoothGrad's noise


@dataclass(frozen=True)
class Method:
    """A saliency method: how its maps are stored, and what it reads."""

    name: str
    encoding: str  # store encoding of its values
    channels: int  # 1: (H, W) maps; 3: one value per colour channel
    summary: str
    uses_cam_layer: bool = False
    uses_noise: bool = False


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("gradcampp", "unit", 1, "Grad-CAM++ at the last conv stage, upsampled, min-max to [0, 1]",
               uses_cam_layer=True),
        Method("gradcam", "unit", 1, "Grad-CAM at the last conv stage, upsampled, min-max to [0, 1]",
               uses_cam_layer=True),
        Method("gbp", "signed", 3, "sign of the guided-backprop gradient, +-1 per channel"),
        Method("smoothgrad", "unit", 3, "SmoothGrad as in SAT (10 samples, sigma 0.15 of the range): "
               "signed mean gradient, min-max to [0, 1] over all channels, 3 channels", uses_noise=True),
        Method("smoothgrad-abs", "unit", 1, "not the paper's: SmoothGrad's mean |grad| over channels, "
               "min-max to [0, 1]", uses_noise=True),
        Method("guided-gradcampp", "signed", 3, "Grad-CAM++ where the guided-backprop sign is +1, -1 elsewhere",
               uses_cam_layer=True),
    )
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise SatkitError(f"--method: unknown method {name!r} (one of {', '.join(METHODS)})") from None


def method_parameters(method: Method, options: MethodOptions, cam_layer: CamLayer | None) -> dict[str, Any]:
    """The parameters that decided a method's maps (recorded in the map's provenance)."""
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


def compute(method: Method | str, model: nn.Module, x: torch.Tensor, target: torch.Tensor, *,
            cam_layer: CamLayer | None = None, options: MethodOptions = MethodOptions(),
            generator: torch.Generator | None = None) -> torch.Tensor:
    """One batch of maps in S units: (B, H, W) for 1-channel methods, else (B, C, H, W)."""
    m = get_method(method) if isinstance(method, str) else method
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


def to_stored(s: torch.Tensor, encoding: str) -> torch.Tensor:
    """Quantise maps in S units to a store's integers, channels last.

    unit: uint8 round(255 s), s in [0, 1]; signed: int8 round(127 s), s in [-1, 1];
    binary: uint8 (s > 0). (B, C, H, W) becomes (B, H, W, C); (B, H, W) stays.
    """
    if s.ndim == 4:
        s = s.permute(0, 2, 3, 1)
    if encoding == "unit":
        return torch.round(s * 255).clamp(0, 255).to(torch.uint8)
    if encoding == "signed":
        return torch.round(s * 127).clamp(-127, 127).to(torch.int8)
    if encoding == "binary":
        return (s > 0).to(torch.uint8)
    raise SatkitError(f"unknown map encoding {encoding!r}")


# --------------------------------------------------------------------------- teacher check

HELDOUT_SPLITS = ("test", "val")  # the held-out split the teacher is scored on, in preference
HELDOUT_MAX_SAMPLES = 1000  # a seeded subset keeps the check to a few seconds
HELDOUT_SEED = 0


def low_accuracy_threshold(num_classes: int) -> float:
    """The accuracy below which a teacher's maps are not worth having: (1 + 1/K) / 2.

    Halfway between chance (1/K) and perfect: a teacher below it is closer to guessing
    than to knowing, and its gradients explain its guesses, not the classes (0.55 for 10
    classes, 0.75 for 2, just above 0.5 for many). A teacher at 0.19 on digits makes
    maps that are noise.
    """
    return (1.0 + 1.0 / max(1, num_classes)) / 2.0


@dataclass(frozen=True)
class TeacherCheck:
    """The teacher's top-1 accuracy on a held-out split, as the maps will see it.

    ``accuracy`` is measured in eval mode (BatchNorm with its running statistics), the
    mode every map is computed in. ``batch_stats_accuracy`` is filled only for a low
    teacher with BatchNorm layers: its accuracy with each batch's own statistics, which
    tells a teacher whose running statistics lag its weights (far higher) from one that
    has not learnt the task (as low).
    """

    split: str
    n: int  # samples scored
    of: int  # samples in the split
    seed: int
    accuracy: float
    num_classes: int
    threshold: float
    batch_stats_accuracy: float | None = None

    @property
    def chance(self) -> float:
        return 1.0 / self.num_classes

    @property
    def low(self) -> bool:
        return self.accuracy < self.threshold

    def summary(self) -> str:
        subset = (f"{self.n:,} of {self.n:,} samples" if self.n == self.of
                  else f"a random {self.n:,} of {self.of:,} samples, seed {self.seed}")
        return f"teacher accuracy on {self.split}: {self.accuracy:.3f} ({subset}, eval mode)"

    def warning(self) -> str | None:
        """A one-paragraph warning when the teacher is low, else None."""
        if not self.low:
            return None
        msg = (f"warning: the teacher's accuracy on {self.split} is {self.accuracy:.3f}, below "
               f"{self.threshold:.3f} (halfway between chance, {self.chance:.3f}, and 1), so its maps "
               "will be mostly noise. Train the teacher longer")
        if self.batch_stats_accuracy is not None and self.batch_stats_accuracy >= self.threshold:
            msg += (f": with batch statistics it scores {self.batch_stats_accuracy:.3f}, so its BatchNorm "
                    "running statistics lag its weights (maps use eval mode, i.e. the running statistics)")
        elif self.batch_stats_accuracy is not None:
            msg += f" (with batch statistics it scores {self.batch_stats_accuracy:.3f} too)"
        return msg + "."

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"split": self.split, "samples": self.n, "of": self.of, "seed": self.seed,
                             "accuracy": round(self.accuracy, 6), "mode": "eval",
                             "chance": round(self.chance, 6), "threshold": round(self.threshold, 6),
                             "low": self.low, "rule": "low when accuracy < (1 + 1/K) / 2"}
        if self.batch_stats_accuracy is not None:
            d["batch_stats_accuracy"] = round(self.batch_stats_accuracy, 6)
        return d


def _accuracy(model: nn.Module, images: Any, labels: Any, device: torch.device | str, batch_size: int) -> float:
    """Top-1 accuracy of ``model`` as it is (no mode change) on uint8 (N, H, W, 3) images."""
    correct = 0
    with torch.no_grad():
        for a in range(0, len(images), batch_size):
            x = torch.from_numpy(images[a:a + batch_size]).to(device).permute(0, 3, 1, 2).float().div_(255.0)
            y = torch.from_numpy(labels[a:a + batch_size]).to(device)
            correct += int((model(x).argmax(1) == y).sum())
    return correct / max(1, len(images))


def check_teacher_accuracy(model: nn.Module, store: Any, *, device: torch.device | str = "cpu",
                           batch_size: int = 256, max_samples: int = HELDOUT_MAX_SAMPLES,
                           seed: int = HELDOUT_SEED) -> TeacherCheck:
    """Score a teacher on the store's held-out split before it makes maps.

    The split is ``test``, else ``val``, else (a store without held-out data) ``train``;
    at most ``max_samples`` of it, picked with ``seed`` (sorted, so reads stay in order).
    The accuracy is taken in eval mode, as the maps are; for a low teacher with BatchNorm
    a copy of it is scored again with batch statistics to say why (see TeacherCheck).
    The model is left exactly as it was. The store must be single-label, with the
    teacher's classes in the store's order (the caller checks).
    """
    import numpy as np

    info = store.info
    split = next((s for s in HELDOUT_SPLITS if s in info.splits), next(iter(info.splits)))
    total = info.splits[split]
    k = min(total, max_samples)
    if k < total:
        idx = np.sort(np.random.default_rng(seed).choice(total, size=k, replace=False))
        images = np.asarray(store.array(split, "images").oindex[idx])
        labels = np.asarray(store.array(split, "labels").oindex[idx])
    else:
        images, labels = store.load(split, "images"), store.load(split, "labels")
    with frozen(model):
        acc = _accuracy(model, images, labels, device, batch_size)
    threshold = low_accuracy_threshold(len(info.classes))
    batch_acc = None
    if acc < threshold and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        import copy

        probe = copy.deepcopy(model).eval()  # a copy: batch-statistics passes update running stats
        for m in probe.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()
        batch_acc = _accuracy(probe, images, labels, device, max(batch_size, 64))
    return TeacherCheck(split=split, n=k, of=total, seed=seed, accuracy=acc, num_classes=len(info.classes),
                        threshold=threshold, batch_stats_accuracy=batch_acc)


# --------------------------------------------------------------------------- store driver


@dataclass(frozen=True)
class SaliencyConfig:
    """Everything that decides what ``satdata saliency`` adds to a store."""

    store: str
    method: str
    name: str | None = None  # None: the method's name
    teacher: str | None = None  # sattrain run dir or checkpoint
    arch: str | None = None  # or a torchvision architecture ...
    weights: str | None = None  # ... with its local weights file
    splits: tuple[str, ...] | None = None  # None: every split
    target: str = "predicted"
    batch_size: int = 256
    device: str = "auto"
    overwrite: bool = False
    layer: str | None = None
    seed: int = 0
    progress: bool = True
    dask: str | None = None  # compute on Dask workers: "local:N" or a scheduler address


@dataclass
class SaliencyResult:
    path: str
    name: str
    method: str
    info: Any  # the committed StoreInfo
    device: str
    cam_layer: CamLayer | None
    seconds: float
    teacher_accuracy: dict[str, float]  # per computed split, over all its samples
    teacher_check: TeacherCheck | None = None  # the held-out check made before any map


def _comparable(teacher: Any, info: Any) -> str | None:
    """Why the teacher's accuracy cannot be measured on this store, or None when it can."""
    if info.label_kind != "single":
        return "the store is multi-label"
    if teacher.num_classes != len(info.classes):
        return f"the teacher has {teacher.num_classes} classes, the store {len(info.classes)}"
    if teacher.classes is not None and list(teacher.classes) != list(info.classes):
        return "the teacher's classes are not the store's"
    return None


def _check_teacher(teacher: Any, info: Any, rule: str, where: str, log: Callable[[str], None]) -> None:
    n_classes = len(info.classes)
    if teacher.image_size is not None and tuple(teacher.image_size) != tuple(info.image_size):
        log(f"note: the teacher was trained at {teacher.image_size[0]}x{teacher.image_size[1]}, "
            f"the store's images are {info.image_size[0]}x{info.image_size[1]}")
    if rule != "label":
        if teacher.classes is not None and list(teacher.classes) != list(info.classes):
            log("note: the teacher's classes differ from the store's; maps are for its predicted class")
        return
    if teacher.num_classes != n_classes:
        raise SatkitError(f"--target label: the teacher has {teacher.num_classes} classes, {where} has "
                          f"{n_classes}, so labels do not name the teacher's classes")
    if teacher.classes is not None and list(teacher.classes) != list(info.classes):
        raise SatkitError(f"--target label: the teacher's classes are not {where}'s (same count, "
                          "other names or order), so labels do not name the teacher's classes")


def _versions() -> dict[str, str]:
    import platform

    import numpy
    import zarr

    v = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
         "zarr": zarr.__version__}
    from importlib.metadata import PackageNotFoundError, version

    try:  # from the metadata: importing torchvision costs seconds
        v["torchvision"] = version("torchvision")
    except PackageNotFoundError:  # pragma: no cover
        pass
    return v


def noise_seed(seed: int, split: str, start: int) -> int:
    """The seed of the noise for the batch of ``split`` starting at sample ``start``: a
    batch's noise does not depend on which process computes it, or in what order."""
    import hashlib

    h = hashlib.sha256(f"satkit-noise/{seed}/{split}/{start}".encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


def batch_images(images: Any, device: torch.device | str) -> torch.Tensor:
    """uint8 (B, H, W, 3) images as float (B, 3, H, W) in [0, 1] on ``device``."""
    import numpy as np

    x = torch.from_numpy(np.ascontiguousarray(images)).to(device)
    return x.permute(0, 3, 1, 2).float().div_(255.0)


def map_batches(model: nn.Module, method: Method, images: Any, labels: Any, *, split: str, start: int,
                batch_size: int, device: torch.device | str, cam_layer: CamLayer | None,
                options: MethodOptions, target_rule: str) -> Iterator[tuple[Any, Any, int]]:
    """Maps for ``images`` (samples ``start``... of ``split``) in batches of ``batch_size``:
    (stored maps, the class each was computed for, how many the teacher got right).
    ``start`` must be a multiple of ``batch_size``: every caller then forms the same
    batches, so a range computed by a Dask worker equals the one-process result."""
    generator = torch.Generator(device=device) if method.uses_noise else None
    for a in range(0, len(images), batch_size):
        b = min(len(images), a + batch_size)
        x = batch_images(images[a:b], device)
        y = torch.from_numpy(labels[a:b]).to(device)
        logits = predict(model, x)
        target = choose_target(logits, y, target_rule)
        right = int((logits.argmax(1) == y).sum()) if y.ndim == 1 else 0
        if generator is not None:
            generator.manual_seed(noise_seed(options.seed, split, start + a))
        s = compute(method, model, x, target, cam_layer=cam_layer, options=options, generator=generator)
        yield to_stored(s, method.encoding).cpu().numpy(), target.cpu().numpy(), right


@contextmanager
def _maps_on_dask(cfg: "SaliencyConfig", store: Any, splits: Sequence[str], cam_layer: CamLayer | None,
                  bar: Any, accuracy: dict[str, float]) -> Iterator[Any]:
    """A ``produce`` for add_map that gathers maps computed on Dask workers (satdata.dask_maps),
    or None without --dask."""
    if not cfg.dask:
        yield None
        return
    from satdata.dask_maps import maps_on_dask

    with maps_on_dask(cfg, store, splits, cam_layer, bar, accuracy) as produce:
        yield produce


def generate_maps(cfg: SaliencyConfig, log: Callable[[str], None] = lambda m: None) -> SaliencyResult:
    """Compute a method's maps with a frozen teacher for a store's splits and add them.

    Images are read a split at a time into memory and sent to the device in batches of
    ``batch_size``; the maps are quantised on the device and written by
    ``satdata.addmap.add_map`` (atomic: a failure or kill leaves the store as it was).
    The map's provenance records the teacher (file sha256, path, arch), the method and
    its parameters (e.g. the CAM layer actually used), the target rule, the device,
    the teacher's accuracy on each split's labels, versions and the creation time.

    Before any map is computed, the teacher is scored on the store's held-out split
    (``check_teacher_accuracy``): the result is logged, recorded as the provenance's
    ``teacher_heldout``, and a low teacher gets a logged warning (the maps are still
    made). Each map is stored with the class it was computed for (``NewMap.targets``).
    """
    import time
    from datetime import datetime, timezone

    import numpy as np

    from satdata import __version__
    from satdata.addmap import NewMap, add_map, check_can_add, check_map_name
    from satdata.teacher import load_teacher

    from satdata.remote import is_url, is_zip, redact

    if is_url(str(cfg.store)) or is_zip(str(cfg.store)):
        where = "at a URL" if is_url(str(cfg.store)) else "packed in a .zip"
        raise SatkitError(f"{redact(str(cfg.store))}: satdata saliency adds maps to a local store directory, and this "
                          f"store is {where} (read-only); copy it here first (`satdata fetch URL --out NAME.zarr`)")
    t0 = time.time()
    method = get_method(cfg.method)
    name = check_map_name(cfg.name or method.name)
    if cfg.target not in TARGET_RULES:
        raise SatkitError(f"--target: unknown rule {cfg.target!r} (one of {', '.join(TARGET_RULES)})")
    if cfg.dask:
        from satdata.dask_build import check_address

        check_address(cfg.dask)
    if cfg.batch_size < 1:
        raise SatkitError(f"--batch-size: must be at least 1, got {cfg.batch_size}")
    if cfg.layer and not method.uses_cam_layer:
        raise SatkitError(f"--layer: method {method.name} uses no CAM layer")
    new = NewMap(name=name, encoding=method.encoding, kind=method.name, channels=method.channels)
    store, compute_splits = check_can_add(cfg.store, name, splits=cfg.splits, overwrite=cfg.overwrite, new=new)
    info = store.info
    device = resolve_device(cfg.device)
    teacher = load_teacher(cfg.teacher, arch=cfg.arch, weights=cfg.weights, device=device)
    _check_teacher(teacher, info, cfg.target, cfg.store, log)
    model = teacher.model
    options = MethodOptions(layer=cfg.layer, seed=cfg.seed)
    check: TeacherCheck | None = None
    why_not = _comparable(teacher, info)
    if why_not is None:
        check = check_teacher_accuracy(model, store, device=device, batch_size=cfg.batch_size)
        log(check.summary())
        warning = check.warning()
        if warning:
            log(warning)
    else:
        log(f"teacher accuracy: not measured ({why_not})")

    cam_layer = None
    if method.uses_cam_layer:
        first = store.array(compute_splits[0], "images")[:1]
        cam_layer = find_cam_layer(model, batch_images(first, device), cfg.layer)
        stage = getattr(model, "features_out", None)
        stage_name = {id(m): n for n, m in model.named_modules()}.get(id(stage))
        if not cfg.layer and stage_name and stage_name != cam_layer.name:
            log(f"Grad-CAM layer: {cam_layer.name} ({cam_layer.hw[0]}x{cam_layer.hw[1]}), because the last "
                f"conv stage {stage_name} is smaller than 2x2 at {info.image_size[0]}x{info.image_size[1]}")
    accuracy: dict[str, float] = {}
    provenance: dict[str, Any] = {
        "teacher": teacher.provenance(),
        "method": method.name,
        "parameters": method_parameters(method, options, cam_layer),
        "target": cfg.target,
        "device": str(device) + (f" on Dask workers ({cfg.dask})" if cfg.dask else ""),
        "batch_size": cfg.batch_size,
        "tool": f"satkit {__version__}",
        "versions": _versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "teacher_accuracy": accuracy,
        "teacher_heldout": check.to_json() if check is not None else {"not_measured": why_not},
    }
    new = NewMap(name=name, encoding=method.encoding, kind=method.name, channels=method.channels,
                 provenance=provenance, targets=True)
    from tqdm.auto import tqdm

    total = sum(info.splits[s] for s in compute_splits)
    bar = tqdm(total=total, desc=f"{method.name}", unit="img", disable=not cfg.progress, dynamic_ncols=True,
               leave=False)

    def produce_here(split: str) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        images = store.load(split, "images")
        labels_np = store.load(split, "labels")
        correct = 0
        bar.set_description(f"{method.name} {split}")
        for stored, target, right in map_batches(model, method, images, labels_np, split=split, start=0,
                                                 batch_size=cfg.batch_size, device=device, cam_layer=cam_layer,
                                                 options=options, target_rule=cfg.target):
            correct += right
            yield stored, target
            bar.update(len(stored))
        if labels_np.ndim == 1 and len(images):
            accuracy[split] = round(correct / len(images), 6)

    from satdata.build import sigterm_as_interrupt

    try:
        with sigterm_as_interrupt(), _maps_on_dask(cfg, store, compute_splits, cam_layer, bar, accuracy) as remote:
            committed = add_map(cfg.store, new, remote or produce_here, splits=compute_splits,
                                overwrite=cfg.overwrite, log=log)
    finally:
        bar.close()
    return SaliencyResult(path=cfg.store, name=name, method=method.name, info=committed, device=str(device),
                          cam_layer=cam_layer, seconds=time.time() - t0, teacher_accuracy=dict(accuracy),
                          teacher_check=check)


__all__ = [
    "METHODS", "Method", "MethodOptions", "CamLayer", "TARGET_RULES", "choose_target", "compute",
    "find_cam_layer", "frozen", "gbp", "get_method", "gradcam", "gradcampp", "guided_gradcampp",
    "guided_gradient", "method_parameters", "minmax", "predict", "smoothgrad", "smoothgrad_abs",
    "smoothgrad_gradient", "to_stored", "SaliencyConfig", "SaliencyResult", "generate_maps", "resolve_device",
    "TeacherCheck", "check_teacher_accuracy", "low_accuracy_threshold", "HELDOUT_MAX_SAMPLES",
    "batch_images", "map_batches", "noise_seed",
]
