"""Results of the book's grid runs: what a notebook records, and reading every run back.

The grid runner (:mod:`hnd.book.grid`) gives each grid cell a folder ``<runs>/<notebook>/<cell>/``.
A notebook writes its numbers there with :func:`write_metrics` (``metrics.json``); the
runner adds ``results.json`` (parameters, status, metrics, versions, git revision,
hardware, seconds) and keeps ``grid.json``, the plan and status of every cell, in
``<runs>``. A training run's numbers are one :class:`RunRecord`; the chapters read them
back with :func:`training_runs`, other cells with :func:`finished_runs` and
:func:`unfinished_cells`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from statistics import mean

from hnd.files import read_json, write_text
from hnd.errors import HndError

METRICS_FILE = "metrics.json"  # a notebook's own numbers, in its output_dir
RESULTS_FILE = "results.json"  # one grid cell: parameters, status, metrics, environment
GRID_FILE = "grid.json"  # the runs folder: every planned cell and its status


def _plain(value: object) -> object:
    """JSON-safe copy: tuples become lists, non-finite floats None, numpy/torch scalars numbers."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def write_json(path: str | os.PathLike, doc: dict) -> Path:
    """Write ``doc`` as indented JSON, atomically."""
    path = Path(path)
    write_text(path, json.dumps(_plain(doc), indent=1) + "\n")
    return path


def write_metrics(output_dir: str | os.PathLike, metrics: dict) -> Path:
    """Record a notebook's numbers (``metrics.json`` in ``output_dir``) for the grid runner."""
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    return write_json(Path(output_dir) / METRICS_FILE, metrics)


def grid_cells(runs: str | os.PathLike) -> list[dict]:
    """Every cell the runner planned in ``runs`` (id, label, notebook, status, error, seconds)."""
    path = Path(runs) / GRID_FILE
    if not path.is_file():
        raise HndError(f"no grid runs in {runs} (no {GRID_FILE}); run `hnd book run --profile PROFILE` first")
    return read_json(path)["cells"]


def finished_runs(runs: str | os.PathLike, notebook: str | None = None) -> list[dict]:
    """The finished cells of ``runs`` (optionally of one notebook, e.g. ``02_train``), in grid
    order: each cell's ``results.json`` with its metrics."""
    out = []
    for cell in grid_cells(runs):
        if cell["status"] != "done" or (notebook and cell["notebook"] != notebook):
            continue
        path = Path(runs) / cell["id"] / RESULTS_FILE
        if path.is_file():
            out.append(read_json(path))
    return out


def unfinished_cells(runs: str | os.PathLike, notebook: str | None = None) -> list[dict]:
    """Planned cells of ``runs`` that did not finish (failed, interrupted or never run)."""
    return [c for c in grid_cells(runs) if c["status"] != "done" and (not notebook or c["notebook"] == notebook)]


TRAIN_NOTEBOOK = "02_train"  # the notebook whose cells are training runs
RATE_NOTEBOOK = "03_rate_accuracy"  # the notebook that measures bytes and accuracy per number format


