"""Device profiles: how fast a machine runs each layer, for the latency model
(:mod:`hnd.latency`). A profile holds measured batch-1 seconds per layer (names as in
:func:`hnd.analysis.analyze` rows, keyed by the model's canonical name), a MACs-per-second
throughput for layers it has not measured, a ``scale`` for every time and the speed of
encoding bytes. Profiles ship in ``hnd/device_profiles/`` (a Raspberry Pi 4, a GPU server,
this machine), are read from a file with one-line errors, and are measured here with
:func:`measure_device_profile` (``hnd profile-device``).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
import yaml
from torch import nn

from hnd.analysis import LayerRow, analyze, profile_layers, walk_layers
from hnd.codec import encode_tensor
from hnd.tensor_codec import tensor_bytes
from hnd.errors import HndError
from hnd.files import read_mapping, write_text
from hnd.machine import cpu_model
from hnd.models import create_model
from hnd.registry import ModelSpec, resolve

PROFILE_DIR = Path(__file__).with_name("device_profiles")
SMALL_MODEL = "mobilenet_v2"
SMALL_MODEL_TOP1 = 71.878  # torchvision's MobileNet_V2_Weights.IMAGENET1K_V1 ImageNet top-1
_PROFILE_KEYS = ("name", "description", "source", "base", "macs_per_s", "scale", "encode_bytes_per_s",
                 "layer_seconds")


# --- device profiles -----------------------------------------------------------------------

@dataclass
class DeviceProfile:
    """How fast one machine runs each layer at batch 1, and how fast it encodes tensors.

    ``layer_seconds[model][layer]``: measured seconds (model by canonical name, layer names as
    in ``analyze(model)`` rows). A teacher's layers (a student's ``tail.*``, a teacher's
    ``head.*``/``tail.*``) that are not measured under the model itself fall back to the
    teacher's measurements at the model's split point, then at the teacher's default one,
    under either part: they are the same modules on the same input shape, wherever the cut.
    Unmeasured layers cost ``macs / macs_per_s``.
    """

    name: str
    description: str
    source: str
    macs_per_s: float
    layer_seconds: dict[str, dict[str, float]] = field(default_factory=dict)
    scale: float = 1.0
    encode_bytes_per_s: float | None = None

    def seconds(self, model: str | ModelSpec, rows: list[LayerRow]) -> list[float]:
        """Seconds of each row of ``model`` on this machine (scaled)."""
        table = self.layer_seconds.get(str(model), {})
        teacher_tables = None  # looked up once, and only when a teacher layer is unmeasured
        out = []
        for row in rows:
            measured = table.get(row.name)
            if measured is None and row.part in ("head", "tail"):
                if teacher_tables is None:
                    teacher_tables = self._teacher_tables(model)
                layer = row.name.partition(".")[2]
                measured = next((t[k] for t in teacher_tables for k in (f"{row.part}.{layer}", f"head.{layer}",
                                                                        f"tail.{layer}") if layer and k in t), None)
            if measured is None:
                measured = row.macs / self.macs_per_s
            out.append(measured * self.scale)
        return out

    def _teacher_tables(self, model: str | ModelSpec) -> list[dict[str, float]]:
        """Measurements of ``model``'s teacher: at its split point, then at the default one."""
        if isinstance(model, str) and model == SMALL_MODEL:
            return []
        try:
            spec = resolve(model)
        except HndError:  # a profile may hold models this library does not name
            return []
        keys = dict.fromkeys([str(spec.as_teacher()), spec.teacher.name])
        keys.pop(str(spec), None)
        return [self.layer_seconds[k] for k in keys if k in self.layer_seconds]

    def encode_seconds(self, nbytes: float) -> float:
        """Seconds to quantize/serialize a tensor of ``nbytes`` payload; 0 when unmeasured."""
        if not self.encode_bytes_per_s:
            return 0.0
        return nbytes / self.encode_bytes_per_s * self.scale

    def to_dict(self) -> dict:
        return asdict(self)


