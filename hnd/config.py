"""Training configurations: the official presets of the original code, and overrides.

A :class:`TrainConfig` holds every setting of a training run. :func:`preset` returns the
original's official configuration for a (model, method) pair (tests/reference/original-hnd-facts.md §3);
:func:`resolve_config` applies a YAML file and ``key=value`` overrides on top of it, checking
every key and value. The resolved config is saved with the run (``config.yaml``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field

import yaml

from hnd.preprocessing import DECODERS
from hnd.errors import HndError
from hnd.files import read_mapping
from hnd.registry import ModelSpec, resolve, student_spec
from hnd.students import check_channels

METHODS = ("naive", "kd", "hnd", "ae", "teacher", "entropic", "head_kd")
STUDENT_METHODS = ("naive", "kd", "hnd", "entropic", "head_kd")  # trained model is a bottleneck student
AE_CHANNELS = (3, 6, 9, 12, 15, 18)  # the original's autoencoder-baseline configs


@dataclass
class TrainConfig:
    """Every setting of a training run. Defaults are those of the HND method's official config."""

    model: str  # a student name (naive, kd, hnd, entropic) or a teacher name (ae, teacher)
    method: str  # naive | kd | hnd | ae | teacher | entropic | head_kd
    epochs: int = 20
    batch_size: int = 32  # per process, as in the original
    eval_batch_size: int = 50  # the original's test batch
    optimizer: str = "adam"  # sgd | adam
    lr: float = 1e-3
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0
    milestones: list[int] = field(default_factory=lambda: [5, 10, 15])  # MultiStepLR, stepped per epoch
    gamma: float = 0.1
    kd_temperature: float = 1.0
    kd_alpha: float = 0.5  # weight of the cross-entropy term: alpha*CE + (1-alpha)*T^2*KL
    ae_channels: int = 3  # ae only: bottleneck channels of the autoencoder
    # entropic only (two stages): stage 1 trains the head against the teacher head with
    # summed squared error + beta * bits, using optimizer/lr/milestones above; stage 2 freezes
    # encoder and entropy model and fine-tunes decoder + tail with KD (SGD, stage2_lr, momentum,
    # weight_decay, stage2_milestones counted from the stage's first epoch).
    beta: float = 0.0  # weight of the rate (bits per image) against the squared error
    stage1_epochs: int = 10  # the rest of `epochs` is stage 2
    stage2_lr: float = 1e-3
    stage2_milestones: list[int] = field(default_factory=lambda: [5])
    pretrained: bool = True  # teacher (and the student's tail) from torchvision's ImageNet weights
    teacher_checkpoint: str | None = None  # a teacher trained with this library, instead of `pretrained`
    inception_transform_input: bool = False  # Inception-v3 teacher: the original never applied it
    input_size: int | None = None  # None: the teacher's (224, Inception-v3 299)
    resize_size: int | None = None  # None: input_size * 256/224 (Inception-v3: 327/299)
    transforms: str = "original"  # original | torchvision (RandomResizedCrop reference recipe)
    decoder: str = "pil"  # pil | torchvision (torchvision.io's decoders: more JPEGs/s per loader worker)
    selection: str = "holdout"  # holdout: select on a slice of train, test on val; val: the original
    holdout_per_class: int = 10  # images per class held out of train for model selection
    skip_bad_images: bool = False  # skip unreadable images (reported) instead of failing
    num_workers: int = -1  # data-loading processes; -1: min(cpus, 8)
    seed: int = 0
    # Stopping rule: end the run once the selection top-1 has not improved for `patience`
    # epochs (0: run all `epochs`); entropic runs count it from their stage 2.
    patience: int = 0
    # Augmentation views: 0 draws a new augmentation of every image each epoch; V > 0 cycles
    # through V fixed views per image (epoch e shows view e mod V, the same for every run and
    # seed), so that the frozen teacher's outputs can be computed once (`teacher_cache`).
    augment_views: int = 0
    teacher_cache: str | None = None  # folder of cached teacher outputs and test accuracy (needs augment_views > 0)
    test_every_epoch: bool = False  # also test every epoch on val, for a curve (never used to select)
    test_first_epochs: int = 0  # also test after each of the first N epochs only (cheaper than every epoch)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "none"  # none | bf16 | fp16 (CUDA only) | auto (bf16 where faster); bf16 also on CPUs (hnd/precision.py)
    channels_last: bool = False  # channels-last tensors: faster convolutions on CUDA and on CPU (oneDNN)
    sync_bn: bool = False  # distributed runs: BatchNorm statistics over all processes' batches
    # The model that trains, at this run's input size (not saved: resolved from ``model`` when
    # not given). ``model`` becomes its canonical name.
    spec: ModelSpec | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        base = method_spec(self.spec if self.spec is not None else resolve(self.model), self.method)
        self.spec = base.at_input_size(self.input_size or base.teacher.input_size)
        self.model = str(self.spec)

    def eval_transform(self):
        """The evaluation transform of this run: its model's, at its input and resize sizes, for
        its decoder."""
        return self.spec.transforms(self.decoder, resize_size=self.resize_size)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "spec"}
        return copy.deepcopy(d)