@dataclass(frozen=True)
class RunRecord:
    """One training run of the book's grid (a cell of ``02_train``): what it trained and what
    it measured. The notebook writes it as the cell's ``metrics.json``; every chapter, the
    explorer and the plots read it back as this record, never as loose keys."""

    teacher: str  # the backbone, e.g. ``resnet18``
    method: str  # naive | kd | hnd | ae | entropic | teacher | head_kd
    channels: int | None  # bottleneck channels; None for the teacher's own run
    beta: float | None  # the rate weight of an entropic student; None for other methods
    model: str  # the trained model's canonical name
    input_size: int | None
    test_top1: float
    test_top5: float
    bytes_per_image: float | None  # entropic: mean range-coded bytes per test image
    teacher_top1: float | None  # its teacher on the same test images (None: not measured)
    select_top1: float | None  # the kept epoch's top-1 on the selection split
    best_epoch: int
    epochs: int
    train_seconds: float
    seconds_per_epoch: float
    images_per_s: float
    checkpoint: str  # the kept checkpoint, relative to the cell's folder
    seed: int = 0  # the run's seed (initialization and batch order)
    epochs_run: int | None = None  # epochs trained before the stopping rule ended the run
    head_error: float | None = None  # HND, head_kd: the teacher head's test output variance the head misses
    folder: Path | None = field(default=None, compare=False, repr=False)  # where it was read from

    @classmethod
    def from_training(cls, teacher: str, config, result: dict, test: dict, epochs: list[dict],
                      output_dir: str | os.PathLike) -> RunRecord:
        """The record of a run of :func:`hnd.training.train_or_resume` (``result``, its per-epoch
        ``epochs``), with ``test`` = {"student": the kept checkpoint's test accuracy, "teacher": its
        teacher's (:func:`hnd.evaluation.evaluate_teacher`) or None}, in the cell folder ``output_dir``."""
        student = test["student"]
        own = config.method == "teacher"
        channels = None if own else config.ae_channels if config.method == "ae" else config.spec.channels
        checkpoint = Path(result["checkpoint"]).resolve()
        try:
            checkpoint = checkpoint.relative_to(Path(output_dir).resolve())
        except ValueError:
            pass  # a checkpoint outside the cell folder keeps its full path
        return cls(
            teacher=teacher, method=config.method, channels=channels,
            beta=config.beta if config.method == "entropic" else None, model=config.model,
            input_size=config.input_size, test_top1=student["top1"], test_top5=student["top5"],
            bytes_per_image=student.get("bytes_per_image"),
            teacher_top1=student["top1"] if own else (test["teacher"] or {}).get("top1"),
            select_top1=result.get("select_top1"), best_epoch=result["best_epoch"], epochs=config.epochs,
            train_seconds=sum(e["seconds"] for e in epochs), seconds_per_epoch=mean(e["seconds"] for e in epochs),
            images_per_s=mean(e["images_per_s"] for e in epochs), checkpoint=checkpoint.as_posix(),
            seed=config.seed, epochs_run=len(epochs), head_error=result.get("head_error"), folder=Path(output_dir))

    @classmethod
    def from_dict(cls, doc: dict, folder: str | os.PathLike | None = None) -> RunRecord:
        """The record saved as ``doc`` (keys it does not know are ignored; a missing one is an error)."""
        names = [f.name for f in fields(cls) if f.name != "folder"]
        optional = {f.name for f in fields(cls) if f.default is not MISSING}  # added since; defaults apply
        missing = [n for n in names if n not in doc and n not in optional]
        if missing:
            where = f" in {folder}" if folder else ""
            raise HndError(f"training record{where} lacks {', '.join(missing)}; re-run the cell")
        return cls(**{n: doc[n] for n in names if n in doc}, folder=Path(folder) if folder else None)

    def to_dict(self) -> dict:
        doc = asdict(self)
        del doc["folder"]
        return doc

    @property
    def label(self) -> str:
        """How the chapters name the run: ``HND 3ch``, ``entropic 3ch β=30``, ``teacher``."""
        if self.method == "teacher":
            return "teacher"
        return rate_label(self.method, self.channels) + (f" {beta_setting(self.beta)}" if self.beta is not None else "")

    @property
    def checkpoint_path(self) -> Path:
        """The kept checkpoint as a path (resolved against the folder the record was read from)."""
        path = Path(self.checkpoint)
        return path if path.is_absolute() or self.folder is None else self.folder / path

    def write(self, output_dir: str | os.PathLike) -> Path:
        """Save as ``metrics.json`` in ``output_dir``, for the grid runner."""
        return write_metrics(output_dir, self.to_dict())


