"""Shared fixtures: an isolated torch cache with generated "pretrained" weights, images, and
the training tests' generated dataset and teacher."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from hnd.config import resolve_config
from hnd.errors import HndError
from hnd.registry import resolve
from hnd.synth import write_synthetic_dataset
from hnd.teachers import teacher_spec, weights_path
from hnd.training import fit

if os.environ.get("PYTEST_XDIST_WORKER"):  # one test process per core: one thread each, subprocesses too
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

PAPER_TEACHERS = ["densenet169", "densenet201", "resnet152", "inception_v3"]
OFFICIAL_STUDENTS = [
    f"{t}_head_mimic-ver{'1b' if t == 'inception_v3' else '2b'}-{c}ch"
    for t in PAPER_TEACHERS for c in (3, 6, 9, 12)
]
# The training tests' teacher and student, tiny and quick: 64-px inputs, 4 classes, no worker processes.
TEACHER = "resnet18"
STUDENT = "resnet18@layer2-3ch"
TINY = ["input_size=64", "batch_size=8", "eval_batch_size=16", "num_workers=0", "holdout_per_class=2",
        "milestones=[1]"]


@pytest.fixture(scope="session", autouse=True)
def torch_home(tmp_path_factory) -> Path:
    """Every test sees an empty torch cache (and Hugging Face cache, where timm's weights go)
    of its own and never downloads."""
    home = tmp_path_factory.mktemp("torch_home")
    old = {k: os.environ.get(k) for k in ("TORCH_HOME", "HF_HUB_CACHE", "HND_OFFLINE")}
    os.environ["TORCH_HOME"] = str(home)
    os.environ["HF_HUB_CACHE"] = str(home / "huggingface")
    os.environ["HND_OFFLINE"] = "1"
    yield home
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def synth(tmp_path_factory) -> Path:
    """A generated 4-class dataset of 64-px images (16 training and 4 validation per class)."""
    return Path(write_synthetic_dataset(tmp_path_factory.mktemp("data") / "synth", classes=4, train_per_class=16,
                                        val_per_class=4, image_size=64, seed=0)["root"])


@pytest.fixture(scope="session")
def teacher_ckpt(synth, tmp_path_factory) -> Path:
    """A 4-class ResNet-18 teacher trained from scratch for one epoch (the CPU profile's start)."""
    out = tmp_path_factory.mktemp("runs") / "teacher"
    config = resolve_config(resolve(TEACHER), "teacher", None, [*TINY, "pretrained=false", "epochs=1", "lr=0.002"])
    fit(config, synth, out, progress=False)
    return out / "best.pt"


@contextmanager
def parameters_on_meta():
    """Inside, every parameter a module registers lives on the ``meta`` device (no memory, no
    initialisation cost) while buffers stay real: index tables computed at construction
    (Swin's and MaxViT's ``relative_position_index``) keep their values, which ``to_empty``
    would replace by garbage."""
    register = nn.Module.register_parameter

    def on_meta(self, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(self, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def empty_build(build: Callable[[], nn.Module]) -> nn.Module:
    """``build()`` with its parameters allocated on the CPU but not initialised (fast even for
    600M weights); buffers are as the builder made them. Fill it before use."""
    with parameters_on_meta():
        model = build()
    made: dict[int, nn.Parameter] = {}  # tied parameters stay tied
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None and p.is_meta:
                if id(p) not in made:
                    made[id(p)] = nn.Parameter(torch.empty_like(p, device="cpu"), requires_grad=p.requires_grad)
                module._parameters[name] = made[id(p)]
    return model


_POOL = 65_537  # a prime: tiled pools do not line up with rows or channels


def _fill(v: torch.Tensor, low: float, high: float, g: torch.Generator) -> None:
    """``v`` uniform in [low, high): drawn directly when small, else a drawn pool of ``_POOL``
    values tiled over it (a memory copy: 600M-weight models fill in about a second)."""
    flat = v.view(-1)
    if flat.numel() <= _POOL:
        flat.uniform_(low, high, generator=g)
        return
    pool = torch.empty(_POOL).uniform_(low, high, generator=g)
    rows = flat.numel() // _POOL
    flat[:rows * _POOL].view(rows, _POOL).copy_(pool.expand(rows, _POOL))
    flat[rows * _POOL:].copy_(pool[:flat.numel() - rows * _POOL])


def random_build(build: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    """``build()`` with random weights that carry the input's signal through any depth, in eval
    mode: weights uniform with variance 1/fan_in, norm weights and variances in [0.5, 1.5],
    biases and means small and centred (:func:`randomize`'s near-1 vectors make deep outputs
    almost input-independent). Quick: parameters are allocated, never initialised, then filled."""
    model = empty_build(build)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, v in model.state_dict().items():
            if not v.is_floating_point():
                continue
            if v.ndim >= 2:
                bound = (3 / max(1, v[0].numel())) ** 0.5
                _fill(v, -bound, bound, g)
            elif name.endswith(("running_var", "weight")):
                _fill(v, 0.5, 1.5, g)
            else:
                _fill(v, -0.1, 0.1, g)
    return model.eval()


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Give every float tensor (BN statistics too) distinct random values: vectors near 1,
    weights small and centred, so that deep tails stay finite."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for v in module.state_dict().values():
            if v.is_floating_point():  # in place: one pass over the memory (models of 600M weights)
                v.uniform_(0.9, 1.0, generator=g) if v.ndim == 1 else v.uniform_(-0.05, 0.05, generator=g)


def torchvision_file_kwargs(name: str) -> dict:
    """Builder arguments that lay a model out like torchvision's published weights file for
    teacher ``name``: Inception-v3 and GoogLeNet with their auxiliary classifiers, vision
    transformers at the spec's input size (their position embeddings depend on it)."""
    spec = teacher_spec(name)
    if spec.family in ("inception", "googlenet"):
        return {"aux_logits": True, "init_weights": False}
    if spec.family == "vision_transformer":
        return {"image_size": spec.input_size}
    return {}


def random_teacher_state(name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state_dict laid out like torchvision's published file for teacher ``name``
    (any torchvision classifier; auxiliary classifiers included; DenseNets, densenet161 too,
    with the old 'norm.1' keys and without num_batches_tracked)."""
    spec = teacher_spec(name)
    model = empty_build(lambda: spec.builder(weights=None, **torchvision_file_kwargs(name)))
    randomize(model, seed)
    state = model.state_dict()
    if spec.family == "densenet":  # torchvision's DenseNet files predate num_batches_tracked
        state = {_old_densenet_key(k): v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    return state


def _old_densenet_key(key: str) -> str:
    for part in ("norm1", "relu1", "conv1", "norm2", "relu2", "conv2"):
        key = key.replace(f".{part}.", f".{part[:-1]}.{part[-1]}.")
    return key


@pytest.fixture(scope="session")
def pretrained(torch_home):
    """Call ``pretrained(name)`` to put generated weights for teacher ``name`` (any
    torchvision classifier) in the cache where torchvision's weights API looks for them;
    returns the state_dict written (old DenseNet keys as in the real files)."""
    written: dict[str, dict] = {}

    def make(name: str) -> dict:
        if name not in written:
            spec = teacher_spec(name)
            state = random_teacher_state(name)
            path = weights_path(spec)
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(state, path)
            written[name] = state
        return written[name]

    return make


def put_in_hub_cache(hub_id: str, state: dict[str, torch.Tensor], revision: str = "0" * 40) -> Path:
    """Write ``state`` as ``model.safetensors`` of Hugging Face repository ``hub_id`` in the
    hub cache, laid out as a download leaves it (``refs/main`` naming a snapshot): where timm
    looks for its pretrained weights."""
    from safetensors.torch import save_file

    from hnd.timm_teachers import hub_cache

    repo = hub_cache() / f"models--{hub_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    path = repo / "snapshots" / revision / "model.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.fixture(scope="session")
def timm_pretrained(torch_home):
    """Call ``timm_pretrained(name)`` (``timm/NAME[.TAG]``) to put random weights for that timm
    teacher in the Hugging Face cache; returns the state_dict written."""
    written: dict[str, dict] = {}

    def make(name: str) -> dict:
        spec = teacher_spec(name)
        if spec.name not in written:
            torch.manual_seed(0)
            state = spec.builder().state_dict()
            put_in_hub_cache(spec.name, state)  # timm's hub ids are the canonical names: timm/NAME.TAG
            written[spec.name] = state
        return written[spec.name]

    return make


@pytest.fixture
def counts(monkeypatch):
    """Counts of ``hnd.registry.parse_name`` calls, of ``hnd.models.create_model`` calls and of
    ``torch.load`` calls per file."""
    import hnd.models
    import hnd.registry

    seen = {"parse": 0, "create": 0, "loads": {}}
    parse, create = hnd.registry.parse_name, hnd.models.create_model

    def counting_parse(name):
        seen["parse"] += 1
        return parse(name)

    def counting_create(*args, **kwargs):
        seen["create"] += 1
        return create(*args, **kwargs)

    # Modules that imported a function by name look it up at home: replace it there too.
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("hnd"):
            for name, original, counting in (("parse_name", parse, counting_parse),
                                             ("create_model", create, counting_create)):
                if getattr(module, name, None) is original:
                    monkeypatch.setattr(module, name, counting)
    load = torch.load

    def counting_load(f, *args, **kwargs):
        key = str(Path(f).resolve()) if isinstance(f, (str, Path)) else repr(f)
        seen["loads"][key] = seen["loads"].get(key, 0) + 1
        return load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    return seen


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
