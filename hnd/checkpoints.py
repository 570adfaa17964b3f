"""Reading the original's published checkpoints and this project's own, safely; saving ours.

Every file is read with ``torch.load(..., weights_only=True, map_location="cpu")``; the only
extra class allowed is ``argparse.Namespace`` (the original KD checkpoints store their
command-line arguments in one). Formats understood (tests/reference/original-hnd-facts.md §2):

- ``original-naive``: ``{type, model, acc, epoch}``, ``model`` = whole student state_dict with
  the original keys (``student_model.*``, ``features.N.*``, ``classifier.*``);
- ``original-kd``: ``{model, optimizer, lr_scheduler, best_value, config, args}``, same keys;
- ``original-hnd``: ``{type, model, epoch, best_valid_value, student}``, ``model`` = head only
  (``extractor.*``, ``module_seq.*``); the tail comes from the pretrained teacher;
- ``original-teacher`` / a plain state_dict with torchvision keys: a teacher;
- ``hnd``: ours, ``{format: "hnd", version, model, spec, part, state_dict, ...}``, keys as in
  :class:`hnd.students.Student` (``head.encoder.*``, ``head.decoder.*``, ``tail.*``); ``spec`` is
  the model's :meth:`hnd.registry.ModelSpec.to_dict`, so the model rebuilds from the file alone.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from hnd.autoencoder import AutoencoderModel, build_ae_model
from hnd.errors import HndError, describe_mismatch
from hnd.files import atomic_write
from hnd.registry import ModelSpec, resolve, spec_from_dict
from hnd.students import Student, head_version
from hnd.teachers import build_teacher, classifier_classes, no_initial_values

FORMAT_VERSION = 1
PARTS = ("student", "head", "teacher", "ae")  # what an hnd checkpoint's state_dict holds
_INCEPTION_TAIL = ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c",
                   "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"]
_N_ENCODER = 7  # stem (4) + BN + ReLU + bottleneck conv


@dataclass
class Checkpoint:
    """A checkpoint read from disk, its weights already in this project's key layout."""

    path: Path
    format: str
    part: str  # student | head | teacher | ae (teacher head + autoencoder + tail)
    state_dict: dict[str, torch.Tensor]  # keys relative to Student, StudentHead or the teacher
    model: str | None = None  # the model name the file records, if any
    meta: dict = field(default_factory=dict)


def read_file(path: str | os.PathLike) -> object:
    """``torch.load`` a file safely, turning every failure into a one-line :class:`HndError`."""
    path = Path(path)
    if not path.exists():
        raise HndError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise HndError(f"checkpoint is not a file: {path}")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on odd pickles; our error says it all
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if isinstance(exc, pickle.UnpicklingError) and found:
            raise HndError(f"refused {path}: loading it would run code or build objects that are not plain "
                           f"data ({found.group(1)}); only tensors and plain data are loaded") from None
        detail = re.search(r"Unsupported [^\n.]*", text)
        detail = detail.group(0) if detail else f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
        raise HndError(f"cannot read {path}: truncated, or not a weights-only PyTorch checkpoint ({detail})") from None


def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _split_key(key: str) -> tuple[str, int, str]:
    prefix, index, rest = key.split(".", 2)
    return prefix, int(index), rest


def convert_original_head(state: dict) -> dict:
    """Original head keys (``extractor.i``, ``module_seq.j``) -> ours (``encoder.i``, ``decoder.j``)."""
    out = {}
    for key, value in state.items():
        prefix, i, rest = _split_key(key)
        if prefix == "module_seq":
            i += 4  # module_seq continues the extractor's 4 stem modules
        elif prefix != "extractor":
            raise HndError(f"unexpected key {key!r} in an original head checkpoint")
        out[f"encoder.{i}.{rest}" if i < _N_ENCODER else f"decoder.{i - _N_ENCODER}.{rest}"] = value
    return out


