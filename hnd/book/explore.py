"""An interactive split-point explorer: ipywidgets over the latency model.

:class:`SplitExplorer` owns explicit widgets (backbone, the plain teacher's split point and
whether every traced layer is offered, student channels, number format, zlib ratio, data rate,
round-trip time, device and server profiles, a profile file), a one-line message, an HTML
summary and an ``Output`` with one figure: the delay breakdown of each option at the chosen
link, and delay against data rate with the crossovers marked. Every change recomputes through
:mod:`hnd.latency`, so tests drive it headlessly by setting widget values and reading
``summary.value`` and ``shown``.
In a rendered book the widgets are a saved snapshot of their last state; ``hnd explore``
serves them live (Voilà, :func:`app_explorer`). It opens on the papers' question: a Pi-class
device and a paper teacher, where the best option moves with the data rate.
"""

from __future__ import annotations

import html
import io
from functools import lru_cache
from pathlib import Path

import ipywidgets as widgets
import matplotlib.pyplot as plt
import traitlets
from IPython.display import Image

from hnd.errors import HndError
from hnd.devices import list_device_profiles, load_device_profile
from hnd.latency import CodedStudent, Option, coded_student, crossovers, options, plan
from hnd.book.plots import format_rate, plot_delay_breakdown
from hnd.registry import list_models, resolve
from hnd.students import OFFICIAL_CHANNELS
from hnd.teachers import PAPER_TEACHERS
from hnd.tracing import stage_ends

FORMATS = ("fp32", "fp16", "int8", "int8+zlib")
ENTROPY = "entropy"  # the format choice of entropic students, offered when runs measured some
BEST_SPLIT = "best at this link"
UNMEASURED_ZLIB = 1.0  # int8+zlib without a measured ratio: no compression assumed until one is set
DEVICE = "raspberry-pi4"  # where the explorer opens: a device slow enough for the link to decide
RATE_READOUT = ",.3~r"  # hnd.book.plots.format_rate in d3-format, for the slider's readout


class RateSlider(widgets.FloatLogSlider):
    """The data-rate slider; its readout writes rates as :func:`hnd.book.plots.format_rate`
    does (ipywidgets' own check of ``readout_format`` predates d3-format's ``~``, which trims
    trailing zeros)."""

    readout_format = traitlets.Unicode(RATE_READOUT).tag(sync=True)


@lru_cache(maxsize=128)
def _options(teacher: str, device: str, server: str, channels: int, fmt: str,
             coded: tuple[CodedStudent, ...] = (), zlib_ratio: float = UNMEASURED_ZLIB) -> tuple[Option, ...]:
    """The options worth drawing for one setting (cached: analysing a teacher takes a second).
    ``device``/``server``: a profile name or file. The plain teacher's splits are sent in the
    chosen format (int8 for the compressed ones, whose ratio is the bottleneck's).
    ``entropy``: the entropic students of ``coded`` with their measured bytes, planned at their
    runs' input size."""
    spec = resolve(teacher)
    dev, srv = load_device_profile(device), load_device_profile(server)
    if fmt == ENTROPY:
        spec = spec.at_input_size(coded[0].input_size) if coded else spec
        return tuple(options(spec, dev, srv, channels=(channels,), formats=(), coded=coded))
    split_format = fmt if fmt in ("fp32", "fp16", "int8") else "int8"
    return tuple(options(spec, dev, srv, channels=(channels,), formats=(fmt,), split_format=split_format,
                         lossless_ratio=zlib_ratio if fmt == "int8+zlib" else None))


def offered(choices: list[Option], every_layer: bool = False) -> list[Option]:
    """``choices`` with the plain teacher cut only where a stage ends (:func:`stage_ends`), or
    after every traced layer."""
    points = [o.split for o in choices if o.kind == "teacher_split"]
    keep = set(points if every_layer else stage_ends(points))
    return [o for o in choices if o.kind != "teacher_split" or o.split in keep]


