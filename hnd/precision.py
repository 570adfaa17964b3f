"""Mixed precision: the autocast dtype of each ``amp`` setting, and the layers kept in fp32.

On CPUs with AMX (Intel Sapphire Rapids and later), oneDNN runs bf16 convolutions several
times faster than fp32 ones. Its bf16 *strided depthwise* convolution is the exception when a
backward pass follows: forward plus backward of a 3x3, stride-2 depthwise conv on
[32, 116, 10, 10] took about 18x longer than in fp32 here. Such layers (ShuffleNet V2 and
MobileNet downsample with them) hold few MACs, so under CPU autocast they run in fp32 whenever
gradients will flow through them, and in bf16 otherwise (a frozen teacher, evaluation).
``bench/train_step.py --amp bf16`` shows the step times. Without AMX it depends on the maker:
on an Intel Xeon with AVX512-BF16, bf16 steps ran no faster than fp32 ones (HND 172 against
146 ms, KD 323 against 287); on an AMD EPYC (Zen 4) with AVX512-BF16 they ran 1.4-1.7x faster
(HND 99 against 164 ms, KD 174 against 273). So ``amp=auto`` takes bf16 on a CPU with AMX or
with AMD's AVX512-BF16.
"""

from __future__ import annotations

import types
import warnings

import torch
from torch import nn

from hnd.errors import HndError
from hnd.machine import cpu_flags, cpu_vendor

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
AMX_FLAG = "amx_bf16"  # the /proc/cpuinfo flag of CPUs whose bf16 convolutions beat fp32 ones
AVX512_BF16_FLAG = "avx512_bf16"  # ... and the flag that does so on AMD's CPUs (Zen 4 and later)


def _cpu_runs_bf16_fast() -> bool | None:
    """Whether oneDNN's bf16 convolutions beat fp32 ones on this CPU (see above); None where
    its flags cannot be read."""
    flags = cpu_flags()
    if flags is None:
        return None
    return AMX_FLAG in flags or (AVX512_BF16_FLAG in flags and cpu_vendor() == "AuthenticAMD")


def resolve_amp(amp: str, device: torch.device) -> str:
    """The autocast setting a run on ``device`` uses: ``auto`` is bf16 on a GPU that has it and on
    a CPU where it is faster (AMX, or AMD's AVX512-BF16), else none; any other setting is itself."""
    if amp != "auto":
        return amp
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "none"
    return "bf16" if device.type == "cpu" and _cpu_runs_bf16_fast() else "none"


def check_amp(amp: str, device: torch.device) -> None:
    """fp16 autocast needs CUDA; bf16 on a CPU where it is no faster than fp32 works: warn."""
    if device.type == "cuda" or amp in ("none", "auto"):
        return
    if amp == "fp16":
        raise HndError(f"amp=fp16 needs a CUDA device; use amp=bf16, auto or none on {device}")
    if device.type == "cpu" and _cpu_runs_bf16_fast() is False:
        warnings.warn("amp=bf16 on a CPU without AMX or AMD's AVX512-BF16 runs no faster than fp32; use amp=auto "
                      "or none here", stacklevel=2)


def _is_strided_depthwise(module: nn.Module) -> bool:
    return (isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels
            and max(module.stride) > 1)


def _forward(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad):
        with torch.autocast("cpu", enabled=False):  # a backward pass follows: fp32
            return conv._conv_forward(x.float(), conv.weight.float(),
                                      None if conv.bias is None else conv.bias.float())
    return conv._conv_forward(x, conv.weight, conv.bias)


def keep_fp32_layers(model: nn.Module, device: torch.device, amp: str) -> int:
    """Run ``model``'s strided depthwise convs in fp32 under bf16 autocast on a CPU where a backward
    pass follows (see above).

    Only those instances' ``forward`` changes: parameters, buffers and state-dict keys stay as
    they are. Returns how many convs were switched."""
    if device.type != "cpu" or resolve_amp(amp, device) != "bf16":
        return 0
    switched = 0
    for module in model.modules():
        if _is_strided_depthwise(module) and "forward" not in vars(module):
            module.forward = types.MethodType(_forward, module)
            switched += 1
    return switched
