"""Mixed precision on the CPU: bf16 autocast keeps strided depthwise convs in fp32 where a
backward pass follows."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import hnd.machine
import hnd.precision
from hnd.precision import check_amp, keep_fp32_layers, resolve_amp

from conftest import error

CPU = torch.device("cpu")


def _layers() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False),  # 0: strided depthwise: fp32
        nn.Conv2d(8, 8, 3, stride=1, padding=1, groups=8),              # 1: depthwise, stride 1: bf16
        nn.Conv2d(8, 16, 3, stride=2, padding=1),                       # 2: strided, dense: bf16
        nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=4),            # 3: strided, grouped: bf16
        nn.Conv2d(16, 32, 3, stride=(1, 2), padding=1, groups=16),      # 4: depthwise multiplier 2, strided: fp32
    )


def test_only_strided_depthwise_convs_run_in_fp32_when_they_will_be_differentiated():
    model = _layers()
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    assert keep_fp32_layers(model, CPU, "bf16") == 2
    assert keep_fp32_layers(model, CPU, "bf16") == 0  # switched once only
    x = torch.randn(2, 8, 16, 16)
    fp32 = nn.functional.conv2d(x, model[0].weight, stride=2, padding=1, groups=8)
    dtypes = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for layer in model:
            y = layer(x)
            if layer is model[0]:
                assert torch.equal(y, fp32)  # exactly the fp32 convolution, not a bf16 one
            dtypes.append(y.dtype)
            x = y
    assert dtypes == [torch.float32, torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.float32]
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():  # no backward: bf16 is fast
        assert model[0](torch.randn(2, 8, 16, 16)).dtype == torch.bfloat16
    state = model.state_dict()
    assert state.keys() == keys.keys() and all(torch.equal(state[k], keys[k]) for k in keys)


def test_gradients_flow_through_the_fp32_convs():
    model = _layers()
    keep_fp32_layers(model, CPU, "bf16")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(2, 8, 16, 16)).float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0
               for p in model.parameters())


def test_nothing_changes_without_bf16_on_a_cpu():
    model = _layers()
    assert keep_fp32_layers(model, CPU, "none") == 0
    assert keep_fp32_layers(model, torch.device("cuda"), "bf16") == 0
    assert not any("forward" in vars(m) for m in model.modules())


INTEL, AMD = "GenuineIntel", "AuthenticAMD"
# (vendor, flags, auto's precision): bf16 where its convolutions were measured faster than fp32
CPUS = [(INTEL, {"avx2", "fma"}, "none"), (INTEL, {"avx512f", "avx512_bf16"}, "none"),
        (INTEL, {"amx_bf16", "amx_tile"}, "bf16"), (AMD, {"avx2", "fma"}, "none"),
        (AMD, {"avx512f", "avx512_bf16"}, "bf16"), (None, None, "none")]


def _on_cpu(monkeypatch, vendor, flags):
    monkeypatch.setattr(hnd.precision, "cpu_flags", lambda: None if flags is None else frozenset(flags))
    monkeypatch.setattr(hnd.precision, "cpu_vendor", lambda: vendor)


@pytest.mark.parametrize("vendor, flags, auto", CPUS)
def test_bf16_on_a_cpu_where_it_is_no_faster_warns(vendor, flags, auto, monkeypatch):
    _on_cpu(monkeypatch, vendor, flags)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_amp("bf16", CPU)
        check_amp("none", CPU)
        check_amp("auto", CPU)
    warns = flags is not None and auto == "none"
    assert [str(w.message) for w in caught] == (
        ["amp=bf16 on a CPU without AMX or AMD's AVX512-BF16 runs no faster than fp32; use amp=auto or none here"]
        if warns else [])


@pytest.mark.parametrize("vendor, flags, auto", CPUS)
def test_auto_takes_bf16_on_a_cpu_where_it_is_faster(vendor, flags, auto, monkeypatch):
    _on_cpu(monkeypatch, vendor, flags)
    assert resolve_amp("auto", CPU) == auto
    assert [resolve_amp(a, CPU) for a in ("none", "bf16", "fp16")] == ["none", "bf16", "fp16"]
    # the strided depthwise convs switch exactly where auto means bf16
    assert (keep_fp32_layers(_layers(), CPU, "auto") > 0) == (auto == "bf16")


def test_fp16_needs_cuda():
    assert error(check_amp, "fp16", CPU) == "amp=fp16 needs a CUDA device; use amp=bf16, auto or none on cpu"


def test_cpu_model_and_flags_come_from_the_first_processor_of_cpuinfo(tmp_path, monkeypatch):
    (tmp_path / "cpuinfo").write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: Test CPU 9000\n"
                                      "flags\t\t: fpu avx2 amx_bf16\n\n"
                                      "processor\t: 1\nmodel name\t: Other\nflags\t\t: fpu\n")
    monkeypatch.setattr(hnd.machine, "Path", lambda _: tmp_path / "cpuinfo")
    hnd.machine._cpuinfo.cache_clear()
    try:
        assert hnd.machine.cpu_model() == "Test CPU 9000"
        assert hnd.machine.cpu_vendor() == "AuthenticAMD"
        assert hnd.machine.cpu_flags() == frozenset({"fpu", "avx2", "amx_bf16"})
        (tmp_path / "cpuinfo").write_text("processor\t: 0\nFeatures\t: fp asimd\n")  # an ARM board: no flags line
        hnd.machine._cpuinfo.cache_clear()
        assert hnd.machine.cpu_flags() is None and hnd.machine.cpu_model()
        assert hnd.machine.cpu_vendor() is None
    finally:
        hnd.machine._cpuinfo.cache_clear()