def shortlist(choices: list[Option], rate_mbps: float, rtt_ms: float, split: str = "") -> list[Option]:
    """Local, small local model, offloading, one split of the plain teacher (``split``, or the
    best at this link when empty) and the students: the options a reader compares (every
    teacher split would crowd the figure)."""
    splits = [o for o in choices if o.kind == "teacher_split"]
    chosen = [o for o in splits if o.split == split][:1] if split else []
    if not chosen and splits:
        chosen = [min(splits, key=lambda o: o.delay(rate_mbps, rtt_ms))]
    return [o for o in choices if o.kind != "teacher_split"] + chosen


def known_teachers() -> list[str]:
    """Every teacher hnd knows: the papers' first, then the other registered ones, then every
    torchvision classifier, then timm's models with pretrained weights (when timm is installed)."""
    names = [r["name"] for r in list_models(all_teachers=True, timm=True) if r["kind"] == "teacher"]
    return list(PAPER_TEACHERS) + [n for n in names if n not in PAPER_TEACHERS]


def _error(exc: Exception) -> str:
    return f"<span style='color:#b00020'>{html.escape(str(exc))}</span>"


def _table(header: list[str], rows: list[list[str]]) -> str:
    """An HTML table whose columns stay apart in any page style: padded cells, the first column
    left-aligned, the numbers right-aligned."""
    def cells(tag: str, values: list[str]) -> str:
        return "".join(f"<{tag} style='padding:2px 10px;text-align:{'left' if i == 0 else 'right'}'>{v}</{tag}>"
                       for i, v in enumerate(values))

    return "<table>" + "".join(f"<tr>{cells(t, r)}</tr>" for t, r in [("th", header)] + [("td", r) for r in rows]) \
        + "</table>"


