"""The latency model of split computing: where to run which layers for one image.

End-to-end delay of one image = device compute + encoding (quantize/serialize) +
bytes x 8 / data rate + round-trip time + server compute. Compute times come from a
:class:`DeviceProfile`: measured batch-1 seconds per layer (names as in
:func:`hnd.analysis.analyze` rows) where known, else the layer's MACs over the profile's
MACs-per-second throughput; every time is multiplied by the profile's ``scale``.

:func:`options` lists the ways to serve one image (all on the device, a small on-device
model, offloading the input, the teacher cut after any layer where one tensor crosses, an
HND student at a channel count and tensor format); each :class:`Option` is a + b / rate in
the data rate, so :func:`plan` ranks them at one link and :func:`crossovers` finds exactly
where the best one changes. Models are names or :class:`hnd.registry.ModelSpec`; a profile
keys its measurements by the canonical name (``str(spec)``), and ``mobilenet_v2`` there is
the small on-device model of :data:`SMALL_MODEL`.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
import yaml
from torch import nn

from hnd.analysis import LayerRow, analyze, profile_layers, walk_layers
from hnd.codec import TENSOR_FORMATS, check_tensor_format, encode_tensor, tensor_bytes
from hnd.errors import HndError
from hnd.files import read_json, read_mapping, write_text
from hnd.models import create_model
from hnd.registry import ModelSpec, resolve, student_spec

PROFILE_DIR = Path(__file__).with_name("device_profiles")
SMALL_MODEL = "mobilenet_v2"
SMALL_MODEL_TOP1 = 71.878  # torchvision's MobileNet_V2_Weights.IMAGENET1K_V1 ImageNet top-1
LOCAL_KINDS = ("local", "local_small")
OPTION_KINDS = ("local", "local_small", "offload", "teacher_split", "student")
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

    def layer_time(self, model: str | ModelSpec, row: LayerRow) -> float:
        """Seconds of one layer of ``model`` on this machine (scaled)."""
        return self.seconds(model, [row])[0]

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
        keys = dict.fromkeys([str(spec.teacher_spec()), spec.teacher.name])
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
def _rows(model: str | ModelSpec) -> tuple[LayerRow, ...]:
    """Analysis rows of :data:`SMALL_MODEL` (the name) or of a model spec."""
    if isinstance(model, str) and model == SMALL_MODEL:
        return small_model_rows()
    return tuple(analyze(model).rows)


@lru_cache(maxsize=None)
def _split_labels(spec: ModelSpec) -> dict[str, str]:
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


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
        teacher = None if isinstance(model, str) else str(model.teacher_spec())
        skip = ("tail",) if teacher is not None and teacher != key and teacher in specs else ()
        torch.manual_seed(0)
        parts, size = _measured_parts(model)
        measured = time_layers(parts, torch.randn(1, 3, size, size), repeats=repeats, warmup=warmup,
                               skip_parts=skip)
        layer_seconds[key] = {k: float(f"{v:.4g}") for k, v in measured.items()}
        macs = {r.name: r.macs for r in _rows(model)}
        total_macs += sum(macs[k] for k in measured)
        total_s += sum(measured.values())
    z = torch.randn(12, 29, 29)  # a 12-channel DenseNet/ResNet-student bottleneck
    encode_s = median_seconds(lambda: encode_tensor(z, "int8"), max(repeats, 20), warmup)
    cpu = _cpu_model()
    return DeviceProfile(
        name=name,
        description=f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__} with "
                    f"{torch.get_num_threads()} threads, fp32 eager batch 1",
        source=f"measured by hnd.latency.measure_device_profile ({repeats} repeats after {warmup} warm-up "
               f"runs, median per layer, random weights) on {platform.node() or 'this host'}",
        macs_per_s=float(f"{total_macs / total_s:.4g}"), layer_seconds=layer_seconds,
        encode_bytes_per_s=float(f"{tensor_bytes(z.shape, 'int8') / encode_s:.4g}"),
    )


# --- options and their delays ------------------------------------------------------------

@dataclass
class Option:
    """One way to serve an image, costed independently of the link.

    Times in seconds, ``bytes`` sent per image; ``accuracy`` is a quoted ImageNet top-1 (%)
    where one applies, else ``None``.
    """

    kind: str
    label: str
    device_s: float
    encode_s: float
    bytes: float
    server_s: float
    accuracy: float | None = None
    split: str | None = None  # teacher splits: the layer cut after, as hnd inspect names it

    @property
    def fixed_s(self) -> float:
        """The part of the delay that does not depend on the data rate (RTT excluded)."""
        return self.device_s + self.encode_s + (0.0 if self.kind in LOCAL_KINDS else self.server_s)

    def breakdown(self, rate_mbps: float, rtt_ms: float) -> dict:
        """Seconds spent in each step: device, encode, transfer, rtt, server."""
        _check_link(rate_mbps, rtt_ms)
        if self.kind in LOCAL_KINDS:
            return {"device": self.device_s, "encode": 0.0, "transfer": 0.0, "rtt": 0.0, "server": 0.0}
        return {"device": self.device_s, "encode": self.encode_s,
                "transfer": self.bytes * 8 / (rate_mbps * 1e6), "rtt": rtt_ms / 1000, "server": self.server_s}

    def delay(self, rate_mbps: float, rtt_ms: float) -> float:
        """End-to-end seconds for one image at ``rate_mbps`` and ``rtt_ms``."""
        return sum(self.breakdown(rate_mbps, rtt_ms).values())

    def to_dict(self) -> dict:
        return asdict(self)


def _check_link(rate_mbps: float, rtt_ms: float) -> None:
    if not (isinstance(rate_mbps, (int, float)) and math.isfinite(rate_mbps) and rate_mbps > 0):
        raise HndError(f"data rate must be a positive number of Mbit/s, got {rate_mbps!r}")
    if not (isinstance(rtt_ms, (int, float)) and math.isfinite(rtt_ms) and rtt_ms >= 0):
        raise HndError(f"round-trip time must be a non-negative number of ms, got {rtt_ms!r}")


@dataclass(frozen=True)
class InputCodec:
    """The input image as a device would send it: mean bytes and encoding seconds, measured."""

    codec: str  # jpeg | webp | png
    quality: int
    bytes: float  # mean per image
    seconds: float  # mean encoding time per image on the machine that measured it
    images: int


_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def measure_input_codec(teacher: str | ModelSpec, images: str | os.PathLike, codec: str = "jpeg", quality: int = 75, *,
                        max_images: int = 50) -> InputCodec:
    """Encode up to ``max_images`` images found under ``images`` (any folder, searched
    recursively, in name order), each resized and center-cropped to ``teacher``'s input as for
    evaluation, and return the mean payload and encoding time."""
    from hnd.codec import check_image_codec, check_quality, encode_image
    from hnd.data import load_image
    from hnd.rate import eval_transform_parts

    check_image_codec(codec)
    quality = check_quality(quality)
    root = Path(images)
    if not root.is_dir():
        raise HndError(f"image folder not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)[:max_images]
    if not files:
        raise HndError(f"no images ({', '.join(_IMAGE_SUFFIXES)}) under {root}")
    crop = eval_transform_parts(resolve(teacher))[0]
    sizes, seconds = [], []
    for path in files:
        image = crop(load_image(path))
        start = time.perf_counter()
        sizes.append(len(encode_image(image, codec, quality)))
        seconds.append(time.perf_counter() - start)
    return InputCodec(codec, quality, statistics.fmean(sizes), statistics.fmean(seconds), len(files))


@dataclass(frozen=True)
class CodedStudent:
    """An entropic student as its training run measured it: mean range-coded bytes per test
    image (every image coded on its own), its rate weight ``beta`` and test top-1."""

    model: str  # the student's canonical name (``...-entropic``)
    bytes: float
    beta: float | None = None
    top1: float | None = None
    input_size: int | None = None  # the run's; None: the teacher's

    @property
    def spec(self) -> ModelSpec:
        return resolve(self.model).at_input_size(self.input_size)


def coded_student(run: str | os.PathLike) -> CodedStudent:
    """The :class:`CodedStudent` of a finished ``entropic`` run folder (its ``result.json`` and
    ``config.yaml``)."""
    folder = Path(run)
    result_file = folder / "result.json" if folder.is_dir() else folder
    try:
        result = read_json(result_file)
        coded = result["test"]["bytes_per_image"]
    except (HndError, KeyError, TypeError):
        raise HndError(f"{run} is not a finished entropic run (no result.json with test bytes_per_image)") from None
    if result.get("method") != "entropic" or coded is None:
        raise HndError(f"{run} holds a {result.get('method')} run; only entropic runs measure coded bytes")
    config_file = result_file.parent / "config.yaml"
    config = read_mapping(config_file) if config_file.is_file() else {}
    return CodedStudent(result["model"], float(coded), config.get("beta"), result["test"].get("top1"),
                        config.get("input_size"))


def options(teacher: str | ModelSpec, device: DeviceProfile, server: DeviceProfile, *, channels=(3, 6, 9, 12),
            formats=("fp32", "fp16", "int8"), lossless_ratio: float | None = None,
            input_bytes: float | None = None, split_format: str = "int8", small_model: bool = True,
            input_codec: InputCodec | None = None, coded: Sequence[CodedStudent] = ()) -> list[Option]:
    """Every way to serve one image of ``teacher``'s task with ``device`` and ``server``.

    ``teacher``: any teacher name or spec; its split point (``resnet18@layer3``) is where its
    students replace the head. The teacher itself is offered cut after every layer where one
    tensor crosses (``row.cut``: not inside a residual block of a traced teacher).
    Bytes of tensors follow from their shapes (:func:`hnd.codec.tensor_bytes`). With
    ``lossless_ratio`` (measured zlib bytes after / before on the bottleneck) each student's
    int8 option also gets an ``int8+zlib`` twin of ``bytes x ratio``. Offloading sends
    ``input_bytes`` (e.g. a measured mean JPEG size), the image as measured by
    :func:`measure_input_codec` (its bytes, and its encoding time here times the device
    profile's ``scale``), or else the raw uint8 RGB input.
    Entropic students (``coded``, measured by their runs: :func:`coded_student`) send their
    measured mean bytes; their coding time is costed as int8's of the same bottleneck (the range
    coder takes well under a millisecond for 3x29x29 here: ``bench/coder.py``).
    Encoding time is the uncompressed payload over ``device.encode_bytes_per_s`` when the
    profile has it, else 0; zlib's own time and the input image's encoding are not modelled.
    Accuracy is quoted only where the computation is the published model's own (the teacher
    run whole or split losslessly, MobileNetV2); students and lossy splits get ``None``.
    """
    from hnd.students import check_channels

    spec = resolve(teacher)
    if spec.is_student:
        raise HndError(f"options take a teacher (its students are planned with it), not the student {spec}; "
                       f"e.g. {spec.teacher_spec()}")
    check_tensor_format(split_format)
    formats = [check_tensor_format(f) for f in formats]
    if lossless_ratio is not None:
        _positive_arg(lossless_ratio, "lossless ratio")
    if ("int8+zlib" in formats or split_format == "int8+zlib") and lossless_ratio is None:
        raise HndError("int8+zlib bytes depend on the values: give a measured lossless_ratio "
                       f"(zlib bytes after / before) or use {', '.join(f for f in TENSOR_FORMATS if f != 'int8+zlib')}")
    if input_bytes is not None:
        _positive_arg(input_bytes, "input bytes")
    channels = [check_channels(c) for c in channels]
    top1 = spec.teacher.top1
    name = spec.teacher.name

    def sent(shape, fmt: str) -> tuple[float, float]:
        """(bytes on the wire, bytes the encoder writes before compression)."""
        if fmt == "int8+zlib":
            raw = tensor_bytes(shape, "int8")
            return raw * lossless_ratio, raw
        raw = tensor_bytes(shape, fmt)
        return raw, raw

    rows = list(_rows(spec))
    dev, srv = device.seconds(spec, rows), server.seconds(spec, rows)
    out = [Option("local", f"local {name}", sum(dev), 0.0, 0.0, 0.0, top1)]
    if small_model:
        out.append(Option("local_small", f"local {SMALL_MODEL}", sum(device.seconds(SMALL_MODEL, list(_rows(SMALL_MODEL)))),
                          0.0, 0.0, 0.0, SMALL_MODEL_TOP1))
    side = spec.input_size
    if input_codec is not None:
        out.append(Option("offload", f"offload {input_codec.codec} q{input_codec.quality}", 0.0,
                          input_codec.seconds * device.scale, input_codec.bytes, sum(srv), top1))
    elif input_bytes is None:
        out.append(Option("offload", "offload raw RGB", 0.0, 0.0, 3 * side * side, sum(srv), top1))
    else:
        out.append(Option("offload", "offload image", 0.0, 0.0, float(input_bytes), sum(srv), top1))
    labels = _split_labels(spec)
    for i, row in enumerate(rows[:-1]):
        if not row.cut:
            continue
        nbytes, raw = sent(row.output_shape, split_format)
        layer = row.name.split(".", 1)[1]
        point = labels.get(layer, layer)
        out.append(Option("teacher_split", f"{name} split after {point} {split_format}",
                          sum(dev[:i + 1]), device.encode_seconds(raw), nbytes, sum(srv[i + 1:]),
                          top1 if split_format in ("fp32",) else None, split=point))
    student_formats = list(dict.fromkeys(formats + (["int8+zlib"] if lossless_ratio is not None and "int8" in formats
                                                     else [])))

    def student_costs(c: int) -> tuple[float, float, tuple]:
        """(device seconds of the encoder, server seconds of decoder + tail, bottleneck shape)."""
        student = student_spec(spec, c)
        srows = list(_rows(student))
        sdev, ssrv = device.seconds(student, srows), server.seconds(student, srows)
        cut = [i for i, r in enumerate(srows) if r.part == "encoder"][-1] + 1
        return sum(sdev[:cut]), sum(ssrv[cut:]), srows[cut - 1].output_shape

    for c in channels:
        dev_s, srv_s, shape = student_costs(c)
        for fmt in student_formats:
            nbytes, raw = sent(shape, fmt)
            out.append(Option("student", f"HND student {c}ch {fmt}", dev_s, device.encode_seconds(raw), nbytes, srv_s))
    for run in coded:
        student = run.spec
        if student.teacher_spec() != spec or not student.entropy:
            raise HndError(f"{run.model} at {student.input_size} px is not an entropic student of {spec} at "
                           f"{spec.input_size} px; plan it with {student.teacher_spec()}"
                           + ("" if student.input_size == spec.input_size else f" --input-size {student.input_size}"))
        dev_s, srv_s, shape = student_costs(student.channels)
        beta = "" if run.beta is None else f" β={run.beta:g}"
        out.append(Option("student", f"entropic student {student.channels}ch{beta}", dev_s,
                          device.encode_seconds(tensor_bytes(shape, "int8")), run.bytes, srv_s, run.top1))
    return out


def _positive_arg(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise HndError(f"{what} must be a positive number, got {value!r}")
    return float(value)


def plan(options: list[Option], rate_mbps: float, rtt_ms: float = 0.0) -> list[tuple[Option, float]]:
    """The options with their delays (seconds) at one link, fastest first."""
    _check_link(rate_mbps, rtt_ms)
    if not options:
        raise HndError("no options to plan over")
    return sorted(((o, o.delay(rate_mbps, rtt_ms)) for o in options), key=lambda t: t[1])


def _line(o: Option, rtt_ms: float) -> tuple[float, float]:
    """(a, b) with delay = a + b / rate_mbps."""
    if o.kind in LOCAL_KINDS:
        return o.device_s, 0.0
    return o.fixed_s + rtt_ms / 1000, o.bytes * 8 / 1e6


def crossovers(options: list[Option], rtt_ms: float = 0.0, low: float = 0.1, high: float = 1000.0) -> list[dict]:
    """Data rates (Mbit/s) between ``low`` and ``high`` where the fastest option changes,
    ascending, each as ``{"rate_mbps", "from", "to"}`` (best below -> best above).

    In u = 1 / rate every delay is a line a + b u, so the best option follows the lower
    envelope of lines; it is walked exactly from the lowest rate (largest u) upwards.
    """
    _check_link(1.0, rtt_ms)
    if not (0 < low < high and math.isfinite(high)):
        raise HndError(f"rate range must satisfy 0 < low < high, got low={low!r} high={high!r}")
    if not options:
        raise HndError("no options to find crossovers over")
    lines = [_line(o, rtt_ms) for o in options]
    u, u_end = 1 / low, 1 / high

    def best_at(u: float) -> int:
        return min(range(len(lines)), key=lambda i: (lines[i][0] + lines[i][1] * u, -lines[i][1]))

    current, found = best_at(u), []
    while True:
        a0, b0 = lines[current]
        nxt, nxt_u = None, None
        for i, (a, b) in enumerate(lines):
            if b <= b0 or a >= a0:
                continue  # never overtakes as u falls (rate rises)
            cross = (a0 - a) / (b - b0)
            if cross < u and (nxt_u is None or cross > nxt_u or (cross == nxt_u and b > lines[nxt][1])):
                nxt, nxt_u = i, cross
        if nxt is None or nxt_u <= u_end:
            return found
        found.append({"rate_mbps": 1 / nxt_u, "from": options[current].label, "to": options[nxt].label})
        current, u = nxt, nxt_u
