"""How a model runs fast on a device: numeric precision, memory format, compilation.

Three choices, each resolved once per run from what was asked and the device, and
recorded in config.json (:func:`describe`):

``precision`` (``--precision auto|fp32|fp16|bf16``)
    ``auto`` is ``bf16`` on a CUDA device with native bfloat16 (compute capability 8.0 and
    later: A100, H100, H200, RTX 30xx and later; every ROCm device torch supports),
    ``fp16`` on older CUDA devices, and ``fp32`` on the CPU and every other device.
    ``fp16`` and ``bf16`` run the forward pass (and the attacks' forward passes) under
    ``torch.autocast``; parameters, optimizer state and the perturbation stay float32.
    ``fp16`` needs a gradient scaler (:func:`make_grad_scaler`); ``bf16`` has float32's
    exponent range and needs none. On the CPU ``fp16`` is refused (CPU autocast covers
    few float16 kernels and PyTorch's CPU gradient scaler is recent; nothing would be
    faster) and ``bf16`` is allowed when asked for explicitly: CPU bfloat16 autocast is
    supported by PyTorch and is faster on CPUs with AMX or AVX-512 BF16, but it changes
    the numbers, so ``auto`` keeps the CPU at float32 and CPU results unchanged.

``channels_last`` (``--channels-last auto|on|off``)
    The model's 4-d weights and each input batch in NHWC order (``torch.channels_last``),
    the layout cuDNN's tensor-core convolutions use natively. ``auto`` is on for CUDA and
    off elsewhere. Measured on an NVIDIA H200 (CIFAR-style ResNet-18, 32x32, batch 512,
    resident batches): bf16 + channels_last ran 50,764 images/s against 31,537 for fp16
    in NCHW, 1.6x (BENCHMARKS.md, "On a GPU").

``compile`` (``--compile none|default|reduce-overhead|max-autotune``)
    ``torch.compile`` with that mode. ``none`` is the default everywhere: in the same
    measurement ``torch.compile`` (default mode) reached 40,289 images/s, slower than
    eager bf16 + channels_last, and it costs a compilation at start (and again for each
    new batch shape and for train/eval mode). The inductor backend needs a C++ compiler
    on the CPU and Triton on CUDA; :func:`check_compile` refuses, with one line, what
    cannot work before anything runs. ``reduce-overhead`` adds CUDA graphs, which torch
    skips for graphs that mutate buffers (batch norm's running statistics in train mode).

Typical use (the trainer's)::

    acc = resolve(device, precision="auto", channels_last="auto", compile="none")
    model = acc.prepare(create_model(...).to(device))   # call this; save unwrap(model)
    scaler = acc.grad_scaler()
    with acc.autocast():                                # or pass acc.autocast as a factory
        loss = F.cross_entropy(model(acc.batch(x)), y)
    config["accel"] = acc.describe()

Nothing here synchronises with the device.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager

import torch
import torch.nn as nn

from satdata.errors import SatkitError

__all__ = [
    "PRECISIONS",
    "CHANNELS_LAST",
    "COMPILE_MODES",
    "Accel",
    "resolve",
    "resolve_precision",
    "cuda_bf16_native",
    "autocast_dtype",
    "autocast_factory",
    "make_grad_scaler",
    "resolve_channels_last",
    "resolve_compile",
    "check_compile",
    "prepare_model",
    "unwrap",
    "to_memory_format",
    "configure_backends",
    "describe",
]

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
CHANNELS_LAST = ("auto", "on", "off")
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _device(device: torch.device | str) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


def cuda_bf16_native(device: torch.device | str) -> bool:
    """Whether a CUDA device computes bfloat16 natively (not emulated).

    torch.cuda.is_bf16_supported() also answers True for emulated bfloat16 on pre-Ampere
    GPUs (slow) and only for the current device, so the rule is read per device: compute
    capability >= 8.0 on CUDA, every device on ROCm (torch.cuda.is_bf16_supported's own rule
    there).
    """
    if getattr(torch.version, "hip", None):
        return True
    major, _minor = torch.cuda.get_device_capability(_device(device))
    return major >= 8


def _device_name(device: torch.device) -> str:
    try:
        return torch.cuda.get_device_name(device)
    except Exception:  # noqa: BLE001 - only a label for a message
        return str(device)


def resolve_precision(requested: str, device: torch.device | str) -> str:
    """'auto', 'fp32', 'fp16' or 'bf16' -> the precision to train in on ``device``.

    auto: bf16 on CUDA devices with native bfloat16, fp16 on older CUDA devices, fp32
    elsewhere. An explicit choice the device cannot run is a SatkitError naming
    --precision: fp16 off CUDA, bf16 on a CUDA device without native bfloat16, fp16/bf16
    on devices other than CUDA and the CPU. bf16 on the CPU is allowed (see the module
    docstring).
    """
    dev = _device(device)
    if requested not in PRECISIONS:
        raise SatkitError(f"--precision: unknown precision {requested!r} (known: {', '.join(PRECISIONS)})")
    if dev.type == "cuda":
        native_bf16 = cuda_bf16_native(dev)
        if requested == "auto":
            return "bf16" if native_bf16 else "fp16"
        if requested == "bf16" and not native_bf16:
            raise SatkitError(f"--precision bf16: {_device_name(dev)} has no native bfloat16 (compute capability "
                              "below 8.0); use --precision fp16 (or auto, which picks it) or fp32")
        return requested
    if requested in ("auto", "fp32"):
        return "fp32"
    if dev.type == "cpu":
        if requested == "fp16":
            raise SatkitError("--precision fp16: float16 training needs a CUDA device; the CPU trains in fp32 "
                              "(the default) or, if asked, bf16 autocast")
        return requested  # bf16: CPU bfloat16 autocast, on request only
    raise SatkitError(f"--precision {requested}: mixed precision is implemented for CUDA devices (and bf16 on the "
                      f"CPU), not for {dev.type}; use --precision fp32")


def autocast_dtype(precision: str) -> torch.dtype | None:
    """torch.float16 / torch.bfloat16 for 'fp16' / 'bf16'; None for 'fp32' (no autocast)."""
    if precision == "fp32":
        return None
    if precision not in _DTYPES:
        raise SatkitError(f"--precision: {precision!r} is not a resolved precision (fp32, fp16, bf16)")
    return _DTYPES[precision]


def autocast_factory(precision: str, device: torch.device | str) -> Callable[[], ContextManager[Any]]:
    """A callable returning a fresh context manager per use: ``torch.autocast`` for
    fp16/bf16 on ``device``'s type, ``contextlib.nullcontext`` for fp32 (which is what
    ``sattrain.trainer.train_one_epoch``'s ``autocast`` parameter takes)."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        return nullcontext
    kind = _device(device).type

    def factory() -> ContextManager[Any]:
        return torch.autocast(kind, dtype=dtype)

    return factory