def training_runs(runs: str | os.PathLike) -> list[RunRecord]:
    """The :class:`RunRecord` of every finished training cell of ``runs``, in grid order."""
    return [RunRecord.from_dict(doc["metrics"], Path(runs) / doc["cell"]) for doc in finished_runs(runs, TRAIN_NOTEBOOK)]


def teacher_reference(runs: list[RunRecord]) -> dict[str, float]:
    """Backbone -> the teacher's test top-1 among training runs: its own ``teacher`` run if the
    grid trained it, else the median of what its students' runs measured."""
    from statistics import median

    out = {}
    for backbone in sorted({r.teacher for r in runs}):
        own = [r.test_top1 for r in runs if r.teacher == backbone and r.method == "teacher"]
        seen = [r.teacher_top1 for r in runs if r.teacher == backbone and r.method != "teacher"
                and r.teacher_top1 is not None]
        if own or seen:
            out[backbone] = own[0] if own else median(seen)
    return out


@dataclass
class MeasuredModel:
    """One trained model the rate chapter measures: its method, bottleneck width, rate weight
    (entropic students) and resolved configuration, and the model itself in eval mode."""

    method: str
    channels: int
    beta: float | None
    config: object  # hnd.config.TrainConfig
    model: object  # torch.nn.Module

    @property
    def label(self) -> str:
        return rate_label(self.method, self.channels)


def grid_data(runs: str | os.PathLike) -> str:
    """The dataset root the grid in ``runs`` trained and tested on."""
    data = read_json(Path(runs) / GRID_FILE).get("data")
    if not data:
        raise HndError(f"the grid in {runs} names no dataset; run `hnd book run` with a profile that has data")
    return data


def trained_models(runs: str | os.PathLike, methods: list[str], teacher: str = "") -> list[MeasuredModel]:
    """The kept checkpoints of the finished training runs of ``methods`` in ``runs``, loaded,
    for one backbone: ``teacher``, or the first one the grid trained."""
    from hnd.checkpoints import read_checkpoint
    from hnd.config import config_from_dict
    from hnd.models import create_model

    out = []
    for r in training_runs(runs):
        teacher = teacher or r.teacher
        if r.method in methods and r.teacher == teacher:
            checkpoint = read_checkpoint(r.checkpoint_path)
            config = config_from_dict(checkpoint.meta["config"])
            out.append(MeasuredModel(r.method, r.channels, r.beta, config, create_model(checkpoint=checkpoint)))
    if not out:
        raise HndError(f"no finished {'/'.join(methods)} run in {runs}" + (f" for {teacher}" if teacher else ""))
    return out


def untrained_models(methods: list[str], teacher: str, classes: int, input_size: int,
                     seed: int = 0) -> list[MeasuredModel]:
    """Randomly initialised models of ``methods`` (3 channels) for a demonstration of the
    measurement without any run: their accuracies mean nothing."""
    import torch

    from hnd.autoencoder import build_ae_model
    from hnd.config import experiment_config
    from hnd.methods import build_reference_teacher
    from hnd.registry import resolve, student_from_teacher

    spec = resolve(teacher)
    torch.manual_seed(seed)
    out = []
    for method in methods:
        config = experiment_config(spec, method, 3, {"pretrained": False, "input_size": input_size})
        reference = build_reference_teacher(config, classes)
        model = (build_ae_model(config.spec, reference, 3) if method == "ae"
                 else student_from_teacher(config.spec, reference))
        if method == "entropic":  # the untrained prior's coding tables
            model.head.prior.update_tables()
        out.append(MeasuredModel(method, 3, config.beta if method == "entropic" else None, config, model.eval()))
    return out


# ---------------------------------------------------------------------------------------------
# Entropic students: what the training notebook passes on, and the rate chapter's comparison


