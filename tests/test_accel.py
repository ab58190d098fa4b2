"""sattrain.accel: precision, channels_last and compile resolution, and that each changes
how a model runs but not what it computes (beyond the precision asked for)."""

from __future__ import annotations

import copy
import warnings
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

from satdata.errors import SatkitError
from sattrain import accel
from sattrain.accel import (
    Accel,
    autocast_dtype,
    autocast_factory,
    check_compile,
    describe,
    make_grad_scaler,
    prepare_model,
    resolve,
    resolve_channels_last,
    resolve_precision,
    to_memory_format,
    unwrap,
)
from sattrain.data import Batch
from sattrain.methods import StepContext, get_method
from sattrain.models import create_model
from sattrain.perturb import sat_perturb

CPU, CUDA, META = torch.device("cpu"), torch.device("cuda"), torch.device("meta")


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """A CUDA device of a chosen compute capability, without a GPU: only the capability and
    the name are asked of torch.cuda by the resolution rules."""
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_a, **_k: "Fake GPU")

    def set_capability(major: int, minor: int = 0) -> None:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_a, **_k: (major, minor))

    return set_capability


# --------------------------------------------------------------------------- precision


def test_precision_on_the_cpu() -> None:
    assert resolve_precision("auto", CPU) == "fp32"  # CPU results unchanged by default
    assert resolve_precision("fp32", CPU) == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"  # on request only
    with pytest.raises(SatkitError, match="--precision fp16: .*CUDA"):
        resolve_precision("fp16", CPU)


@pytest.mark.parametrize("bad", ["fp64", "half", "", "AUTO"])
def test_unknown_precision_is_refused(bad: str) -> None:
    with pytest.raises(SatkitError, match="--precision: unknown precision"):
        resolve_precision(bad, CPU)


def test_precision_on_cuda_by_capability(fake_cuda) -> None:  # type: ignore[no-untyped-def]
    fake_cuda(9, 0)  # H100/H200
    assert resolve_precision("auto", CUDA) == "bf16"
    assert resolve_precision("fp16", CUDA) == "fp16"
    assert resolve_precision("bf16", "cuda:0") == "bf16"
    assert resolve_precision("fp32", CUDA) == "fp32"
    fake_cuda(8, 0)  # A100
    assert resolve_precision("auto", CUDA) == "bf16"
    fake_cuda(7, 5)  # T4: no native bfloat16
    assert resolve_precision("auto", CUDA) == "fp16"
    assert resolve_precision("fp16", CUDA) == "fp16"
    with pytest.raises(SatkitError, match="--precision bf16: Fake GPU has no native bfloat16"):
        resolve_precision("bf16", CUDA)


def test_rocm_counts_as_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.version, "hip", "6.2", raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_a, **_k: (1, 0))
    assert resolve_precision("auto", CUDA) == "bf16"


def test_precision_on_other_devices() -> None:
    assert resolve_precision("auto", META) == "fp32"
    for p in ("fp16", "bf16"):
        with pytest.raises(SatkitError, match=f"--precision {p}: .*not for meta"):
            resolve_precision(p, META)


def test_autocast_factory() -> None:
    f = autocast_factory("fp32", CPU)
    assert f is nullcontext and isinstance(f(), nullcontext)
    assert autocast_dtype("fp32") is None and autocast_dtype("bf16") is torch.bfloat16
    with pytest.raises(SatkitError):
        autocast_dtype("auto")  # only resolved precisions
    f = autocast_factory("bf16", CPU)
    a, b = f(), f()
    assert a is not b  # a fresh context per use
    x, w = torch.rand(4, 8), torch.rand(8, 3)
    with f():
        assert (x @ w).dtype is torch.bfloat16
    assert (x @ w).dtype is torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that CUDA is absent; the object is all we look at
        c = autocast_factory("fp16", CUDA)()
    assert isinstance(c, torch.autocast) and c.device == "cuda" and c.fast_dtype is torch.float16


def test_scaler_only_for_fp16() -> None:
    assert make_grad_scaler("fp32", CPU) is None
    assert make_grad_scaler("bf16", CPU) is None
    assert make_grad_scaler("bf16", CUDA) is None
    assert make_grad_scaler("fp32", CUDA) is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "CUDA is not available, disabling" on a machine without one
        s = make_grad_scaler("fp16", CUDA)
    assert isinstance(s, torch.amp.GradScaler)
    with pytest.raises(SatkitError, match="--precision fp16"):
        make_grad_scaler("fp16", CPU)