_CHOICES = {
    "method": METHODS,
    "optimizer": ("sgd", "adam"),
    "transforms": ("original", "torchvision"),
    "decoder": DECODERS,
    "selection": ("holdout", "val"),
    "amp": ("none", "bf16", "fp16", "auto"),
}

# Per-method fields of the official configs; all four paper teachers share them.
_METHOD_PRESETS: dict[str, dict] = {
    "naive": {"optimizer": "sgd", "lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-4},
    "kd": {"optimizer": "sgd", "lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-4},
    "hnd": {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0},
    # Not in the papers: HND's head and frozen tail trained on KD's loss, an ablation of HND's loss.
    "head_kd": {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0},
    "ae": {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0},
    # The original's org/*.yaml: fine-tuning a teacher, no learning-rate schedule.
    "teacher": {"optimizer": "sgd", "lr": 1e-2, "momentum": 0.9, "weight_decay": 5e-4, "epochs": 50,
                "batch_size": 20, "milestones": []},
    # The SC2 benchmark's Entropic Student (ResNet-50): stage 1 Adam 10 epochs, milestones [5, 8];
    # stage 2 SGD lr 1e-3 10 epochs, milestone [5], KD T=1 alpha=0.5. beta: default_beta.
    "entropic": {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "momentum": 0.9, "epochs": 20,
                 "stage1_epochs": 10, "milestones": [5, 8], "stage2_lr": 1e-3, "stage2_milestones": [5],
                 "kd_temperature": 1.0, "kd_alpha": 0.5},
}


def default_beta(spec: ModelSpec) -> float:
    """The preset rate weight of an entropic student: the teacher head's output elements / 10^5
    (DenseNet-169/201 0.50, Inception-v3 2.35, ResNet-152 4.01 at their official points), so that
    one bit weighs the same against the mean squared error per element for every teacher."""
    numel = 1
    for n in spec.head_output_shape:
        numel *= n
    return round(numel / 1e5, 4)


def method_spec(spec: ModelSpec, method: str) -> ModelSpec:
    """The model a method trains: ``entropic`` makes a student entropy-coded (``-entropic``);
    the other student methods take a plain student."""
    if spec.is_student and method in STUDENT_METHODS:
        if method != "entropic" and spec.entropy:
            raise HndError(f"{spec} has an entropy-coded bottleneck, which only --method entropic trains; "
                           f"use {spec.with_entropy(False)} with --method {method}")
        return spec.with_entropy(method == "entropic")
    return spec


def check_method(method: str) -> str:
    if method not in METHODS:
        raise HndError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")
    return method


def check_model_for_method(spec: ModelSpec, method: str) -> None:
    """naive/kd/hnd train a student, ae/teacher a teacher; say which names fit."""
    if method in STUDENT_METHODS and not spec.is_student:
        raise HndError(f"method {method} trains a student, but {spec} is a teacher; give a student name "
                       f"such as {student_spec(spec, 3)}")
    if method not in STUDENT_METHODS and spec.is_student:
        raise HndError(f"method {method} trains on the teacher {spec.as_teacher()}; give the teacher's name, "
                       f"not the student {spec}")


def preset(spec: ModelSpec, method: str) -> TrainConfig:
    """The official configuration of (model, method), as the original's YAML files have it."""
    check_model_for_method(spec, check_method(method))
    spec = method_spec(spec, method)
    fields = dict(_METHOD_PRESETS[method])
    if method == "entropic":
        fields["beta"] = default_beta(spec)
    return TrainConfig(model=str(spec), method=method, spec=spec, **fields)


def _field_types() -> dict[str, object]:
    return {k: v for k, v in typing.get_type_hints(TrainConfig).items() if k != "spec"}


def _coerce(key: str, value: object, kind: object) -> object:
    """Check ``value`` against the field's annotation; ints are accepted for floats."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if type(None) in args:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        kind = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is list:
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list):
            raise HndError(f"{key} must be a list of {args[0].__name__}, e.g. {key}=[5,10,15]; got {value!r}")
        return [_coerce(key, v, args[0]) for v in value]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. device=0 is unusual but a path like 123 is a string
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise HndError(f"{key} must be {kind.__name__}, got {value!r}")
    return value


def apply_overrides(config: TrainConfig, overrides: dict) -> TrainConfig:
    """A copy of ``config`` with ``overrides`` (field -> value) applied and checked."""
    types = _field_types()
    values = config.to_dict()
    for key, value in overrides.items():
        if key not in types:
            raise HndError(f"unknown config key {key!r}; valid keys: {', '.join(types)}")
        values[key] = _coerce(key, value, types[key])
    for key in ("teacher_checkpoint", "teacher_cache"):  # recorded with the run: not relative to where it started
        if values[key]:
            values[key] = os.path.abspath(os.path.expanduser(values[key]))
    new = TrainConfig(**values, spec=config.spec)
    validate(new)
    return new


def parse_assignments(pairs: list[str]) -> dict:
    """``["lr=0.01", "milestones=[2,4]"]`` -> ``{"lr": 0.01, "milestones": [2, 4]}`` (YAML values)."""
    out = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise HndError(f"expected key=value, got {pair!r}")
        try:
            out[key.strip()] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            out[key.strip()] = text
    return out


def read_config_file(path: str | os.PathLike) -> dict:
    """A YAML mapping of config fields, from ``--config FILE``."""
    return read_mapping(path, "config file", "a mapping of config keys")


def validate(config: TrainConfig) -> None:
    """Check values that types alone do not: choices, ranges, method/model fit."""
    for key, choices in _CHOICES.items():
        if getattr(config, key) not in choices:
            raise HndError(f"{key} must be one of {', '.join(choices)}, got {getattr(config, key)!r}")
    check_model_for_method(config.spec, config.method)
    positive = ["epochs", "batch_size", "eval_batch_size", "holdout_per_class", "ae_channels"]
    for key in positive:
        if getattr(config, key) <= 0:
            raise HndError(f"{key} must be positive, got {getattr(config, key)}")
    for key, unit in (("patience", "epochs"), ("augment_views", "views per image"), ("test_first_epochs", "epochs")):
        if getattr(config, key) < 0:
            raise HndError(f"{key} must be 0 (off) or a positive number of {unit}, got {getattr(config, key)}")
    if config.teacher_cache and not config.augment_views:
        raise HndError("teacher_cache needs augment_views > 0 (a fixed set of views whose teacher outputs can be "
                       "kept); e.g. augment_views=8")
    if not config.lr > 0 or not config.gamma > 0 or not config.momentum >= 0 or not config.weight_decay >= 0:
        raise HndError("lr and gamma must be positive, momentum and weight_decay non-negative")
    if not 0 <= config.kd_alpha <= 1 or not config.kd_temperature > 0:
        raise HndError("kd_alpha must be in [0, 1] and kd_temperature positive")
    for key in ("milestones", "stage2_milestones"):
        steps = getattr(config, key)
        if any(b <= a for a, b in zip(steps, steps[1:])) or any(m <= 0 for m in steps):
            raise HndError(f"{key} must be strictly increasing positive epochs, got {steps}")
    if config.method == "entropic":
        if not (config.beta > 0 and math.isfinite(config.beta)):
            raise HndError(f"beta (the rate weight of method entropic) must be a positive number, got {config.beta}")
        if not 0 < config.stage1_epochs <= config.epochs or not config.stage2_lr > 0:
            raise HndError(f"stage1_epochs must be from 1 to epochs ({config.epochs}) and stage2_lr positive, got "
                           f"{config.stage1_epochs} and {config.stage2_lr}")
    for key in ("input_size", "resize_size"):
        value = getattr(config, key)
        if value is not None and value < 32:
            raise HndError(f"{key} must be at least 32, got {value}")
    if config.resize_size is not None and config.resize_size < config.spec.input_size:
        raise HndError(f"resize_size ({config.resize_size}) must be at least the input size ({config.spec.input_size})")


def layered_overrides(config_file: str | os.PathLike | None, assignments: list[str] = ()) -> dict:
    """The keys of a YAML config file, then ``key=value`` pairs over them."""
    overrides = read_config_file(config_file) if config_file else {}
    overrides.update(parse_assignments(list(assignments)))
    return overrides


def check_saved_run(doc: dict, spec: ModelSpec, method: str, where: str) -> None:
    """A one-line error unless the saved config ``doc`` is a ``method`` run of ``spec``."""
    if (doc.get("model"), doc.get("method")) != (str(spec), method):
        raise HndError(f"{where} holds a {doc.get('method')} run of {doc.get('model')}, not {method} of {spec}")


def resolve_config(spec: ModelSpec, method: str, config_file: str | os.PathLike | None = None,
                   assignments: list[str] = ()) -> TrainConfig:
    """Official preset of (model, method), then the YAML file, then ``key=value`` pairs."""
    overrides = layered_overrides(config_file, assignments)
    for key, value in (("model", spec), ("method", method)):
        given = str(overrides.pop(key, value))
        if given != str(value) and (key == "method" or resolve(given) != spec):
            raise HndError(f"the config sets {key} to something else than the command line ({value!r}); "
                           f"give {key} on the command line only")
    return apply_overrides(preset(spec, method), overrides)


def config_from_dict(doc: dict, spec: ModelSpec | None = None) -> TrainConfig:
    """Rebuild a saved config (checkpoints, ``config.yaml``); unknown keys are an error.
    ``spec``: the model, already resolved (it must be the saved one)."""
    if not isinstance(doc, dict) or "model" not in doc or "method" not in doc:
        raise HndError("saved config lacks 'model' or 'method'")
    if spec is not None and str(spec) != doc["model"]:
        raise HndError(f"the saved config is for {doc['model']}, not {spec}")
    base = TrainConfig(model=doc["model"], method=check_method(doc["method"]), spec=spec)
    return apply_overrides(base, {k: v for k, v in doc.items() if k not in ("model", "method")})


def dump_config(config: TrainConfig, relative_to: str | os.PathLike | None = None) -> str:
    """The config as YAML; with ``relative_to``, the teacher checkpoint's path is shown relative
    to that folder (for pages that must not show a machine's folder names)."""
    doc = config.to_dict()
    if relative_to is not None:
        for key in ("teacher_checkpoint", "teacher_cache"):
            if doc[key]:
                doc[key] = os.path.relpath(doc[key], relative_to)
    return yaml.safe_dump(doc, sort_keys=False)


def experiment_config(teacher: ModelSpec, method: str, channels: int,
                      overrides: dict | None = None) -> TrainConfig:
    """The config of one cell of the book's grid: ``teacher`` backbone (any teacher's spec,
    ``@POINT`` included), ``method``, bottleneck ``channels`` (the student's, or the
    autoencoder's for ``ae``; ignored for ``teacher``), official preset of the model that
    trains, then ``overrides``."""
    check_method(method)
    if teacher.is_student:
        raise HndError(f"teacher must be a backbone name such as resnet152, got the student {teacher}")
    overrides = dict(overrides or {})
    fixed = [k for k in ("model", "method", "ae_channels") if k in overrides]
    if fixed:
        raise HndError(f"overrides cannot set {', '.join(fixed)}: they follow from teacher, method and channels")
    if method in STUDENT_METHODS:
        return apply_overrides(preset(student_spec(teacher, channels), method), overrides)
    channels = check_channels(channels)
    if method == "ae":
        overrides["ae_channels"] = channels
    return apply_overrides(preset(teacher, method), overrides)