def make_grad_scaler(precision: str, device: torch.device | str) -> Any:
    """A ``torch.amp.GradScaler`` for fp16 on CUDA; None for fp32 and bf16 (no scaling needed).

    fp16 on anything but CUDA is a SatkitError (resolve_precision never returns it).
    """
    dev = _device(device)
    autocast_dtype(precision)  # validates
    if precision != "fp16":
        return None
    if dev.type != "cuda":
        raise SatkitError(f"--precision fp16: float16 training needs a CUDA device, not {dev.type}")
    return torch.amp.GradScaler("cuda")


def resolve_channels_last(requested: str | bool, device: torch.device | str) -> bool:
    """'auto' -> True on CUDA, False elsewhere; 'on'/True -> True; 'off'/False -> False."""
    if isinstance(requested, bool):
        return requested
    if requested not in CHANNELS_LAST:
        raise SatkitError(f"--channels-last: unknown value {requested!r} (known: {', '.join(CHANNELS_LAST)})")
    if requested == "auto":
        return _device(device).type == "cuda"
    return requested == "on"


def _cxx_compiler() -> str | None:
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx) or (cxx if os.path.isfile(cxx) else None)
    for name in ("g++", "c++", "clang++"):
        found = shutil.which(name)
        if found:
            return found
    return None


def check_compile(mode: str, device: torch.device | str, backend: str = "inductor") -> None:
    """Refuse, with one line naming --compile, a compilation that cannot work here.

    Checks the mode's name, that TorchDynamo supports this Python and platform, and, for
    the inductor backend, a C++ compiler (CPU) or the Triton package (CUDA). Nothing is
    compiled: a failure inside the compiler still surfaces at the first forward pass.
    """
    if mode not in COMPILE_MODES:
        raise SatkitError(f"--compile: unknown mode {mode!r} (known: {', '.join(COMPILE_MODES)})")
    if mode == "none":
        return
    try:
        import torch._dynamo as dynamo

        check = getattr(dynamo.eval_frame, "check_if_dynamo_supported", None)
        if check is not None:
            check()
        elif not dynamo.is_dynamo_supported():
            raise RuntimeError("TorchDynamo is not supported on this platform")
    except Exception as e:  # noqa: BLE001 - any reason becomes the one line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SatkitError(f"--compile {mode}: torch.compile is unavailable here ({reason}); use --compile none") from None
    if backend != "inductor":
        return
    kind = _device(device).type
    if kind == "cpu" and _cxx_compiler() is None:
        raise SatkitError(f"--compile {mode}: torch.compile on the CPU needs a C++ compiler (none of g++, c++, "
                          "clang++ found, and CXX is not set); install one or use --compile none")
    if kind == "cuda" and importlib.util.find_spec("triton") is None:
        raise SatkitError(f"--compile {mode}: torch.compile on CUDA needs the triton package (it comes with "
                          "PyTorch's Linux CUDA wheels); install it or use --compile none")


