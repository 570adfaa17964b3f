"""What loading a model from its checkpoint costs: a plain build (its initial values drawn) then
the weights, against ``load_model`` (what ``create_model`` and every command use), which builds
without drawing them (``no_initial_values``) since the file gives every value.

    python bench/model_load.py [--models resnet152_head_mimic-ver2b-3ch densenet201 ...]

For each model: a random checkpoint is saved in a temporary folder, then per way the median of
three loads in seconds, and whether both ways give the same weights.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from hnd.checkpoints import load_model, read_checkpoint, save_checkpoint
from hnd.registry import resolve

MODELS = ["resnet152_head_mimic-ver2b-3ch", "densenet201_head_mimic-ver2b-3ch", "inception_v3_head_mimic-ver1b-3ch",
          "resnet50@layer2-3ch", "vgg16", "vit_b_16"]


def load(spec, ckpt, skip: bool) -> tuple[float, torch.nn.Module]:
    start = time.perf_counter()
    if skip:
        model = load_model(spec, ckpt)
    else:
        model = spec.build(pretrained=False)
        model.load_state_dict(ckpt.state_dict)
    return time.perf_counter() - start, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=MODELS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{'model':36s} {'build+load (s)':>14s} {'load_model (s)':>14s}  same weights")
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            spec = resolve(name)
            path = Path(folder) / "model.pt"
            part = "student" if spec.is_student else "teacher"
            save_checkpoint(path, spec, spec.build(pretrained=False), part=part)
            ckpt = read_checkpoint(path)
            times = {skip: [] for skip in (False, True)}
            models = {}
            for _ in range(3):
                for skip in (False, True):
                    seconds, models[skip] = load(spec, ckpt, skip)
                    times[skip].append(seconds)
            same = all(torch.equal(a, b) for a, b in zip(models[False].state_dict().values(),
                                                         models[True].state_dict().values()))
            print(f"{name:36s} {statistics.median(times[False]):14.3f} {statistics.median(times[True]):14.3f}  {same}")


if __name__ == "__main__":
    main()
