"""Rate–accuracy on a tiny generated dataset with random-init models: a lossless transmission
gives exactly the plain evaluation's accuracy, bytes are the payload sizes the shapes imply,
and the plot draws one artist per series."""

from __future__ import annotations

import math

import pytest
import torch

from hnd import create_model
from hnd.autoencoder import build_ae_model
from hnd.tensor_codec import TENSOR_FORMATS
from hnd.data import ImageDataset
from hnd.image_folders import check_layout, load_image
from hnd.evaluation import evaluate, eval_loader
from hnd.rate import (RatePoint, bottleneck_rate, input_rate, select_samples, split_stages,
                      teacher_split_rate)
from hnd.registry import resolve, student_from_teacher
from hnd.synth import write_synthetic_dataset
from hnd.teachers import teacher_spec, teacher_stages

from conftest import error

TEACHER, STUDENT = "resnet50", "resnet50_head_mimic-ver2b-3ch"
SIZE, CLASSES = 32, 6  # 6 outputs, so that top-5 is not always a hit
KW = {"device": "cpu", "batch_size": 8, "num_workers": 0}
CPU = torch.device("cpu")


def sized(name: str, size: int = SIZE):
    """The spec of ``name`` at input side ``size``: what the measurements read images at."""
    return resolve(name).at_input_size(size)


@pytest.fixture(scope="module")
def val(tmp_path_factory) -> list[tuple[str, int]]:
    root = tmp_path_factory.mktemp("rate") / "synth"
    write_synthetic_dataset(root, classes=3, train_per_class=1, val_per_class=2, image_size=48, seed=0)
    return check_layout(root, splits=("val",)).samples["val"]  # 6 images


@pytest.fixture(scope="module")
def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    teacher = create_model(TEACHER, pretrained=False, num_classes=CLASSES)
    return teacher, student_from_teacher(resolve(STUDENT), teacher).eval()


def _relabel(model, name: str, samples, size: int = SIZE) -> list[tuple[str, int]]:
    """Give the images labels from ``model``'s own ranking: its 1st, 2nd and last choice in turn.
    Plain evaluation then gives top-1 1/3 and top-5 2/3, and an equal accuracy means equal
    predictions, not chance."""
    transform = sized(name, size).transforms()
    x = torch.stack([transform(load_image(path)) for path, _ in samples])  # [N, 3, S, S]
    with torch.no_grad():
        ranks = model.eval()(x).argsort(dim=1, descending=True)  # [N, classes]
    picks = [0, 1, ranks.shape[1] - 1]
    return [(path, int(ranks[i, picks[i % 3]])) for i, (path, _) in enumerate(samples)]


def _plain(model, name: str, samples, size: int = SIZE):
    dataset = ImageDataset(samples, sized(name, size).transforms())
    result = evaluate(model, eval_loader(dataset, KW["batch_size"], 0), CPU)
    assert (result.top1, result.top5) == pytest.approx((100 / 3, 200 / 3))  # the labels work as meant
    return result


def _same_accuracy(point: RatePoint, plain) -> bool:
    return (point.top1, point.top5, point.images) == (plain.top1, plain.top5, plain.images)


def test_bottleneck_fp32_is_plain_evaluation_and_bytes_follow_the_shape(val, models):
    _, student = models
    samples = _relabel(student, STUDENT, val)
    plain = _plain(student, STUDENT, samples)
    points = bottleneck_rate(student, sized(STUDENT), samples, **KW)
    assert [p.setting for p in points] == list(TENSOR_FORMATS)
    assert {(p.kind, p.label, p.images) for p in points} == {("bottleneck", STUDENT, 6)}
    by = {p.setting: p for p in points}
    assert _same_accuracy(by["fp32"], plain)
    with torch.no_grad():
        numel = student.encode(torch.zeros(1, 3, SIZE, SIZE))[0].numel()  # bc x H' x W'
    assert numel == 3 * 5 * 5
    assert (by["fp32"].bytes, by["fp16"].bytes, by["int8"].bytes) == (4 * numel, 2 * numel, numel + 8)
    assert by["int8"].bytes < by["fp16"].bytes < by["fp32"].bytes
    assert (by["int8+zlib"].top1, by["int8+zlib"].top5) == (by["int8"].top1, by["int8"].top5)  # lossless zlib


