"""Teachers from timm (PyTorch Image Models): ``timm/NAME[.TAG]`` names, resolved once into a
:class:`~hnd.teacher_spec.TeacherSpec` that carries the tag's pretrained config.

The config gives the input side, the resize side (input side / ``crop_pct``, floored: timm's
own rule), interpolation, mean, std and classes. ``NAME`` alone takes timm's default tag, and
the spec's name always carries the tag, so that a checkpoint names the weights it started
from. Models are built with ``timm.create_model`` and their pretrained weights loaded by timm
itself, from the Hugging Face cache where timm keeps its downloads, or from
:func:`weights_path` (a file put there by hand). timm is optional: ``pip install "hnd[timm]"``.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import math
import os
from pathlib import Path

from hnd.errors import HndError
from hnd.preprocessing import INTERPOLATIONS
from hnd.teacher_spec import TeacherSpec

PREFIX = "timm/"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm reads from a Hugging Face repository


def installed() -> bool:
    return importlib.util.find_spec("timm") is not None


def _timm():
    try:
        import timm
    except ImportError:
        raise HndError('timm teachers need timm, an optional extra: pip install "hnd[timm]"') from None
    return timm


def is_timm_name(name: str) -> bool:
    return name.startswith(PREFIX)


def _timm_name(name: str) -> str:
    """The name timm knows: ``timm/resnet18.a1_in1k`` -> ``resnet18.a1_in1k``."""
    return name[len(PREFIX):]


def timm_spec(name: str) -> TeacherSpec:
    """The spec of ``timm/NAME[.TAG]``; unknown models and tags are one-line errors."""
    timm = _timm()
    full = _timm_name(name)
    arch, tag = timm.models.split_model_name_tag(full)
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; similar: {', '.join(PREFIX + c for c in close)}" if close else ""
        raise HndError(f"unknown timm model {arch!r}{hint} (`hnd models --timm` lists those with weights)")
    try:
        cfg = timm.models.get_pretrained_cfg(full, allow_unregistered=False)
    except RuntimeError:
        tags = [PREFIX + n for n in timm.list_pretrained(f"{arch}.*")]
        raise HndError(f"{arch} has no pretrained tag {tag!r} in timm {timm.__version__}; "
                       f"valid: {', '.join(tags) or 'none'}") from None
    return _spec(f"{arch}.{cfg.tag}" if cfg.tag else arch)


@functools.cache
def _spec(tagged: str) -> TeacherSpec:
    """One spec object per tagged name (its builder is compared by identity)."""
    timm = _timm()
    cfg = timm.models.get_pretrained_cfg(tagged, allow_unregistered=False)
    if cfg.crop_mode not in (None, "center"):
        raise HndError(f"{PREFIX}{tagged} is evaluated with timm's crop_mode {cfg.crop_mode!r}; hnd's preprocessing "
                       "resizes the shorter side and centre-crops (crop_mode 'center'): choose another tag")
    if cfg.interpolation not in INTERPOLATIONS:
        raise HndError(f"{PREFIX}{tagged} resizes with {cfg.interpolation!r}; valid: {', '.join(INTERPOLATIONS)}")
    side = int(cfg.input_size[-1])
    classes = int(cfg.num_classes or 1000)

    def builder(weights=None, num_classes=None, **kwargs):
        return timm.create_model(tagged, pretrained=False, num_classes=num_classes or classes, **kwargs)

    family = timm.models.model_entrypoint(tagged.split(".")[0]).__module__.rsplit(".", 1)[-1]
    return TeacherSpec(PREFIX + tagged, f"timm.{family}", builder, None, side, math.floor(side / cfg.crop_pct),
                       cfg.interpolation, source="timm", num_classes=classes, mean=tuple(cfg.mean),
                       std=tuple(cfg.std), fixed_input_size=bool(cfg.fixed_input_size),
                       labels=functools.partial(_categories, tagged))


def _categories(tagged: str) -> list[str] | None:
    """Short class names (each label's first synonym) where timm knows the label set."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    subset = infer_imagenet_subset(_timm().models.get_pretrained_cfg(tagged))
    return [d.split(",")[0] for d in ImageNetInfo(subset).label_descriptions()] if subset else None


def timm_teachers() -> list[str]:
    """``timm/NAME`` for every timm model with pretrained weights (default tags), or none when
    timm is not installed."""
    if not installed():
        return []
    return sorted({PREFIX + n.split(".")[0] for n in _timm().list_models(pretrained=True)})


def hub_cache() -> Path:
    """The Hugging Face cache that timm downloads into (``HF_HUB_CACHE``, else the library's)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    from huggingface_hub import constants
    return Path(constants.HF_HUB_CACHE)


def weights_path(spec: TeacherSpec) -> Path:
    """Where a weights file put by hand is read: ``<torch hub>/checkpoints/timm/NAME.TAG.safetensors``."""
    import torch
    return Path(torch.hub.get_dir()) / "checkpoints" / "timm" / f"{_timm_name(spec.name)}.safetensors"


def cached_weights(spec: TeacherSpec) -> Path | None:
    """The pretrained file already on disk: timm's download in the Hugging Face cache, else
    :func:`weights_path`; ``None`` when neither is there."""
    from huggingface_hub import try_to_load_from_cache

    hub_id = _timm().models.get_pretrained_cfg(_timm_name(spec.name)).hf_hub_id
    for filename in _WEIGHT_FILES if hub_id else ():
        found = try_to_load_from_cache(hub_id, filename, cache_dir=hub_cache())
        if isinstance(found, str):
            return Path(found)
    path = weights_path(spec)
    return path if path.is_file() else None


def build_timm(spec: TeacherSpec, *, pretrained: bool, num_classes: int, input_size: int) -> object:
    """``timm.create_model`` for ``spec`` in eval mode. ``pretrained``: timm loads the cached
    file, else downloads it unless ``HND_OFFLINE=1``; models built for one input side
    (``fixed_input_size``) are built for ``input_size``."""
    timm = _timm()
    tagged = _timm_name(spec.name)
    kwargs: dict = {"num_classes": num_classes}
    if spec.fixed_input_size and input_size != spec.input_size:
        kwargs["img_size"] = input_size
    if pretrained:
        found = cached_weights(spec)
        if found is None and os.environ.get("HND_OFFLINE") == "1":
            raise HndError(f"pretrained weights for {spec.name} are missing and HND_OFFLINE=1 forbids downloading; "
                           f"fetch them into the Hugging Face cache ({hub_cache()}, e.g. `hf download "
                           f"timm/{tagged}` where the network is) or put the model.safetensors file at "
                           f"{weights_path(spec)}")
        if found is not None:
            kwargs["pretrained_cfg_overlay"] = {"file": str(found)}
    try:
        model = timm.create_model(tagged, pretrained=pretrained, **kwargs)
    except Exception as exc:  # network, hub and file errors of several libraries
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise HndError(f"cannot build {spec.name}{' with its pretrained weights' if pretrained else ''}: "
                       f"{text[:300]}") from None
    return model.eval()