def _convert_original_tail(state: dict) -> dict:
    """Original flattened tail keys (``features.N.*``, ``classifier.*``) -> ours (``tail.<stage>.*``).

    The original flattened the teacher's tail into one list (DenseNet: dense layers of block 3,
    the 4 modules of transition3, dense layers of block 4, norm5, ...; ResNet: the bottleneck
    blocks of layer3 and layer4; Inception-v3: Mixed_5b ... Mixed_7c). Which index is which is
    read off the keys themselves, so a checkpoint of another depth is recognised as such.
    """
    subkeys: dict[int, set[str]] = {}
    for key in state:
        if key.startswith("features."):
            _, i, rest = _split_key(key)
            subkeys.setdefault(i, set()).add(rest)
    indices = sorted(subkeys)
    names: dict[int, str] = {}
    if any(k.startswith("branch") for k in subkeys.get(0, ())):  # Inception-v3
        names = dict(zip(indices, _INCEPTION_TAIL))
        classifier = "fc"
    elif "conv3.weight" in subkeys.get(0, ()):  # ResNet bottleneck blocks
        layer, block = 2, 0
        for i in indices:
            if "downsample.0.weight" in subkeys[i]:  # each layer starts with a downsampling block
                layer, block = layer + 1, 0
            names[i] = f"layer{layer}.{block}"
            block += 1
        classifier = "fc"
    else:  # DenseNet: dense layers, transition3 (norm, relu, conv, pool), dense layers, norm5
        block, layer, plain = 3, 0, 0
        for i in indices:
            if "norm1.weight" in subkeys[i]:
                layer += 1
                names[i] = f"denseblock{block}.denselayer{layer}"
            else:
                names[i] = ["transition3.norm", "transition3.conv", "norm5"][min(plain, 2)]
                plain += 1
                if plain == 2:
                    block, layer = 4, 0
        classifier = "classifier"
    out = {}
    for key, value in state.items():
        if key.startswith("classifier."):
            out[f"tail.{classifier}.{key.split('.', 1)[1]}"] = value
        elif key.startswith("features."):
            _, i, rest = _split_key(key)
            out[f"tail.{names[i]}.{rest}"] = value
        else:
            raise HndError(f"unexpected key {key!r} in an original whole-model checkpoint")
    return out


def convert_original_model(state: dict) -> dict:
    """Whole original student state_dict -> our :class:`Student` keys."""
    head = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("student_model.")}
    tail = {k: v for k, v in state.items() if not k.startswith("student_model.")}
    converted = {f"head.{k}": v for k, v in convert_original_head(head).items()}
    converted.update(_convert_original_tail(tail))
    return converted