def test_bottleneck_of_an_autoencoder_with_fewer_images(val, models):
    teacher, _ = models
    torch.manual_seed(1)
    ae = build_ae_model(resolve(TEACHER), teacher, 2).eval()
    points = bottleneck_rate(ae, sized(TEACHER, 64), val, ["int8", "fp32"], label="AE 2ch", max_images=3,
                             **KW)
    assert [(p.label, p.setting, p.images) for p in points] == [("AE 2ch", "int8", 3), ("AE 2ch", "fp32", 3)]
    numel = 2 * 4 * 4  # layer2 output 512 x 8 x 8 at 64 px, minus 4 by the encoder
    assert [p.bytes for p in points] == [numel + 8, 4 * numel]


def test_input_raw_and_png_are_plain_evaluation(val, models):
    teacher, _ = models
    samples = _relabel(teacher, TEACHER, val)
    plain = _plain(teacher, TEACHER, samples)
    points = input_rate(teacher, sized(TEACHER), samples, "jpeg", [10, 60, 95], **KW)
    assert [(p.kind, p.label, p.setting) for p in points] == [
        ("input", "resnet50 raw", "raw"), ("input", "resnet50 jpeg", "q10"),
        ("input", "resnet50 jpeg", "q60"), ("input", "resnet50 jpeg", "q95")]
    raw, *jpeg = points
    assert raw.bytes == SIZE * SIZE * 3 and _same_accuracy(raw, plain)
    assert jpeg[0].bytes < jpeg[1].bytes < jpeg[2].bytes < raw.bytes
    assert all(p.images == 6 for p in points)
    png = input_rate(teacher, sized(TEACHER), samples, "png", [], **KW)
    assert [p.setting for p in png] == ["raw", "lossless"]
    assert _same_accuracy(png[1], plain) and 0 < png[1].bytes


def test_transform_parts_compose_to_eval_transform(image_file):
    preprocessing = sized(TEACHER, 40).preprocessing()
    geometry, to_tensor = preprocessing.geometry(), preprocessing.to_tensor()
    image = load_image(image_file)
    crop = geometry(image)
    assert crop.size == (40, 40)
    assert torch.equal(to_tensor(crop), sized(TEACHER, 40).transforms()(image))


def test_teacher_split_fp32_is_the_teacher_at_every_stage(val, models):
    teacher, _ = models
    samples = _relabel(teacher, TEACHER, val)
    plain = _plain(teacher, TEACHER, samples)
    points = teacher_split_rate(teacher, sized(TEACHER), samples, "fp32", **KW)
    stages = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool"]
    assert split_stages(resolve(TEACHER), teacher) == stages
    assert [(p.kind, p.label, p.setting) for p in points] == [("teacher_split", TEACHER, s) for s in stages]
    assert all(_same_accuracy(p, plain) for p in points)
    h, numels = torch.zeros(1, 3, SIZE, SIZE), {}
    with torch.no_grad():
        for name, stage in teacher_stages(teacher_spec(TEACHER), teacher)[:len(stages)]:
            h = stage(h)
            numels[name] = h[0].numel()
    assert [p.bytes for p in points] == [4 * numels[s] for s in stages]


def test_teacher_split_chosen_stages_default_format(val, models):
    teacher, _ = models
    points = teacher_split_rate(teacher, sized(TEACHER), val, stages=["layer4", "layer2"], max_images=3, **KW)
    assert [p.setting for p in points] == ["layer2", "layer4"]  # teacher order
    assert points[0].bytes < 512 * 4 * 4 + 8 + 16  # int8 codes, zlib adds at most a few bytes
    assert points[1].bytes < 2048 + 8 + 16


