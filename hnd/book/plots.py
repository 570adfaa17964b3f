"""Figures for the book: the data, split analyses, training runs, the grid's comparisons, rate–accuracy.

This is the package's only plotting module. It imports matplotlib, so ``import hnd`` does
not import it. Every function returns a new :class:`matplotlib.figure.Figure`; close it
with ``plt.close(fig)`` once shown.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from math import prod
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, FuncFormatter, LogLocator, MaxNLocator, NullFormatter, NullLocator

from hnd.book.results import RunRecord, beta_setting, entropic_means, is_entropic_point

if TYPE_CHECKING:  # torch: only the figures of models need it, not those of runs
    from hnd.analysis import Analysis
    from hnd.rate import RatePoint

SIZE_COLOR, MACS_COLOR, SPLIT_COLOR = "tab:blue", "tab:orange", "tab:red"
_PERCENT = FuncFormatter(lambda v, _: f"{v:g}%")


def plot_image_rows(rows: dict[str, list[tuple[str, object]]], columns: int = 10, size: float = 1.05) -> Figure:
    """Images in labelled rows: ``rows`` maps a row title to (caption, PIL image) pairs, laid
    out ``columns`` to a line (a long row wraps onto several lines under one title)."""
    lines = [(title if k == 0 else "", items[k:k + columns]) for title, items in rows.items()
             for k in range(0, max(len(items), 1), columns)]
    fig, axes = plt.subplots(len(lines), columns, figsize=(size * columns, size * 1.25 * len(lines)), squeeze=False)
    for (title, items), line in zip(lines, axes):
        for ax in line:
            ax.set_axis_off()
        for ax, (caption, image) in zip(line, items):
            ax.imshow(image)
            ax.set_title(caption, fontsize=6)
        if title:
            line[0].text(-0.08, 1.25, title, transform=line[0].transAxes, fontsize=8, fontweight="bold")
    fig.tight_layout(h_pad=0.8)
    return fig


def _as_list(analyses: Analysis | Iterable[Analysis]) -> list[Analysis]:
    return list(analyses) if isinstance(analyses, Iterable) else [analyses]


def _size_ratios(analysis: Analysis) -> list[float]:
    n_input = prod(analysis.summary.input_shape)
    return [row.numel / n_input for row in analysis.rows]


def _split_index(analysis: Analysis) -> int:
    """Index of the last row that runs on the device (teacher head or student encoder)."""
    device = "encoder" if analysis.summary.kind == "student" else "head"
    return max(i for i, row in enumerate(analysis.rows) if row.part == device)


def _stage_ticks(analysis: Analysis, min_gap: float) -> tuple[list[int], list[str]]:
    """First row of each top-level stage (``head.layer2.3`` -> ``layer2``), thinned so that
    labels are at least ``min_gap`` rows apart. Where there are four top-level modules or
    fewer (``features``, ``avgpool``, ``flatten``, ``classifier`` of a traced MobileNet), their
    children are the stages (``features.3``)."""
    def stage(name: str, depth: int) -> str:
        parts = name.split(".")[1:] or [name]
        return ".".join(parts[:depth])

    depth = 2 if len({stage(r.name, 1) for r in analysis.rows}) <= 4 else 1
    ticks, labels, last = [], [], None
    for i, row in enumerate(analysis.rows):
        name = stage(row.name, depth)
        if labels and name == labels[-1]:
            continue
        if last is None or i - last >= min_gap:
            ticks.append(i)
            labels.append(name)
            last = i
    return ticks, labels


def plot_layer_sizes(analyses: Analysis | Iterable[Analysis]) -> Figure:
    """Per model, two panels over its layers (as :func:`hnd.analysis.analyze` walks them):
    each layer's output size relative to the input (log scale; the dotted line is the
    input's size) and the cumulative MACs as % of the whole model. The dashed line marks the
    model's split point (the official one of a paper family's teacher)."""
    analyses = _as_list(analyses)
    fig, axes = plt.subplots(2 * len(analyses), 1, figsize=(8, 4.4 * len(analyses)),
                             gridspec_kw={"height_ratios": [3, 2] * len(analyses)}, squeeze=False)
    for k, analysis in enumerate(analyses):
        size_ax, macs_ax = axes[2 * k, 0], axes[2 * k + 1, 0]
        s, x = analysis.summary, range(len(analysis.rows))
        split = _split_index(analysis)

        size_ax.semilogy(x, _size_ratios(analysis), color=SIZE_COLOR, marker=".", ms=3, lw=1.2)
        size_ax.axhline(1.0, color="0.3", lw=0.8, ls=":")
        size_ax.text(len(analysis.rows) - 1, 1.0, "input size ", ha="right", va="bottom",
                     fontsize=8, color="0.3")
        size_ax.set_ylabel("output / input")
        size_ax.set_title(f"{s.model}: {len(analysis.rows)} layers", loc="left",
                          fontsize=10)

        macs_ax.plot(x, [100 * row.cum_macs / s.macs for row in analysis.rows], color=MACS_COLOR)
        macs_ax.set_ylim(0, 100)
        macs_ax.yaxis.set_major_formatter(_PERCENT)
        macs_ax.set_ylabel("cumulative MACs")
        macs_ax.sharex(size_ax)
        size_ax.tick_params(labelbottom=False)

        for ax in (size_ax, macs_ax):
            ax.axvline(split, color=SPLIT_COLOR, lw=1, ls="--")
            ax.grid(axis="y", lw=0.3, alpha=0.5)
        size_ax.text(split, size_ax.get_ylim()[1], f" split: {s.split_point}",
                     color=SPLIT_COLOR, fontsize=8, va="top")
        ticks, labels = _stage_ticks(analysis, min_gap=len(analysis.rows) / 30)
        macs_ax.set_xticks(ticks, labels, rotation=90, fontsize=7)
        macs_ax.set_xlim(-0.5, len(analysis.rows) - 0.5)
    fig.tight_layout()
    return fig


def plot_size_vs_compute(teachers: Iterable[Analysis], students: Iterable[Analysis] = ()) -> Figure:
    """Every possible split of each teacher as a point (share of the model's MACs done on
    the device, size of the tensor sent relative to the input; only layers after which one
    tensor crosses, ``row.cut``), the teachers' split points circled; students' bottlenecks
    (if given) as crosses in their teacher's colour."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = {}
    for analysis in teachers:
        s = analysis.summary
        split = _split_index(analysis)
        ratios = _size_ratios(analysis)
        kept = [i for i, row in enumerate(analysis.rows) if row.cut]
        x = [100 * analysis.rows[i].cum_macs / s.macs for i in kept]
        y = [ratios[i] for i in kept]
        (line,) = ax.plot(x, y, marker=".", ms=3, lw=1, label=s.model)
        colors[s.teacher] = line.get_color()
        ax.plot(100 * analysis.rows[split].cum_macs / s.macs, ratios[split], "o", ms=9, mfc="none",
                color=line.get_color())
    labelled = set()
    for analysis in students:
        s = analysis.summary
        ax.plot(100 * s.encoder_macs / s.macs, s.bottleneck_pct_of_input / 100, "x", ms=7,
                mew=1.5, color=colors.get(s.teacher, "black"),
                label=None if s.teacher in labelled else f"{s.teacher} students")
        labelled.add(s.teacher)
    ax.plot([], [], "o", ms=9, mfc="none", color="0.3", label="split point")
    ax.axhline(1.0, color="0.3", lw=0.8, ls=":")
    ax.set_yscale("log")
    ax.set_xlim(0, 100)
    ax.xaxis.set_major_formatter(_PERCENT)
    ax.set_xlabel("MACs done on the device (cumulative, % of the model)")
    ax.set_ylabel("tensor sent / input size")
    ax.grid(lw=0.3, alpha=0.5)
    ax.legend(fontsize=8, ncol=3, loc="lower left")
    fig.tight_layout()
    return fig


