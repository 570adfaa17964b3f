"""Analysis: per-layer rows and summaries against the original's measured numbers
(tests/reference/original-hnd-facts.md §4)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hnd import tracing
from hnd.analysis import analyze, analyze_model, sequential_layers, split_point_rows
from hnd.models import create_student
from hnd.registry import resolve
from hnd.teachers import TEACHERS, build_teacher, meta_teacher, teacher_spec

from conftest import OFFICIAL_STUDENTS

FACTS = Path(__file__).parent / "reference" / "original-hnd-facts.md"


def _table(first_columns: str) -> list[dict[str, str]]:
    """The rows of the fact sheet's Markdown table whose header starts with ``first_columns``."""
    lines = [line for line in FACTS.read_text().splitlines() if line.startswith("|")]
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_columns} |"))
    names = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:  # after the |---| line
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != len(names) or set(line) <= set("|-"):
            break
        rows.append(dict(zip(names, cells)))
    return rows


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def _int(text: str) -> int:
    return int(text.replace(",", ""))


REFERENCE = {(r["teacher"], int(r["bc"])): r for r in _table("teacher | bc")}
TAIL_PARAMS = {r["teacher"]: _int(r["tail params"]) for r in _table("teacher | tail params")}


def test_the_fact_sheet_has_every_official_student():
    paper = ("densenet169", "densenet201", "resnet152", "inception_v3")
    assert sorted(REFERENCE) == sorted((t, c) for t in paper for c in (3, 6, 9, 12))
    assert sorted(TAIL_PARAMS) == sorted(paper)


@pytest.mark.parametrize("name", OFFICIAL_STUDENTS)
def test_official_students_match_reference(name):
    teacher = name.split("_head_mimic")[0]
    bc = int(name.rsplit("-", 1)[1][:-2])
    ref = REFERENCE[(teacher, bc)]
    bottleneck, head_out = _shape(ref["bottleneck (C,H,W)"]), _shape(ref["head out"])
    s = analyze(resolve(name)).summary
    assert s.bottleneck_shape == bottleneck
    assert s.head_output_shape == head_out
    assert (s.head_params, s.encoder_params, s.encoder_macs, s.head_macs) == tuple(
        _int(ref[k]) for k in ("head params", "enc params", "enc MACs", "head MACs"))
    assert (s.params, s.macs, s.tail_params) == (_int(ref["mimic params"]), _int(ref["mimic MACs"]),
                                                 TAIL_PARAMS[teacher])
    assert f"{s.bottleneck_pct_of_input:.3f}" == ref["% of input"]
    assert f"{4 * s.bottleneck_bytes['int8'] / 1024:.3f}" == ref["fp32 KiB"]
    values = bottleneck[0] * bottleneck[1] * bottleneck[2]
    assert s.bottleneck_bytes == {"fp32": 4 * values, "fp16": 2 * values, "int8": values}
    t = analyze(resolve(teacher)).summary
    assert (t.head_params, t.head_macs, t.macs, t.params) == tuple(
        _int(ref[k]) for k in ("teacher-head params", "teacher-head MACs", "teacher MACs", "teacher params"))
    assert t.head_output_shape == head_out == t.bottleneck_shape


@pytest.mark.parametrize("name", (TEACHERS))
def test_rows_are_sequential_and_add_up(name):
    a = analyze(resolve(name))
    assert a.rows[-1].output_shape == (1000,)
    assert sum(r.params for r in a.rows) == a.summary.params
    assert [r.cum_macs for r in a.rows] == list(torch.tensor([r.macs for r in a.rows]).cumsum(0).tolist())
    split = [r.name for r in a.rows if r.part == "head"][-1]
    assert split.startswith(f"head.{teacher_spec(name).split_point}")
    # Every parameter counted once: the teacher's own count (torchvision's builder).
    assert a.summary.params == sum(p.numel() for p in meta_teacher(teacher_spec(name)).parameters())


def test_rows_recompute_the_teacher_exactly():
    teacher = build_teacher("densenet121", pretrained=False)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        y = x
        for _, layer in sequential_layers(teacher.features, "features"):
            y = layer(y)
        assert torch.equal(y, teacher.features(x))


def test_densenet_rows_open_blocks_into_dense_layers():
    rows = analyze(resolve("densenet169")).rows
    assert len(rows) == 103  # original decomposition: 102 modules, plus our explicit flatten
    assert rows[4].name == "head.denseblock1.denselayer1" and rows[4].output_shape == (96, 56, 56)
    assert rows[3].output_shape == (64, 56, 56) and rows[0].output_shape == (64, 112, 112)


def test_other_split_point_moves_the_head():
    s = analyze(resolve("resnet152"), split_point="layer1").summary
    assert s.head_output_shape == (256, 56, 56) and s.split_point == "layer1"
    assert s.head_macs < analyze(resolve("resnet152")).summary.head_macs