class SplitExplorer:
    """Widgets to explore where to split ``teachers`` for a device, a server and a link.

    ``accuracy`` maps (teacher, kind, channels) to a top-1 to show next to each option, e.g.
    from the book's runs (:func:`accuracy_from_runs`); kinds are those of
    :class:`hnd.latency.Option`, channels is None for options without a bottleneck.
    ``coded`` maps a teacher to its entropic students as measured (:func:`coded_from_runs`);
    when there are any, the format choice ``entropy`` shows them with their measured bytes.
    ``zlib_ratios`` maps channels to a measured zlib ratio of int8 bottlenecks
    (:func:`zlib_ratios_from_runs`); the ratio box starts there and can be changed.
    """

    def __init__(self, teachers: tuple[str, ...] = PAPER_TEACHERS, *, backbone: str | None = None,
                 device: str = DEVICE, server: str | None = None, profiles: list[str] | None = None,
                 accuracy: dict | None = None, coded: dict | None = None, zlib_ratios: dict | None = None,
                 rate_mbps: float = 10.0, rtt_ms: float = 20.0):
        profiles = profiles or list_device_profiles()
        server = server or next((p for p in profiles if p != device), device)
        for name in (device, server):
            if name not in profiles:
                raise HndError(f"unknown device profile {name!r}; valid: {', '.join(profiles)}")
        if backbone is not None and backbone not in teachers:
            raise HndError(f"backbone {backbone!r} is not among the explorer's: {', '.join(teachers)}")
        self.accuracy = accuracy or {}
        self.coded = coded or {}
        self.zlib_ratios = zlib_ratios or {}
        style = {"description_width": "90px"}
        self.backbone = widgets.Dropdown(options=list(teachers), value=backbone or teachers[0],
                                         description="backbone", style=style)
        self.split = widgets.Dropdown(options=[BEST_SPLIT], value=BEST_SPLIT, description="teacher split",
                                      style=style)
        self.every_split = widgets.Checkbox(value=False, description="every traced layer", style=style)
        self.channels = widgets.Dropdown(options=list(OFFICIAL_CHANNELS), description="channels", style=style)
        formats = list(FORMATS) + ([ENTROPY] if any(self.coded.values()) else [])
        self.fmt = widgets.Dropdown(options=formats, value="int8", description="format", style=style)
        self.zlib = widgets.BoundedFloatText(value=self._measured_zlib(), min=0.01, max=2.0, step=0.01,
                                             description="zlib ratio", style=style)
        self.rate = RateSlider(value=rate_mbps, base=10, min=-1, max=3, step=0.05, description="rate (Mbps)",
                               continuous_update=False, style=style)
        self.rtt = widgets.FloatSlider(value=rtt_ms, min=0, max=200, step=1, description="RTT (ms)",
                                       continuous_update=False, style=style)
        self.device = widgets.Dropdown(options=profiles, value=device, description="device", style=style)
        self.server = widgets.Dropdown(options=profiles, value=server, description="server", style=style)
        self.profile_file = widgets.Text(placeholder="a file written by hnd profile-device",
                                         description="profile file", continuous_update=False, style=style)
        self.message = widgets.HTML()  # one line: a profile loaded, the runs' teacher, or what is wrong
        self.summary = widgets.HTML()
        self.output = widgets.Output()
        self.shown: list[Option] = []  # what the figure shows now
        for name in ("backbone", "split", "every_split", "channels", "fmt", "zlib", "rate", "rtt", "device",
                     "server", "profile_file", "message", "summary", "output"):
            getattr(self, name).add_class(f"hnd-{name.replace('_', '-')}")  # stable handles for a browser
        self._quiet = False  # set while the explorer changes its own widgets
        self.channels.observe(self._channels_changed, names="value")
        self.profile_file.observe(lambda change: self.load_profile(change["new"]), names="value")
        for control in self.controls:
            if control not in (self.channels, self.profile_file):
                control.observe(lambda change: self.update(), names="value")
        self.update()

    @property
    def controls(self) -> list[widgets.Widget]:
        return [self.backbone, self.split, self.every_split, self.channels, self.fmt, self.zlib, self.rate,
                self.rtt, self.device, self.server, self.profile_file]

    @property
    def widget(self) -> widgets.Widget:
        left = widgets.VBox([self.backbone, self.split, self.every_split, self.channels, self.fmt, self.zlib])
        right = widgets.VBox([self.rate, self.rtt, self.device, self.server, self.profile_file])
        return widgets.VBox([widgets.HBox([left, right]), self.message, self.summary, self.output])

    def _measured_zlib(self) -> float:
        return self.zlib_ratios.get(self.channels.value, UNMEASURED_ZLIB)

    def _channels_changed(self, change) -> None:
        if change["new"] in self.zlib_ratios:  # a measured ratio belongs to its width
            self._quiet = True
            try:
                self.zlib.value = self.zlib_ratios[change["new"]]
            finally:
                self._quiet = False
        self.update()

    def load_profile(self, path: str) -> None:
        """Add the device profile in file ``path`` (``hnd profile-device``) to both profile
        lists and plan with it as the device; a bad file is a one-line message, nothing else."""
        path = path.strip()
        if not path:
            return
        try:
            profile = load_device_profile(str(Path(path).expanduser().resolve()))
        except HndError as exc:
            self.message.value = _error(exc)
            return
        label = f"{profile.name} ({Path(path).name})"
        value = str(Path(path).expanduser().resolve())
        self._quiet = True
        try:
            for box in (self.device, self.server):
                pairs = [(o, o) if isinstance(o, str) else tuple(o) for o in box.options]
                if value not in [v for _, v in pairs]:
                    box.options = pairs + [(label, value)]
            self.device.value = value
        finally:
            self._quiet = False
        self.message.value = f"Loaded device profile <b>{html.escape(label)}</b>."
        self.update()

    def _accuracy(self, option: Option) -> float | None:
        if option.kind == "student" and option.accuracy is not None:  # an entropic student's own run
            return option.accuracy
        key = (self.backbone.value, option.kind, self.channels.value if option.kind == "student" else None)
        return self.accuracy.get(key, option.accuracy)

    def _choices(self) -> list[Option]:
        coded = tuple(c for c in self.coded.get(self.backbone.value, ()) if c.spec.channels == self.channels.value)
        choices = offered(list(_options(self.backbone.value, self.device.value, self.server.value,
                                        self.channels.value, self.fmt.value, coded if self.fmt.value == ENTROPY
                                        else (), float(self.zlib.value))), self.every_split.value)
        points = [BEST_SPLIT] + [o.split for o in choices if o.kind == "teacher_split"]
        if list(self.split.options) != points:  # another backbone or the toggle: other split points
            self._quiet = True
            try:
                keep = self.split.value if self.split.value in points else BEST_SPLIT
                self.split.options = points
                self.split.value = keep
            finally:
                self._quiet = False
        return choices

    def update(self) -> None:
        """Recompute for the current widget values and redraw the summary and the figure."""
        if self._quiet:
            return
        self.zlib.layout.display = None if self.fmt.value == "int8+zlib" else "none"  # only int8+zlib uses it
        rate, rtt = self.rate.value, self.rtt.value
        try:
            choices = self._choices()
        except HndError as exc:  # e.g. a backbone that cannot be traced, a profile file gone bad
            self.message.value = _error(exc)
            return
        split = "" if self.split.value == BEST_SPLIT else self.split.value
        self.shown = shortlist(choices, rate, rtt, split)
        ranked = plan(self.shown, rate, rtt)
        best, delay = ranked[0]
        changes = crossovers(self.shown, rtt_ms=rtt)
        rows = [[o.label, f"{1e3 * d:,.1f}", f"{o.bytes:,.0f}",
                 "" if self._accuracy(o) is None else f"{self._accuracy(o):.1f}"] for o, d in ranked]
        crossing = "; ".join(f"{c['from']} → {c['to']} at {format_rate(c['rate_mbps'])}" for c in changes) or "none"
        zlib = ""
        if self.fmt.value == "int8+zlib":
            measured = self.zlib_ratios.get(self.channels.value)
            zlib = (f"<br>zlib ratio {self.zlib.value:g}: " +
                    ("as measured by the book's rate chapter." if measured == self.zlib.value else
                     "set by hand (the rate chapter or <code>hnd rate</code> measures it)."))
        self.summary.value = (
            f"<b>Best at {format_rate(rate)}, {rtt:.0f} ms RTT: {best.label}</b> ({1e3 * delay:,.1f} ms)."
            f"<br>Best option changes as the rate rises: {crossing}.{zlib}"
            + _table(["option", "delay (ms)", "bytes sent", "top-1 (%)"], rows))
        fig = plot_delay_breakdown(self.shown, rate, rtt, crossings=changes,
                                   title=f"{self.backbone.value}: {self.device.label} → {self.server.label}")
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=90)
        plt.close(fig)
        self.output.outputs = ()
        self.output.append_display_data(Image(data=buffer.getvalue(), format="png"))
        if self.message.value.startswith("<span"):  # the last problem is gone
            self.message.value = ""


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


