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

import math
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from hnd.tensor_codec import TENSOR_FORMATS, check_tensor_format, tensor_bytes
from hnd.devices import SMALL_MODEL, SMALL_MODEL_TOP1, DeviceProfile, rows_of, split_labels
from hnd.errors import HndError
from hnd.files import read_json, read_mapping
from hnd.registry import ModelSpec, resolve, student_spec

LOCAL_KINDS = ("local", "local_small")
OPTION_KINDS = ("local", "local_small", "offload", "teacher_split", "student")


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


def measure_input_codec(teacher: ModelSpec, images: str | os.PathLike, codec: str = "jpeg", quality: int = 75, *,
                        max_images: int = 50) -> InputCodec:
    """Encode up to ``max_images`` images found under ``images`` (any folder, searched
    recursively, in name order), each resized and center-cropped to ``teacher``'s input as for
    evaluation, and return the mean payload and encoding time."""
    from hnd.codec import check_image_codec, check_quality, encode_image
    from hnd.image_folders import load_image

    check_image_codec(codec)
    quality = check_quality(quality)
    root = Path(images)
    if not root.is_dir():
        raise HndError(f"image folder not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)[:max_images]
    if not files:
        raise HndError(f"no images ({', '.join(_IMAGE_SUFFIXES)}) under {root}")
    crop = teacher.preprocessing().geometry()
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


def options(teacher: ModelSpec, device: DeviceProfile, server: DeviceProfile, *, channels=(3, 6, 9, 12),
            formats=("fp32", "fp16", "int8"), lossless_ratio: float | None = None,
            input_bytes: float | None = None, split_format: str = "int8", small_model: bool = True,
            input_codec: InputCodec | None = None, coded: Sequence[CodedStudent] = ()) -> list[Option]:
    """Every way to serve one image of ``teacher``'s task with ``device`` and ``server``.

    ``teacher``: any teacher's spec; its split point (``resnet18@layer3``) is where its
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

    spec = teacher
    if spec.is_student:
        raise HndError(f"options take a teacher (its students are planned with it), not the student {spec}; "
                       f"e.g. {spec.as_teacher()}")
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

    rows = list(rows_of(spec))
    dev, srv = device.seconds(spec, rows), server.seconds(spec, rows)
    out = [Option("local", f"local {name}", sum(dev), 0.0, 0.0, 0.0, top1)]
    if small_model:
        out.append(Option("local_small", f"local {SMALL_MODEL}", sum(device.seconds(SMALL_MODEL, list(rows_of(SMALL_MODEL)))),
                          0.0, 0.0, 0.0, SMALL_MODEL_TOP1))
    side = spec.input_size
    if input_codec is not None:
        out.append(Option("offload", f"offload {input_codec.codec} q{input_codec.quality}", 0.0,
                          input_codec.seconds * device.scale, input_codec.bytes, sum(srv), top1))
    elif input_bytes is None:
        out.append(Option("offload", "offload raw RGB", 0.0, 0.0, 3 * side * side, sum(srv), top1))
    else:
        out.append(Option("offload", "offload image", 0.0, 0.0, float(input_bytes), sum(srv), top1))
    labels = split_labels(spec)
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
        srows = list(rows_of(student))
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
        if student.as_teacher() != spec or not student.entropy:
            raise HndError(f"{run.model} at {student.input_size} px is not an entropic student of {spec} at "
                           f"{spec.input_size} px; plan it with {student.as_teacher()}"
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
