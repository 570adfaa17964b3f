"""The latency model: hand-computed delays and crossovers, profiles, options, CLI."""

from __future__ import annotations

import json

import pytest

from conftest import PAPER_TEACHERS, error
from hnd.registry import resolve
from hnd.analysis import LayerRow, analyze
from hnd.cli import main
from hnd.tensor_codec import tensor_bytes
from hnd.devices import (DeviceProfile, list_device_profiles, load_device_profile, measure_device_profile,
                         save_device_profile)
from hnd.latency import Option, coded_student, crossovers, measure_input_codec, options, plan
from hnd.registry import student_spec


def row(name: str, macs: int, part: str = "head") -> LayerRow:
    return LayerRow(name, "Conv2d", part, (4, 2, 2), 0, macs, 0)


def toy_options() -> list[Option]:
    """Three options whose delays are easy by hand (rate in Mbit/s, delay in s):
    local 0.1; student 0.02 + 10000 B; offload 0.005 + 100000 B."""
    return [Option("local", "local", 0.1, 0.0, 0.0, 0.0),
            Option("student", "student", 0.015, 0.005, 10_000, 0.0),
            Option("offload", "offload", 0.0, 0.0, 100_000, 0.005)]


# --- hand-computed delays and crossovers -----------------------------------------------------

def test_profile_seconds_measured_fallback_and_scale():
    p = DeviceProfile("toy", "", "", macs_per_s=1e9, layer_seconds={"m": {"a": 0.002}}, scale=3.0)
    assert p.seconds("m", [row("a", 10**9), row("b", 5 * 10**6)]) == pytest.approx([0.006, 0.015])
    # a student's tail layers reuse its teacher's measurements
    p = DeviceProfile("toy", "", "", 1e9, {"densenet169": {"tail.x": 0.5}})
    assert p.seconds("densenet169_head_mimic-ver2b-3ch", [row("tail.x", 0, "tail")]) == [0.5]


def test_teacher_layers_fall_back_to_the_teachers_measurements():
    p = DeviceProfile("toy", "", "", 1e9, {"resnet18": {"tail.layer3.0.conv1": 0.5, "head.layer2.0.conv1": 0.25}})
    student = "resnet18@layer2-3ch"
    assert p.seconds(student, [row("tail.layer3.0.conv1", 0, "tail")]) == [0.5]
    assert p.seconds("resnet18@layer1-3ch", [row("tail.layer2.0.conv1", 0, "tail")]) == [0.25]  # head there
    assert p.seconds("resnet18@layer3", [row("head.layer3.0.conv1", 0, "head")]) == [0.5]  # a teacher cut deeper
    assert p.seconds(student, [row("encoder.0", 10**9, "encoder"), row("tail.fc", 10**6, "tail")]) == [1.0, 0.001]
    assert p.seconds("resnet34-3ch", [row("tail.layer3.0.conv1", 0, "tail")]) == [0.0]  # another teacher


def test_delay_equals_hand_formula():
    local, student, offload = toy_options()
    # 10000 bytes at 8 Mbit/s = 10 ms; RTT 30 ms
    assert student.delay(8, 30) == pytest.approx(0.015 + 0.005 + 0.010 + 0.030)
    assert student.breakdown(8, 30) == pytest.approx(
        {"device": 0.015, "encode": 0.005, "transfer": 0.010, "rtt": 0.030, "server": 0.0})
    assert offload.delay(100, 0) == pytest.approx(0.005 + 0.008)
    assert local.delay(0.5, 500) == pytest.approx(0.1)  # sends nothing, pays no RTT


def test_crossovers_match_hand_computation():
    # local = student: 0.1 = 0.02 + 0.08/r -> r = 1; student = offload: 0.02 + 0.08/r = 0.005 + 0.8/r -> r = 48
    found = crossovers(toy_options())
    assert [c["rate_mbps"] for c in found] == pytest.approx([1.0, 48.0])
    assert [(c["from"], c["to"]) for c in found] == [("local", "student"), ("student", "offload")]
    # RTT 20 ms: 0.1 = 0.04 + 0.08/r -> r = 4/3; student vs offload unchanged (both pay it)
    found = crossovers(toy_options(), rtt_ms=20)
    assert [c["rate_mbps"] for c in found] == pytest.approx([4 / 3, 48.0])
    assert crossovers(toy_options(), low=2, high=40) == []
    # agrees with the best option of plan() on either side of every crossing
    for c in crossovers(toy_options(), rtt_ms=5):
        assert plan(toy_options(), c["rate_mbps"] * 0.99, 5)[0][0].label == c["from"]
        assert plan(toy_options(), c["rate_mbps"] * 1.01, 5)[0][0].label == c["to"]


