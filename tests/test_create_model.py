"""``create_model``, the one way in: a checkpoint's spec wins over the name's defaults (input
size, classes, entropy tables), a name that contradicts the file is a one-line error, and every
command parses a name once, reads a checkpoint once and builds through ``create_model``; a
student trained at another size than its teacher's default is sent with `hnd edge` and nothing
but its checkpoint."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import hnd.serving
from conftest import error, randomize
from hnd.checkpoints import save_checkpoint
from hnd.cli import main
from hnd.models import create_model, create_student
from hnd.synth import write_synthetic_dataset

NAME = "resnet18@layer2-3ch-entropic"
PLAIN = "resnet18@layer2-3ch"
SIZE = 64  # not resnet18's 224: what the checkpoint records must decide
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def students(tmp_path_factory) -> dict:
    """A 4-class entropic student with its tables and a 3-class plain one, both saved at 64 px."""
    folder = tmp_path_factory.mktemp("create_model")
    entropic = create_model(NAME, pretrained=False, num_classes=4, input_size=SIZE)
    randomize(entropic, 3)
    entropic.head.prior.update_tables()
    save_checkpoint(folder / "entropic.pt", entropic.spec, entropic)
    plain = create_model(PLAIN, pretrained=False, num_classes=3, input_size=SIZE)
    randomize(plain, 4)
    save_checkpoint(folder / "plain.pt", plain.spec, plain)
    return {"entropic": folder / "entropic.pt", "plain": folder / "plain.pt", "model": entropic}


def test_the_checkpoint_decides_input_size_classes_and_tables(students):
    saved = students["model"]
    for name in (NAME, None):
        model = create_model(name, checkpoint=students["entropic"])
        assert model.spec == saved.spec and model.spec.input_size == SIZE and not model.training
        assert torch.equal(model.prior.pmf, saved.prior.pmf) and model.prior.has_tables
        x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert tuple(model(x).shape) == (2, 4) and torch.equal(model(x), saved(x))


def test_contradictions_are_one_line_errors(students):
    message = error(create_model, "resnet18@layer3-3ch", checkpoint=students["plain"])
    assert "does not fit resnet18@layer3-3ch" in message and "\n" not in message
    assert error(create_model, PLAIN, checkpoint=students["plain"], input_size=96) == (
        f"{students['plain']} fixes its own input size and classes; build without --checkpoint to choose them")
    assert error(create_model) == "give a model name or a checkpoint that records its model"
    assert error(create_student, "resnet18", random_seed=0) == (
        "resnet18 is a teacher: split computing here needs a student such as resnet18-3ch (see `hnd models`)")


def _serve(checkpoint: Path, log: Path):
    """`hnd serve` of ``checkpoint`` in its own process: (process, address)."""
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "hnd", "serve", NAME, "--checkpoint", str(checkpoint),
                                 "--port", "0", "--max-wait-ms", "1"], stdout=subprocess.PIPE, stderr=out,
                                text=True, cwd=ROOT)
    deadline, line = time.monotonic() + 120, ""
    while not line and time.monotonic() < deadline and proc.poll() is None:
        line = proc.stdout.readline()
    assert line.startswith("hnd serve:"), (line, log.read_text()[-2000:])
    return proc, re.search(r" on (\S+:\d+) ", line).group(1)


def _key(path: str) -> str:
    return str(Path(path).resolve())  # as the counts fixture names files


def _json(capsys):
    return json.loads(capsys.readouterr().out)


def test_edge_sends_a_student_of_another_size_with_nothing_but_its_checkpoint(students, image_file, counts,
                                                                              capsys, tmp_path):
    checkpoint = str(students["entropic"])
    proc, address = _serve(students["entropic"], tmp_path / "server.log")
    try:
        assert main(["predict", NAME, str(image_file), "--checkpoint", checkpoint, "--json"]) == 0
        expected = _json(capsys)["topk"]
        assert len(expected) == 4  # every class of a 4-class student, without --topk
        for wire in (["--bits", "32"], ["--compress", "entropy"]):
            counts.update(parse=0, create=0, loads={})
            assert main(["edge", NAME, str(image_file), "--server", address, "--checkpoint", checkpoint,
                         "--json", *wire]) == 0
            (row,) = _json(capsys)
            assert [t["index"] for t in row["topk"]] == [t["index"] for t in expected]
            assert [t["prob"] for t in row["topk"]] == pytest.approx([t["prob"] for t in expected], abs=1e-5)
            assert (counts["parse"], counts["create"], counts["loads"]) == (1, 1, {_key(checkpoint): 1})
        # a size the server does not take: one line that names both sides
        assert main(["edge", NAME, str(image_file), "--server", address, "--checkpoint", checkpoint,
                     "--input-size", "96"]) == 2
        message = capsys.readouterr().err
        assert message.count("\n") == 1 and "(input 64px)" in message and "encoded a 96px image" in message
    finally:
        proc.kill()
        proc.wait(10)
        proc.stdout.close()


def test_predict_shows_every_class_of_a_small_student_by_default(students, image_file, capsys):
    assert main(["predict", PLAIN, str(image_file), "--checkpoint", str(students["plain"]), "--json"]) == 0
    assert sorted(t["index"] for t in _json(capsys)["topk"]) == [0, 1, 2]
    assert main(["predict", PLAIN, str(image_file), "--checkpoint", str(students["plain"]), "--topk", "4"]) == 2
    assert "--topk must be between 1 and 3, got 4" in capsys.readouterr().err


def test_every_command_parses_once_reads_once_and_builds_through_create_model(students, counts, capsys,
                                                                              monkeypatch, tmp_path, image_file):
    plain, entropic = str(students["plain"]), str(students["entropic"])
    data = write_synthetic_dataset(tmp_path / "data", classes=3, train_per_class=1, val_per_class=2,
                                   image_size=72)["root"]
    served = []
    monkeypatch.setattr(hnd.serving, "serve", lambda model, **kwargs: served.append(model))
    commands = {
        "predict": (["predict", PLAIN, str(image_file), "--checkpoint", plain, "--json"], plain),
        "evaluate": (["evaluate", PLAIN, "--method", "hnd", "--checkpoint", plain, "--data", data,
                      "--student-only", "--workers", "0", "--no-progress"], plain),
        "serve": (["serve", NAME, "--checkpoint", entropic], entropic),
        "export": (["export", PLAIN, "--part", "encoder", "--checkpoint", plain, "--out",
                    str(tmp_path / "encoder.onnx")], plain),
        "inspect": (["inspect", PLAIN], None),
        "plan": (["plan", "resnet18", "--rate", "10", "--channels", "3", "--json"], None),
    }
    for command, (argv, checkpoint) in commands.items():
        counts.update(parse=0, create=0, loads={})
        assert main(argv) == 0, command
        capsys.readouterr()
        assert counts["parse"] == 1, command
        assert counts["loads"] == ({_key(checkpoint): 1} if checkpoint else {}), command
        if checkpoint:  # (inspect and plan build on the meta device, through analyses cached per process)
            assert counts["create"] == 1, command
    assert served[0].spec.input_size == SIZE and served[0].prior.has_tables


# Where a name may still come in: the functions that turn names into specs or models, and the
# device profiles, whose on-device MobileNetV2 (SMALL_MODEL) and measured keys are names.
NAME_ENTRY_POINTS = {
    "hnd.registry.resolve", "hnd.registry.student_spec", "hnd.models.create_model", "hnd.models.create_student",
    "hnd.devices.DeviceProfile.seconds", "hnd.devices.DeviceProfile._teacher_tables", "hnd.devices.rows_of",
    "hnd.devices._measured_parts", "hnd.devices.measure_device_profile",
}


def _takes_a_name(annotation: object) -> bool:
    """An annotation (a string, under ``from __future__ import annotations``) that lets a model
    come as a name: ``str`` and ``ModelSpec`` in one union."""
    members = {m.strip() for m in re.split(r"[|\[\],]", str(annotation))}
    return {"str", "ModelSpec"} <= members


def test_inside_the_package_models_travel_as_specs():
    """A name is resolved once, where it enters; every other function takes a ``ModelSpec``."""
    import importlib
    import inspect
    import pkgutil

    import hnd

    found = set()
    for info in pkgutil.walk_packages(hnd.__path__, "hnd."):
        if info.name == "hnd.__main__":  # runs the command line
            continue
        module = importlib.import_module(info.name)
        for _, obj in inspect.getmembers(module):
            if getattr(obj, "__module__", None) != info.name:
                continue
            # a class's own attributes only: walking inherited ones touches ipywidgets' deprecated class attributes
            members = [obj] + ([getattr(obj, key) for key in vars(obj)] if inspect.isclass(obj) else [])
            for fn in map(inspect.unwrap, members):  # through lru_cache
                if inspect.isfunction(fn) and any(_takes_a_name(a) for a in fn.__annotations__.values()):
                    found.add(f"{fn.__module__}.{fn.__qualname__}")
    assert found == NAME_ENTRY_POINTS
