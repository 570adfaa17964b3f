"""The split-point explorer, driven headlessly: set widget values, read what it shows."""

from __future__ import annotations

import pytest

from hnd.errors import HndError
from hnd.book.explore import ENTROPY, SplitExplorer, accuracy_from_runs, shortlist
from hnd.latency import coded_student
from hnd.latency import list_device_profiles, plan

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
    assert f"Best at 0.1 Mbps" in explorer.summary.value and slow.label in explorer.summary.value
    assert slow.kind != "offload"  # a whole image over 0.1 Mbps never wins
    before = shown_png(explorer)
    explorer.rate.value = 1000.0
    fast = plan(explorer.shown, 1000.0, explorer.rtt.value)[0][0]
    assert f"Best at 1e+03 Mbps" in explorer.summary.value and fast.label in explorer.summary.value
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
    every = [o for o in explorer.shown]
    assert shortlist(every, 10.0, 20.0) == every


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