_DEVICE_PANELS = (
    ("MACs on the device", lambda s: s.encoder_macs),
    ("parameters on the device", lambda s: s.encoder_params),
    ("bytes sent per image (fp32)", lambda s: s.bottleneck_bytes["fp32"]),
)


def plot_head_comparison(teachers: Iterable[Analysis], students: Iterable[Analysis]) -> Figure:
    """Bars per teacher: what the device runs and sends when the teacher is split at its
    official point (teacher head) vs for each of its students (encoder, bottleneck), by
    bottleneck channel count. Short black lines in the bytes panel mark the input image's
    size at fp32. Log scales."""
    teachers = _as_list(teachers)
    names = [t.summary.model for t in teachers]
    by_key = {(a.summary.teacher, a.summary.bottleneck_shape[0]): a.summary for a in students}
    channels = sorted({c for _, c in by_key})
    n_bars = 1 + len(channels)
    width = 0.8 / n_bars
    fig, axes = plt.subplots(1, len(_DEVICE_PANELS), figsize=(8, 3.6))
    for ax, (title, value) in zip(axes, _DEVICE_PANELS):
        ax.bar(range(len(names)), [value(t.summary) for t in teachers], width, color="0.55",
               label="teacher head")
        for j, c in enumerate(channels, 1):
            ax.bar([k + j * width for k in range(len(names))],
                   [value(by_key[t.summary.teacher, c]) if (t.summary.teacher, c) in by_key
                    else 0 for t in teachers],
                   width, label=f"student, {c} ch")
        if title.startswith("bytes"):
            for k, t in enumerate(teachers):
                ax.hlines(4 * prod(t.summary.input_shape), k - width, k + n_bars * width,
                          color="black", lw=1.2, label="input image" if k == 0 else None)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(EngFormatter(sep=""))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks([k + width * (n_bars - 1) / 2 for k in range(len(names))], names,
                      rotation=30, ha="right", fontsize=8)
        ax.tick_params(axis="y", labelsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", lw=0.3, alpha=0.5)
    handles, labels = axes[-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


METHOD_COLORS = {"teacher": "black", "naive": "tab:gray", "kd": "tab:orange", "hnd": "tab:blue", "ae": "tab:green",
                 "entropic": "tab:purple", "head_kd": "tab:cyan"}  # also the order of the methods in plots
METHOD_LABELS = {"naive": "naive", "kd": "KD", "hnd": "HND", "ae": "AE", "entropic": "entropic",
                 "head_kd": "head KD", "teacher": "teacher"}
STAGE_COLOR = "tab:purple"


def _beta_colors(betas: Iterable[float]) -> dict[float, object]:
    """One shade of purple per β, darker for larger β (a higher rate weight, fewer bytes)."""
    betas = sorted(set(betas))
    cmap = plt.get_cmap("Purples")
    return {b: cmap(0.45 + 0.5 * (k / (len(betas) - 1) if len(betas) > 1 else 0.5)) for k, b in enumerate(betas)}


def plot_training(metrics: list[dict], title: str = "") -> Figure:
    """One training run per epoch (``metrics.jsonl`` lines): training loss, top-1 on the
    selection split (and on the training batches where the method has logits), seconds. An
    entropic run (lines with ``stage``) gets a fourth panel, bytes per image: the prior's
    estimate on the noisy training bottleneck (stage 1) and the range-coded bytes on the
    selection split; a dotted line marks where stage 2 begins."""
    entropic = any("stage" in m for m in metrics)
    fig, axes = plt.subplots(1, 4 if entropic else 3, figsize=(14 if entropic else 11, 3.2))
    loss_ax, acc_ax, time_ax = axes[:3]
    epochs = [m["epoch"] for m in metrics]
    loss_ax.plot(epochs, [m["train_loss"] for m in metrics], marker="o", color="tab:red")
    loss_ax.set_yscale("log")
    loss_ax.set(xlabel="epoch", ylabel="training loss per image", title="loss")
    acc_ax.plot(epochs, [m["select_top1"] for m in metrics], marker="o", label="selection split")
    tested = [(m["epoch"], m["test_top1"]) for m in metrics if "test_top1" in m]  # test_every_epoch, test_first_epochs
    if tested:
        acc_ax.plot(*zip(*tested), marker=".", color="black", label="test split")
    trained = [(m["epoch"], m["train_top1"]) for m in metrics if "train_top1" in m]
    if trained and (entropic or len(trained) == len(metrics)):
        acc_ax.plot(*zip(*trained), marker=".", ls="--", label="training batches")
    acc_ax.yaxis.set_major_formatter(_PERCENT)
    acc_ax.set(xlabel="epoch", ylabel="top-1", title="accuracy")
    acc_ax.legend(fontsize=8)
    time_ax.bar(epochs, [m["seconds"] for m in metrics], color="0.6")
    time_ax.set(xlabel="epoch", ylabel="seconds", title="time per epoch")
    if entropic:
        rate_ax = axes[3]
        for key, label, style in (("train_bytes_estimate", "training estimate (noisy)", "--"),
                                  ("select_bytes_per_image", "range-coded, selection split", "-")):
            series = [(m["epoch"], m[key]) for m in metrics if m.get(key) is not None]
            if series:
                rate_ax.plot(*zip(*series), marker="o", ls=style, color=STAGE_COLOR, label=label)
        rate_ax.set(xlabel="epoch", ylabel="bytes per image", title="rate")
        if rate_ax.lines:
            rate_ax.legend(fontsize=8)
        first = [m["epoch"] for m in metrics if m.get("stage") == 2]
        if first:
            for ax in axes:
                ax.axvline(first[0] - 0.5, color=STAGE_COLOR, ls=":", lw=1)
            loss_ax.text(first[0] - 0.5, 1, " stage 2", transform=loss_ax.get_xaxis_transform(), va="top",
                         fontsize=7, color=STAGE_COLOR)
    for ax in axes:
        ax.grid(alpha=0.3, lw=0.5)
        if len(epochs) <= 12:
            ax.set_xticks(epochs)
        else:  # a locator, not fixed ticks: those would widen the axis past the run (epoch -5 to 20)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_accuracy_vs_channels(runs: list[RunRecord], teacher_top1: dict[str, float] | None = None) -> Figure:
    """The papers' main comparison: test top-1 against bottleneck channels, a line per method,
    one panel per backbone, the teacher's top-1 as a dashed reference line; with several seeds,
    the mean and a bar from the lowest to the highest seed. Entropic students
    get one line per rate weight β (``entropic β=…``, shades of purple). The legend is on the last panel, or on every panel when their lines differ."""
    teacher_top1 = teacher_top1 or {}
    backbones = sorted({r.teacher for r in runs} | set(teacher_top1))
    fig, axes = plt.subplots(1, max(len(backbones), 1), figsize=(4.2 * max(len(backbones), 1), 3.4),
                             squeeze=False, sharey=True)
    shades = _beta_colors(r.beta for r in runs if r.method == "entropic" and r.beta is not None)
    for ax, backbone in zip(axes[0], backbones):
        mine = [r for r in runs if r.teacher == backbone]
        for method in ("naive", "kd", "hnd", "ae"):
            _seed_line(ax, [r for r in mine if r.method == method], marker="o", color=METHOD_COLORS[method],
                       label=METHOD_LABELS[method])
        for beta in sorted({r.beta for r in mine if r.method == "entropic"}, key=lambda b: (b is None, b)):
            label = "entropic" if beta is None else f"entropic {beta_setting(beta)}"
            _seed_line(ax, [r for r in mine if r.method == "entropic" and r.beta == beta], marker="D", ms=5,
                       color=shades.get(beta, METHOD_COLORS["entropic"]), label=label)
        if backbone in teacher_top1:
            ax.axhline(teacher_top1[backbone], color="black", ls="--", lw=1, label="teacher")
        ax.set_xticks(sorted({r.channels for r in mine}) or [0])
        ax.yaxis.set_major_formatter(_PERCENT)
        ax.set(title=backbone, xlabel="bottleneck channels")
        ax.grid(alpha=0.3, lw=0.5)
    axes[0, 0].set_ylabel("test top-1")
    labels = [tuple(ax.get_legend_handles_labels()[1]) for ax in axes[0]]
    for ax in axes[0] if len(set(labels)) > 1 else axes[0, -1:]:
        if ax.get_legend_handles_labels()[1]:
            ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def _seed_line(ax, runs: list[RunRecord], **style) -> None:
    """Test top-1 against channels: the mean over seeds, with a bar from the lowest to the
    highest seed where there are several."""
    widths = sorted({r.channels for r in runs})
    if not widths:
        return
    seeds = [[r.test_top1 for r in runs if r.channels == w] for w in widths]
    means = [sum(v) / len(v) for v in seeds]
    ax.plot(widths, means, **style)
    if any(len(v) > 1 for v in seeds):
        spread = [[m - min(v) for m, v in zip(means, seeds)], [max(v) - m for m, v in zip(means, seeds)]]
        ax.errorbar(widths, means, yerr=spread, fmt="none", capsize=3, color=style["color"])


def plot_training_time(runs: list[RunRecord]) -> Figure:
    """Training cost per method: seconds per epoch and images per second, one bar per
    (method, channels) run, grouped by method; entropic runs, one per (channels, β), are
    labelled with both."""
    methods = [m for m in METHOD_COLORS if any(r.method == m for r in runs)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for ax, key, label in ((axes[0], "seconds_per_epoch", "seconds per epoch"),
                           (axes[1], "images_per_s", "training images per second")):
        x = 0
        ticks, names = [], []
        for method in methods:
            group = sorted((r for r in runs if r.method == method),
                           key=lambda r: (r.teacher, r.channels or 0, r.beta or 0))
            start = x
            for r in group:
                ax.bar(x, getattr(r, key), color=METHOD_COLORS[method], width=0.8)
                if method == "entropic" and r.beta is not None:
                    ax.text(x, getattr(r, key), f"{r.channels} {beta_setting(r.beta)}", ha="center", va="bottom",
                            fontsize=6, rotation=90)
                elif method != "teacher":
                    ax.text(x, getattr(r, key), f"{r.channels}", ha="center", va="bottom", fontsize=7)
                x += 1
            ticks.append((start + x - 1) / 2)
            names.append(METHOD_LABELS[method])
            x += 0.6
        ax.set_xticks(ticks, names, rotation=20, ha="right", fontsize=8)  # seven groups side by side
        ax.set(ylabel=label)
        ax.margins(y=0.25 if "entropic" in methods else 0.05)
        ax.grid(axis="y", alpha=0.3, lw=0.5)
    axes[0].set_title("numbers on bars: bottleneck channels (and β)", fontsize=8, loc="left")
    fig.tight_layout()
    return fig


_FORMAT_MARKERS = {"fp32": "o", "fp16": "s", "int8": "^", "int8+zlib": "D"}
_NOTE_SIZE = 9  # points' labels in the rate-accuracy plane


def _sparse(n: int, most: int) -> list[int]:
    """At most ``most`` indices spread evenly over ``range(n)``, the first and last included."""
    if n <= most:
        return list(range(n))
    return sorted({round(k * (n - 1) / (most - 1)) for k in range(most)})


def _annotate_sparsely(ax, series: list[dict], most: int, placed: list, y_tol: float, gap: float = 0.1,
                       **text) -> None:
    """Write each chosen point's ``setting`` next to it, skipping points that lie too close (``gap``
    decades of bytes, ``y_tol`` of top-1) to one already written, so that labels do not pile up."""
    for i in _sparse(len(series), most):
        x, y = series[i]["bytes"], series[i]["top1"]
        if any(abs(math.log10(x / px)) < gap and abs(y - py) < y_tol for px, py in placed):
            continue
        placed.append((x, y))
        ax.annotate(series[i]["setting"], (x, y), textcoords="offset points", **text)


def plot_rate_accuracy(points: list[RatePoint] | list[dict], teacher_top1: float | None = None) -> Figure:
    """Top-1 against bytes sent per image (log scale) for :mod:`hnd.rate` points: bottlenecks
    as markers (colour by model, marker by tensor format), each entropic student (rows with a
    ``beta``, see :func:`hnd.book.results.model_points`) as one curve through the mean of its
    seeds at each β, joined in order of bytes, with a bar from its lowest to its highest seed and
    every β written, one line per input codec over its qualities, one line
    per teacher through its split stages (in stage order), the raw input size as a dotted
    vertical line, the teacher's top-1 (if given) as a dashed line. Sized to be read at the
    width of a page: the legend sits below the axes, in columns."""
    rows = [p.to_dict() if hasattr(p, "to_dict") else dict(p) for p in points]
    fig, ax = plt.subplots(figsize=(7.5, 6.5), layout="constrained")
    handles: list = []
    colors = (f"C{k % 10}" for k in range(10**6))  # one colour per model, codec and teacher
    placed: list = []  # annotated (bytes, top1)
    tops = [r["top1"] for r in rows] + ([teacher_top1] if teacher_top1 is not None else [])
    y_tol = 0.04 * ((max(tops) - min(tops)) if tops else 1) or 1

    bottlenecks = [r for r in rows if r["kind"] == "bottleneck"]
    labels = list(dict.fromkeys(r["label"] for r in bottlenecks))
    formats = list(dict.fromkeys(r["setting"] for r in bottlenecks if not is_entropic_point(r)))
    spare = iter("os^Dvp*hX")
    markers = {f: _FORMAT_MARKERS.get(f) or next(spare) for f in formats}
    curves = []  # (label, colour) of entropic students, drawn after the markers
    for label in labels:
        color = next(colors)
        mine = [r for r in bottlenecks if r["label"] == label]
        for fmt in formats:
            series = [r for r in mine if r["setting"] == fmt and not is_entropic_point(r)]
            if series:
                ax.scatter([r["bytes"] for r in series], [r["top1"] for r in series], s=60, color=color,
                           marker=markers[fmt], edgecolors="black", linewidths=0.4, zorder=3)
        if any(not is_entropic_point(r) for r in mine):
            handles.append(plt.Line2D([], [], ls="", marker="o", ms=7, color=color, label=label))
        if any(is_entropic_point(r) for r in mine):
            curves.append((label, color))
    handles += [plt.Line2D([], [], ls="", marker=markers[f], ms=6, color="0.6", mec="black", mew=0.4,
                           label=f"bottleneck {f}") for f in formats]
    means = entropic_means(bottlenecks)
    for label, color in curves:
        series = sorted((c for c in means if c["label"] == label), key=lambda c: (c["bytes"], c["beta"]))
        (line,) = ax.plot([c["bytes"] for c in series], [c["top1"] for c in series], marker="P", ms=8, lw=1.6,
                          color=color, mec="black", mew=0.4, zorder=4, label=f"{label}, range-coded over β")
        handles.append(line)
        spread = [c for c in series if c["top1_high"] > c["top1_low"]]
        if spread:  # from the lowest to the highest seed, as the results chapter draws them
            ax.vlines([c["bytes"] for c in spread], [c["top1_low"] for c in spread],
                      [c["top1_high"] for c in spread], color=color, lw=1.6, zorder=4)
        for c in series:  # every β: the curve's points mean nothing without it
            placed.append((c["bytes"], c["top1"]))
            ax.annotate(beta_setting(c["beta"]), (c["bytes"], c["top1"]), textcoords="offset points",
                        xytext=(5, -11), fontsize=_NOTE_SIZE, color=color)

    inputs = [r for r in rows if r["kind"] == "input"]
    for label in dict.fromkeys(r["label"] for r in inputs if r["setting"] != "raw"):
        series = [r for r in inputs if r["label"] == label and r["setting"] != "raw"]
        series.sort(key=lambda r: (int(r["setting"][1:]) if r["setting"][1:].isdigit() else 0, r["bytes"]))
        (line,) = ax.plot([r["bytes"] for r in series], [r["top1"] for r in series], marker=".", ms=6,
                          lw=1.2, color=next(colors), label=f"input: {label}")
        handles.append(line)
        _annotate_sparsely(ax, series, 3, placed, y_tol, xytext=(3, 5), fontsize=_NOTE_SIZE,
                           color=line.get_color())

    for label in dict.fromkeys(r["label"] for r in rows if r["kind"] == "teacher_split"):
        series = [r for r in rows if r["kind"] == "teacher_split" and r["label"] == label]
        (line,) = ax.plot([r["bytes"] for r in series], [r["top1"] for r in series], marker="x", ms=5,
                          lw=0.8, color=next(colors), label=f"{label} split after a stage")
        handles.append(line)
        _annotate_sparsely(ax, series, 6, placed, y_tol, gap=0.2, xytext=(0, -12), fontsize=_NOTE_SIZE - 1,
                           ha="center", color=line.get_color())

    raw = {(r["label"], r["bytes"]): r for r in inputs if r["setting"] == "raw"}
    for (label, size), r in raw.items():
        handles.append(ax.axvline(size, color="0.3", lw=1, ls=":", label=f"raw input ({size:,.0f} B)"))
        ax.plot(size, r["top1"], marker="*", ms=9, color="0.3", ls="")
    if teacher_top1 is not None:
        handles.append(ax.axhline(teacher_top1, color="black", lw=1, ls="--",
                                  label=f"teacher top-1 ({teacher_top1:.1f}%)"))

    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(EngFormatter(unit="B", sep=" "))
    ax.yaxis.set_major_formatter(_PERCENT)
    ax.set_xlabel("bytes sent per image (log scale)", fontsize=12)
    ax.set_ylabel("top-1", fontsize=12)
    ax.tick_params(labelsize=11)
    ax.grid(lw=0.3, alpha=0.5, which="both")
    fig.legend(handles=handles, fontsize=10, loc="outside lower center", ncol=2, frameon=False)
    return fig


DELAY_PARTS = (("device", "tab:blue"), ("encode", "tab:purple"), ("transfer", "tab:orange"), ("rtt", "0.6"),
               ("server", "tab:green"))
_RATES = [10 ** (k / 20) for k in range(-20, 61)]  # 0.1 .. 1000 Mbps


def format_rate(mbps: float, unit: bool = True) -> str:
    """A data rate as people write it: 0.1, 2.5, 316, 1,000 Mbps (three significant digits,
    thousands separated, never an exponent), as the explorer's rate slider shows it."""
    if not 0 < mbps < math.inf:
        return f"{mbps:g}" + (" Mbps" if unit else "")
    digits = 2 - math.floor(math.log10(mbps))
    text = f"{round(mbps, digits):,.{max(digits, 0)}f}"
    text = text.rstrip("0").rstrip(".") if "." in text else text
    return text + (" Mbps" if unit else "")


def _delay_curve(option, rtt_ms: float) -> list[float]:
    return [1e3 * option.delay(r, rtt_ms) for r in _RATES]


def plot_delay_breakdown(options: list, rate_mbps: float, rtt_ms: float, *, crossings: list[dict] = (),
                         title: str = "") -> Figure:
    """Left: each option's delay at one link, stacked by where the time goes. Right: delay
    against data rate (log-log), the chosen rate dashed, the rates where the best option
    changes marked. ``options`` are :class:`hnd.latency.Option`. Margins are computed, not
    searched (no tight layout, no minor grid): the live explorer redraws it on every change."""
    width, height = 11, 0.45 * len(options) + 2.2
    fig, (bars, curves) = plt.subplots(1, 2, figsize=(width, height), gridspec_kw={"width_ratios": [1.1, 1]})
    label_in = max((len(o.label) for o in options), default=0) * 8 * 0.52 / 72  # 8 pt text, ~0.52 em a character
    fig.subplots_adjust(left=(label_in + 0.15) / width, right=0.985, bottom=0.62 / height,
                        top=1 - (0.5 if title else 0.2) / height, wspace=0.22)
    ranked = sorted(options, key=lambda o: o.delay(rate_mbps, rtt_ms), reverse=True)
    for i, option in enumerate(ranked):
        left = 0.0
        for part, color in DELAY_PARTS:
            width = 1e3 * option.breakdown(rate_mbps, rtt_ms)[part]
            bars.barh(i, width, left=left, color=color, label=part if i == 0 else None)
            left += width
    bars.set_yticks(range(len(ranked)), [o.label for o in ranked], fontsize=8)
    bars.set_xlabel(f"delay per image (ms) at {format_rate(rate_mbps)}, RTT {rtt_ms:.0f} ms")
    bars.legend(fontsize=7, loc="lower right")
    bars.grid(axis="x", alpha=0.3, lw=0.5)
    for option in options:
        curves.loglog(_RATES, _delay_curve(option, rtt_ms), label=option.label, lw=1.2)
    curves.axvline(rate_mbps, color="black", ls="--", lw=0.8)
    for c in crossings:
        curves.axvline(c["rate_mbps"], color="tab:red", ls=":", lw=0.8)
        curves.text(c["rate_mbps"], curves.get_ylim()[1], format_rate(c["rate_mbps"], unit=False), rotation=90,
                    va="top", ha="right", fontsize=7, color="tab:red")
    curves.set(xlabel="data rate (Mbps)", ylabel="delay per image (ms)")
    curves.xaxis.set_major_formatter(FuncFormatter(lambda x, _: format_rate(x, unit=False)))
    curves.grid(alpha=0.3, lw=0.5)
    for axis in (curves.xaxis, curves.yaxis):
        axis.set_minor_locator(NullLocator())
    curves.legend(fontsize=7, loc="upper right")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def plot_delay_vs_rate(options_by_teacher: dict[str, list], rtt_ms: float) -> Figure:
    """The papers' delay comparison: per backbone, delay against data rate for local
    computing, offloading, the best split of the plain teacher at each rate (the lower
    envelope over its split points) and the students."""
    names = list(options_by_teacher)
    cols = min(2, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False, sharey=True)
    for ax, name in zip(axes.flat, names):
        choices = options_by_teacher[name]
        splits = [o for o in choices if o.kind == "teacher_split"]
        for option in (o for o in choices if o.kind != "teacher_split"):
            ax.loglog(_RATES, _delay_curve(option, rtt_ms), label=option.label, lw=1.2,
                      ls="--" if option.kind.startswith("local") else "-")
        if splits:
            envelope = [min(1e3 * o.delay(r, rtt_ms) for o in splits) for r in _RATES]
            ax.loglog(_RATES, envelope, color="black", lw=1.6, label="best teacher split")
        ax.set(title=name, xlabel="data rate (Mbps)")
        ax.grid(alpha=0.3, lw=0.5, which="both")
        ax.legend(fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel(f"delay per image (ms), RTT {rtt_ms:g} ms")
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


def plot_learning_curves(curves: list[tuple[RunRecord, list[dict]]], key: str = "select_top1") -> Figure:
    """Every student's top-1 (``key``: selection or test split) against epoch (top) and against
    training seconds (below): one colour per method, solid for the narrowest bottleneck and dashed
    for wider ones, one line per seed; a cross marks the epoch each run kept. The lower panel is
    the papers' cost argument: accuracy per second of training. Sized to be read at the width of
    a page: the panels share its width, the legend sits below them."""
    fig, axes = plt.subplots(2, 1, figsize=(7.5, 7.5), sharey=True, layout="constrained")
    widths = sorted({r.channels for r, _ in curves if r.channels is not None})
    for record, metrics in curves:
        series = [(m["epoch"], m[key], m["seconds"]) for m in metrics if key in m]
        if not series:
            continue
        epochs, top1, seconds = zip(*series)
        elapsed = [sum(seconds[: i + 1]) for i in range(len(seconds))]
        style = dict(color=METHOD_COLORS.get(record.method, STAGE_COLOR), lw=1.2, alpha=0.85,
                     ls="-" if record.channels == widths[0] else "--")
        for ax, x in ((axes[0], epochs), (axes[1], elapsed)):
            ax.plot(x, top1, **style)
            kept = record.best_epoch - epochs[0]
            if 0 <= kept < len(x):
                ax.plot(x[kept], top1[kept], "x", ms=7, color=style["color"])
    handles = [plt.Line2D([], [], color=METHOD_COLORS.get(method, STAGE_COLOR), label=METHOD_LABELS.get(method, method))
               for method in dict.fromkeys(r.method for r, _ in curves)]
    if widths:
        handles.append(plt.Line2D([], [], color="0.3", ls="-", label=f"{widths[0]} ch"))
    if len(widths) > 1:
        handles.append(plt.Line2D([], [], color="0.3", ls="--", label=f"{', '.join(map(str, widths[1:]))} ch"))
    handles.append(plt.Line2D([], [], ls="", marker="x", color="0.3", label="kept epoch"))
    split = "selection" if key == "select_top1" else "test"
    axes[0].set(xlabel="epoch", ylabel=f"{split} top-1")
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1].set(xlabel="training seconds (cumulative, log scale)", ylabel=f"{split} top-1")
    axes[1].set_xscale("log")
    axes[1].xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))  # 1,000 s, not 10³
    for ax in axes:
        ax.yaxis.set_major_formatter(_PERCENT)
        ax.tick_params(labelsize=10)
        ax.xaxis.label.set_size(11)
        ax.yaxis.label.set_size(11)
        ax.grid(alpha=0.3, lw=0.5, which="both")
    fig.legend(handles=handles, fontsize=10, loc="outside lower center", ncol=3, frameon=False)
    return fig
