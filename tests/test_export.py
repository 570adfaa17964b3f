"""ONNX export of a student's edge encoder and server part: parity with PyTorch, errors, CLI."""

from __future__ import annotations

import sys

import onnx  # noqa: F401  -- the deploy extra is installed for the tests; fail, don't skip
import onnxruntime  # noqa: F401
import pytest
import torch

from conftest import error, randomize
from hnd.registry import resolve
from hnd.checkpoints import load_model, save_checkpoint
from hnd.cli import main
from hnd.export import PARTS, check_onnx, example_part, export_onnx, run_onnx
from hnd.models import create_model, create_student

NAME = "resnet50_head_mimic-ver2b-3ch"
TOL = 1e-4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A student checkpoint with fixed random weights (BN statistics too, so eval mode matters)."""
    model = create_model(NAME, pretrained=False)
    randomize(model, seed=3)
    path = tmp_path_factory.mktemp("ckpt") / "student.pt"
    save_checkpoint(path, resolve(NAME), model)
    return path


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    """{part: path} of both parts exported from ``checkpoint``."""
    folder = tmp_path_factory.mktemp("onnx")
    model = create_student(NAME, checkpoint=checkpoint)
    return {part: export_onnx(model, part, folder / f"{part}.onnx").path for part in PARTS}


@pytest.fixture(scope="module")
def student(checkpoint):
    return load_model(resolve(NAME), checkpoint)


def _images(batch: int, seed: int = 5) -> torch.Tensor:
    return torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("batch", [1, 2])
def test_encoder_matches_pytorch(exported, student, batch):
    encoder, _ = student.split()
    x = _images(batch)
    assert check_onnx(exported["encoder"], encoder, x) <= TOL
    assert tuple(run_onnx(exported["encoder"], x).shape) == (batch, 3, 29, 29)


@pytest.mark.parametrize("batch", [1, 3])
def test_server_matches_pytorch(exported, student, batch):
    encoder, server = student.split()
    with torch.no_grad():
        z = encoder(_images(batch))
    assert check_onnx(exported["server"], server, z) <= TOL
    assert tuple(run_onnx(exported["server"], z).shape) == (batch, 1000)


def test_chained_parts_give_the_students_logits(exported, student):
    x = _images(2, seed=7)
    logits = run_onnx(exported["server"], run_onnx(exported["encoder"], x))
    with torch.no_grad():
        expected = student(x)
    assert (logits - expected).abs().max() <= TOL
    assert torch.equal(logits.argmax(1), expected.argmax(1))


def test_example_part_gives_real_shapes(checkpoint):
    module, z = example_part(create_student(checkpoint=checkpoint), "server", batch=2)
    assert tuple(z.shape) == (2, 3, 29, 29) and not module.training


def test_a_student_of_any_teacher_exports(tmp_path):
    """Both parts of a generic student of a torchvision teacher (MobileNetV3, its tail a traced
    graph) export and match PyTorch; chained, they give the student's logits."""
    name = "mobilenet_v3_large-3ch"
    model = create_model(name, pretrained=False)
    randomize(model, seed=4)
    path = tmp_path / "student.pt"
    save_checkpoint(path, model.spec, model)
    student = create_student(name, checkpoint=path)
    parts = {part: export_onnx(student, part, tmp_path / f"{part}.onnx").path for part in PARTS}
    encoder, server = student.split()
    x = _images(2, seed=8)
    with torch.no_grad():
        z, expected = encoder(x), student(x)
    assert tuple(z.shape) == (2, 3, 29, 29)
    scale = float(expected.abs().max())
    assert check_onnx(parts["encoder"], encoder, x) <= TOL * max(1.0, float(z.abs().max()))
    assert check_onnx(parts["server"], server, z) <= TOL * max(1.0, scale)
    logits = run_onnx(parts["server"], run_onnx(parts["encoder"], x))
    assert (logits - expected).abs().max() <= TOL * max(1.0, scale)
    assert torch.equal(logits.argmax(1), expected.argmax(1))
    module, z = example_part(student, "server", batch=3)
    assert tuple(z.shape) == (3, 3, 29, 29) and not module.training