def test_teacher_split_of_a_traced_teacher(val, monkeypatch):
    """A teacher outside the paper families is split at the points of its traced graph (never
    inside a residual block); fp32 is the teacher's own accuracy at each, and the tail runs on
    what was received."""
    import hnd.rate

    torch.manual_seed(0)
    teacher = create_model("resnet18", pretrained=False, num_classes=CLASSES)
    valid = split_stages(resolve("resnet18"), teacher)
    assert {"maxpool", "layer2.0", "layer2", "layer3.0.add", "avgpool"} <= set(valid)
    assert not {"layer2.0.conv1", "layer2.0.bn2", "fc"} & set(valid)
    samples = _relabel(teacher, "resnet18", val)
    plain = _plain(teacher, "resnet18", samples)
    chosen = ["maxpool", "layer2", "layer3.0", "avgpool"]
    points = teacher_split_rate(teacher, sized("resnet18@layer3"), samples, "fp32", stages=chosen[::-1], **KW)
    assert [(p.kind, p.label, p.setting) for p in points] == [("teacher_split", "resnet18", s) for s in chosen]
    assert all(_same_accuracy(p, plain) for p in points)
    assert [p.bytes for p in points] == [4 * n for n in (64 * 8 * 8, 128 * 4 * 4, 256 * 2 * 2, 512)]  # at 32 px
    assert "'layer2.0.conv1'" in error(teacher_split_rate, teacher, sized("resnet18"), val, stages=["layer2.0.conv1"],
                                       **KW)

    monkeypatch.setattr(hnd.rate, "tensor_roundtrip", lambda z, fmt: (torch.full_like(z, 0.5), [7] * len(z)))
    seen = []
    _record_inputs(teacher.layer3[0].conv1, seen)
    (point,) = teacher_split_rate(teacher, sized("resnet18"), val, stages=["layer2"], **KW)
    assert point.bytes == 7  # the head stops at layer2: layer3 runs once, in the tail, on what was received
    assert [h.shape for h in seen] == [(6, 128, 4, 4)] and bool((seen[0] == 0.5).all())


def _record_inputs(module: torch.nn.Module, seen: list) -> None:
    module.register_forward_pre_hook(lambda _, args: seen.append(args[0].clone()))


def test_server_runs_on_what_was_received(val, monkeypatch):
    """Through a channel that delivers a constant tensor (or a black image), the server's first
    module sees exactly what was delivered: decoder, tail and teacher run on the received data."""
    import hnd.rate
    from PIL import Image

    torch.manual_seed(0)
    teacher = create_model(TEACHER, pretrained=False, num_classes=CLASSES)
    student = student_from_teacher(resolve(STUDENT), teacher).eval()
    monkeypatch.setattr(hnd.rate, "tensor_roundtrip", lambda z, fmt: (torch.full_like(z, 0.5), [7] * len(z)))
    monkeypatch.setattr(hnd.rate, "decode_image", lambda data: Image.new("RGB", (SIZE, SIZE)))
    decoder_in, layer2_in, conv1_in = [], [], []
    _record_inputs(student.head.decoder, decoder_in)
    _record_inputs(teacher.layer2, layer2_in)
    _record_inputs(teacher.conv1, conv1_in)

    (point,) = bottleneck_rate(student, sized(STUDENT), val, ["fp32"], **KW)
    assert point.bytes == 7
    assert [z.shape for z in decoder_in] == [(6, 3, 5, 5)] and bool((decoder_in[0] == 0.5).all())

    layer2_in.clear()
    teacher_split_rate(teacher, sized(TEACHER), val, stages=["layer1"], **KW)  # the head stops at layer1
    assert [h.shape for h in layer2_in] == [(6, 256, 8, 8)] and bool((layer2_in[0] == 0.5).all())

    conv1_in.clear()
    input_rate(teacher, sized(TEACHER), val, "jpeg", [50], **KW)
    to_tensor = sized(TEACHER).preprocessing().to_tensor()
    black = to_tensor(Image.new("RGB", (SIZE, SIZE)))  # [3, S, S]
    raw, sent = conv1_in  # the raw crop first, then what came out of the codec
    assert bool((sent == black).all()) and not (raw == black).all()


