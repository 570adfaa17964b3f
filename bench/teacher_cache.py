"""How much the teacher-output cache saves: one training epoch of HND, AE and KD students with
the frozen teacher run every step, and with its outputs read from ``teacher_cache``.

    python bench/teacher_cache.py [--data DIR] [--teacher CKPT] [--epochs N] [--threads T]

Defaults: the `cpu` profile's generated data (made in a temporary folder when --data is not
given) and its shipped teacher, 80 px, channels-last, batch 32, 8 augmentation views, one thread
(as a book cell runs). Prints seconds and images per second per epoch, the one-time cost of filling the
cache and its size. Every run trains in its own temporary folder.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from hnd.config import experiment_config
from hnd.registry import resolve
from hnd.synth import ensure_synthetic_dataset
from hnd.training import fit, read_metrics

ROOT = Path(__file__).resolve().parent.parent
TEACHER = ROOT / "notebooks" / "teachers" / "shufflenet_v2_x1_0-synth10-80px"
STUDENT = {"pretrained": False, "input_size": 80, "channels_last": True, "batch_size": 32, "optimizer": "adam",
           "lr": 1e-3, "weight_decay": 0.0, "milestones": [], "num_workers": 0, "augment_views": 8}


def epoch_seconds(method: str, data: Path, teacher: Path, epochs: int, cache: Path | None, out: Path) -> dict:
    """Train ``epochs`` epochs; the mean seconds and images/s of an epoch."""
    overrides = {**STUDENT, "epochs": epochs, "teacher_checkpoint": str(teacher)}
    if cache is not None:
        overrides["teacher_cache"] = str(cache)
    config = experiment_config(resolve("shufflenet_v2_x1_0"), method, 3, overrides)
    start = time.perf_counter()
    fit(config, data, out, progress=False)
    lines = read_metrics(out)
    return {"epoch_s": sum(m["seconds"] for m in lines) / len(lines),
            "images_per_s": sum(m["images_per_s"] for m in lines) / len(lines),
            "total_s": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="dataset root (default: the cpu profile's, generated)")
    parser.add_argument("--teacher", default=str(TEACHER / "best.pt"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = Path(args.data) if args.data else Path(ensure_synthetic_dataset(
            tmp / "data", classes=10, train_per_class=136, val_per_class=50, image_size=110, seed=0)["root"])
        cache = tmp / "cache"
        start = time.perf_counter()
        # the first cached run fills the cache: its extra time is the one-time cost
        first = epoch_seconds("hnd", data, Path(args.teacher), 1, cache, tmp / "fill")
        fill = first["total_s"] - first["epoch_s"]
        size = sum(f.stat().st_size for f in cache.glob("*.pt")) / 2**20
        print(f"cache filled in {fill:.1f} s (with one epoch: {time.perf_counter() - start:.1f} s), {size:.0f} MiB")
        rows = []
        for method in ("hnd", "ae", "kd"):
            plain = epoch_seconds(method, data, Path(args.teacher), args.epochs, None, tmp / f"{method}-plain")
            cached = epoch_seconds(method, data, Path(args.teacher), args.epochs, cache, tmp / f"{method}-cached")
            rows.append({"method": method, "plain_epoch_s": round(plain["epoch_s"], 2),
                         "cached_epoch_s": round(cached["epoch_s"], 2),
                         "speedup": round(plain["epoch_s"] / cached["epoch_s"], 2)})
            print(f"{method:4s} epoch: teacher run every step {plain['epoch_s']:6.2f} s "
                  f"({plain['images_per_s']:.0f} images/s), cached {cached['epoch_s']:6.2f} s "
                  f"({cached['images_per_s']:.0f} images/s): {rows[-1]['speedup']:.2f}x", flush=True)
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
