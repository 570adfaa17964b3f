"""Training runs end to end on the generated dataset: run folder, checkpoints, evaluation,
exact resume after SIGKILL, torchrun with 2 processes, and one-line errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hnd.registry import resolve
from hnd.checkpoints import load_model, read_file
from hnd.cli import main
from conftest import STUDENT, TEACHER, TINY, error
from hnd.config import resolve_config
from hnd.errors import HndError
from hnd.evaluation import evaluate_checkpoint, evaluate_teacher
from hnd.methods import build_task
from hnd.training import fit, read_metrics, resume_config, train_or_resume

ROOT = Path(__file__).resolve().parents[1]


def _config(method: str, teacher_ckpt: Path, *extra: str):
    name = TEACHER if method == "ae" else STUDENT
    return resolve_config(resolve(name), method, None, [*TINY, f"teacher_checkpoint={teacher_ckpt}", *extra])


def _cli(*args: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hnd", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, **kwargs)


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["naive", "kd", "hnd", "ae", "head_kd"])
def test_fit_writes_a_complete_run(method, synth, teacher_ckpt, tmp_path):
    out = tmp_path / method
    result = fit(_config(method, teacher_ckpt, "epochs=2"), synth, out, progress=False)

    assert sorted(p.name for p in out.iterdir()) == ["best.pt", "config.yaml", "last.pt", "metrics.jsonl",
                                                     "result.json"]
    lines = read_metrics(out)
    assert [m["epoch"] for m in lines] == [1, 2]
    assert lines[0]["images"] == 4 * (16 - 2)  # the held-out slice is not trained on
    assert all(m["train_loss"] > 0 and 0 <= m["select_top1"] <= 100 and m["images_per_s"] > 0 for m in lines)
    assert (lines[0]["lr"], lines[1]["lr"]) == pytest.approx((1e-3, 1e-4))  # MultiStepLR: lr x0.1 after 1 epoch

    last = read_file(out / "last.pt")  # weights_only: plain data only
    assert last["epoch"] == 2 and last["method"] == method and last["config"]["method"] == method
    assert {"optimizer", "scheduler", "versions", "classes", "best_top1"} <= last.keys()
    best = read_file(out / "best.pt")
    assert {"versions", "classes", "best_top1", "config"} <= best.keys() and "optimizer" not in best.keys()
    assert json.loads((out / "result.json").read_text()) == result
    # a head in front of the teacher's frozen tail: how much of the teacher head's output it misses
    assert ("head_error" in result) == (method in ("hnd", "head_kd"))
    assert result.get("head_error", 1.0) > 0
    assert ("train_top1" in lines[0]) == (method in ("naive", "kd", "head_kd"))

    # The model is rebuilt from the file alone and reproduces the run's test accuracy.
    model = load_model(None, out / "best.pt")
    assert type(model).__name__ == ("AutoencoderModel" if method == "ae" else "Student")
    evaluated = evaluate_checkpoint(None, method, out / "best.pt", synth, student_only=True, num_workers=0)
    assert evaluated["student"] == result["test"]


@pytest.mark.parametrize("extra, tested", [([], []), (["test_first_epochs=1"], [1]),
                                           (["test_every_epoch=true"], [1, 2])])
def test_runs_test_after_the_epochs_asked_and_the_kept_one_at_the_end(synth, teacher_ckpt, tmp_path, extra, tested):
    result = fit(_config("hnd", teacher_ckpt, "epochs=2", *extra), synth, tmp_path / "run", progress=False)
    lines = read_metrics(tmp_path / "run")
    assert [m["epoch"] for m in lines if "test_top1" in m] == tested
    assert all(0 <= m["test_top1"] <= 100 for m in lines if "test_top1" in m)
    assert result["test"]["images"] == 4 * 4
    if tested:  # the same test split: the kept epoch's curve point is its final test
        kept = next(m for m in lines if m["epoch"] == result["best_epoch"])
        assert "test_top1" not in kept or kept["test_top1"] == result["test"]["top1"]


@pytest.mark.filterwarnings("ignore:amp=bf16 on a CPU without AMX or AMD")  # expected on such a CPU; works all the same
def test_a_student_trains_under_bf16_autocast_on_the_cpu(synth, teacher_ckpt, tmp_path):
    """bf16 autocast (fp32 weights and checkpoint) trains on the CPU as on a GPU; its test top-1
    equals an fp32 evaluation of the checkpoint within one image of the 16."""
    config = _config("kd", teacher_ckpt, "epochs=1", "amp=bf16", "channels_last=true")
    result = fit(config, synth, tmp_path / "run", progress=False)
    best = read_file(tmp_path / "run" / "best.pt")
    assert {v.dtype for v in best["state_dict"].values() if v.is_floating_point()} == {torch.float32}
    again = evaluate_checkpoint(None, "kd", tmp_path / "run" / "best.pt", synth, student_only=True, num_workers=0)
    assert result["test"]["images"] == again["student"]["images"] == 16
    assert abs(result["test"]["top1"] - again["student"]["top1"]) <= 100 / 16 + 1e-9


@pytest.mark.parametrize("method", ["hnd", "head_kd"])
def test_hnd_trains_only_the_head(method, synth, teacher_ckpt, tmp_path):
    """HND and its loss ablation (KD's loss through the frozen tail) change the head only."""
    out = tmp_path / method
    fit(_config(method, teacher_ckpt, "epochs=1"), synth, out, progress=False)
    student = read_file(out / "last.pt")["state_dict"]
    teacher = read_file(teacher_ckpt)["state_dict"]
    tail = {k[len("tail."):]: v for k, v in student.items() if k.startswith("tail.")}
    assert tail and all(torch.equal(v, teacher[k]) for k, v in tail.items())  # tail = teacher's, untouched
    loss = [m["train_loss"] for m in read_metrics(out)]
    assert loss[0] > 0


def test_evaluate_cli_reports_model_and_teacher(synth, teacher_ckpt, tmp_path, capsys):
    out = tmp_path / "kd"
    fit(_config("kd", teacher_ckpt, "epochs=1"), synth, out, progress=False)
    capsys.readouterr()
    assert main(["evaluate", STUDENT, "--method", "kd", "--checkpoint", str(out / "best.pt"), "--data", str(synth),
                 "--workers", "0", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["format"] == "hnd" and doc["student"]["images"] == 16 and doc["teacher"]["images"] == 16
    teacher = evaluate_checkpoint(resolve(TEACHER), "teacher", teacher_ckpt, synth, num_workers=0)["student"]
    assert doc["teacher"] == teacher
    # What the training notebook records next to a finished run: its teacher alone; none for a teacher run.
    config = _config("kd", teacher_ckpt, "epochs=1")
    assert evaluate_teacher(config, synth, num_workers=0) == teacher
    assert evaluate_teacher(resolve_config(resolve(TEACHER), "teacher", None, TINY), synth, num_workers=0) is None

    assert main(["evaluate", STUDENT, "--method", "hnd", "--checkpoint", str(out / "best.pt"), "--data",
                 str(synth)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds a kd run of resnet18@layer2-3ch, not hnd of" in err, err


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(synth, teacher_ckpt, tmp_path):
    """A run killed with SIGKILL during its second epoch and resumed ends with exactly the
    weights and metrics of a run that was never interrupted."""
    common = ["train", STUDENT, "--method", "naive", "--data", str(synth), *TINY, "epochs=3",
              f"teacher_checkpoint={teacher_ckpt}", "--no-progress"]
    fit(_config("naive", teacher_ckpt, "epochs=3"), synth, tmp_path / "whole", progress=False)  # never interrupted

    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "hnd", *common, "--out", str(run)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not (run / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # epoch 2 starts right after epoch 1's last.pt is written; an epoch takes > 1 s
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert read_file(run / "last.pt")["epoch"] < 3

    resumed = _cli(*common, "--out", str(run), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = read_file(tmp_path / "whole" / "last.pt"), read_file(run / "last.pt")
    assert _same_weights(a["state_dict"], b["state_dict"])
    assert _same_weights(a["optimizer"]["state"][0], b["optimizer"]["state"][0])

    def numbers(path):
        return [{k: v for k, v in m.items() if k not in ("seconds", "images_per_s")} for m in read_metrics(path)]

    assert numbers(run) == numbers(tmp_path / "whole") and len(numbers(run)) == 3
    assert json.loads((run / "result.json").read_text())["test"] == \
        json.loads((tmp_path / "whole" / "result.json").read_text())["test"]


def test_resume_rules(synth, teacher_ckpt, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(HndError, match="nothing to resume"):
        resume_config(out, resolve(STUDENT), "hnd")
    fit(_config("hnd", teacher_ckpt, "epochs=1"), synth, out, progress=False)
    with pytest.raises(HndError, match="already holds a run"):
        fit(_config("hnd", teacher_ckpt, "epochs=1"), synth, out, progress=False)
    with pytest.raises(HndError, match="cannot change lr"):
        resume_config(out, resolve(STUDENT), "hnd", assignments=["lr=0.5"])
    with pytest.raises(HndError, match="holds a hnd run"):
        resume_config(out, resolve(STUDENT), "kd")
    longer = resume_config(out, resolve(STUDENT), "hnd", assignments=["epochs=2"])  # extending a run is allowed
    fit(longer, synth, out, resume=True, progress=False)
    assert [m["epoch"] for m in read_metrics(out)] == [1, 2]


def test_torchrun_two_processes_agree_with_one_process(synth, teacher_ckpt, tmp_path):
    """One optimizer step: 2 gloo processes with batch 8 each (BatchNorm synchronised) vs one
    process with batch 16 give the same update, up to float rounding. HND with SGD, so that a
    missing gradient scaling of the summed loss (or a wrong data split) would show."""
    settings = ["epochs=1", "optimizer=sgd", "lr=1e-8", "holdout_per_class=12", "sync_bn=true"]
    common = [STUDENT, "--method", "hnd", "--data", str(synth), *TINY, *settings, f"teacher_checkpoint={teacher_ckpt}",
              "--no-progress"]
    fit(_config("hnd", teacher_ckpt, *settings, "batch_size=16"), synth, tmp_path / "one", progress=False)
    # Two processes, as in a grid cell given two GPUs: torchrun --standalone, launched by
    # train_or_resume (the 02_train notebook's call) with the whole config.
    config = _config("hnd", teacher_ckpt, *settings, "batch_size=8")
    two = train_or_resume(config, synth, tmp_path / "two", processes=2)
    assert two == json.loads((tmp_path / "two" / "result.json").read_text())
    assert train_or_resume(config, synth, tmp_path / "two", processes=2) == two  # done: read back, not rerun
    message = error(train_or_resume, config, tmp_path / "no-data", tmp_path / "broken", processes=2)
    assert message.startswith("training under torchrun (2 processes) failed: hnd: error: data folder not found")
    assert (tmp_path / "broken" / "torchrun.log").is_file()

    m1, m2 = read_metrics(tmp_path / "one")[0], read_metrics(tmp_path / "two")[0]
    assert m1["images"] == m2["images"] == 16  # 4 classes x (16 - 12 held out): one global batch
    assert m2["train_loss"] == pytest.approx(m1["train_loss"], rel=1e-4)

    w1 = read_file(tmp_path / "one" / "last.pt")["state_dict"]
    w2 = read_file(tmp_path / "two" / "last.pt")["state_dict"]
    torch.manual_seed(0)  # the run's seed: the fresh head both runs started from
    fresh = build_task(_config("hnd", teacher_ckpt), 4).model.state_dict()
    head = [k for k in w1 if k.startswith("head.") and w1[k].is_floating_point()]
    moved = sum((w1[k] - fresh[k]).pow(2).sum() for k in head).sqrt()
    apart = sum((w1[k] - w2[k]).pow(2).sum() for k in head).sqrt()
    assert moved > 0 and apart < 0.05 * moved, (apart, moved)

    # Two nodes of one process each (two torchrun launchers meeting at a c10d rendezvous on
    # loopback, as on two machines of a cluster) give the same update as one process.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id",
                               "hnd-two-nodes", "-m", "hnd", "train", *common,
                               "--out", str(tmp_path / "nodes"), "batch_size=8"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT) for _ in range(2)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err[-2000:] for _, err in outputs]
    w3 = read_file(tmp_path / "nodes" / "last.pt")["state_dict"]
    assert read_metrics(tmp_path / "nodes")[0]["images"] == 16
    assert sum((w1[k] - w3[k]).pow(2).sum() for k in head).sqrt() < 0.05 * moved

    # The test accuracy the two processes all-reduced equals a one-process evaluation.
    result = json.loads((tmp_path / "two" / "result.json").read_text())
    again = evaluate_checkpoint(None, "hnd", tmp_path / "two" / "best.pt", synth, student_only=True, num_workers=0)
    counts = ("top1", "top5", "images")
    assert [result["test"][k] for k in counts] == [again["student"][k] for k in counts]
    assert result["test"]["loss"] == pytest.approx(again["student"]["loss"], rel=1e-5)  # threads differ


@pytest.mark.parametrize("args, message", [
    (["train", STUDENT, "--method", "fancy", "--data", "x"], "unknown method 'fancy'; valid methods: naive"),
    (["train", STUDENT, "--method", "hnd", "--data", "x", "lr=fast"], "lr must be float"),
    (["train", STUDENT, "--method", "hnd", "--data", "x", "colour=red"], "unknown config key 'colour'"),
    (["train", STUDENT, "--method", "hnd", "--data", "/nonexistent/data"], "data folder not found"),
    (["train", TEACHER, "--method", "hnd", "--data", "x"], "trains a student"),
    (["train", STUDENT, "--method", "hnd", "--data", "x", "--out", "/nonexistent/run", "--resume"],
     "nothing to resume"),
    (["train", STUDENT, "--method", "hnd", "--data", "x", "amp=fp16", "device=cpu"],
     "amp=fp16 needs a CUDA device; use amp=bf16, auto or none on cpu"),
])
def test_cli_errors_are_one_line(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_unreadable_image_is_named_or_skipped(synth, tmp_path, capsys):
    data = tmp_path / "data"
    subprocess.run(["cp", "-r", str(synth), str(data)], check=True)
    bad = sorted((data / "train" / sorted(os.listdir(data / "train"))[0]).iterdir())[0]
    bad.write_bytes(b"not a jpeg")
    common = ["train", TEACHER, "--method", "teacher", "--data", str(data), *TINY, "epochs=1", "pretrained=false",
              "holdout_per_class=12", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "a"), "num_workers=1"]) == 2  # the error from a loader worker
    err = capsys.readouterr().err
    assert str(bad) in err and "skip_bad_images" in err and err.count("\n") == 1, err
    assert main([*common, "--out", str(tmp_path / "b"), "skip_bad_images=true"]) == 0
    assert f"skipped unreadable image {bad}" in capsys.readouterr().err


def test_train_or_resume_starts_continues_and_reuses(synth, teacher_ckpt, tmp_path):
    out = tmp_path / "run"
    first = train_or_resume(_config("hnd", teacher_ckpt, "epochs=1"), synth, out, progress=False)
    stamp = (out / "last.pt").stat().st_mtime_ns
    again = train_or_resume(_config("hnd", teacher_ckpt, "epochs=1"), synth, out, progress=False)
    assert again == first and (out / "last.pt").stat().st_mtime_ns == stamp  # finished: read back
    with pytest.raises(HndError, match=r"holds a run with other settings \(lr\); delete it or choose"):
        train_or_resume(_config("hnd", teacher_ckpt, "epochs=1", "lr=0.5"), synth, out, progress=False)
    (out / "result.json").unlink()  # as if killed after the last epoch, before the test
    longer = train_or_resume(_config("hnd", teacher_ckpt, "epochs=2"), synth, out, progress=False)
    assert [m["epoch"] for m in read_metrics(out)] == [1, 2] and longer["epochs"] == 2
    assert json.loads((out / "result.json").read_text()) == longer
    # A run saved before a config key existed (here: decoder) continues with that key's default.
    ckpt = read_file(out / "last.pt")
    del ckpt["config"]["decoder"]
    torch.save(ckpt, out / "last.pt")
    assert train_or_resume(_config("hnd", teacher_ckpt, "epochs=2"), synth, out, progress=False) == longer
    assert "processes must be a positive integer, got 0" in error(
        train_or_resume, _config("hnd", teacher_ckpt, "epochs=2"), synth, out, processes=0)

    # decoder=torchvision: the same images through torchvision.io and transforms.v2; the same
    # epoch up to the decoders' grey-level differences.
    other = train_or_resume(_config("hnd", teacher_ckpt, "epochs=1", "decoder=torchvision"), synth,
                            tmp_path / "torchvision", progress=False)
    pil, tv = read_metrics(out)[0], read_metrics(tmp_path / "torchvision")[0]
    assert tv["images"] == pil["images"] and tv["train_loss"] == pytest.approx(pil["train_loss"], rel=0.02)
    assert other["test"]["images"] == first["test"]["images"]