def test_plan_ranks_by_delay():
    ranked = plan(toy_options(), 10, 0)
    assert [o.label for o, _ in ranked] == ["student", "offload", "local"]
    delays = [d for _, d in ranked]
    assert delays == sorted(delays)
    assert plan(toy_options(), 100, 0)[0][0].label == "offload"
    assert plan(toy_options(), 0.5, 0)[0][0].label == "local"


@pytest.mark.parametrize("rate,rtt", [(0, 0), (-1, 0), (10, -5), (float("nan"), 0)])
def test_bad_link_is_one_line_error(rate, rtt):
    assert "must be" in error(plan, toy_options(), rate, rtt)


# --- profiles --------------------------------------------------------------------------------

def test_every_builtin_profile_loads():
    names = list_device_profiles()
    assert {"this-machine", "gpu-server", "raspberry-pi4"} <= set(names)
    for name in names:
        p = load_device_profile(name)
        assert p.macs_per_s > 0 and p.scale > 0 and p.description and p.source
    here, pi = load_device_profile("this-machine"), load_device_profile("raspberry-pi4")
    assert pi.scale == 10 * here.scale and pi.layer_seconds == here.layer_seconds
    assert set(here.layer_seconds) >= set(PAPER_TEACHERS) | {"mobilenet_v2"}
    rows = analyze(resolve("densenet169")).rows
    assert set(here.layer_seconds["densenet169"]) == {r.name for r in rows}


def test_base_and_scale_profile_files(tmp_path):
    (tmp_path / "measured.yaml").write_text(
        "description: d\nsource: s\nmacs_per_s: 1.0e9\nencode_bytes_per_s: 1.0e6\n"
        "layer_seconds:\n  m:\n    a: 0.002\n")
    (tmp_path / "slow.yaml").write_text("source: assumed 8x slower\nbase: measured.yaml\nscale: 8\n")
    slow = load_device_profile(str(tmp_path / "slow.yaml"))
    assert slow.name == "slow" and slow.source == "assumed 8x slower" and slow.description == "d"
    assert slow.seconds("m", [row("a", 0), row("b", 10**6)]) == pytest.approx([0.016, 0.008])
    assert slow.encode_seconds(1000) == pytest.approx(0.008)
    (tmp_path / "pi2.yaml").write_text("base: raspberry-pi4\nscale: 2\n")
    assert load_device_profile(str(tmp_path / "pi2.yaml")).scale == pytest.approx(20.0)


def test_measured_profile_round_trips(tmp_path):
    p = measure_device_profile(["mobilenet_v2"], repeats=1, warmup=0, name="tiny")
    assert p.name == "tiny" and p.macs_per_s > 0 and p.encode_bytes_per_s > 0
    assert len(p.layer_seconds["mobilenet_v2"]) > 10 and "cores" in p.description
    for path in (tmp_path / "tiny.yaml", tmp_path / "tiny.json"):
        save_device_profile(p, path)
        assert load_device_profile(str(path)) == p