def train_overrides(method: str, overrides: dict | None, *, teacher_checkpoint: str = "",
                    beta: float = 0.0, seed: int = 0) -> dict:
    """The config overrides of one training run (``02_train``): the profile's ``overrides``,
    then ``teacher_checkpoint`` and ``seed`` if given, then ``beta`` for method ``entropic`` (0
    keeps the method's preset, :func:`hnd.config.default_beta`). A non-zero ``beta`` for another
    method is an error: only entropic students have a rate to weigh."""
    out = dict(overrides or {})
    if teacher_checkpoint:
        out["teacher_checkpoint"] = teacher_checkpoint
    if seed:
        out["seed"] = seed
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta < 0:
        raise HndError(f"beta must be a non-negative number (0: the preset), got {beta!r}")
    if beta:
        if method != "entropic":
            raise HndError(f"beta={beta:g} is the rate weight of method entropic; method {method} has no rate "
                           "(leave beta at 0)")
        out["beta"] = float(beta)
    return out


def beta_setting(beta: float) -> str:
    """The setting of an entropic student's rate point: ``β=0.05``."""
    return f"β={beta:g}"


def rate_label(method: str, channels: int) -> str:
    """How the rate chapter names a model: ``HND 3ch``, ``AE 12ch``, ``entropic 3ch``."""
    return f"{method if method == 'entropic' else method.upper()} {channels}ch"


def model_points(points: list, method: str, channels: int, beta: float | None = None) -> list[dict]:
    """Rate points of one trained model (:class:`hnd.rate.RatePoint` or dicts) as table rows
    with its ``method``, ``channels`` and ``beta`` (entropic students; None otherwise). An
    entropic student's range-coded point gets the setting ``β=<beta>``, so that one student
    per channel count traces a curve over its β values."""
    rows = []
    for p in points:
        row = {**(p.to_dict() if hasattr(p, "to_dict") else dict(p)), "method": method, "channels": channels,
               "beta": beta}
        if beta is not None and row["setting"] == "entropy":
            row["setting"] = beta_setting(beta)
        rows.append(row)
    return rows


def is_entropic_point(row: dict) -> bool:
    """A bottleneck point of an entropic student's range coder (a finite ``beta``)."""
    beta = row.get("beta")
    return (row.get("kind") == "bottleneck" and isinstance(beta, (int, float)) and not isinstance(beta, bool)
            and math.isfinite(beta))


def matched_input(rows: list[dict], codec: str, top1: float) -> dict | None:
    """The input point of ``codec`` (``jpeg``, ``webp``) with the fewest bytes whose top-1 is at
    least ``top1``; None when no quality of the sweep gets there."""
    sent = [r for r in rows if r.get("kind") == "input" and str(r.get("label", "")).endswith(f" {codec}")
            and r.get("setting") != "raw" and r["top1"] >= top1]
    return min(sent, key=lambda r: (r["bytes"], -r["top1"])) if sent else None


def hnd_partner(rows: list[dict], channels: int | None, fmt: str) -> list[dict]:
    """The HND student's points at ``channels`` sent as ``fmt``, one per seed: what an entropic
    student of that width is weighed against."""
    return [r for r in rows if r.get("kind") == "bottleneck" and r.get("method") == "hnd"
            and r.get("channels") == channels and r.get("setting") == fmt]


