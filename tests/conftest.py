"""Shared fixtures: an isolated torch cache with generated "pretrained" weights, images."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from hnd.errors import HndError
from hnd.teachers import TEACHERS, teacher_spec, weights_path

PAPER_TEACHERS = ["densenet169", "densenet201", "resnet152", "inception_v3"]
OFFICIAL_STUDENTS = [
    f"{t}_head_mimic-ver{'1b' if t == 'inception_v3' else '2b'}-{c}ch"
    for t in PAPER_TEACHERS for c in (3, 6, 9, 12)
]


@pytest.fixture(scope="session", autouse=True)
def torch_home(tmp_path_factory) -> Path:
    """Every test sees an empty torch cache of its own and never downloads."""
    home = tmp_path_factory.mktemp("torch_home")
    old = {k: os.environ.get(k) for k in ("TORCH_HOME", "HND_OFFLINE")}
    os.environ["TORCH_HOME"] = str(home)
    os.environ["HND_OFFLINE"] = "1"
    yield home
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def random_teacher_state(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state_dict laid out like torchvision's published file for teacher ``name``
    (Inception-v3 with its auxiliary classifier; DenseNets with the old 'norm.1' keys)."""
    spec = teacher_spec(name)
    kwargs = {"aux_logits": True, "init_weights": False} if spec.family == "inception" else {}
    model = spec.builder(weights=None, **kwargs)
    randomize(model, seed)
    state = model.state_dict()
    if spec.family == "densenet":  # torchvision's DenseNet files predate num_batches_tracked
        state = {_old_densenet_key(k): v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    return state


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Give every float tensor (BN statistics too) distinct random values: vectors near 1,
    weights small and centred, so that deep tails stay finite."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for v in module.state_dict().values():
            if v.is_floating_point():
                u = torch.rand(v.shape, generator=g)
                v.copy_(0.9 + 0.1 * u if v.ndim == 1 else 0.1 * (u - 0.5))


def _old_densenet_key(key: str) -> str:
    for part in ("norm1", "relu1", "conv1", "norm2", "relu2", "conv2"):
        key = key.replace(f".{part}.", f".{part[:-1]}.{part[-1]}.")
    return key


@pytest.fixture(scope="session")
def pretrained(torch_home):
    """Call ``pretrained(name)`` to put generated weights for teacher ``name`` in the cache;
    returns the state_dict written (old DenseNet keys as in the real files)."""
    written: dict[str, dict] = {}

    def make(name: str) -> dict:
        assert name in TEACHERS
        if name not in written:
            state = random_teacher_state(name)
            path = weights_path(name)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(state, path)
            written[name] = state
        return written[name]

    return make


@pytest.fixture(scope="session")
def image_file(tmp_path_factory) -> Path:
    """A 320x240 RGB JPEG with some structure."""
    path = tmp_path_factory.mktemp("images") / "photo.jpg"
    g = torch.Generator().manual_seed(1)
    pixels = (torch.rand(240, 320, 3, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(path, quality=90)
    return path


def error(fn, *args, **kwargs) -> str:
    """The message of the HndError that ``fn(*args, **kwargs)`` raises; it must be one line."""
    with pytest.raises(HndError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message
    return message
