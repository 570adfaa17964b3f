"""Reading grid results back: the teacher reference line of the results chapter, what the
training notebook passes on for entropic students, the rate chapter's matched-accuracy
comparison, and the results chapter's figures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import error
from hnd.registry import resolve
from hnd.rate import RatePoint
from hnd.book.results import (RunRecord, beta_setting, best_run, entropic_comparison, entropic_summary,
                              is_entropic_point, matched_input, model_points, rate_label, teacher_reference,
                              train_overrides)


def run(teacher, method, top1, teacher_top1=None, **more) -> RunRecord:
    fields = dict(teacher=teacher, method=method, channels=None, beta=None, model=f"{teacher}-{method}",
                  input_size=None, test_top1=top1, test_top5=min(100.0, top1 + 20), bytes_per_image=None,
                  teacher_top1=teacher_top1, select_top1=None, best_epoch=1, epochs=2, train_seconds=2.0,
                  seconds_per_epoch=1.0, images_per_s=10.0, checkpoint="run/best.pt")
    return RunRecord(**{**fields, **more})


def test_own_teacher_run_wins_over_what_students_saw():
    runs = [run("resnet50", "hnd", 40.0, 58.0), run("resnet50", "teacher", 58.8, 58.8),
            run("resnet50", "kd", 30.0, 57.0)]
    assert teacher_reference(runs) == {"resnet50": 58.8}


def test_students_median_without_a_teacher_run_and_nothing_when_unknown():
    runs = [run("densenet169", "hnd", 70.0, 75.0), run("densenet169", "kd", 68.0, 76.0),
            run("densenet169", "naive", 60.0, 80.0), run("resnet152", "hnd", 70.0, None)]
    assert teacher_reference(runs) == {"densenet169": 76.0}


def _training_cell(runs, cell, record: RunRecord, status="done"):
    """A grid folder as the runner leaves it: grid.json and the cell's results.json."""
    from hnd.book.results import GRID_FILE, RESULTS_FILE, write_json
    from hnd.files import read_json

    grid = read_json(runs / GRID_FILE) if (runs / GRID_FILE).is_file() else {"profile": "t", "cells": []}
    grid["cells"].append({"id": cell, "notebook": cell.split("/")[0], "label": cell, "status": status,
                          "error": None, "seconds": 1.0})
    write_json(runs / GRID_FILE, grid)
    write_json(runs / cell / RESULTS_FILE, {"cell": cell, "status": status, "metrics": record.to_dict()})


def test_run_records_round_trip_through_the_grid_with_checkpoints_relative_to_their_cell(tmp_path):
    from hnd.book.results import training_runs

    hnd3 = run("resnet18", "hnd", 61.5, 80.0, channels=3)
    entropic = run("resnet18", "entropic", 55.0, 80.0, channels=3, beta=30.0, bytes_per_image=41.2)
    _training_cell(tmp_path, "02_train/method-hnd_channels-3", hnd3)
    _training_cell(tmp_path, "02_train/method-entropic_channels-3_beta-30", entropic)
    _training_cell(tmp_path, "02_train/method-kd_channels-3", run("resnet18", "kd", 1.0), status="failed")
    _training_cell(tmp_path, "03_rate_accuracy/default", run("resnet18", "hnd", 2.0))
    records = training_runs(tmp_path)
    assert records == [hnd3, entropic]  # the failed cell and other notebooks are left out
    assert records[1].checkpoint_path == tmp_path / "02_train/method-entropic_channels-3_beta-30/run/best.pt"
    assert [r.label for r in records] == ["HND 3ch", "entropic 3ch β=30"]
    assert run("resnet18", "teacher", 80.0).label == "teacher"


def test_a_record_missing_a_field_is_a_one_line_error(tmp_path):
    doc = run("resnet18", "hnd", 50.0).to_dict()
    del doc["test_top5"], doc["epochs"]
    assert error(RunRecord.from_dict, doc, "x") == "training record in x lacks test_top5, epochs; re-run the cell"
    assert RunRecord.from_dict({**doc, "test_top5": 1.0, "epochs": 1, "extra": 0}).test_top5 == 1.0


