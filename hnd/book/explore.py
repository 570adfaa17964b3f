"""An interactive split-point explorer: ipywidgets over the latency model.

:class:`SplitExplorer` owns explicit widgets (backbone, channels, number format, data rate,
round-trip time, device and server profiles), an HTML summary and an ``Output`` with one
figure: the delay breakdown of each strategy at the chosen link, and delay against data rate
with the crossovers marked. Every change recomputes through :mod:`hnd.latency`, so tests
drive it headlessly by setting widget values and reading ``summary.value`` and ``shown``.
In a rendered book the widgets are a saved snapshot of their last state.
"""

from __future__ import annotations

import io
from functools import lru_cache

import ipywidgets as widgets
import matplotlib.pyplot as plt
from IPython.display import Image

from hnd.errors import HndError
from hnd.latency import CodedStudent, Option, coded_student, crossovers, list_device_profiles, load_device_profile, \
    options, plan
from hnd.book.plots import plot_delay_breakdown
from hnd.registry import resolve
from hnd.students import OFFICIAL_CHANNELS
from hnd.teachers import PAPER_TEACHERS

FORMATS = ("fp32", "fp16", "int8")
ENTROPY = "entropy"  # the format choice of entropic students, offered when runs measured some


@lru_cache(maxsize=64)
def _options(teacher: str, device: str, server: str, channels: int, fmt: str,
             coded: tuple[CodedStudent, ...] = ()) -> tuple[Option, ...]:
    """The options worth drawing for one setting (cached: analysing a teacher takes a second).
    ``entropy``: the entropic students of ``coded`` with their measured bytes, planned at their
    runs' input size."""
    spec = resolve(teacher)
    if fmt == ENTROPY:
        spec = spec.at_input_size(coded[0].input_size) if coded else spec
        return tuple(options(spec, load_device_profile(device), load_device_profile(server), channels=(channels,),
                             formats=(), coded=coded))
    return tuple(options(spec, load_device_profile(device), load_device_profile(server),
                         channels=(channels,), formats=(fmt,)))


def shortlist(choices: list[Option], rate_mbps: float, rtt_ms: float) -> list[Option]:
    """Local, small local model, offloading, the best teacher split at this link, and the
    students: the options a reader compares (every teacher split would crowd the figure)."""
    splits = [o for o in choices if o.kind == "teacher_split"]
    best_split = min(splits, key=lambda o: o.delay(rate_mbps, rtt_ms)) if splits else None
    return [o for o in choices if o.kind != "teacher_split"] + ([best_split] if best_split else [])