def resolve_compile(requested: str, device: torch.device | str) -> str:
    """The compile mode to use: ``requested`` itself once :func:`check_compile` accepts it."""
    check_compile(requested, device)
    return requested


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def prepare_model(model: nn.Module, *, channels_last: bool, compile_mode: str = "none",
                  backend: str = "inductor") -> nn.Module:
    """The module to call for training: ``model`` in channels_last (in place: its 4-d
    parameters and buffers are re-laid, the module is the same object) and, unless
    ``compile_mode`` is "none", wrapped by ``torch.compile(mode=...)``.

    The compiled wrapper shares the parameters but its state_dict keys carry an
    ``_orig_mod.`` prefix: save, load and hand to the optimizer ``unwrap(result)`` (or the
    original ``model``). ``backend`` is torch.compile's (the tests use "eager", which
    traces without generating code).
    """
    check_compile(compile_mode, _model_device(model), backend)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile_mode == "none":
        return model
    return torch.compile(model, mode=None if compile_mode == "default" else compile_mode, backend=backend)


def unwrap(model: nn.Module) -> nn.Module:
    """The module under a torch.compile wrapper (itself when not compiled)."""
    return getattr(model, "_orig_mod", model)


def to_memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A 4-d batch in channels_last when asked (a copy only when it is not already);
    anything else unchanged. NCHW batches are never made contiguous here."""
    if channels_last and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def configure_backends(device: torch.device | str) -> dict[str, Any]:
    """Process-wide settings for speed on ``device``: on CUDA, cuDNN picks the fastest
    convolution algorithm per input shape (``torch.backends.cudnn.benchmark = True``; one
    extra tuning per new shape, such as a shorter last batch). Nothing on the CPU, whose
    results therefore stay as they were. Returns what was set."""
    if _device(device).type == "cuda":
        torch.backends.cudnn.benchmark = True
        return {"cudnn_benchmark": True}
    return {}


def describe(precision: str, channels_last: bool, compile_mode: str, *,
             requested: dict[str, Any] | None = None) -> dict[str, Any]:
    """What was resolved, for config.json: precision, the autocast dtype (None for fp32),
    whether a gradient scaler runs, channels_last, the compile mode, and (when given) what
    was asked for."""
    dtype = autocast_dtype(precision)
    out: dict[str, Any] = {
        "precision": precision,
        "autocast_dtype": None if dtype is None else str(dtype).replace("torch.", ""),
        "grad_scaler": precision == "fp16",
        "channels_last": bool(channels_last),
        "compile": compile_mode,
    }
    if requested is not None:
        out["requested"] = dict(requested)
    return out


@dataclass(frozen=True)
class Accel:
    """The resolved settings of one run on one device (see :func:`resolve`)."""

    device: torch.device
    precision: str
    channels_last: bool
    compile: str
    requested: tuple[tuple[str, Any], ...] = ()

    def autocast(self) -> ContextManager[Any]:
        """A fresh autocast context (nullcontext for fp32); the bound method is a factory."""
        return autocast_factory(self.precision, self.device)()

    def grad_scaler(self) -> Any:
        return make_grad_scaler(self.precision, self.device)

    def prepare(self, model: nn.Module, *, backend: str = "inductor") -> nn.Module:
        """configure_backends(device), then prepare_model with these settings."""
        configure_backends(self.device)
        return prepare_model(model, channels_last=self.channels_last, compile_mode=self.compile, backend=backend)

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        return to_memory_format(x, self.channels_last)

    def describe(self) -> dict[str, Any]:
        out = describe(self.precision, self.channels_last, self.compile,
                       requested=dict(self.requested) if self.requested else None)
        if self.device.type == "cuda":
            out["cudnn_benchmark"] = True
        return out


def resolve(device: torch.device | str, *, precision: str = "auto", channels_last: str | bool = "auto",
            compile: str = "none") -> Accel:
    """Resolve all three choices for ``device`` (each refused with one line if impossible)."""
    dev = _device(device)
    return Accel(
        device=dev,
        precision=resolve_precision(precision, dev),
        channels_last=resolve_channels_last(channels_last, dev),
        compile=resolve_compile(compile, dev),
        requested=(("precision", precision), ("channels_last", channels_last), ("compile", compile)),
    )


def backward_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: Any = None,
                  between: Callable[[], None] | None = None) -> None:
    """Backpropagate ``loss`` and take the optimizer step, through the fp16 gradient scaler
    when there is one (``make_grad_scaler``); ``between`` runs after the backward pass and
    before the step (Free-AT's perturbation update reads the input's gradient there). The
    caller zeroes the gradients."""
    if scaler is not None:
        scaler.scale(loss).backward()
        if between is not None:
            between()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if between is not None:
            between()
        optimizer.step()