def parse_checkpoint(obj: object, path: Path) -> Checkpoint:
    """Recognise the format of a loaded object and convert its weights to our layout."""
    if isinstance(obj, dict) and obj.get("format") == "hnd":
        if not _is_state_dict(obj.get("state_dict")) or obj.get("part") not in PARTS:
            raise HndError(f"{path}: damaged hnd checkpoint (needs 'state_dict' and 'part')")
        meta = {k: v for k, v in obj.items() if k not in ("state_dict",)}
        return Checkpoint(path, "hnd", obj["part"], obj["state_dict"], obj.get("model"), meta)
    state = obj.get("model") if isinstance(obj, dict) and "model" in obj else obj
    meta = {k: v for k, v in obj.items() if k != "model"} if state is not obj else {}
    if not _is_state_dict(state):
        raise HndError(f"{path} is not a checkpoint hnd understands: expected a state_dict, an "
                       "original naive/KD/HND checkpoint or an hnd checkpoint")
    keys = list(state)
    try:
        if keys[0].startswith(("extractor.", "module_seq.")):
            return Checkpoint(path, "original-hnd", "head", convert_original_head(state), None, meta)
        if any(k.startswith("student_model.") for k in keys):
            fmt = "original-kd" if "args" in meta or "optimizer" in meta else "original-naive"
            return Checkpoint(path, fmt, "student", convert_original_model(state), None, meta)
    except (ValueError, KeyError, IndexError):  # keys not of the original's "<part>.<index>.<name>" form
        raise HndError(f"{path}: looks like an original HND checkpoint but its keys do not follow the "
                       f"original layout (first key {keys[0]!r})") from None
    return Checkpoint(path, "original-teacher" if meta else "state_dict", "teacher", state, None, meta)


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read and recognise any supported checkpoint file."""
    return parse_checkpoint(read_file(path), Path(path))


def _count(state: dict, pattern: str) -> int:
    return len({m.group(1) for k in state if (m := re.match(pattern, k))})


def _head_family(head: dict) -> str | None:
    """Head design from its decoder: the number of convs (BNs excluded) tells the family."""
    convs = _count(head, r"decoder\.(\d+)\.weight$") - _count(head, r"decoder\.(\d+)\.running_mean$")
    return {5: "densenet", 4: "resnet", 3: "inception"}.get(convs)


def identify(state: dict, part: str) -> str:
    """Which model a converted state_dict looks like, for error messages."""
    if part == "teacher":
        return _identify_teacher(state) or "an unknown teacher"
    head = {k[5:]: v for k, v in state.items() if k.startswith("head.")} if part == "student" else state
    if "encoder.6.weight" not in head:
        return "an unknown model"
    channels = head["encoder.6.weight"].shape[0]
    family = _head_family(head)
    if family is None:
        return f"an unknown head with {channels} bottleneck channels"
    if part == "student":
        tail = {k[5:]: v for k, v in state.items() if k.startswith("tail.")}
        teacher = _identify_teacher(tail) or f"an unknown {family}"
    else:  # a head alone does not tell which member of the family it was trained for
        teacher = {"densenet": "densenet121/169/201", "resnet": "resnet50/101/152",
                   "inception": "inception_v3"}[family]
    return f"{teacher}_head_mimic-ver{head_version(family)}-{channels}ch"


def _identify_teacher(state: dict) -> str | None:
    """Teacher name from torchvision-layout keys (with or without the ``features.`` prefix)."""
    state = {k.removeprefix("features."): v for k, v in state.items()}
    layers = _count(state, r"denseblock3\.denselayer(\d+)\.")
    if layers:
        return {24: "densenet121", 32: "densenet169", 48: "densenet201"}.get(layers)
    blocks = _count(state, r"layer3\.(\d+)\.")
    if blocks:
        return {6: "resnet50", 23: "resnet101", 36: "resnet152"}.get(blocks)
    return "inception_v3" if any(k.startswith("Mixed_7c.") for k in state) else None


def _recorded_name(ckpt: Checkpoint, spec: ModelSpec) -> str | None:
    """The model the file records, as comparable with ``spec``: a teacher's weights do not
    depend on where it is split, so for those only the teacher's name counts."""
    if ckpt.model is None or ckpt.part != "teacher":
        return ckpt.model
    saved = ckpt.meta.get("spec")
    return saved.get("teacher") if isinstance(saved, dict) else ckpt.model.split("@")[0]


def _load_into(module: nn.Module, ckpt: Checkpoint, spec: ModelSpec) -> None:
    diffs = describe_mismatch(module.state_dict(), ckpt.state_dict)
    expected = spec.teacher.name if ckpt.part == "teacher" else str(spec)
    if diffs or (ckpt.model is not None and _recorded_name(ckpt, spec) != expected):
        looks = ckpt.model or identify(ckpt.state_dict, ckpt.part)
        raise HndError(f"{ckpt.path} ({ckpt.format}, {ckpt.part}) does not fit {spec}: it looks like "
                       f"{looks}; first mismatches: {diffs or 'none (model name differs)'}")
    module.load_state_dict(ckpt.state_dict)