def test_real_model_is_analysed_on_its_device():
    student = create_student("resnet50_head_mimic-ver2b-3ch", pretrained=False)
    a = analyze_model(resolve("resnet50_head_mimic-ver2b-3ch"), student)
    assert a.summary.encoder_macs == 118659840 and next(student.parameters()).device.type == "cpu"
    assert a.to_dict()["summary"]["bottleneck_shape"] == [3, 29, 29]


def test_candidate_split_points_and_head_comparison():
    from hnd.analysis import compare_heads

    teacher = analyze(resolve("densenet169"))
    candidates = teacher.smaller_than_input()
    assert all(r.numel < 3 * 224 * 224 for r in candidates)
    # Original notebook: transition1's output is 0.667 of the input, transition2's 0.333.
    by_name = {r.name: r.numel / (3 * 224 * 224) for r in candidates}
    assert round(by_name["head.transition1.pool"], 3) == 0.667 and round(by_name["head.transition2.pool"], 3) == 0.333
    assert "head.conv0" not in by_name
    row = compare_heads(teacher, analyze(resolve("densenet169_head_mimic-ver2b-3ch")))
    assert row["encoder_macs"] == 118659840 and row["teacher_head_macs"] == 2076884992
    assert row["macs_reduction_pct"] == pytest.approx(100 * (1 - 118659840 / 2076884992))
    assert (row["bytes_int8"], row["bottleneck_shape"]) == (2523, "3x29x29")


def test_split_point_rows_of_a_traced_teacher():
    """resnet18: every traced split point with a tensor output, in graph order; each name is a
    valid ``@POINT``; sizes and cost shares follow from the architecture."""
    rows = split_point_rows(resolve("resnet18"))
    points = tracing.split_points(tracing.trace(meta_teacher(teacher_spec("resnet18"))))
    assert [r.name for r in rows] == [p.name for p in points]  # all of ResNet-18's points are tensors
    assert all(r.kind == "traced" for r in rows)
    by_name = {r.name: r for r in rows}
    assert by_name["layer2"].output_shape == (128, 28, 28) and by_name["layer4"].output_shape == (512, 7, 7)
    assert by_name["layer2"].pct_of_input == pytest.approx(100 * 128 * 28 * 28 / (3 * 224 * 224))
    assert by_name["layer2"].bytes("int8") == 128 * 28 * 28
    # conv1 (7x7, 3 -> 64, stride 2 at 224): the first row's MACs.
    assert by_name["conv1"].cum_macs == 64 * 3 * 7 * 7 * 112 * 112
    assert [r.cum_macs for r in rows] == sorted(r.cum_macs for r in rows)
    assert 0 < by_name["layer2"].pct_macs < by_name["layer3"].pct_macs < 100
    for r in (rows[0], by_name["layer2"], rows[-1]):
        assert resolve(f"resnet18@{r.name}").head_output_shape == r.output_shape


def test_split_point_rows_of_a_staged_teacher():
    """densenet169: the stage list first (the original's split names), then the traced points;
    transition2's output is a third of the input (the original's notebook)."""
    rows = split_point_rows(resolve("densenet169"))
    kinds = [r.kind for r in rows]
    assert kinds == sorted(kinds, key=lambda k: k != "stage") and {"stage", "traced"} == set(kinds)
    stages = {r.name: r for r in rows if r.kind == "stage"}
    assert list(stages)[:5] == ["conv0", "norm0", "relu0", "pool0", "denseblock1"] and "classifier" not in stages
    assert stages["transition2"].output_shape == (256, 14, 14)
    assert round(stages["transition2"].pct_of_input / 100, 3) == 0.333
    assert round(stages["transition1"].pct_of_input / 100, 3) == 0.667
    # the fact sheet's §4: the teacher head up to transition2
    assert stages["transition2"].cum_macs == _int(REFERENCE[("densenet169", 3)]["teacher-head MACs"])


def test_generic_student_is_analysed():
    """resnet18@layer2-3ch with ResNet's stem: the encoder is the ver2b one (fact sheet §4: 10,432 params,
    118,659,840 MACs at bc=3), the head reproduces layer2's 128x28x28."""
    s = analyze(resolve("resnet18-3ch")).summary
    assert (s.model, s.kind, s.teacher, s.split_point) == ("resnet18@layer2-3ch", "student", "resnet18", "bottleneck")
    assert s.bottleneck_shape == (3, 29, 29) and s.head_output_shape == (128, 28, 28)
    assert (s.encoder_params, s.encoder_macs) == (10432, 118659840)
    t = analyze(resolve("resnet18")).summary
    assert s.tail_params == t.tail_params and s.tail_macs == t.tail_macs  # the teacher's own tail
    assert t.head_output_shape == t.bottleneck_shape == (128, 28, 28)
    assert s.bottleneck_bytes["int8"] == 3 * 29 * 29
