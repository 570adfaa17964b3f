"""Reading grid results back: the teacher reference line of the results chapter."""

from __future__ import annotations

from hnd.results import teacher_reference


def run(teacher, method, top1, teacher_top1=None):
    return {"teacher": teacher, "method": method, "test_top1": top1, "teacher_top1": teacher_top1}


def test_own_teacher_run_wins_over_what_students_saw():
    runs = [run("resnet50", "hnd", 40.0, 58.0), run("resnet50", "teacher", 58.8, 58.8),
            run("resnet50", "kd", 30.0, 57.0)]
    assert teacher_reference(runs) == {"resnet50": 58.8}


def test_students_median_without_a_teacher_run_and_nothing_when_unknown():
    runs = [run("densenet169", "hnd", 70.0, 75.0), run("densenet169", "kd", 68.0, 76.0),
            run("densenet169", "naive", 60.0, 80.0), run("resnet152", "hnd", 70.0, None)]
    assert teacher_reference(runs) == {"densenet169": 76.0}
