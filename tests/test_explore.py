"""The split-point explorer, driven headlessly: set widget values, read what it shows."""

from __future__ import annotations

import json
import re

import matplotlib.pyplot as plt
import pytest

from hnd.errors import HndError
import hnd.book.explore as explore
from hnd.book.explore import BEST_SPLIT, DEVICE, ENTROPY, RATE_READOUT, SplitExplorer, _options, \
    accuracy_from_runs, app_explorer, known_teachers, offered, shortlist, zlib_ratios_from_runs
from hnd.book.plots import format_rate, plot_delay_breakdown
from hnd.devices import list_device_profiles, load_device_profile, rows_of, save_device_profile
from hnd.latency import coded_student, crossovers, plan
from hnd.registry import resolve
from hnd.tracing import stage_ends

PROFILES = list_device_profiles()


@pytest.fixture(scope="module")
def explorer():
    return SplitExplorer(("densenet169", "resnet152"), rate_mbps=10.0, rtt_ms=20.0)


def shown_png(explorer) -> bytes:
    (output,) = explorer.output.outputs
    return output["data"]["image/png"]


def test_it_shows_the_planners_best_option_and_a_figure(explorer):
    ranked = plan(explorer.shown, explorer.rate.value, explorer.rtt.value)
    assert f"Best at 10 Mbps, 20 ms RTT: {ranked[0][0].label}</b>" in explorer.summary.value
    assert explorer.summary.value.count("<tr>") == len(explorer.shown) + 1
    assert shown_png(explorer)  # one PNG in the Output widget
    kinds = {o.kind for o in explorer.shown}
    assert {"local", "offload", "teacher_split", "student"} <= kinds
    assert sum(o.kind == "teacher_split" for o in explorer.shown) == 1  # only the best split


def test_moving_the_rate_changes_the_answer(explorer):
    explorer.rate.value = 0.1
    slow = plan(explorer.shown, 0.1, explorer.rtt.value)[0][0]
    assert "Best at 0.1 Mbps" in explorer.summary.value and slow.label in explorer.summary.value
    assert slow.kind != "offload"  # a whole image over 0.1 Mbps never wins
    before = shown_png(explorer)
    explorer.rate.value = 1000.0
    fast = plan(explorer.shown, 1000.0, explorer.rtt.value)[0][0]
    assert "Best at 1,000 Mbps" in explorer.summary.value and fast.label in explorer.summary.value
    assert shown_png(explorer) != before


def test_channels_and_format_pick_the_student(explorer):
    explorer.channels.value, explorer.fmt.value = 12, "fp32"
    students = [o for o in explorer.shown if o.kind == "student"]
    assert students and all("12" in o.label and "fp32" in o.label for o in students)
    explorer.fmt.value = "int8"
    smaller = [o for o in explorer.shown if o.kind == "student"]
    assert max(o.bytes for o in smaller) < min(o.bytes for o in students)


def test_every_value_the_widgets_allow_works(explorer):
    for backbone in explorer.backbone.options:
        explorer.backbone.value = backbone
        for device in explorer.device.options:
            explorer.device.value = device
            for rtt in (explorer.rtt.min, explorer.rtt.max):
                explorer.rtt.value = rtt
                assert "Best at" in explorer.summary.value
    explorer.rate.value = 10 ** explorer.rate.min
    assert "Best at 0.1 Mbps" in explorer.summary.value


def test_accuracy_is_shown_where_runs_exist(tmp_path):
    accuracy = {("densenet169", "student", 3): 70.5, ("densenet169", "local", None): 75.6}
    explorer = SplitExplorer(("densenet169",), accuracy=accuracy)
    assert "70.5" in explorer.summary.value and "75.6" in explorer.summary.value
    with pytest.raises(HndError, match="no grid runs in"):
        accuracy_from_runs(str(tmp_path))


def test_unknown_profile_is_a_one_line_error():
    with pytest.raises(HndError, match=f"unknown device profile 'nope'; valid: {PROFILES[0]}"):
        SplitExplorer(("densenet169",), device="nope")