def test_select_samples_is_class_balanced_and_fixed():
    samples = [("a0", 0), ("a1", 0), ("a2", 0), ("b0", 1), ("b1", 1), ("c0", 2)]
    assert select_samples(samples, 4) == [("a0", 0), ("a1", 0), ("b0", 1), ("c0", 2)]
    assert select_samples(samples, 3) == [("a0", 0), ("b0", 1), ("c0", 2)]
    assert select_samples(samples, None) == samples == select_samples(samples, 100)
    assert "positive" in error(select_samples, samples, 0)
    assert "empty" in error(select_samples, [], 3)


def test_errors_are_one_line(val, models):
    teacher, student = models
    assert "int4" in error(bottleneck_rate, student, sized(STUDENT), val, ["int4"], **KW)
    assert "gif" in error(input_rate, teacher, sized(TEACHER), val, "gif", [50], **KW)
    assert "1 to 100" in error(input_rate, teacher, sized(TEACHER), val, "jpeg", [0], **KW)
    assert "no quality" in error(input_rate, teacher, sized(TEACHER), val, "webp", [], **KW)
    message = error(teacher_split_rate, teacher, sized(TEACHER), val, stages=["fc"], **KW)
    assert "'fc'" in message and "layer2" in message and "flatten" not in message
    assert "bf16" in error(teacher_split_rate, teacher, sized(TEACHER), val, "bf16", **KW)


def _points() -> list:
    """Hand-made points of every kind: two bottleneck models in four formats, two codecs with
    the raw reference each, one teacher's splits; half as RatePoint, half as dicts."""
    points = [RatePoint("bottleneck", model, fmt, b, top1, top1 + 5, 10)
              for model, top1 in (("student 3ch", 60.0), ("student 12ch", 70.0))
              for fmt, b in zip(TENSOR_FORMATS, (300, 150, 83, 70))]
    for codec in ("jpeg", "webp"):
        points.append(RatePoint("input", "resnet50 raw", "raw", 3072, 75.0, 90.0, 10))
        points += [RatePoint("input", f"resnet50 {codec}", f"q{q}", 8 * q + (0 if codec == "jpeg" else -50),
                             40 + q / 3, 80.0, 10).to_dict() for q in (10, 30, 50, 75, 95)]
    points += [RatePoint("teacher_split", "resnet50", s, b, 75.0, 90.0, 10).to_dict()
               for s, b in (("conv1", 9000), ("maxpool", 3000), ("layer1", 10000), ("layer2", 6000),
                            ("layer3", 3300), ("layer4", 1700), ("avgpool", 1700))]
    return points


@pytest.mark.parametrize("teacher_top1", [75.0, None])
def test_plot_rate_accuracy(teacher_top1):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hnd.book.plots import plot_rate_accuracy

    fig = plot_rate_accuracy(_points(), teacher_top1=teacher_top1)
    try:
        (ax,) = fig.axes
        assert len(ax.collections) == 2 * len(TENSOR_FORMATS)  # one marker series per model x format
        # 2 codec lines + 1 teacher-split line + raw size (vertical line and its point) + teacher top-1
        assert len(ax.lines) == 3 + 2 + (teacher_top1 is not None)
        assert ax.get_xscale() == "log"
        assert any(line.get_xdata()[0] == 3072 and len(set(line.get_xdata())) == 1 for line in ax.lines)
        assert {t.get_text() for t in ax.texts} >= {"q10", "q95", "conv1", "layer4"}
        assert "avgpool" not in {t.get_text() for t in ax.texts}  # same place as layer4: not written twice
        fig.canvas.draw()
        (legend,) = fig.legends
        box, axes_box = legend.get_window_extent(), ax.get_window_extent()
        assert box.y1 <= axes_box.y0 and box.x0 >= -1 and box.x1 <= fig.bbox.x1 + 1  # below the axes, in the figure
        # Read at a page's width (about 7 inches): no text smaller than 8 points on a 7.5 inch figure.
        assert fig.get_figwidth() <= 8
        words = [*ax.texts, *legend.get_texts(), *ax.get_xticklabels(), *ax.get_yticklabels()]
        assert min(t.get_fontsize() for t in words) >= 8
        texts = {t.get_text() for t in legend.get_texts()}
        assert {"student 3ch", "bottleneck int8+zlib", "input: resnet50 jpeg"} <= texts
        assert any(math.isclose(line.get_ydata()[0], 75.0) and line.get_linestyle() == "--"
                   for line in ax.lines) == (teacher_top1 is not None)
    finally:
        plt.close(fig)


