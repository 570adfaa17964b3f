"""Facts about this machine for run records and device profiles, read once per process."""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path


@functools.lru_cache(maxsize=None)
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields in ``/proc/cpuinfo`` (Linux), read once; empty elsewhere."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():  # the first processor ends here
                break
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else what :mod:`platform` knows)."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_vendor() -> str | None:
    """The CPU's maker as ``/proc/cpuinfo`` names it (``GenuineIntel``, ``AuthenticAMD``); None where unknown."""
    return _cpuinfo().get("vendor_id")


def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags (``/proc/cpuinfo`` on x86 Linux); None where they cannot be read."""
    flags = _cpuinfo().get("flags")
    return None if flags is None else frozenset(flags.split())


def machine_facts() -> dict:
    """CPU model, core count, memory and GPUs of this machine, for run records (a copy)."""
    return dict(_facts())


@functools.lru_cache(maxsize=None)
def _facts() -> dict:
    import torch

    try:
        memory_gib = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        memory_gib = None
    gpus = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else [])
    return {"platform": platform.platform(), "cpu": cpu_model(), "cpus": os.cpu_count(), "memory_gib": memory_gib,
            "gpus": gpus}
