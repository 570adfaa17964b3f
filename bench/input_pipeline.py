"""Is training input-bound? Images/s of the training input pipeline per loader worker, next to
the training step's images/s of each method on the same device.

HND trains a small head against a frozen teacher head, so its step is cheap and the input
pipeline (JPEG decode + augmentation on the CPU) may be what limits it. For each decoder this
measures one worker (one process, one thread) turning JPEG files into augmented, normalized
[3, S, S] tensors with the training transform of the original (warp to S, resize, random crop,
flip):

- ``pil``: Pillow decode + the transforms on PIL images (``hnd.data``'s ``decoder=pil``, the
  default);
- ``torchvision``: ``torchvision.io`` decode on the CPU + the same transforms on uint8 tensors
  (``decoder=torchvision``);
- ``cuda`` (with a GPU): ``decode_jpeg(device="cuda")`` on batches, then the same transforms
  there.

The JPEGs are the photographs bundled with scikit-image and matplotlib, resized to ImageNet's
typical 500x375 and saved at quality 90. Then, unless ``--no-steps``, it times the training
step of naive, KD and HND for ``--model`` (``bench/train_step.py``'s measurement, random
weights) and prints how many workers each method needs not to wait for its input.
Run from the repository root:
    python bench/input_pipeline.py [--model densenet169] [--images 64] [--device auto] [--json FILE]
"""

from __future__ import annotations

import argparse
import io
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torchvision import io as tvio

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/train_step.py

from hnd.book.photographs import reference_photographs  # noqa: E402
from hnd.data import read_image, train_transform  # noqa: E402
from hnd.registry import resolve  # noqa: E402
from hnd.distributed import pick_device  # noqa: E402
from hnd.errors import HndError  # noqa: E402


def write_jpegs(folder: Path, count: int) -> list[Path]:
    """``count`` JPEGs of ImageNet's typical size from the bundled photographs."""
    photos = list(reference_photographs().values())
    paths = []
    for i in range(count):
        image = photos[i % len(photos)].convert("RGB").resize((500, 375), Image.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        path = folder / f"{i:04d}.jpg"
        path.write_bytes(buffer.getvalue())
        paths.append(path)
    return paths


def per_worker(paths: list[Path], load, rounds: int) -> float:
    """Images/s of one worker over ``paths`` (median of ``rounds`` passes)."""
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for path in paths:
            out = load(path)
        assert out.shape[0] == 3
        times.append(time.perf_counter() - start)
    return len(paths) / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="densenet169", help="teacher whose input size and students to use")
    parser.add_argument("--images", type=int, default=64, help="JPEG files per pass (default 64)")
    parser.add_argument("--rounds", type=int, default=3, help="passes per decoder; the median counts (default 3)")
    parser.add_argument("--device", default="auto", help="device of the training steps (and CUDA decoding)")
    parser.add_argument("--batch-size", type=int, help="training step batch (default 32 on CUDA, 4 on CPU)")
    parser.add_argument("--no-steps", action="store_true", help="measure the input pipeline only")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    try:
        device = pick_device(args.device)
        spec = resolve(args.model)
        size, resize = spec.input_size, spec.resize_size
    except HndError as exc:
        parser.error(str(exc))
    torch.set_num_threads(1)  # one loader worker: one process, one thread
    rates: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(Path(tmp), args.images)
        for decoder in ("pil", "torchvision"):  # hnd.data's two decoders, as a loader worker runs them
            transform = train_transform(spec, "original", decoder=decoder)
            rates[decoder] = per_worker(paths, lambda p: transform(read_image(p, decoder)), args.rounds)
        if device.type == "cuda":
            gpu_transform = train_transform(spec, "original", decoder="torchvision")  # runs where its input is
            datas = [tvio.read_file(str(p)) for p in paths]
            for _ in range(2):  # warm up the decoder
                tvio.decode_jpeg(datas[:8], device=device)
            times = []
            for _ in range(args.rounds):
                torch.cuda.synchronize(device)
                start = time.perf_counter()
                images = tvio.decode_jpeg(datas, device=device, mode=tvio.ImageReadMode.RGB)
                batch = torch.stack([gpu_transform(x) for x in images])
                torch.cuda.synchronize(device)
                times.append(time.perf_counter() - start)
            assert batch.shape[1] == 3
            rates["cuda"] = len(paths) / statistics.median(times)
    print(f"input pipeline, {args.model} training transform at {size} px (resize {resize}), "
          f"{args.images} JPEGs of 500x375, one worker, one thread:")
    for name, ips in rates.items():
        print(f"  {name:12s} {ips:8.1f} images/s per worker" + ("" if name == "pil" else
                                                                 f"  ({ips / rates['pil']:.2f}x PIL)"))
    doc = {"model": args.model, "input_size": size, "per_worker_images_per_s": rates}
    if not args.no_steps:
        import train_step

        batch = args.batch_size or (32 if device.type == "cuda" else 4)
        rows = []
        for method in ("naive", "kd", "hnd"):
            case = {"model": args.model, "method": method, "channels": 12, "batch": batch,
                    "input_size": size, "device": str(device), "amp": None, "channels_last": False,
                    "steps": 5 if device.type == "cuda" else 2, "warmup": 2 if device.type == "cuda" else 1}
            rows.append(train_step.run_case(case))
        print(f"\ntraining step on {device} (batch {batch}) and the PIL / torchvision workers it needs:")
        for row in rows:
            if "error" in row:
                print(f"  {row['method']:6s} error: {row['error']}")
                continue
            need = {k: math.ceil(row["images_per_s"] / v) for k, v in rates.items() if k != "cuda"}
            print(f"  {row['method']:6s} {row['images_per_s']:8.1f} images/s  -> workers: "
                  + ", ".join(f"{k} {n}" for k, n in need.items()))
        doc["steps"] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
