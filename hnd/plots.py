"""Figures for the book, drawn from :class:`hnd.analysis.Analysis` results.

This is the package's only plotting module. It imports matplotlib, so ``import hnd`` does
not import it. Every function returns a new :class:`matplotlib.figure.Figure`; close it
with ``plt.close(fig)`` once shown.
"""

from __future__ import annotations

from collections.abc import Iterable
from math import prod

import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from matplotlib.ticker import EngFormatter, FuncFormatter, LogLocator, NullFormatter

from hnd.analysis import Analysis

SIZE_COLOR, MACS_COLOR, SPLIT_COLOR = "tab:blue", "tab:orange", "tab:red"
_PERCENT = FuncFormatter(lambda v, _: f"{v:g}%")


def _as_list(analyses: Analysis | Iterable[Analysis]) -> list[Analysis]:
    return [analyses] if isinstance(analyses, Analysis) else list(analyses)


def _size_ratios(analysis: Analysis) -> list[float]:
    n_input = prod(analysis.summary.input_shape)
    return [row.numel / n_input for row in analysis.rows]


def _split_index(analysis: Analysis) -> int:
    """Index of the last row that runs on the device (teacher head or student encoder)."""
    device = "encoder" if analysis.summary.kind == "student" else "head"
    return max(i for i, row in enumerate(analysis.rows) if row.part == device)


def _stage_ticks(analysis: Analysis, min_gap: float) -> tuple[list[int], list[str]]:
    """First row of each top-level stage (``head.layer2.3`` -> ``layer2``), thinned so that
    labels are at least ``min_gap`` rows apart."""
    ticks, labels, last = [], [], None
    for i, row in enumerate(analysis.rows):
        stage = row.name.split(".")[1] if "." in row.name else row.name
        if labels and stage == labels[-1]:
            continue
        if last is None or i - last >= min_gap:
            ticks.append(i)
            labels.append(stage)
            last = i
    return ticks, labels


def plot_layer_sizes(analyses: Analysis | Iterable[Analysis]) -> Figure:
    """Per model, two panels over its sequential layers: each layer's output size relative
    to the input (log scale; the dotted line is the input's size) and the cumulative MACs
    as % of the whole model. The dashed line marks the official split point."""
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
        size_ax.set_title(f"{s.model}: {len(analysis.rows)} sequential layers", loc="left",
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
        size_ax.text(split, size_ax.get_ylim()[1], f" official split: {s.split_point}",
                     color=SPLIT_COLOR, fontsize=8, va="top")
        ticks, labels = _stage_ticks(analysis, min_gap=len(analysis.rows) / 30)
        macs_ax.set_xticks(ticks, labels, rotation=90, fontsize=7)
        macs_ax.set_xlim(-0.5, len(analysis.rows) - 0.5)
    fig.tight_layout()
    return fig


def plot_size_vs_compute(teachers: Iterable[Analysis], students: Iterable[Analysis] = ()) -> Figure:
    """Every possible split of each teacher as a point (share of the model's MACs done on
    the device, size of the tensor sent relative to the input), official split points
    circled; students' bottlenecks (if given) as crosses in their teacher's colour."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = {}
    for analysis in teachers:
        s = analysis.summary
        x = [100 * row.cum_macs / s.macs for row in analysis.rows]
        y = _size_ratios(analysis)
        (line,) = ax.plot(x, y, marker=".", ms=3, lw=1, label=s.model)
        colors[s.teacher] = line.get_color()
        split = _split_index(analysis)
        ax.plot(x[split], y[split], "o", ms=9, mfc="none", color=line.get_color())
    labelled = set()
    for analysis in students:
        s = analysis.summary
        ax.plot(100 * s.encoder_macs / s.macs, s.bottleneck_pct_of_input / 100, "x", ms=7,
                mew=1.5, color=colors.get(s.teacher, "black"),
                label=None if s.teacher in labelled else f"{s.teacher} students")
        labelled.add(s.teacher)
    ax.plot([], [], "o", ms=9, mfc="none", color="0.3", label="official split")
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