def list_device_profiles() -> list[str]:
    """Names of the built-in profiles (``hnd/device_profiles/*.yaml``)."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def _is_path(name_or_path: str) -> bool:
    return (os.sep in name_or_path or "/" in name_or_path
            or name_or_path.endswith((".yaml", ".yml", ".json")) or Path(name_or_path).is_file())


def _read_profile_file(path: Path) -> dict:
    doc = read_mapping(path, "device profile", f"a mapping with keys {', '.join(_PROFILE_KEYS)}")
    unknown = [k for k in doc if k not in _PROFILE_KEYS]
    if unknown:
        raise HndError(f"device profile {path} has unknown keys {', '.join(map(str, unknown))}; "
                       f"valid: {', '.join(_PROFILE_KEYS)}")
    return doc


def _positive(value: object, what: str, where: Path, *, allow_zero: bool = False) -> float:
    if isinstance(value, str):  # YAML 1.1 reads exponents without a sign (1e9) as strings
        try:
            value = float(value)
        except ValueError:
            pass
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        kind = "a non-negative" if allow_zero else "a positive"
        raise HndError(f"device profile {where}: {what} must be {kind} number, got {value!r}")
    return float(value)


def _layer_table(value: object, where: Path) -> dict[str, dict[str, float]]:
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise HndError(f"device profile {where}: layer_seconds must map model names to "
                       "{layer name: seconds} mappings")
    return {str(m): {str(k): _positive(s, f"layer_seconds[{m}][{k}]", where, allow_zero=True)
                     for k, s in layers.items()} for m, layers in value.items()}


def load_device_profile(name_or_path: str, _seen: tuple[Path, ...] = ()) -> DeviceProfile:
    """A built-in profile by name, or a YAML/JSON profile file.

    A file may say ``base: <profile name or path>`` (relative to the file's folder) and
    inherit everything it does not set; its ``scale`` multiplies the base's.
    """
    if _is_path(str(name_or_path)):
        path = Path(name_or_path)
        if not path.is_file():
            raise HndError(f"device profile file {path} does not exist; built-in profiles: "
                           f"{', '.join(list_device_profiles())}")
    else:
        path = PROFILE_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise HndError(f"unknown device profile {name_or_path!r}; built-in: "
                           f"{', '.join(list_device_profiles())}, or a path to a .yaml/.json file")
    path = path.resolve()
    if path in _seen:
        raise HndError(f"device profile {path} is its own base (cycle through {', '.join(map(str, _seen))})")
    doc = _read_profile_file(path)
    scale = _positive(doc.get("scale", 1.0), "scale", path)
    base = None
    if doc.get("base") is not None:
        ref = str(doc["base"])
        if _is_path(ref) and not Path(ref).is_absolute():
            ref = str(path.parent / ref)
        base = load_device_profile(ref, _seen + (path,))
    if "macs_per_s" in doc:
        macs_per_s = _positive(doc["macs_per_s"], "macs_per_s", path)
    elif base is not None:
        macs_per_s = base.macs_per_s
    else:
        raise HndError(f"device profile {path} needs macs_per_s (a positive number) or a base profile")
    encode = doc.get("encode_bytes_per_s", base.encode_bytes_per_s if base else None)
    if encode is not None:
        encode = _positive(encode, "encode_bytes_per_s", path)
    layers = {m: dict(t) for m, t in (base.layer_seconds if base else {}).items()}
    for model, table in _layer_table(doc.get("layer_seconds") or {}, path).items():
        layers.setdefault(model, {}).update(table)
    for key in ("name", "description", "source"):
        if key in doc and not isinstance(doc[key], str):
            raise HndError(f"device profile {path}: {key} must be a string, got {doc[key]!r}")
    return DeviceProfile(
        name=doc.get("name") or path.stem,
        description=doc.get("description", base.description if base else ""),
        source=doc.get("source", base.source if base else ""),
        macs_per_s=macs_per_s, layer_seconds=layers,
        scale=scale * (base.scale if base else 1.0), encode_bytes_per_s=encode,
    )


def save_device_profile(profile: DeviceProfile, path: str | os.PathLike) -> None:
    """Write ``profile`` as YAML (or JSON for a ``.json`` path), atomically."""
    doc = profile.to_dict()
    if doc["encode_bytes_per_s"] is None:
        del doc["encode_bytes_per_s"]
    text = (json.dumps(doc, indent=1) + "\n" if str(path).endswith(".json")
            else yaml.safe_dump(doc, sort_keys=False, width=120))
    write_text(path, text)


# --- the small on-device model -----------------------------------------------------------

def _small_model_parts(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """MobileNetV2's forward as sequential parts (features, pool, flatten, classifier)."""
    return [("features", model.features), ("pool", nn.AdaptiveAvgPool2d(1)), ("flatten", nn.Flatten(1)),
            ("classifier", model.classifier)]


def _build_small_model() -> nn.Module:
    import torchvision.models as tvm

    return tvm.mobilenet_v2(weights=None).eval()


@lru_cache(maxsize=None)
def small_model_rows() -> tuple[LayerRow, ...]:
    """Per-layer rows of MobileNetV2 at 224x224, counted on the meta device."""
    with torch.device("meta"):
        model = _build_small_model()
        return tuple(profile_layers(_small_model_parts(model), torch.zeros(1, 3, 224, 224)))


@lru_cache(maxsize=None)
def rows_of(model: str | ModelSpec) -> tuple[LayerRow, ...]:
    """Analysis rows of :data:`SMALL_MODEL` (the name) or of a model spec."""
    if isinstance(model, str) and model == SMALL_MODEL:
        return small_model_rows()
    return tuple(analyze(model).rows)


@lru_cache(maxsize=None)
def split_labels(spec: ModelSpec) -> dict[str, str]:
    """Node name -> split point name (``layer2.1.relu_1`` -> ``layer2.1``) for a teacher whose
    parts are traced; empty for a staged teacher cut at one of its stages (rows are stages)."""
    from hnd.teachers import stage_split_points, traced_facts

    if spec.teacher.staged and spec.split_point in stage_split_points(spec.teacher):
        return {}
    return {p.node: p.name for p in traced_facts(spec.teacher, spec.input_size).points}


# --- measuring a profile -----------------------------------------------------------------

def _measured_parts(model: str | ModelSpec) -> tuple[list[tuple[str, nn.Module]], int]:
    """The parts ``analyze`` uses for ``model`` (random weights, eval mode), and its input side."""
    if isinstance(model, str) and model == SMALL_MODEL:
        return _small_model_parts(_build_small_model()), 224
    from hnd.teachers import split_teacher

    spec = resolve(model)
    built = create_model(spec, pretrained=False)
    if spec.is_student:
        parts = [("encoder", built.head.encoder), ("decoder", built.head.decoder), ("tail", built.tail)]
    else:
        head, tail = split_teacher(spec.teacher, built, spec.split_point)
        parts = [("head", head), ("tail", tail)]
    return parts, spec.input_size


def median_seconds(fn, repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def time_layers(parts: list[tuple[str, nn.Module]], x: torch.Tensor, *, repeats: int = 20,
                warmup: int = 5, skip_parts: tuple[str, ...] = ()) -> dict[str, float]:
    """Median batch-1 seconds of each layer of ``parts`` on ``x``'s device (CPU), walked as
    :func:`hnd.analysis.walk_layers` does (sequential layers; nodes of traced parts, those
    giving tensors). Layers of ``skip_parts`` are run once, to feed the next part, but not timed.

    A layer's output is kept from its first run: the timed repeats may redo an in-place
    operation (a traced ``out += identity``) on their input, which must not reach later layers.
    """
    seconds = {}

    def step(name, kind, module, part, thunk):
        out = thunk()
        if part in skip_parts or not isinstance(out, torch.Tensor):
            return out
        kept = out.clone()
        seconds[name] = median_seconds(thunk, repeats, warmup)
        return kept

    walk_layers(parts, x, step)
    return seconds


def measure_device_profile(models: list[str | ModelSpec], *, repeats: int = 20, warmup: int = 5,
                           threads: int | None = None, name: str = "this-machine") -> DeviceProfile:
    """Measure this machine's CPU: median batch-1 seconds per layer of each model (random
    weights; speed does not depend on them), a fitted MACs/s for unmeasured models, and the
    int8 encoder's bytes/s on a typical bottleneck.

    A student listed together with its teacher (at the same split point) is timed on its
    encoder and decoder only: its tail is the teacher's tail on the same input shape, which
    :class:`DeviceProfile` reuses. Measurements are keyed by canonical model name.
    """
    if not models:
        raise HndError(f"give at least one model to profile (a teacher, a student or {SMALL_MODEL})")
    if repeats < 1 or warmup < 0:
        raise HndError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats} warmup={warmup}")
    if threads is not None:
        if threads < 1:
            raise HndError(f"threads must be a positive integer, got {threads}")
        torch.set_num_threads(threads)
    specs = {}  # canonical name -> SMALL_MODEL or spec, every name resolved before any timing
    for m in models:
        model = m if isinstance(m, str) and m == SMALL_MODEL else resolve(m)
        specs.setdefault(str(model), model)
    layer_seconds: dict[str, dict[str, float]] = {}
    total_macs = total_s = 0.0
    for key, model in specs.items():
        teacher = None if isinstance(model, str) else str(model.as_teacher())
        skip = ("tail",) if teacher is not None and teacher != key and teacher in specs else ()
        torch.manual_seed(0)
        parts, size = _measured_parts(model)
        measured = time_layers(parts, torch.randn(1, 3, size, size), repeats=repeats, warmup=warmup,
                               skip_parts=skip)
        layer_seconds[key] = {k: float(f"{v:.4g}") for k, v in measured.items()}
        macs = {r.name: r.macs for r in rows_of(model)}
        total_macs += sum(macs[k] for k in measured)
        total_s += sum(measured.values())
    z = torch.randn(12, 29, 29)  # a 12-channel DenseNet/ResNet-student bottleneck
    encode_s = median_seconds(lambda: encode_tensor(z, "int8"), max(repeats, 20), warmup)
    cpu = cpu_model()
    return DeviceProfile(
        name=name,
        description=f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__} with "
                    f"{torch.get_num_threads()} threads, fp32 eager batch 1",
        source=f"measured by hnd.devices.measure_device_profile ({repeats} repeats after {warmup} warm-up "
               f"runs, median per layer, random weights) on {platform.node() or 'this host'}",
        macs_per_s=float(f"{total_macs / total_s:.4g}"), layer_seconds=layer_seconds,
        encode_bytes_per_s=float(f"{tensor_bytes(z.shape, 'int8') / encode_s:.4g}"),
    )


# --- options and their delays ------------------------------------------------------------