def test_shortlist_keeps_one_teacher_split(explorer):
    """Of every option, the shortlist keeps all but the plain teacher's splits, and of those the
    one asked for, else the fastest at this link."""
    from hnd.devices import load_device_profile
    from hnd.latency import options

    every = options(resolve("densenet169"), load_device_profile("raspberry-pi4"), load_device_profile("gpu-server"),
                    channels=(3,), formats=("int8",))
    splits = [o for o in every if o.kind == "teacher_split"]
    assert len(splits) > 2
    fastest = min(splits, key=lambda o: o.delay(10.0, 20.0))
    assert shortlist(every, 10.0, 20.0) == [o for o in every if o.kind != "teacher_split"] + [fastest]
    asked = splits[1] if splits[1] is not fastest else splits[2]
    assert shortlist(every, 10.0, 20.0, split=asked.split)[-1] is asked


def test_a_backbone_outside_the_paper_families():
    explorer = SplitExplorer(("resnet18",), rate_mbps=10.0, rtt_ms=20.0)
    labels = [o.label for o in explorer.shown]
    assert "local resnet18" in labels and "HND student 3ch int8" in labels
    [split] = [o for o in explorer.shown if o.kind == "teacher_split"]
    assert split.label.startswith("resnet18 split after ") and ".conv" not in split.label
    assert "Best at 10 Mbps" in explorer.summary.value


def test_entropic_students_appear_with_their_measured_bytes(tmp_path):
    from test_latency import _entropic_run

    coded = {"resnet18": [coded_student(_entropic_run(tmp_path / "a", coded=75.0, top1=58.25, beta=4.0))]}
    explorer = SplitExplorer(("resnet18",), coded=coded, rate_mbps=0.5, rtt_ms=20.0)
    assert ENTROPY in explorer.fmt.options
    assert ENTROPY not in SplitExplorer(("resnet18",)).fmt.options  # nothing measured: not offered
    explorer.fmt.value = ENTROPY
    [student] = [o for o in explorer.shown if o.kind == "student"]
    assert student.label == "entropic student 3ch β=4" and student.bytes == 75.0
    assert "58.2" in explorer.summary.value and "HND student" not in explorer.summary.value
    explorer.channels.value = 12  # no entropic run at 12 channels: no student to show
    assert not [o for o in explorer.shown if o.kind == "student"]
    explorer.fmt.value = "int8"
    assert any(o.label == "HND student 12ch int8" for o in explorer.shown)


def test_the_teacher_split_can_be_chosen_and_follows_the_backbone():
    explorer = SplitExplorer(("resnet18", "densenet169"), rate_mbps=10.0, rtt_ms=20.0)
    points = list(explorer.split.options)
    assert points[0] == BEST_SPLIT and len(points) > 3
    explorer.split.value = points[1]  # the first layer: not the best at this link
    [split] = [o for o in explorer.shown if o.kind == "teacher_split"]
    assert split.split == points[1] and f"split after {points[1]} int8" in explorer.summary.value
    explorer.backbone.value = "densenet169"  # its own split points; the choice falls back to the best
    assert explorer.split.value == BEST_SPLIT and "transition1" in " ".join(explorer.split.options)
    [split] = [o for o in explorer.shown if o.kind == "teacher_split"]
    best = min((o for o in offered(list(_options("densenet169", DEVICE, explorer.server.value, 3, "int8")))
                if o.kind == "teacher_split"), key=lambda o: o.delay(10.0, 20.0))
    assert split == best


def test_int8_zlib_uses_the_measured_ratio_of_each_width():
    explorer = SplitExplorer(("resnet18",), zlib_ratios={3: 0.5, 12: 0.8})
    assert explorer.zlib.value == 0.5
    explorer.fmt.value = "int8"
    [int8] = [o for o in explorer.shown if o.kind == "student"]
    explorer.fmt.value = "int8+zlib"
    [packed] = [o for o in explorer.shown if o.kind == "student"]
    assert packed.bytes == pytest.approx(0.5 * int8.bytes) and "as measured" in explorer.summary.value
    explorer.channels.value = 12
    assert explorer.zlib.value == 0.8
    explorer.zlib.value = 0.25  # a ratio set by hand
    [packed12] = [o for o in explorer.shown if o.kind == "student"]
    assert packed12.label == "HND student 12ch int8+zlib" and "set by hand" in explorer.summary.value


