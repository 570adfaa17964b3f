"""Process groups for ``torchrun``: gloo on CPU, NCCL on CUDA; a no-op in a single process.

``torchrun --nproc_per_node N -m hnd train ...`` sets RANK, WORLD_SIZE and LOCAL_RANK;
without them every helper here behaves as for one process (the original called
``dist.barrier()`` unconditionally and crashed there).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import nn

from hnd.errors import HndError


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Only the main process writes files and prints progress."""
        return self.rank == 0


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    """``auto`` → this process's GPU if there is one, else the CPU; ``cuda`` without a GPU is an error."""
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(preference)
    except RuntimeError:
        raise HndError(f"unknown device {preference!r}; valid: auto, cpu, cuda, cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise HndError(f"device {preference} requested but CUDA is not available; use device=cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    elif device.type != "cpu":
        raise HndError(f"unsupported device {preference!r}; valid: auto, cpu, cuda, cuda:N")
    return device


def setup(preference: str = "auto") -> tuple[Dist, torch.device]:
    """Join the process group torchrun describes in the environment (if any) and pick the device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    info = Dist(int(os.environ.get("RANK", "0")), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    device = pick_device(preference, info.local_rank)
    if info.enabled and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info, device


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over all processes (float64); unchanged in one process."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """The main process's ``flag`` on every process (e.g. 'this epoch was the best')."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.broadcast(t, 0)
    return bool(t.item())


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics span the batches of all processes, on any backend
    (torch's SyncBatchNorm is CUDA-only). Gradients flow through the all-reduce, so a run of
    N processes with batch B equals one process with batch N·B."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized()):
            return super().forward(x)
        count = torch.full_like(x[0, :, 0, 0], x.numel() / x.shape[1])
        stats = torch.stack([x.sum((0, 2, 3)), x.square().sum((0, 2, 3)), count])  # [3, C]
        with warnings.catch_warnings():  # its replacement is private API; this one still works
            warnings.simplefilter("ignore", FutureWarning)
            total, total_sq, n = dist_nn.all_reduce(stats)  # summed over processes, differentiable
        mean = total / n
        var = total_sq / n - mean.square()  # biased, as BatchNorm normalizes with
        if self.track_running_stats:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 1 / (int(self.num_batches_tracked) + 1)
                self.running_mean.lerp_(mean, m)
                self.running_var.lerp_(var * n / (n - 1), m)
                self.num_batches_tracked += 1
        shape = (1, -1, 1, 1)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Make ``module``'s BatchNorm layers use statistics over all processes (in place):
    torch's SyncBatchNorm on CUDA, :class:`GlobalBatchNorm2d` elsewhere."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            new = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                    child.track_running_stats).to(next(child.buffers()).device)
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            setattr(module, name, new)
        else:
            sync_batchnorm(child, device)
    return module