def test_a_record_from_training_keeps_the_checkpoint_inside_the_cell_relative(tmp_path):
    from hnd.config import experiment_config

    config = experiment_config(resolve("resnet18"), "entropic", 3, {"pretrained": False, "input_size": 64, "beta": 2.0,
                                                          "epochs": 2, "stage1_epochs": 1})
    result = {"checkpoint": str(tmp_path / "run" / "best.pt"), "best_epoch": 2, "select_top1": 40.0}
    test = {"student": {"top1": 42.0, "top5": 90.0, "bytes_per_image": 33.5}, "teacher": {"top1": 70.0}}
    epochs = [{"seconds": 3.0, "images_per_s": 10.0}, {"seconds": 5.0, "images_per_s": 20.0}]
    record = RunRecord.from_training("resnet18", config, result, test, epochs, tmp_path)
    assert (record.checkpoint, record.checkpoint_path) == ("run/best.pt", tmp_path / "run" / "best.pt")
    assert (record.channels, record.beta, record.bytes_per_image, record.teacher_top1) == (3, 2.0, 33.5, 70.0)
    assert (record.train_seconds, record.seconds_per_epoch, record.images_per_s) == (8.0, 4.0, 15.0)
    record.write(tmp_path)
    from hnd.book.results import METRICS_FILE
    from hnd.files import read_json

    assert RunRecord.from_dict(read_json(tmp_path / METRICS_FILE), tmp_path) == record
    config = experiment_config(resolve("resnet18"), "teacher", 3, {"pretrained": False})
    own = RunRecord.from_training("resnet18", config,
                                  result, {"student": {"top1": 70.0, "top5": 99.0}, "teacher": None}, epochs,
                                  tmp_path / "elsewhere")
    assert (own.channels, own.beta, own.teacher_top1) == (None, None, 70.0)
    assert own.checkpoint == str((tmp_path / "run" / "best.pt").resolve())  # outside its cell: kept whole


# ---------------------------------------------------------------------------------------------
# What 02_train passes on


def test_train_overrides_add_beta_for_entropic_only():
    base = {"epochs": 3, "lr": 0.001}
    assert train_overrides("entropic", base, beta=0.5) == {"epochs": 3, "lr": 0.001, "beta": 0.5}
    assert train_overrides("entropic", base) == base  # 0: the preset, nothing added
    assert train_overrides("hnd", base, teacher_checkpoint="t/best.pt") == {**base, "teacher_checkpoint": "t/best.pt"}
    assert base == {"epochs": 3, "lr": 0.001}  # the profile's mapping is not changed
    assert train_overrides("entropic", None, beta=2) == {"beta": 2.0}
    message = error(train_overrides, "hnd", base, beta=0.5)
    assert "method hnd has no rate" in message and "\n" not in message
    for bad in (-1.0, math.inf, math.nan, "0.5", True):
        assert "beta must be a non-negative number" in error(train_overrides, "entropic", base, beta=bad)


def test_beta_flows_into_the_entropic_config():
    from hnd.config import default_beta, experiment_config

    config = experiment_config(resolve("resnet50"), "entropic", 3, train_overrides("entropic", {}, beta=0.25))
    assert config.beta == 0.25 and config.model.endswith("-entropic")
    preset = experiment_config(resolve("resnet50"), "entropic", 3, train_overrides("entropic", {}))
    assert preset.beta == default_beta(preset.spec) > 0


# ---------------------------------------------------------------------------------------------
# The rate chapter


def test_rate_labels_and_beta_settings():
    assert [rate_label(m, c) for m, c in (("hnd", 3), ("ae", 12), ("entropic", 6))] == [
        "HND 3ch", "AE 12ch", "entropic 6ch"]
    assert beta_setting(0.05) == "β=0.05" and beta_setting(4.0141) == "β=4.0141" and beta_setting(2.0) == "β=2"