def test_a_measured_profile_file_becomes_the_device(tmp_path):
    explorer = SplitExplorer(("resnet18",), rate_mbps=10.0, rtt_ms=20.0)
    slow = load_device_profile("raspberry-pi4")
    slow.name = "my-board"
    save_device_profile(slow, tmp_path / "board.yaml")
    explorer.profile_file.value = str(tmp_path / "board.yaml")
    assert explorer.device.label == "my-board (board.yaml)" and explorer.device.value == str(tmp_path / "board.yaml")
    assert ("my-board (board.yaml)", str(tmp_path / "board.yaml")) in explorer.server.options
    assert "Loaded device profile" in explorer.message.value
    local = next(o for o in explorer.shown if o.kind == "local")
    assert local.device_s == pytest.approx(sum(slow.seconds("resnet18", list(rows_of(resolve("resnet18"))))))
    explorer.device.value = "this-machine"  # the built-in ones stay
    assert explorer.device.label == "this-machine"


@pytest.mark.parametrize("text, message", [
    ("name: [unclosed\n", "is not valid YAML"),
    ("name: x\nwhatever: 1\n", "has unknown keys whatever"),
    (None, "does not exist"),
])
def test_a_bad_profile_file_is_one_line_in_the_app(tmp_path, text, message):
    explorer = SplitExplorer(("resnet18",))
    path = tmp_path / "bad.yaml"
    if text is not None:
        path.write_text(text)
    before = (list(explorer.device.options), explorer.device.value, explorer.summary.value)
    explorer.profile_file.value = str(path)
    assert message in explorer.message.value and "\n" not in explorer.message.value
    assert (list(explorer.device.options), explorer.device.value, explorer.summary.value) == before
    explorer.rate.value = 50.0  # the next redraw clears the message
    assert explorer.message.value == ""


def test_the_app_reads_a_grid_of_runs(tmp_path):
    runs = tmp_path / "runs"
    cell = runs / "03_rate_accuracy" / "default"
    cell.mkdir(parents=True)
    points = [{"method": "hnd", "channels": c, "setting": s, "bytes": b}
              for c, s, b in ((3, "int8", 100.0), (3, "int8+zlib", 60.0), (12, "int8", 400.0), (12, "fp32", 1600.0))]
    (cell / "results.json").write_text(json.dumps({"metrics": {"points": points}}))
    (runs / "grid.json").write_text(json.dumps({"cells": [
        {"id": "03_rate_accuracy/default", "notebook": "03_rate_accuracy", "status": "done"}]}))
    assert zlib_ratios_from_runs(str(runs)) == {3: 0.6}  # 12 channels: no int8+zlib measured
    explorer = app_explorer(str(runs))
    assert explorer.backbone.value == "densenet169" and explorer.zlib.value == 0.6  # no training runs: the default
    assert list(explorer.backbone.options) == known_teachers()
    assert known_teachers()[:4] == ["densenet169", "densenet201", "resnet152", "inception_v3"]
    assert "resnet18" in known_teachers() and "mobilenet_v3_large" in known_teachers()


def test_hnd_explore_opens_where_the_rate_moves_the_best_option():
    """The scene hnd explore opens on (a Pi-class device, a paper teacher): along the rate
    slider the best option is local, then the student, then offloading."""
    explorer = app_explorer()
    assert (explorer.backbone.value, explorer.device.value, explorer.server.value) == \
        ("densenet169", "raspberry-pi4", "gpu-server")
    bests = []
    for step in range(9):
        rate = 10 ** (explorer.rate.min + step * (explorer.rate.max - explorer.rate.min) / 8)
        explorer.rate.value = rate
        best = plan(explorer.shown, explorer.rate.value, explorer.rtt.value)[0][0]
        assert f"Best at {format_rate(explorer.rate.value)}, 20 ms RTT: {best.label}</b>" in explorer.summary.value
        bests.append(best.kind)
    assert list(dict.fromkeys(bests)) == ["local_small", "student", "offload"]


@pytest.mark.parametrize("mbps, text", [(0.1, "0.1 Mbps"), (0.05, "0.05 Mbps"), (2.5, "2.5 Mbps"), (1, "1 Mbps"),
                                        (10, "10 Mbps"), (300, "300 Mbps"), (1000, "1,000 Mbps"),
                                        (999.7, "1,000 Mbps"), (10 ** 0.05, "1.12 Mbps"), (12345, "12,300 Mbps")])
def test_rates_are_written_as_people_write_them(mbps, text):
    assert format_rate(mbps) == text and format_rate(mbps, unit=False) == text.removesuffix(" Mbps")