@pytest.mark.parametrize("text,expected", [
    ("macs_per_s: [1, 2\n", "not valid YAML"),
    ("- 1\n- 2\n", "must hold a mapping with keys"),
    ("macs_per_s: 1e9\nscale: -2\n", "scale must be a positive number"),
    ("macs_per_s: 0\n", "macs_per_s must be a positive number"),
    ("macs_per_s: 1e9\nspeed: 3\n", "valid: name, description"),
    ("description: no speed\n", "needs macs_per_s"),
    ("macs_per_s: 1e9\nlayer_seconds:\n  m:\n    a: -1\n", "non-negative"),
    ("base: no-such-device\n", "unknown device profile 'no-such-device'"),
])
def test_bad_profile_files_are_one_line_errors(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert expected in error(load_device_profile, str(path))


def test_unknown_profile_names_the_valid_ones(tmp_path):
    message = error(load_device_profile, "pi-zero")
    assert "this-machine" in message and "gpu-server" in message
    assert "does not exist" in error(load_device_profile, str(tmp_path / "missing.yaml"))
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    assert "its own base" in error(load_device_profile, str(tmp_path / "loop.yaml"))


# --- options ---------------------------------------------------------------------------------

@pytest.mark.parametrize("teacher", PAPER_TEACHERS)
def test_options_cover_every_choice(teacher):
    device = DeviceProfile("d", "", "", 1e10, encode_bytes_per_s=1e8)
    server = DeviceProfile("s", "", "", 1e12)
    opts = options(resolve(teacher), device, server, lossless_ratio=0.5)
    kinds = [o.kind for o in opts]
    assert kinds.count("local") == kinds.count("local_small") == kinds.count("offload") == 1
    rows = analyze(resolve(teacher)).rows
    splits = [o for o in opts if o.kind == "teacher_split"]
    assert len(splits) == len(rows) - 1
    assert [s.bytes for s in splits] == [tensor_bytes(r.output_shape, "int8") for r in rows[:-1]]
    total = sum(r.macs for r in rows) / 1e10
    assert all(s.device_s + s.server_s * 100 == pytest.approx(total) for s in splits)
    labels = {o.label for o in opts}
    assert len(labels) == len(opts)
    for c in (3, 6, 9, 12):
        z = analyze(student_spec(teacher, c)).summary.bottleneck_shape
        for fmt in ("fp32", "fp16", "int8", "int8+zlib"):
            [o] = [o for o in opts if o.label == f"HND student {c}ch {fmt}"]
            expected = tensor_bytes(z, "int8") * 0.5 if fmt == "int8+zlib" else tensor_bytes(z, fmt)
            assert o.bytes == pytest.approx(expected)
    offload = next(o for o in opts if o.kind == "offload")
    side = 299 if teacher == "inception_v3" else 224
    assert offload.bytes == 3 * side * side and offload.label == "offload raw RGB"


def test_options_details_and_errors():
    device = DeviceProfile("d", "", "", 1e10, encode_bytes_per_s=1e6)
    server = DeviceProfile("s", "", "", 1e12)
    opts = options(resolve("resnet152"), device, server, channels=(3,), formats=("int8",), input_bytes=20_000,
                   small_model=False)
    assert [o.kind for o in opts].count("local_small") == 0
    offload = next(o for o in opts if o.kind == "offload")
    assert offload.bytes == 20_000 and offload.label == "offload image" and offload.accuracy == pytest.approx(78.312)
    student = next(o for o in opts if o.kind == "student")
    assert student.encode_s == pytest.approx(student.bytes / 1e6) and student.accuracy is None
    assert "lossless_ratio" in error(options, resolve("resnet152"), device, server, formats=("int8+zlib",))
    assert "unknown tensor format" in error(options, resolve("resnet152"), device, server, formats=("int4",))
    assert "unknown teacher" in error(resolve, "alexnet9")
    assert "not the student" in error(options, resolve("resnet18-3ch"), device, server)
    assert "positive integer" in error(options, resolve("resnet152"), device, server, channels=(0,))


def test_options_of_a_traced_teacher_split_only_where_one_tensor_crosses():
    device = DeviceProfile("d", "", "", 1e10, encode_bytes_per_s=1e8)
    server = DeviceProfile("s", "", "", 1e12)
    opts = options(resolve("resnet18"), device, server, channels=(3, 12), formats=("int8",))
    rows = analyze(resolve("resnet18")).rows
    cuts = [r for r in rows[:-1] if r.cut]
    assert len(cuts) < len(rows) - 1  # rows inside ResNet's residual blocks are no split points
    splits = [o for o in opts if o.kind == "teacher_split"]
    assert [s.bytes for s in splits] == [tensor_bytes(r.output_shape, "int8") for r in cuts]
    total = sum(r.macs for r in rows) / 1e10
    assert all(s.device_s + s.server_s * 100 == pytest.approx(total) for s in splits)
    labels = [o.label for o in opts]
    assert len(set(labels)) == len(labels)
    assert {"local resnet18", "resnet18 split after maxpool int8", "resnet18 split after layer2.0 int8",
            "resnet18 split after layer2 int8", "resnet18 split after layer4 int8"} <= set(labels)
    assert not [label for label in labels if "conv1" in label.replace("after conv1 ", "")]
    assert next(o for o in opts if o.kind == "local").accuracy == pytest.approx(69.758)
    for c in (3, 12):
        spec = student_spec("resnet18", c)
        assert str(spec) == f"resnet18@layer2-{c}ch"
        [o] = [o for o in opts if o.label == f"HND student {c}ch int8"]
        assert o.bytes == tensor_bytes(analyze(spec).summary.bottleneck_shape, "int8") == tensor_bytes((c, 29, 29),
                                                                                                     "int8")
    # at another split point the students move with it
    deeper = options(resolve("resnet18@layer3"), device, server, channels=(3,), formats=("fp32",), small_model=False)
    [s] = [o for o in deeper if o.kind == "student"]
    srows = analyze(resolve("resnet18@layer3-3ch")).rows
    assert srows[-len([r for r in srows if r.part == "tail"])].name == "tail.layer4.0.conv1"
    assert s.bytes == tensor_bytes(analyze(resolve("resnet18@layer3-3ch")).summary.bottleneck_shape, "fp32")
    assert s.server_s == pytest.approx(sum(r.macs for r in srows if r.part != "encoder") / 1e12)


def test_measured_profile_of_a_traced_teacher_and_its_student():
    p = measure_device_profile(["resnet18", "resnet18-3ch"], repeats=1, warmup=0)
    assert set(p.layer_seconds) == {"resnet18", "resnet18@layer2-3ch"}  # canonical names
    assert set(p.layer_seconds["resnet18"]) == {r.name for r in analyze(resolve("resnet18")).rows}
    student = analyze(resolve("resnet18@layer2-3ch")).rows
    assert set(p.layer_seconds["resnet18@layer2-3ch"]) == {r.name for r in student if r.part != "tail"}
    tail = [r for r in student if r.part == "tail"]
    assert p.seconds("resnet18-3ch", tail) == [p.layer_seconds["resnet18"][r.name] for r in tail]


# --- command line ----------------------------------------------------------------------------

def test_cli_plan_table_and_json(capsys):
    assert main(["plan", "densenet169", "--rate", "10", "--rtt", "20", "--channels", "3", "12"]) == 0
    out = capsys.readouterr().out
    assert "best: " in out and "delay ms" in out and "HND student 12ch int8" in out
    assert "local densenet169" in out and "best option by data rate" in out
    assert main(["plan", "inception_v3", "--rate", "5", "--json", "--device", "raspberry-pi4",
                 "--lossless-ratio", "0.6", "--input-bytes", "30000"]) == 0
    doc = json.loads(capsys.readouterr().out)
    delays = [o["delay_s"] for o in doc["options"]]
    assert delays == sorted(delays) and doc["device"] == "raspberry-pi4"
    assert any(o["label"] == "HND student 3ch int8+zlib" for o in doc["options"])
    rates = [c["rate_mbps"] for c in doc["crossovers"]]
    assert rates and rates == sorted(rates)  # at 5 Mbps on a Pi the best option changes with the rate
    assert all(c["from"] != c["to"] for c in doc["crossovers"])
    labels = [o["label"] for o in doc["options"]]
    assert doc["crossovers"][0]["from"] in labels and doc["crossovers"][-1]["to"] in labels


@pytest.mark.parametrize("argv,expected", [
    (["plan", "densenet169", "--rate", "0"], "data rate must be a positive"),
    (["plan", "densenet169", "--rate", "10", "--device", "nope"], "unknown device profile 'nope'"),
    (["plan", "vgg99", "--rate", "10"], "unknown teacher 'vgg99'"),
])
def test_cli_plan_errors(capsys, argv, expected):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hnd: error: ") and expected in err and "\n" not in err


def test_cli_profile_device(tmp_path, capsys):
    out = tmp_path / "mine.yaml"
    assert main(["profile-device", "mobilenet_v2", "--out", str(out), "--repeats", "1", "--warmup", "0",
                 "--name", "mine"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert load_device_profile(str(out)).name == "mine"
    assert main(["plan", "resnet152", "--rate", "3", "--device", str(out)]) == 0


def test_offloading_a_measured_jpeg(tmp_path, capsys):
    from hnd.synth import write_synthetic_dataset

    data = write_synthetic_dataset(tmp_path / "images", classes=2, train_per_class=2, val_per_class=2,
                                   image_size=64)["root"]
    low, high = (measure_input_codec(resolve("resnet152"), data, "jpeg", q) for q in (10, 90))
    assert low.images == high.images == 8 and 0 < low.bytes < high.bytes and low.seconds > 0
    device = load_device_profile("raspberry-pi4")
    offload = [o for o in options(resolve("resnet152"), device, load_device_profile("gpu-server"), channels=(3,),
                                  input_codec=high) if o.kind == "offload"]
    assert [(o.label, o.bytes, o.encode_s) for o in offload] == [("offload jpeg q90", high.bytes,
                                                                  high.seconds * device.scale)]
    assert main(["plan", "resnet152", "--rate", "5", "--images", data, "--quality", "40", "--json"]) == 0
    labels = [o["label"] for o in json.loads(capsys.readouterr().out)["options"]]
    assert "offload jpeg q40" in labels and "offload raw RGB" not in labels
    (tmp_path / "empty").mkdir()
    assert error(measure_input_codec, resolve("resnet152"), tmp_path / "empty").startswith("no images (.jpg")
    assert "quality" in error(measure_input_codec, resolve("resnet152"), data, "jpeg", 0)


# --- entropic students, with the bytes their runs measured --------------------------------------

def _entropic_run(folder, model="resnet18@layer2-3ch-entropic", coded=140.0, top1=61.5, beta=2.5, input_size=64):
    """A finished entropic run folder as training writes it (result.json, config.yaml)."""
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(json.dumps({"model": model, "method": "entropic",
                                                    "test": {"top1": top1, "bytes_per_image": coded}}))
    (folder / "config.yaml").write_text(f"model: {model}\nmethod: entropic\nbeta: {beta}\ninput_size: {input_size}\n")
    return folder


def test_entropic_students_are_planned_with_their_measured_bytes(tmp_path):
    small = coded_student(_entropic_run(tmp_path / "small", coded=60.0, beta=8.0))
    large = coded_student(_entropic_run(tmp_path / "large", coded=900.0, beta=0.5))
    assert (small.bytes, small.beta, small.top1, small.spec.input_size) == (60.0, 8.0, 61.5, 64)
    device, server = load_device_profile("raspberry-pi4"), load_device_profile("gpu-server")
    teacher = student_spec("resnet18", 3).as_teacher().at_input_size(64)
    opts = options(teacher, device, server, channels=(3,), formats=("int8",), coded=[small, large])
    by = {o.label: o for o in opts}
    hnd_int8, coded_small = by["HND student 3ch int8"], by["entropic student 3ch β=8"]
    assert coded_small.bytes == 60.0 and by["entropic student 3ch β=0.5"].bytes == 900.0
    assert coded_small.accuracy == 61.5
    # Same encoder and server work as the HND student; only the bytes differ.
    assert (coded_small.device_s, coded_small.server_s) == (hnd_int8.device_s, hnd_int8.server_s)
    [(first, _), _] = plan([hnd_int8, coded_small], 0.1, 20.0)
    assert first is coded_small  # fewer bytes win on a slow link


def test_entropic_runs_that_do_not_fit_are_one_line_errors(tmp_path, capsys):
    run = _entropic_run(tmp_path / "run")
    assert main(["plan", "resnet18", "--rate", "1", "--entropic", str(run)]) == 2  # run at 64 px, plan at 224
    err = capsys.readouterr().err.strip()
    assert "--input-size 64" in err and "\n" not in err
    assert main(["plan", "resnet18", "--rate", "1", "--input-size", "64", "--entropic", str(run), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert any(o["label"] == "entropic student 3ch β=2.5" and o["bytes"] == 140.0 for o in doc["options"])
    assert main(["plan", "resnet34", "--rate", "1", "--input-size", "64", "--entropic", str(run)]) == 2
    assert "not an entropic student of resnet34" in capsys.readouterr().err
    other = tmp_path / "hnd-run"
    other.mkdir()
    (other / "result.json").write_text(json.dumps({"model": "resnet18@layer2-3ch", "method": "hnd",
                                                   "test": {"top1": 50.0}}))
    assert "not a finished entropic run" in error(coded_student, other)
    assert "not a finished entropic run" in error(coded_student, tmp_path / "missing")