def test_model_points_record_method_channels_and_beta():
    hnd = [RatePoint("bottleneck", "HND 3ch", fmt, b, 50.0, 80.0, 10) for fmt, b in (("int8", 155), ("fp32", 588))]
    rows = model_points(hnd, "hnd", 3)
    assert [(r["setting"], r["method"], r["channels"], r["beta"]) for r in rows] == [
        ("int8", "hnd", 3, None), ("fp32", "hnd", 3, None)]
    coded = model_points([RatePoint("bottleneck", "entropic 3ch", "entropy", 40, 55.0, 85.0, 10)], "entropic", 3, 0.1)
    assert coded[0]["setting"] == "β=0.1" and coded[0]["beta"] == 0.1 and coded[0]["bytes"] == 40
    assert is_entropic_point(coded[0]) and not any(is_entropic_point(r) for r in rows)
    # Dicts pass too, and points of an entropic student in a tensor format keep their format.
    again = model_points([{**coded[0], "setting": "int8"}], "entropic", 3, 0.1)
    assert again[0]["setting"] == "int8" and again[0]["beta"] == 0.1
    assert not is_entropic_point({"kind": "bottleneck", "beta": float("nan")})
    assert not is_entropic_point({"kind": "input", "beta": 0.1})


def _table() -> list[dict]:
    """Two entropic students (3 ch at two β, 12 ch at one), HND 3 ch in two formats, JPEG and
    WebP sweeps with their raw reference."""
    rows = model_points([RatePoint("bottleneck", "entropic 3ch", "entropy", 40, 60.0, 90.0, 10)], "entropic", 3, 0.2)
    rows += model_points([RatePoint("bottleneck", "entropic 3ch", "entropy", 24, 50.0, 90.0, 10)], "entropic", 3, 1.0)
    rows += model_points([RatePoint("bottleneck", "entropic 12ch", "entropy", 120, 80.0, 90.0, 10)], "entropic", 12, 0.2)
    rows += model_points([RatePoint("bottleneck", "HND 3ch", fmt, b, 58.0, 90.0, 10)
                          for fmt, b in (("int8", 155), ("int8+zlib", 140))], "hnd", 3)
    for codec, offset in (("jpeg", 0), ("webp", -100)):
        rows.append(RatePoint("input", "resnet50 raw", "raw", 6912, 85.0, 95.0, 10).to_dict())
        rows += [RatePoint("input", f"resnet50 {codec}", f"q{q}", 1000 + 20 * q + offset, 40 + q / 2, 90.0,
                           10).to_dict() for q in (5, 10, 20, 40, 70)]
    return rows


def test_matched_input_is_the_smallest_payload_reaching_the_accuracy():
    rows = _table()
    assert matched_input(rows, "jpeg", 60.0)["setting"] == "q40"  # 40 + 40/2 = 60 >= 60
    assert matched_input(rows, "jpeg", 60.1)["setting"] == "q70"
    assert matched_input(rows, "webp", 45.0)["bytes"] == 1000 + 20 * 10 - 100
    assert matched_input(rows, "jpeg", 80.0) is None  # the raw reference never counts
    assert matched_input(rows, "png", 0.0) is None


def test_entropic_comparison_pairs_each_point_with_its_alternatives():
    comparison = entropic_comparison(_table())
    assert [(c["label"], c["beta"]) for c in comparison] == [("entropic 3ch", 1.0), ("entropic 3ch", 0.2),
                                                              ("entropic 12ch", 0.2)]
    first, second, wide = comparison
    assert (first["bytes"], first["top1"], first["hnd_zlib_bytes"], first["hnd_int8_bytes"]) == (24, 50.0, 140, 155)
    assert (first["jpeg_quality"], first["jpeg_bytes"]) == ("20", 1400)  # 40 + 20/2 = 50
    assert (second["jpeg_quality"], second["webp_quality"]) == ("40", "40")
    assert wide["hnd_zlib_bytes"] is None and wide["jpeg_bytes"] is None and wide["webp_bytes"] is None
    assert entropic_comparison([r for r in _table() if not is_entropic_point(r)]) == []


def _seeded_table() -> list[dict]:
    """_table() with a second seed of entropic 3ch at β=1 and of HND 3ch (int8+zlib)."""
    rows = _table()
    rows += model_points([RatePoint("bottleneck", "entropic 3ch", "entropy", 26, 60.0, 90.0, 10)], "entropic", 3, 1.0)
    rows += model_points([RatePoint("bottleneck", "HND 3ch", "int8+zlib", 150, 48.0, 90.0, 10)], "hnd", 3)
    return rows