def test_the_slider_readout_and_the_figure_write_rates_the_same_way(explorer):
    assert explorer.rate.readout_format == RATE_READOUT == ",.3~r"  # d3-format: 3 significant digits, trimmed
    explorer.rate.value = 1000.0
    assert "e+" not in explorer.summary.value and "1,000 Mbps" in explorer.summary.value

    fig = plot_delay_breakdown(explorer.shown, 1000.0, 20.0, crossings=crossovers(explorer.shown, rtt_ms=20.0))
    fig.canvas.draw()
    bars, curves = fig.axes[:2]
    ticks = [t.get_text() for t in curves.get_xticklabels() if t.get_text()]
    assert "1,000" in ticks and "0.1" in ticks and "1,000 Mbps" in bars.get_xlabel()
    assert all("e" not in t.get_text() for t in curves.texts)
    plt.close(fig)


def test_stage_ends_are_where_a_reader_cuts():
    assert stage_ends(["conv1", "bn1", "layer1.0.add", "layer1.0", "layer1", "layer2.0", "layer2.1", "avgpool"]) == \
        ["conv1", "bn1", "layer1", "layer2.1", "avgpool"]
    assert stage_ends(["features.0", "features.1.conv.0", "features.1", "features.2.conv.0", "features"]) == \
        ["features.0", "features.1", "features.2.conv.0", "features"]
    assert stage_ends(["pool0", "denseblock1.denselayer1", "denseblock1.denselayer6", "transition1.norm",
                       "transition1.pool", "stage2.0.cat", "stage2", "Mixed_5b", "Mixed_5c"]) == \
        ["pool0", "denseblock1.denselayer6", "transition1.pool", "stage2", "Mixed_5b", "Mixed_5c"]
    assert stage_ends([]) == []


def test_every_traced_layer_is_behind_a_toggle():
    explorer = SplitExplorer(("resnet18", "shufflenet_v2_x1_0"))
    stages = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "flatten"]
    assert list(explorer.split.options) == [BEST_SPLIT] + stages
    explorer.every_split.value = True
    every = list(explorer.split.options)[1:]
    assert "layer1.0.add" in every and set(stages) < set(every) and stage_ends(every) == stages
    explorer.split.value = "layer1.0.add"
    assert [o.split for o in explorer.shown if o.kind == "teacher_split"] == ["layer1.0.add"]
    explorer.every_split.value = False  # the chosen point is hidden again: back to the best
    assert explorer.split.value == BEST_SPLIT and "layer1.0.add" not in explorer.split.options
    explorer.backbone.value = "shufflenet_v2_x1_0"
    assert list(explorer.split.options) == [BEST_SPLIT, "conv1", "maxpool", "stage2", "stage3", "stage4", "conv5",
                                            "mean"]


def test_the_zlib_ratio_box_shows_only_for_int8_zlib(explorer):
    explorer.fmt.value = "int8"
    assert explorer.zlib.layout.display == "none"
    explorer.fmt.value = "int8+zlib"
    assert explorer.zlib.layout.display is None
    explorer.fmt.value = "fp16"
    assert explorer.zlib.layout.display == "none"


def test_table_headers_are_separate_padded_cells(explorer):
    headers = re.findall(r"<th style='([^']*)'>([^<]*)</th>", explorer.summary.value)
    assert [h for _, h in headers] == ["option", "delay (ms)", "bytes sent", "top-1 (%)"]
    assert all("padding:2px 10px" in style for style, _ in headers)
    assert explorer.summary.value.count("padding:2px 10px") == 4 * (len(explorer.shown) + 1)


def test_with_runs_it_still_opens_on_a_paper_teacher_and_names_the_trained_one(monkeypatch):
    monkeypatch.setattr(explore, "accuracy_from_runs", lambda runs: {("shufflenet_v2_x1_0", "student", 3): 41.5})
    monkeypatch.setattr(explore, "coded_from_runs", lambda runs: {})
    monkeypatch.setattr(explore, "zlib_ratios_from_runs", lambda runs: {})
    explorer = app_explorer("runs")
    assert explorer.backbone.value == "densenet169" and explorer.device.value == DEVICE
    assert "trained <b>shufflenet_v2_x1_0</b>" in explorer.message.value
    explorer.backbone.value = "shufflenet_v2_x1_0"
    assert "41.5" in explorer.summary.value