def entropic_settings(rows: list[dict]) -> dict[tuple, list[dict]]:
    """The entropic points grouped by (label, channels, β), one point per seed."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if is_entropic_point(r):
            groups.setdefault((r["label"], r.get("channels"), r["beta"]), []).append(r)
    return groups


def entropic_means(rows: list[dict]) -> list[dict]:
    """One row per entropic student and rate weight β (by channels, then bytes), averaged over
    its seeds: label, channels, β, seeds, bytes, top-1 and the top-1 of its lowest and highest
    seed, so that no seed is picked."""
    out = []
    for (label, channels, beta), seeds in entropic_settings(rows).items():
        top1 = [r["top1"] for r in seeds]
        out.append({"label": label, "channels": channels, "beta": beta, "seeds": len(seeds),
                    "bytes": mean(r["bytes"] for r in seeds), "top1": mean(top1), "top1_low": min(top1),
                    "top1_high": max(top1)})
    return sorted(out, key=lambda c: (c["channels"] or 0, c["bytes"]))


def entropic_comparison(rows: list[dict]) -> list[dict]:
    """:func:`entropic_means`, each row with its alternatives: the HND student of the same width
    sent as int8 and int8+zlib, averaged over its seeds, and the fewest bytes with which the input
    image reaches the mean top-1 as JPEG and as WebP (:func:`matched_input`). Missing partners
    are None."""
    out = []
    for line in entropic_means(rows):
        channels = line["channels"]
        for fmt, key in (("int8", "hnd_int8"), ("int8+zlib", "hnd_zlib")):
            hnd = hnd_partner(rows, channels, fmt)
            line[f"{key}_bytes"] = mean(h["bytes"] for h in hnd) if hnd else None
            line[f"{key}_top1"] = mean(h["top1"] for h in hnd) if hnd else None
        for codec in ("jpeg", "webp"):
            match = matched_input(rows, codec, line["top1"])
            line[f"{codec}_bytes"] = match["bytes"] if match else None
            line[f"{codec}_quality"] = match["setting"].lstrip("q") if match else None
        out.append(line)
    return out


def most_accurate(settings: list[dict]) -> dict:
    """The most accurate of ``settings`` (rows of :func:`entropic_comparison`): the highest mean
    top-1, then the fewest bytes."""
    return max(settings, key=lambda c: (c["top1"], -c["bytes"]))


def _seed_range(c: dict) -> str:
    """`` (55.0–65.0, 2 seeds)``: the top-1 of the lowest and highest seed; empty for one seed."""
    return f" ({c['top1_low']:.1f}–{c['top1_high']:.1f}, {c['seeds']} seeds)" if c["seeds"] > 1 else ""


def entropic_summary(comparison: list[dict]) -> str:
    """A Markdown paragraph for the rate chapter: per entropic student (channel count), its most
    accurate β (mean over seeds) against HND int8+zlib of the same width and JPEG/WebP at the
    same top-1, and the range of bytes over its β values."""
    if not comparison:
        return "No entropic student was measured in this run."
    sentences = []
    for label in dict.fromkeys(c["label"] for c in comparison):
        own = [c for c in comparison if c["label"] == label]
        top = most_accurate(own)
        text = (f"The most accurate rate weight of **{label}** ({beta_setting(top['beta'])}) sends "
                f"{top['bytes']:,.0f} bytes per image at {top['top1']:.1f}% top-1{_seed_range(top)}")
        if top["hnd_zlib_bytes"] is not None:
            text += (f", where HND {top['channels']}ch sends {top['hnd_zlib_bytes']:,.0f} bytes with int8+zlib "
                     f"at {top['hnd_zlib_top1']:.1f}% (the mean over its seeds)")
        codecs = [f"{top[f'{c}_bytes']:,.0f} bytes as {name} (quality {top[f'{c}_quality']})"
                  for c, name in (("jpeg", "JPEG"), ("webp", "WebP")) if top[f"{c}_bytes"] is not None]
        missing = [name for c, name in (("jpeg", "JPEG"), ("webp", "WebP")) if top[f"{c}_bytes"] is None]
        if codecs:
            text += "; to reach the same top-1 the input image needs " + " and ".join(codecs)
        if missing:
            text += ("; " if not codecs else ", while ") + " and ".join(missing) + " reach" + \
                ("es" if len(missing) == 1 else "") + " it at no quality of the sweep"
        text += "."
        if len(own) > 1:
            low, high = min(own, key=lambda c: c["bytes"]), max(own, key=lambda c: c["bytes"])
            text += (f" Over its {len(own)} β values it sends from {low['bytes']:,.0f} bytes "
                     f"({beta_setting(low['beta'])}, {low['top1']:.1f}%) to {high['bytes']:,.0f} bytes "
                     f"({beta_setting(high['beta'])}, {high['top1']:.1f}%).")
        sentences.append(text)
    return " ".join(sentences)


def best_run(runs: list[RunRecord], method: str, channels: int | None = None,
             backbone: str | None = None) -> RunRecord | None:
    """The training run of ``method`` (at ``channels``, for ``backbone``) with the best test
    top-1; for an entropic student the best of its β values. None when there is none."""
    found = [r for r in runs if r.method == method and (channels is None or r.channels == channels)
             and (backbone is None or r.teacher == backbone)]
    return max(found, key=lambda r: r.test_top1) if found else None


_AVERAGED = ("test_top1", "test_top5", "bytes_per_image", "teacher_top1", "select_top1", "train_seconds",
             "seconds_per_epoch", "images_per_s")


def seed_means(runs: list[RunRecord]) -> list[RunRecord]:
    """One record per setting (backbone, method, channels, β) whose numbers are the means over
    its seeds (``seed`` -1 when several were averaged); settings with one seed pass through."""
    groups: dict[tuple, list[RunRecord]] = {}
    for r in runs:
        groups.setdefault((r.teacher, r.method, r.channels, r.beta), []).append(r)
    out = []
    for group in groups.values():
        if len(group) == 1:
            out.append(group[0])
            continue
        averaged = {k: mean(getattr(r, k) for r in group) for k in _AVERAGED
                    if all(getattr(r, k) is not None for r in group)}
        out.append(replace(group[0], seed=-1, **averaged))
    return out


def narrowest_summary(runs: list[RunRecord]) -> dict:
    """The results chapter's closing numbers: for the first backbone with a reference top-1,
    at its narrowest bottleneck, each method's test top-1 and seconds per epoch, as means over
    seeds (an entropic student's at its best β, with that β and its bytes per image) and the β
    values trained. Numbers that no run measured are None."""
    reference = teacher_reference(runs)
    lead = sorted(reference)[0] if reference else None
    runs = seed_means(runs)
    widths = sorted({r.channels for r in runs if r.teacher == lead and r.method != "teacher"})
    low = widths[0] if widths else None
    out = {"backbone": lead, "channels": low, "teacher_top1": reference.get(lead), "methods": {}}
    for method in ("naive", "kd", "hnd", "ae", "entropic"):
        best = best_run(runs, method, low, lead) if low is not None else None
        out["methods"][method] = {key: getattr(best, name) if best else None for key, name in (
            ("top1", "test_top1"), ("seconds_per_epoch", "seconds_per_epoch"), ("beta", "beta"),
            ("bytes_per_image", "bytes_per_image"))}
    out["betas"] = sorted({r.beta for r in runs if r.method == "entropic" and r.teacher == lead and r.channels == low})
    return out


def learning_curves(runs: list[RunRecord]) -> list[tuple[RunRecord, list[dict]]]:
    """Each student run with its per-epoch lines (``run/metrics.jsonl`` in its cell folder),
    for the learning-curve figures; runs whose lines are not there are left out."""
    from hnd.training import read_metrics

    out = []
    for r in runs:
        metrics = read_metrics(r.folder / "run") if r.folder is not None and r.method != "teacher" else []
        if metrics:
            out.append((r, metrics))
    return out


def top1_at_epoch(curves: list[tuple[RunRecord, list[dict]]], epoch: int) -> list[RunRecord]:
    """The runs as if they had stopped after ``epoch`` epochs and kept their best selection
    epoch up to then: test top-1 of that epoch (runs that logged ``test_top1`` every epoch)."""
    out = []
    for record, metrics in curves:
        seen = [m for m in metrics if m["epoch"] <= epoch and "test_top1" in m]
        if seen:
            kept = max(seen, key=lambda m: m["select_top1"])  # the first of equals, as training keeps it
            out.append(replace(record, test_top1=kept["test_top1"], best_epoch=kept["epoch"],
                               epochs_run=len(seen)))
    return out