def test_entropic_comparison_averages_every_method_over_its_seeds():
    first = entropic_comparison(_seeded_table())[0]
    assert (first["beta"], first["seeds"], first["bytes"], first["top1"]) == (1.0, 2, 25, 55.0)
    assert (first["top1_low"], first["top1_high"]) == (50.0, 60.0)
    # HND's two seeds, not its first: (140 + 150) / 2 bytes at (58 + 48) / 2 top-1
    assert (first["hnd_zlib_bytes"], first["hnd_zlib_top1"]) == (145, 53.0)
    assert first["hnd_int8_bytes"] == 155  # one seed measured as int8
    assert first["jpeg_quality"] == "40"  # the JPEG sweep reaching the mean, 55%: 40 + 40/2


def test_entropic_summary_names_the_best_point_and_the_range():
    text = entropic_summary(entropic_comparison(_table()))
    assert text.count("The most accurate rate weight of") == 2
    assert "**entropic 3ch** (β=0.2) sends 40 bytes per image at 60.0% top-1" in text
    assert "HND 3ch sends 140 bytes with int8+zlib at 58.0% (the mean over its seeds)" in text
    assert "1,800 bytes as JPEG (quality 40) and 1,700 bytes as WebP (quality 40)" in text
    assert "from 24 bytes (β=1, 50.0%) to 40 bytes (β=0.2, 60.0%)" in text
    assert "**entropic 12ch** (β=0.2) sends 120 bytes" in text and "JPEG and WebP reach it at no quality" in text
    assert entropic_summary([]) == "No entropic student was measured in this run."
    seeded = entropic_summary(entropic_comparison(_seeded_table()))
    assert "(β=0.2) sends 40 bytes per image at 60.0% top-1" in seeded  # β=1 averages 55.0 over its seeds
    assert "from 25 bytes (β=1, 55.0%)" in seeded and "at 53.0% (the mean over its seeds)" in seeded
    wide = entropic_summary(entropic_comparison(_seeded_table() + model_points(
        [RatePoint("bottleneck", "entropic 12ch", "entropy", 130, 90.0, 90.0, 10)], "entropic", 12, 0.2)))
    assert "**entropic 12ch** (β=0.2) sends 125 bytes per image at 85.0% top-1 (80.0–90.0, 2 seeds)" in wide


def test_best_run_takes_the_best_beta():
    runs = [run("resnet50", "entropic", 50.0, channels=3, beta=1.0), run("resnet50", "entropic", 60.0, channels=3,
                                                                         beta=0.2),
            run("resnet50", "entropic", 70.0, channels=12, beta=0.2), run("resnet50", "hnd", 55.0, channels=3)]
    assert best_run(runs, "entropic", 3).beta == 0.2
    assert best_run(runs, "entropic").channels == 12
    assert best_run(runs, "hnd", 3).test_top1 == 55.0
    assert best_run(runs, "kd", 3) is None and best_run(runs, "entropic", 3, backbone="resnet152") is None


# ---------------------------------------------------------------------------------------------
# The results chapter's figures


@pytest.fixture
def plt():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    yield plt
    plt.close("all")


def _grid_runs() -> list[RunRecord]:
    runs = [run("resnet50", "teacher", 80.0, 80.0, channels=None, seconds_per_epoch=9.0, images_per_s=100.0)]
    for method, top in (("hnd", 60.0), ("kd", 50.0)):
        runs += [run("resnet50", method, top + c, 80.0, channels=c, seconds_per_epoch=5.0, images_per_s=200.0)
                 for c in (3, 12)]
    runs += [run("resnet50", "entropic", 40.0 + c + 10 * k, 80.0, channels=c, beta=b, seconds_per_epoch=6.0,
                 images_per_s=150.0) for c in (3, 12) for k, b in enumerate((2.0, 0.5))]
    return runs


def test_accuracy_vs_channels_draws_one_line_per_beta(plt):
    from hnd.book.plots import plot_accuracy_vs_channels

    runs = _grid_runs()
    fig = plot_accuracy_vs_channels([r for r in runs if r.method != "teacher"], teacher_reference(runs))
    (ax,) = fig.axes
    lines = {line.get_label(): line for line in ax.lines}
    assert set(lines) == {"HND", "KD", "entropic β=0.5", "entropic β=2", "teacher"}
    assert list(lines["entropic β=0.5"].get_xdata()) == [3, 12]
    assert list(lines["entropic β=0.5"].get_ydata()) == [53.0, 62.0]
    assert lines["entropic β=0.5"].get_color() != lines["entropic β=2"].get_color()
    assert {t.get_text() for t in ax.get_legend().get_texts()} == set(lines)


