"""Figures for the book. Imports matplotlib, so ``import hnd`` does not import this module."""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from hnd.analysis import Analysis


def plot_layer_sizes(analyses: list[Analysis]) -> Figure:
    """Per teacher: each sequential layer's output size relative to the input (log scale)
    and cumulative MACs as % of the whole model, with the official split point marked."""
    fig, axes = plt.subplots(len(analyses), 1, figsize=(9, 2.8 * len(analyses)), squeeze=False)
    for ax, analysis in zip(axes[:, 0], analyses):
        s = analysis.summary
        input_numel = s.input_shape[0] * s.input_shape[1] * s.input_shape[2]
        rows = [r for r in analysis.rows if len(r.output_shape) == 3]  # feature maps only
        x = range(len(rows))
        ax.semilogy(x, [r.numel / input_numel for r in rows], color="tab:blue", label="output / input size")
        ax.axhline(1.0, color="tab:blue", lw=0.8, ls=":")
        split = max(i for i, r in enumerate(rows) if r.part == "head")
        ax.axvline(split, color="tab:red", lw=1, ls="--", label=f"official split ({s.split_point})")
        ax.set_ylabel("size vs input")
        ax.set_title(s.model, loc="left", fontsize=10)
        cum = ax.twinx()
        cum.plot(x, [100 * r.cum_macs / s.macs for r in rows], color="tab:orange", label="cumulative MACs %")
        cum.set_ylim(0, 100)
        cum.set_ylabel("cum. MACs %")
        lines = ax.get_legend_handles_labels()[0] + cum.get_legend_handles_labels()[0]
        ax.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="upper right")
    axes[-1, 0].set_xlabel("sequential layer")
    fig.tight_layout()
    return fig


_DEVICE_METRICS = {
    "device MACs": lambda s: s.encoder_macs,
    "device parameters": lambda s: s.encoder_params,
    "bytes sent per image (fp32)": lambda s: s.bottleneck_bytes["fp32"],
}


def plot_head_comparison(teachers: list[Analysis], students: list[Analysis]) -> Figure:
    """Device-side MACs and parameters of each teacher head (split at its official point) vs
    its students' encoders, and the bytes sent per image, per bottleneck channel count."""
    names = [t.summary.teacher for t in teachers]
    by_key = {(a.summary.teacher, a.summary.bottleneck_shape[0]): a.summary for a in students}
    channels = sorted({c for _, c in by_key})
    width = 0.8 / (1 + len(channels))
    fig, axes = plt.subplots(1, len(_DEVICE_METRICS), figsize=(12, 3.6))
    for ax, (title, value) in zip(axes, _DEVICE_METRICS.items()):
        ax.bar(range(len(names)), [value(t.summary) for t in teachers], width, label="teacher head")
        for j, c in enumerate(channels, 1):
            ax.bar([k + j * width for k in range(len(names))], [value(by_key[n, c]) for n in names], width,
                   label=f"student encoder, {c} ch")
        ax.set_yscale("log")
        ax.set_xticks([k + width * len(channels) / 2 for k in range(len(names))], names, rotation=20, fontsize=8)
        ax.set_title(title, fontsize=10)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=1 + len(channels), fontsize=8)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return fig
