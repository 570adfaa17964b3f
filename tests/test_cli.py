"""The command line: models, inspect, predict; user mistakes give one line, exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from hnd.checkpoints import save_checkpoint
from hnd.cli import main
from hnd.models import create_student

from conftest import randomize
from original_layout import hnd_checkpoint, kd_checkpoint, naive_checkpoint


def run_json(capsys, *argv):
    assert main(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


def test_models_lists_teachers_and_official_students(capsys):
    rows = run_json(capsys, "models", "--json")
    names = {r["name"] for r in rows}
    assert {"densenet169", "resnet152", "inception_v3", "densenet121", "resnet50", "resnet101"} <= names
    official = [r["name"] for r in rows if r["kind"] == "student" and r["official"]]
    assert len(official) == 16 and "inception_v3_head_mimic-ver1b-12ch" in official
    assert main(["models"]) == 0 and "densenet201_head_mimic-ver2b-9ch" in capsys.readouterr().out


def test_inspect_json_summary_and_rows(capsys):
    doc = run_json(capsys, "inspect", "inception_v3_head_mimic-ver1b-6ch", "--json")
    s = doc["summary"]
    assert doc["model"] == "inception_v3_head_mimic-ver1b-6ch"
    assert (s["bottleneck_shape"], s["encoder_macs"], s["head_params"]) == ([6, 37, 37], 205400256, 477132)
    assert s["bottleneck_bytes"]["int8"] == 8214
    first = doc["layers"][0]
    assert set(first) >= {"name", "output_shape", "bytes", "params", "macs", "cum_macs"}
    assert set(first["bytes"]) == {"fp32", "fp16", "int8"}
    assert doc["layers"][-1]["cum_macs"] == s["macs"] == 5200387776
    assert main(["inspect", "resnet152", "--split-point", "layer3"]) == 0
    assert "split after layer3" in capsys.readouterr().out


def test_predict_teacher_with_cached_weights(capsys, pretrained, image_file):
    pretrained("densenet169")
    doc = run_json(capsys, "predict", "densenet169", str(image_file), "--topk", "3", "--logits", "--json")
    assert doc["model"] == "densenet169" and len(doc["topk"]) == 3 and len(doc["logits"]) == 1000
    probs = [t["prob"] for t in doc["topk"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-6
    logits = torch.tensor(doc["logits"])
    assert doc["topk"][0]["index"] == int(logits.argmax())
    assert abs(probs[0] - float(logits.softmax(0).max())) < 1e-6
    doc = run_json(capsys, "predict", "densenet169", str(image_file), "--json")
    assert "logits" not in doc and len(doc["topk"]) == 5


@pytest.mark.parametrize("fmt", ["naive", "kd", "hnd", "ours"])
def test_predict_student_from_every_checkpoint_format(fmt, capsys, pretrained, image_file, tmp_path):
    pretrained("inception_v3")
    name = "inception_v3_head_mimic-ver1b-3ch"
    student = create_student(name)  # pretrained tail, as the HND format implies
    randomize(student.head, seed=3)
    path = tmp_path / "ckpt.pt"
    if fmt == "ours":
        save_checkpoint(path, student.spec, student)
    else:
        torch.save({"naive": naive_checkpoint, "kd": kd_checkpoint, "hnd": hnd_checkpoint}[fmt](student), path)
    doc = run_json(capsys, "predict", name, str(image_file), "--checkpoint", str(path), "--logits", "--json")
    from hnd.data import image_tensor

    with torch.no_grad():
        expected = student.eval()(image_tensor(student.spec, image_file))[0]
    assert torch.allclose(torch.tensor(doc["logits"]), expected, atol=1e-5)


def test_eval_transform_sizes():
    from hnd.registry import resolve

    inception = repr(resolve("inception_v3").transforms())
    assert "size=327" in inception and "size=(299, 299)" in inception
    assert "size=256" in repr(resolve("resnet152_head_mimic-ver2b-3ch").transforms())


@pytest.mark.parametrize("argv, message", [
    (["inspect", "vgg17"], "unknown teacher 'vgg17'"),
    (["inspect", "resnet18@layer1.0.conv1"], "nearest valid split points: maxpool or layer1.0.add"),
    (["inspect", "resnet18@fc"], "leaves no tail"),
    (["inspect", "fasterrcnn_resnet50_fpn"], "detection model"),
    (["inspect", "vit_b_16-3ch"], "[C, H, W]"),
    (["inspect", "densenet169_head_mimic-ver2b-0ch"], "positive integer"),
    (["inspect", "densenet169_head_mimic-ver2b-1.5ch"], "positive integer"),
    (["predict", "densenet169", "{missing}"], "image not found"),
    (["predict", "densenet169", "{text}"], "cannot read"),
    (["predict", "densenet169_head_mimic-ver2b-3ch", "{image}"], "give its weights with --checkpoint"),
    (["predict", "densenet169_head_mimic-ver2b-3ch", "{image}", "--checkpoint", "{missing}"], "checkpoint not found"),
    (["predict", "resnet101", "{image}"], "resnet101-63fe2227.pth"),
    (["predict", "densenet169", "{image}", "--topk", "0"], "--topk must be a positive integer"),
])
def test_user_mistakes_are_one_line_errors(argv, message, capsys, tmp_path, image_file):
    (tmp_path / "notes.txt").write_text("hello")
    subs = {"{missing}": str(tmp_path / "nope.jpg"), "{text}": str(tmp_path / "notes.txt"), "{image}": str(image_file)}
    assert main([subs.get(a, a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hnd: error: ") and message in err and err.count("\n") == 1


def test_console_entry_point_prints_no_traceback(tmp_path):
    env = {**os.environ, "TORCH_HOME": str(tmp_path), "HND_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "hnd", "predict", "inception_v3", __file__], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr and "cannot read" in done.stderr
    done = subprocess.run([sys.executable, "-m", "hnd", "models", "--json"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and json.loads(done.stdout)[0]["name"] == "densenet121"


@pytest.mark.parametrize("command", ["train", "config", "evaluate"])
def test_method_help_names_every_method(command, capsys):
    """The help texts name the methods without importing hnd.config: they must not fall behind it."""
    from hnd.config import METHODS

    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps help lines
    assert " | ".join(METHODS) in text