def test_accuracy_vs_channels_draws_the_mean_over_seeds_and_their_range(plt):
    from hnd.book.plots import plot_accuracy_vs_channels

    runs = [run("resnet50", "hnd", t, channels=c, seed=s) for c, s, t in
            ((3, 0, 50.0), (3, 1, 54.0), (12, 0, 60.0), (12, 1, 60.0))]
    (ax,) = plot_accuracy_vs_channels(runs).axes
    (line,) = [line for line in ax.lines if line.get_label() == "HND"]
    assert list(line.get_xdata()) == [3, 12] and list(line.get_ydata()) == [52.0, 60.0]
    (bars,) = ax.collections  # one vertical bar per width, from the lowest to the highest seed
    assert [tuple(s[:, 1]) for s in bars.get_segments()] == [(50.0, 54.0), (60.0, 60.0)]


def test_accuracy_vs_channels_gives_each_panel_its_legend_when_betas_differ(plt):
    from hnd.book.plots import plot_accuracy_vs_channels

    runs = [run("densenet169", "entropic", 60.0, channels=12, beta=0.5),
            run("resnet152", "entropic", 70.0, channels=12, beta=4.0)]
    fig = plot_accuracy_vs_channels(runs)
    legends = [{t.get_text() for t in ax.get_legend().get_texts()} for ax in fig.axes]
    assert legends == [{"entropic β=0.5"}, {"entropic β=4"}]


def test_training_time_has_a_bar_per_run_and_labels_entropic_betas(plt):
    from hnd.book.plots import plot_training_time

    runs = _grid_runs()
    fig = plot_training_time(runs)
    for ax in fig.axes:
        assert len(ax.patches) == len(runs)
        assert [t.get_text() for t in ax.get_xticklabels()] == ["teacher", "KD", "HND", "entropic"]
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert {"3 β=0.5", "3 β=2", "12 β=0.5", "12 β=2"} <= set(texts) and texts.count("3") == 2


def test_training_plot_of_an_entropic_run_shows_its_rate_and_stages(plt):
    from hnd.book.plots import plot_training

    lines = [{"epoch": 1, "stage": 1, "train_loss": 900.0, "train_bytes_estimate": 80.0, "select_bytes_per_image": 70.0,
              "select_top1": 20.0, "seconds": 3.0},
             {"epoch": 2, "stage": 1, "train_loss": 500.0, "train_bytes_estimate": 50.0, "select_bytes_per_image": 48.0,
              "select_top1": 30.0, "seconds": 3.0},
             {"epoch": 3, "stage": 2, "train_loss": 1.2, "train_top1": 35.0, "select_bytes_per_image": 48.0,
              "select_top1": 40.0, "seconds": 5.0}]
    fig = plot_training(lines)
    assert len(fig.axes) == 4
    rate = fig.axes[3]
    series = {line.get_label(): list(line.get_ydata()) for line in rate.lines if not line.get_label().startswith("_")}
    assert series == {"training estimate (noisy)": [80.0, 50.0], "range-coded, selection split": [70.0, 48.0, 48.0]}
    assert all(any(list(line.get_xdata()) == [2.5, 2.5] for line in ax.lines) for ax in fig.axes)  # stage 2 starts
    train = [line for line in fig.axes[1].lines if line.get_label() == "training batches"]
    assert len(train) == 1 and list(train[0].get_xdata()) == [3]

    plain = plot_training([{k: v for k, v in m.items() if k not in ("stage", "train_bytes_estimate",
                                                                    "select_bytes_per_image")} for m in lines])
    assert len(plain.axes) == 3  # other methods: no rate panel, no stage line
    assert not any(list(line.get_xdata()) == [2.5, 2.5] for ax in plain.axes for line in ax.lines)


def test_training_plot_of_a_long_run_shows_only_its_epochs(plt):
    """Past 12 epochs the axes keep integer ticks of their own and end within an epoch of the
    run's first and last (no epoch -5 or 20 on a 15-epoch run)."""
    from hnd.book.plots import plot_training

    lines = [{"epoch": e, "train_loss": 10.0 / e, "select_top1": 5.0 * e, "seconds": 4.0} for e in range(1, 16)]
    fig = plot_training(lines)
    fig.canvas.draw()
    for ax in fig.axes:
        low, high = ax.get_xlim()
        assert -1 < low < 1 and 15 < high < 17, (ax.get_title(), low, high)
        shown = [t for t in ax.get_xticks() if low <= t <= high]
        assert len(shown) >= 3 and all(float(t).is_integer() for t in shown), shown