def test_plot_rate_accuracy_draws_an_entropic_curve_through_its_seed_means_and_writes_every_beta():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import LineCollection
    from matplotlib.colors import to_rgba

    from hnd.book.plots import plot_rate_accuracy
    from hnd.book.results import model_points

    # Two seeds per β whose points lie close: one seed of β=30 as accurate as β=1 (seen in a build).
    coded = []
    for beta, seeds in ((1.0, ((186.5, 78.5), (187.6, 79.5))), (30.0, ((157.2, 78.5), (157.3, 67.0)))):
        for b, top1 in seeds:
            coded += model_points([RatePoint("bottleneck", "entropic 3ch", "entropy", b, top1, 99.0, 10)],
                                  "entropic", 3, beta)
    fig = plot_rate_accuracy(_points() + coded, teacher_top1=75.0)
    try:
        (ax,) = fig.axes
        (curve,) = [line for line in ax.lines if "range-coded" in line.get_label()]
        assert list(curve.get_xdata()) == pytest.approx([157.25, 187.05])  # one point per β, not per seed
        assert list(curve.get_ydata()) == pytest.approx([72.75, 79.0])
        (bars,) = [c for c in ax.collections if isinstance(c, LineCollection)]
        assert [tuple(bars.get_color()[0])] == [to_rgba(curve.get_color())]
        spans = sorted((seg[0][1], seg[1][1]) for seg in bars.get_segments())
        assert spans == [(67.0, 78.5), (78.5, 79.5)]  # from the lowest to the highest seed
        written = [t.get_text() for t in ax.texts]
        assert written.count("β=1") == 1 and written.count("β=30") == 1
    finally:
        plt.close(fig)


def test_plot_rate_accuracy_draws_each_entropic_student_as_a_curve_over_beta():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hnd.book.plots import plot_rate_accuracy
    from hnd.book.results import model_points

    coded = []  # two entropic students, their betas given out of order of bytes
    for channels, shift in ((3, 0.0), (12, 8.0)):
        for beta, b, top1 in ((0.1, 60, 58.0), (2.0, 16, 40.0), (0.5, 30, 50.0)):
            point = RatePoint("bottleneck", f"entropic {channels}ch", "entropy", b * (1 + channels / 3), top1 + shift,
                              90.0, 10)
            coded += model_points([point], "entropic", channels, beta)
    fig = plot_rate_accuracy(_points() + coded, teacher_top1=75.0)
    try:
        (ax,) = fig.axes
        assert len(ax.collections) == 2 * len(TENSOR_FORMATS)  # the entropic points are no format markers
        curves = {line.get_label(): line for line in ax.lines if "range-coded" in line.get_label()}
        assert set(curves) == {"entropic 3ch, range-coded over β", "entropic 12ch, range-coded over β"}
        three = curves["entropic 3ch, range-coded over β"]
        assert list(three.get_xdata()) == [32, 60, 120] and list(three.get_ydata()) == [40.0, 50.0, 58.0]
        assert three.get_color() != curves["entropic 12ch, range-coded over β"].get_color()
        assert len(ax.lines) == 3 + 2 + 1 + 2  # as without them, plus one curve per entropic student
        assert {"β=0.1", "β=0.5", "β=2"} <= {t.get_text() for t in ax.texts}
        texts = {t.get_text() for t in fig.legends[0].get_texts()}
        assert set(curves) <= texts and "bottleneck β=0.1" not in texts and "entropic 3ch" not in texts
    finally:
        plt.close(fig)