# --------------------------------------------------------------------------- channels_last


def test_channels_last_resolution() -> None:
    assert resolve_channels_last("auto", CUDA) is True
    assert resolve_channels_last("auto", CPU) is False
    assert resolve_channels_last("on", CPU) is True and resolve_channels_last("off", CUDA) is False
    assert resolve_channels_last(True, CPU) is True and resolve_channels_last(False, CUDA) is False
    with pytest.raises(SatkitError, match="--channels-last: unknown value 'yes'"):
        resolve_channels_last("yes", CPU)


def test_to_memory_format() -> None:
    x = torch.rand(2, 3, 5, 5)
    y = to_memory_format(x, True)
    assert y.is_contiguous(memory_format=torch.channels_last) and torch.equal(x, y)
    assert to_memory_format(y, True) is y  # already: no copy
    assert to_memory_format(x, False) is x
    assert to_memory_format(y, False) is y  # never forced back to NCHW here
    v = torch.rand(4, 3)
    assert to_memory_format(v, True) is v


@pytest.mark.parametrize("name", ["resnet10", "small-cnn"])
def test_channels_last_model_computes_the_same(name: str) -> None:
    """Outputs and weight gradients of a channels_last model equal the NCHW model's. In float64,
    so that the two layouts' different summation orders cannot flip a ReLU near 0 (in float32
    one flip in a batch of 4 moves an early layer's gradient by a few percent)."""
    torch.manual_seed(0)
    ref = create_model(name, 10).double()
    model = copy.deepcopy(ref)
    out_model = prepare_model(model, channels_last=True)
    assert out_model is model  # re-laid in place, the same module
    convs = [p for p in model.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert not any(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                   for p in ref.parameters())  # the reference stayed NCHW
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3])
    for m in (ref, model):
        m.train()
    a = ref(x)
    b = model(to_memory_format(x, True))
    torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    F.cross_entropy(a, y).backward()
    F.cross_entropy(b, y).backward()
    for (n1, p1), (_n2, p2) in zip(ref.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(p2.grad, p1.grad, rtol=1e-9, atol=1e-12, msg=n1)
    # and in float32, in eval mode (no batch statistics), the outputs agree to float32's rounding
    ref32, m32 = ref.float().eval(), model.float().eval()
    with torch.no_grad():
        torch.testing.assert_close(m32(to_memory_format(x.float(), True)), ref32(x.float()), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- compile


def test_compile_modes_checked() -> None:
    check_compile("none", CPU)
    with pytest.raises(SatkitError, match="--compile: unknown mode 'fast'"):
        check_compile("fast", CPU)
    with pytest.raises(SatkitError, match="--compile: unknown mode"):
        prepare_model(create_model("small-cnn", 10), channels_last=False, compile_mode="fast")


def test_compile_refused_without_a_cxx_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accel, "_cxx_compiler", lambda: None)
    with pytest.raises(SatkitError, match="--compile default: torch.compile on the CPU needs a C\\+\\+ compiler"):
        check_compile("default", CPU)
    check_compile("default", CPU, backend="eager")  # eager generates no code
    check_compile("none", CPU)


def test_compile_refused_without_triton_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else real(name, *a))
    with pytest.raises(SatkitError, match="--compile max-autotune: torch.compile on CUDA needs the triton package"):
        check_compile("max-autotune", CUDA)