def test_narrowest_summary_reads_each_method_at_the_narrowest_width():
    from hnd.book.results import narrowest_summary

    runs = _grid_runs()
    summary = narrowest_summary(runs)
    assert (summary["backbone"], summary["channels"], summary["teacher_top1"]) == ("resnet50", 3, 80.0)
    assert summary["methods"]["hnd"]["top1"] == 63.0 and summary["methods"]["kd"]["seconds_per_epoch"] == 5.0
    assert summary["methods"]["entropic"]["beta"] == 0.5 and summary["methods"]["entropic"]["top1"] == 53.0
    assert summary["methods"]["naive"] == {"top1": None, "seconds_per_epoch": None, "beta": None,
                                           "bytes_per_image": None}
    assert summary["betas"] == [0.5, 2.0]
    assert narrowest_summary([])["backbone"] is None


def _curve_run(folder: Path, method: str, channels: int, seed: int, select: list[float], test: list[float]):
    """A finished student run whose run/metrics.jsonl holds the given per-epoch top-1s."""
    lines = [{"epoch": e + 1, "select_top1": s, "test_top1": t, "seconds": 2.0, "train_loss": 1.0}
             for e, (s, t) in enumerate(zip(select, test))]
    (folder / "run").mkdir(parents=True)
    (folder / "run" / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    best = max(range(len(select)), key=lambda i: select[i])
    return run("resnet50", method, test[best], 80.0, channels=channels, seed=seed, best_epoch=best + 1,
               epochs=10, epochs_run=len(select), folder=folder)


def test_runs_read_as_if_they_had_stopped_earlier(tmp_path, plt):
    from hnd.book.plots import plot_learning_curves
    from hnd.book.results import learning_curves, seed_means, top1_at_epoch

    runs = [_curve_run(tmp_path / "hnd0", "hnd", 3, 0, [20, 50, 70, 70], [21, 49, 72, 71]),
            _curve_run(tmp_path / "kd0", "kd", 3, 0, [40, 60, 61, 59], [41, 58, 62, 60]),
            _curve_run(tmp_path / "kd1", "kd", 3, 1, [42, 61, 60, 60], [43, 59, 60, 60]),
            run("resnet50", "teacher", 80.0, 80.0, folder=tmp_path / "teacher")]
    curves = learning_curves(runs)
    assert [r.method for r, _ in curves] == ["hnd", "kd", "kd"]  # the teacher has no student curve
    early = top1_at_epoch(curves, 2)
    assert [(r.test_top1, r.best_epoch, r.epochs_run) for r in early] == [(49, 2, 2), (58, 2, 2), (59, 2, 2)]
    assert [r.test_top1 for r in top1_at_epoch(curves, 4)] == [72, 62, 59]  # kept epochs 3, 3, 2
    means = {r.method: r for r in seed_means(early)}
    assert means["kd"].test_top1 == 58.5 and means["kd"].seed == -1 and means["hnd"].seed == 0
    fig = plot_learning_curves(curves)
    by_epoch, by_seconds = fig.axes
    assert sum(1 for line in by_epoch.lines if len(line.get_xdata()) == 4) == 3
    assert max(max(line.get_xdata()) for line in by_seconds.lines if len(line.get_xdata())) == 8.0  # 4 epochs x 2 s
    # Read at a page's width (about 7 inches): the panels stacked, the legend below them, no text under 8 points.
    fig.canvas.draw()
    (legend,) = fig.legends
    assert fig.get_figwidth() <= 8 and by_seconds.get_window_extent().y1 < by_epoch.get_window_extent().y0
    assert legend.get_window_extent().y1 <= by_seconds.get_window_extent().y0
    words = [*legend.get_texts()] + [t for ax in fig.axes for t in (*ax.get_xticklabels(), *ax.get_yticklabels(),
                                                                    ax.xaxis.label, ax.yaxis.label)]
    assert min(t.get_fontsize() for t in words) >= 8
    assert {t.get_text() for t in legend.get_texts()} == {"HND", "KD", "3 ch", "kept epoch"}