class SplitExplorer:
    """Widgets to explore where to split ``teachers`` for a device, a server and a link.

    ``accuracy`` maps (teacher, kind, channels) to a top-1 to show next to each option, e.g.
    from the book's runs (:func:`accuracy_from_runs`); kinds are those of
    :class:`hnd.latency.Option`, channels is None for options without a bottleneck.
    ``coded`` maps a teacher to its entropic students as measured (:func:`coded_from_runs`);
    when there are any, the format choice ``entropy`` shows them with their measured bytes.
    """

    def __init__(self, teachers: tuple[str, ...] = PAPER_TEACHERS, *, device: str = "this-machine",
                 server: str | None = None, profiles: list[str] | None = None,
                 accuracy: dict | None = None, coded: dict | None = None, rate_mbps: float = 10.0,
                 rtt_ms: float = 20.0):
        profiles = profiles or list_device_profiles()
        server = server or next((p for p in profiles if p != device), device)
        for name in (device, server):
            if name not in profiles:
                raise HndError(f"unknown device profile {name!r}; valid: {', '.join(profiles)}")
        self.accuracy = accuracy or {}
        self.coded = coded or {}
        style = {"description_width": "90px"}
        self.backbone = widgets.Dropdown(options=list(teachers), description="backbone", style=style)
        self.channels = widgets.Dropdown(options=list(OFFICIAL_CHANNELS), description="channels", style=style)
        formats = list(FORMATS) + ([ENTROPY] if any(self.coded.values()) else [])
        self.fmt = widgets.Dropdown(options=formats, value="int8", description="format", style=style)
        self.rate = widgets.FloatLogSlider(value=rate_mbps, base=10, min=-1, max=3, step=0.05,
                                           description="rate (Mbps)", continuous_update=False, style=style)
        self.rtt = widgets.FloatSlider(value=rtt_ms, min=0, max=200, step=1, description="RTT (ms)",
                                       continuous_update=False, style=style)
        self.device = widgets.Dropdown(options=profiles, value=device, description="device", style=style)
        self.server = widgets.Dropdown(options=profiles, value=server, description="server", style=style)
        self.summary = widgets.HTML()
        self.output = widgets.Output()
        self.shown: list[Option] = []  # what the figure shows now
        for control in self.controls:
            control.observe(lambda change: self.update(), names="value")
        self.update()

    @property
    def controls(self) -> list[widgets.Widget]:
        return [self.backbone, self.channels, self.fmt, self.rate, self.rtt, self.device, self.server]

    @property
    def widget(self) -> widgets.Widget:
        left = widgets.VBox([self.backbone, self.channels, self.fmt, self.device])
        right = widgets.VBox([self.rate, self.rtt, self.server])
        return widgets.VBox([widgets.HBox([left, right]), self.summary, self.output])

    def _accuracy(self, option: Option) -> float | None:
        if option.kind == "student" and option.accuracy is not None:  # an entropic student's own run
            return option.accuracy
        key = (self.backbone.value, option.kind, self.channels.value if option.kind == "student" else None)
        return self.accuracy.get(key, option.accuracy)

    def update(self) -> None:
        """Recompute for the current widget values and redraw the summary and the figure."""
        rate, rtt = self.rate.value, self.rtt.value
        coded = tuple(c for c in self.coded.get(self.backbone.value, ()) if c.spec.channels == self.channels.value)
        choices = list(_options(self.backbone.value, self.device.value, self.server.value, self.channels.value,
                                self.fmt.value, coded if self.fmt.value == ENTROPY else ()))
        self.shown = shortlist(choices, rate, rtt)
        ranked = plan(self.shown, rate, rtt)
        best, delay = ranked[0]
        changes = crossovers(self.shown, rtt_ms=rtt)
        rows = "".join(
            f"<tr><td>{o.label}</td><td style='text-align:right'>{1e3 * d:,.1f}</td>"
            f"<td style='text-align:right'>{o.bytes:,.0f}</td>"
            f"<td style='text-align:right'>{'' if self._accuracy(o) is None else f'{self._accuracy(o):.1f}'}</td></tr>"
            for o, d in ranked)
        crossing = "; ".join(f"{c['from']} → {c['to']} at {c['rate_mbps']:.3g} Mbps" for c in changes) or "none"
        self.summary.value = (
            f"<b>Best at {rate:.3g} Mbps, {rtt:.0f} ms RTT: {best.label}</b> ({1e3 * delay:,.1f} ms)."
            f"<br>Best option changes as the rate rises: {crossing}."
            f"<table><tr><th>option</th><th>delay (ms)</th><th>bytes sent</th><th>top-1 (%)</th></tr>{rows}</table>")
        fig = plot_delay_breakdown(self.shown, rate, rtt, crossings=changes,
                                   title=f"{self.backbone.value}: {self.device.value} → {self.server.value}")
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
        plt.close(fig)
        self.output.outputs = ()
        self.output.append_display_data(Image(data=buffer.getvalue(), format="png"))


def accuracy_from_runs(runs: str) -> dict:
    """(teacher, kind, channels) -> test top-1 of the finished training runs of a book grid:
    HND students as ``student``, the teacher (own run or as measured in its students' runs)
    for ``local``, ``offload`` and ``teacher_split``."""
    from hnd.book.results import training_runs

    out: dict = {}
    for r in training_runs(runs):
        if r.method == "hnd":
            out[(r.teacher, "student", r.channels)] = r.test_top1
        if r.teacher_top1 is not None:
            for kind in ("local", "offload", "teacher_split"):
                out[(r.teacher, kind, None)] = r.teacher_top1
    return out


def coded_from_runs(runs: str) -> dict[str, list[CodedStudent]]:
    """teacher -> the entropic students of a book grid's finished runs, as measured."""
    from hnd.book.results import training_runs

    out: dict[str, list[CodedStudent]] = {}
    for r in training_runs(runs):
        if r.method == "entropic":
            out.setdefault(r.teacher, []).append(coded_student(r.checkpoint_path.parent))
    return out