def checkpoint_spec(ckpt: Checkpoint, model: ModelSpec | None = None) -> ModelSpec:
    """The spec of the model in ``ckpt``: ``model`` if given, else the one the file records;
    a recorded input size (a run at another resolution) and head design are kept."""
    saved = ckpt.meta.get("spec")
    if model is None:
        if isinstance(saved, dict):
            return spec_from_dict(saved)
        if ckpt.model is None:
            raise HndError(f"{ckpt.path} ({ckpt.format}) does not record its model; give the model name")
        return resolve(ckpt.model)
    return model.as_saved(saved)


def load_model(model: ModelSpec | None, checkpoint: str | os.PathLike | Checkpoint) -> nn.Module:
    """Build ``model`` with the weights of ``checkpoint`` (a path, or a :class:`Checkpoint`
    already read: no file is read twice), eval mode; any supported format.

    ``model=None`` takes the model the file records (hnd checkpoints), so a model can be
    rebuilt from the file alone. The class count is read off the weights. A head-only
    checkpoint (original HND, or ours with ``part="head"``) takes its tail from the teacher's
    pretrained weights; ``part="ae"`` is the autoencoder baseline on a teacher's split point.
    """
    ckpt = checkpoint if isinstance(checkpoint, Checkpoint) else read_checkpoint(checkpoint)
    spec = checkpoint_spec(ckpt, model)
    num_classes = classifier_classes(ckpt.state_dict)
    if ckpt.part == "ae":
        if spec.is_student:
            raise HndError(f"{ckpt.path} holds an autoencoder baseline; give its teacher's name, not {spec}")
        channels = ckpt.state_dict["ae.encoder.9.weight"].shape[0]
        with no_initial_values():  # every value comes from the file (_load_into is strict)
            teacher = build_teacher(spec.teacher, pretrained=False, num_classes=num_classes,
                                    input_size=spec.input_size)
            model = build_ae_model(spec, teacher, channels)
        _load_into(model, ckpt, spec)
        return model.eval()
    if not spec.is_student:
        if ckpt.part != "teacher":
            raise HndError(f"{ckpt.path} holds a {ckpt.part} ({identify(ckpt.state_dict, ckpt.part)}); "
                           f"{spec} is a teacher: give a student name or a teacher checkpoint")
        with no_initial_values():
            model = spec.build(pretrained=False, num_classes=num_classes)
        _load_into(model, ckpt, spec)
        return model.eval()
    if ckpt.part == "teacher":
        raise HndError(f"{ckpt.path} holds a teacher ({identify(ckpt.state_dict, 'teacher')}); "
                       f"{spec} is a student: use the teacher's name or a student checkpoint")
    if ckpt.part == "head":
        model = spec.build(pretrained=True)
        _load_into(model.head, ckpt, spec)
    else:
        with no_initial_values():
            model = spec.build(pretrained=False, num_classes=num_classes)
        _load_into(model, ckpt, spec)
    return model.eval()


def atomic_save(obj: object, path: str | os.PathLike) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def save_checkpoint(path: str | os.PathLike, spec: ModelSpec, model: nn.Module, *,
                    part: str = "student", **extra: object) -> None:
    """Save ``model`` as an hnd checkpoint with its spec. part: ``student`` (whole), ``head``
    (student head only; the tail is the pretrained teacher's), ``teacher`` or ``ae`` (an
    :class:`~hnd.autoencoder.AutoencoderModel` on the teacher's split point). ``extra`` holds
    plain data."""
    if part not in (("student", "head") if spec.is_student else ("teacher", "ae")):
        raise HndError(f"part {part!r} does not apply to {spec}")
    if spec.is_student and not isinstance(model, Student):
        raise HndError(f"{spec} is a student but the model is a {type(model).__name__}")
    if part == "ae" and not isinstance(model, AutoencoderModel):
        raise HndError(f"part 'ae' needs an AutoencoderModel, got a {type(model).__name__}")
    module = model.head if part == "head" else model
    atomic_save({"format": "hnd", "version": FORMAT_VERSION, "model": str(spec), "spec": spec.to_dict(),
                 "part": part, "state_dict": module.state_dict(), **extra}, path)