def test_errors_are_one_line(tmp_path, monkeypatch):
    model = create_student(NAME, random_seed=0)
    assert error(export_onnx, model, "edge", tmp_path / "e.onnx") == "unknown part 'edge'; valid parts: encoder, server"
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert 'pip install -e ".[deploy]"' in error(export_onnx, model, "encoder", tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir()), "nothing is written on errors"


def test_cli_export(checkpoint, tmp_path, capsys):
    out = tmp_path / "enc.onnx"
    assert main(["export", NAME, "--part", "encoder", "--format", "onnx", "--checkpoint", str(checkpoint),
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "MB" in printed and "max abs diff" in printed
    assert float(printed.split("max abs diff ")[1].split()[0]) <= TOL
    assert out.stat().st_size > 0 and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    assert main(["export", "resnet50", "--part", "encoder", "--out", str(tmp_path / "t.onnx")]) == 2
    assert "resnet50 is a teacher: split computing here needs a student" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["export", NAME, "--part", "encoder", "--format", "tflite", "--out", str(tmp_path / "x")])
    assert "invalid choice" in capsys.readouterr().err


def test_the_encoder_travels_with_a_sidecar_the_device_reads_without_torch(tmp_path):
    """`hnd export --part encoder` writes encoder.json beside encoder.onnx: model, preprocessing,
    bottleneck shape and, for an entropic student, its coding tables. A process without torch
    reads it, preprocesses a photograph and runs the encoder with onnxruntime: the same
    bottleneck as PyTorch's. A sidecar of another encoder, a missing or damaged one, or tables
    that fail their fingerprint are one-line errors."""
    import json
    import subprocess
    import sys

    from matplotlib import cbook
    from PIL import Image

    from hnd.codec import encode_coded
    from hnd.encoder_bundle import EncoderBundle
    from hnd.entropy import table_fingerprint

    model = create_student("resnet18@layer2-3ch-entropic", pretrained=False, num_classes=4, input_size=64)
    randomize(model, seed=2)
    model.head.prior.update_tables()
    path = export_onnx(model, "encoder", tmp_path / "encoder.onnx").path
    bundle = EncoderBundle.read(path)
    assert bundle.model == "resnet18@layer2-3ch-entropic" and bundle.preprocessing == model.spec.preprocessing()
    assert bundle.bottleneck_shape == (3, 9, 9) and bundle.tables.fingerprint == table_fingerprint(model.prior)
    assert bundle.wire_formats[-1] == "entropy"

    photo = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    code = ("import sys; sys.modules['torch'] = None; sys.modules['torchvision'] = None\n"
            "import json, numpy as np, onnxruntime as ort\nfrom PIL import Image\n"
            "from hnd.encoder_bundle import EncoderBundle\n"
            f"bundle = EncoderBundle.read({str(path)!r})\n"
            f"x = bundle.preprocessing.array(Image.open({photo!r}))[None]\n"
            "session = ort.InferenceSession(str(bundle.onnx), providers=['CPUExecutionProvider'])\n"
            "z = session.run(None, {session.get_inputs()[0].name: x})[0][0]\n"
            "print(bundle.tables.encode(z).hex())\nprint(json.dumps(z.ravel().tolist()))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    coded, values = done.stdout.splitlines()
    with Image.open(photo) as image, torch.no_grad():
        z = model.encode(model.spec.transforms()(image.convert("RGB"))[None])[0]
    assert torch.allclose(torch.tensor(json.loads(values)).view_as(z), z, atol=1e-4)
    assert bytes.fromhex(coded) == encode_coded(model.prior, z)  # the same bytes on the wire

    side = tmp_path / "encoder.json"
    doc = json.loads(side.read_text())
    other = export_onnx(create_student("resnet18@layer2-3ch", pretrained=False, input_size=64), "encoder",
                        tmp_path / "other.onnx").path
    (tmp_path / "other.json").write_text(side.read_text())  # the wrong sidecar beside it
    assert "describes another encoder" in error(EncoderBundle.read, other)
    side.write_text(json.dumps({**doc, "entropy": {**doc["entropy"], "fingerprint": 1}}))
    assert "does not match the recorded 1" in error(EncoderBundle.read, path)
    side.write_text("{not json")
    assert "is not JSON" in error(EncoderBundle.read, path)
    side.unlink()
    assert "encoder.json is missing" in error(EncoderBundle.read, path)