def test_compile_refused_where_dynamo_is_unsupported(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch._dynamo as dynamo

    def unsupported() -> None:
        raise RuntimeError("Python 3.99+ not yet supported for torch.compile\nsecond line")

    monkeypatch.setattr(dynamo.eval_frame, "check_if_dynamo_supported", unsupported, raising=False)
    monkeypatch.setattr(dynamo, "is_dynamo_supported", lambda: False, raising=False)
    with pytest.raises(SatkitError, match=r"--compile default: torch.compile is unavailable here \(Python 3.99"):
        check_compile("default", CPU)


def test_compiled_model_is_a_wrapper_sharing_the_weights() -> None:
    """torch.compile for real (TorchDynamo traces the model), with the "eager" backend so that
    no C++ is generated: the inductor build of even a small CNN takes over 30 s on two cores."""
    torch.manual_seed(0)
    model = create_model("small-cnn", 10).eval()
    compiled = prepare_model(model, channels_last=True, compile_mode="default", backend="eager")
    assert compiled is not model and unwrap(compiled) is model and unwrap(model) is model
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    assert list(unwrap(compiled).state_dict()) == list(model.state_dict())
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(compiled(to_memory_format(x, True)), model(x), rtol=1e-4, atol=1e-5)
    # the same parameters: a step through the wrapper moves the original's weights
    before = next(model.parameters()).detach().clone()
    opt = torch.optim.SGD(unwrap(compiled).parameters(), lr=0.1)
    compiled.train()
    F.cross_entropy(compiled(x), torch.tensor([0, 1, 2])).backward()
    opt.step()
    assert not torch.equal(next(model.parameters()), before)


# --------------------------------------------------------------------------- all together


def test_resolve_and_describe_on_the_cpu() -> None:
    acc = resolve("cpu")
    assert acc == Accel(CPU, "fp32", False, "none", acc.requested)
    d = acc.describe()
    assert d == {"precision": "fp32", "autocast_dtype": None, "grad_scaler": False, "channels_last": False,
                 "compile": "none", "requested": {"precision": "auto", "channels_last": "auto", "compile": "none"}}
    assert acc.grad_scaler() is None and isinstance(acc.autocast(), nullcontext)
    x = torch.rand(2, 3, 4, 4)
    assert acc.batch(x) is x
    m = create_model("small-cnn", 10)
    assert acc.prepare(m) is m
    assert describe("bf16", True, "default") == {"precision": "bf16", "autocast_dtype": "bfloat16",
                                                 "grad_scaler": False, "channels_last": True, "compile": "default"}
    with pytest.raises(SatkitError, match="--precision fp16"):
        resolve("cpu", precision="fp16")
    with pytest.raises(SatkitError, match="--compile"):
        resolve("cpu", compile="turbo")


def test_resolve_on_cuda_records_the_choices(fake_cuda) -> None:  # type: ignore[no-untyped-def]
    fake_cuda(9, 0)
    acc = resolve(CUDA, precision="auto", channels_last="auto", compile="none")
    assert (acc.precision, acc.channels_last, acc.compile) == ("bf16", True, "none")
    d = acc.describe()
    assert d["precision"] == "bf16" and d["channels_last"] is True and d["cudnn_benchmark"] is True
    assert d["requested"]["precision"] == "auto"
    fake_cuda(7, 0)
    acc = resolve(CUDA, channels_last="off")
    assert (acc.precision, acc.channels_last) == ("fp16", False)
    assert acc.describe()["grad_scaler"] is True


@pytest.mark.parametrize("method", ["sat", "pgd"])
def test_a_bf16_channels_last_step_on_the_cpu(method: str) -> None:
    """The trainer's pieces under --precision bf16 --channels-last on, on the CPU: the SAT
    batch keeps channels_last, the method (an attack included) runs under autocast, the
    loss is finite, and a step changes the weights."""
    torch.manual_seed(0)
    acc = resolve("cpu", precision="bf16", channels_last="on")
    model = acc.prepare(create_model("resnet10", 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(3)
    x = acc.batch(torch.rand(4, 3, 16, 16, generator=g))
    S = torch.rand(4, 1, 16, 16, generator=g) * 2 - 1
    assert sat_perturb(x, S, eps=8 / 255, p=0.5, generator=g).is_contiguous(memory_format=torch.channels_last)
    batch = Batch(x, torch.tensor([0, 1, 2, 3]), S)
    ctx = StepContext(epoch=3, p=0.5, eps0=8 / 255, eps=8 / 255, step_size=2 / 255, steps=2, beta=None,
                      multilabel=False, generator=g, coin=torch.Generator().manual_seed(0))
    before = [p.detach().clone() for p in model.parameters()]
    with acc.autocast():
        res = get_method(method).fn(model, batch, ctx)
    assert res.logits.dtype is torch.bfloat16  # the forward pass ran in bf16
    assert torch.isfinite(res.loss)
    opt.zero_grad(set_to_none=True)
    res.loss.backward()
    opt.step()
    assert all(p.dtype is torch.float32 for p in model.parameters())  # weights stay float32
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