def zlib_ratios_from_runs(runs: str) -> dict[int, float]:
    """channels -> zlib bytes / int8 bytes of the HND students' bottlenecks, as the rate
    chapter of a book grid measured them (empty when it has not run)."""
    from hnd.book.results import RATE_NOTEBOOK, finished_runs

    out: dict[int, float] = {}
    for cell in finished_runs(runs, RATE_NOTEBOOK):
        points = cell.get("metrics", {}).get("points", [])
        sizes = {(p["channels"], p["setting"]): p["bytes"] for p in points if p.get("method") == "hnd"}
        for (channels, setting), nbytes in sizes.items():
            if setting == "int8+zlib" and sizes.get((channels, "int8")):
                out[channels] = round(nbytes / sizes[(channels, "int8")], 3)
    return out


def app_explorer(runs: str | None = None) -> SplitExplorer:
    """The explorer of ``hnd explore``: every teacher hnd knows and the built-in device
    profiles, opened on the papers' question (their first teacher on a Pi-class device); with a
    book grid's ``runs``, its accuracies, entropic students and zlib ratios, and a line naming
    the teacher it trained (the book's is small enough to run locally at every rate)."""
    teachers = known_teachers()
    if not runs:
        return SplitExplorer(tuple(teachers))
    accuracy = accuracy_from_runs(runs)
    explorer = SplitExplorer(tuple(teachers), accuracy=accuracy, coded=coded_from_runs(runs),
                             zlib_ratios=zlib_ratios_from_runs(runs))
    trained = [t for (t, kind, _) in accuracy if kind == "student"] or [t for (t, _, _) in accuracy]
    trained = [t for t in trained if t in teachers]
    if trained:
        explorer.message.value = (f"The book's runs trained <b>{html.escape(trained[0])}</b>: "
                                  "choose it as the backbone to see their accuracies.")
    return explorer
