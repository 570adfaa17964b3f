"""The GPU path: AMP steps, channels_last, a one-process NCCL group, split serving on CUDA and
ONNX parity with the CUDA provider. Marked ``gpu``: ``bench/gpu_check.sh`` runs them on a
machine with CUDA; without it each skips, saying why. Everything else in the suite is CPU-only."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hnd.registry import resolve
from hnd.config import resolve_config
from hnd.synth import write_synthetic_dataset
from hnd.training import fit, read_metrics

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU path is not tested")]

STUDENT = "resnet18@layer2-3ch"
TINY = ["input_size=64", "batch_size=8", "eval_batch_size=16", "num_workers=2", "holdout_per_class=2",
        "milestones=[1]", "pretrained=false", "device=cuda"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return Path(write_synthetic_dataset(tmp_path_factory.mktemp("data") / "synth", classes=4, train_per_class=16,
                                        val_per_class=4, image_size=64, seed=0)["root"])


@pytest.mark.parametrize("amp, channels_last", [("bf16", False), ("fp16", False), ("none", True), ("bf16", True)])
def test_training_steps_on_cuda(synth, tmp_path, amp, channels_last):
    config = resolve_config(resolve(STUDENT), "naive", None, [*TINY, "epochs=2", f"amp={amp}",
                                                     f"channels_last={str(channels_last).lower()}"])
    result = fit(config, synth, tmp_path / "run", progress=False)
    lines = read_metrics(tmp_path / "run")
    assert [m["epoch"] for m in lines] == [1, 2] and all(torch.isfinite(torch.tensor(m["train_loss"])) for m in lines)
    _same_top1_on_the_cpu(result["test"], tmp_path / "run" / "best.pt", synth)


def _same_top1_on_the_cpu(tested: dict, checkpoint: Path, data: Path) -> None:
    """The test top-1 that training measured on the GPU is the CPU's for the same weights, up to
    one image (reduced-precision ties)."""
    from hnd.evaluation import evaluate_checkpoint

    on_cpu = evaluate_checkpoint(None, "naive", checkpoint, data, student_only=True, num_workers=0,
                                 device="cpu")["student"]
    assert tested["images"] == on_cpu["images"] and abs(tested["top1"] - on_cpu["top1"]) <= 100 / on_cpu["images"]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_agrees_with_fp32_on_the_same_batch(amp):
    """One naive step's loss and gradients under autocast against fp32, same weights, same batch."""
    from hnd.models import create_student

    model = create_student(STUDENT, random_seed=0).cuda().train()
    x = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1)).cuda()
    y = torch.arange(8).remainder(4).cuda()

    def loss_and_grads(dtype):
        model.zero_grad()
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    torch.backends.cudnn.deterministic = True
    loss32, grad32 = loss_and_grads(None)
    loss16, grad16 = loss_and_grads({"bf16": torch.bfloat16, "fp16": torch.float16}[amp])
    assert abs(loss16 - loss32) <= 0.02 * abs(loss32)
    assert torch.nn.functional.cosine_similarity(grad16.float(), grad32, dim=0) > 0.99


def test_one_process_nccl_group(synth, tmp_path):
    """torchrun with one process on the GPU: the NCCL backend starts, trains and tears down."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--standalone",
                           "-m", "hnd", "train", STUDENT, "--method", "naive", "--data", str(synth), "--out",
                           str(tmp_path / "ddp"), *TINY, "epochs=1", "--no-progress"],
                          capture_output=True, text=True, cwd=root, timeout=600,
                          env={**os.environ, "NCCL_DEBUG": "INFO"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "NCCL" in proc.stdout + proc.stderr  # the group really was NCCL
    result = json.loads((tmp_path / "ddp" / "result.json").read_text())
    _same_top1_on_the_cpu(result["test"], tmp_path / "ddp" / "best.pt", synth)


def test_serve_on_cuda_answers_an_edge_client():
    from hnd.models import create_student
    from hnd.serving import EdgeClient

    root = Path(__file__).resolve().parents[1]
    server = subprocess.Popen([sys.executable, "-m", "hnd", "serve", STUDENT, "--random-weights", "--port", "0",
                               "--device", "cuda"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              cwd=root)
    try:
        line = server.stdout.readline()
        assert "device cuda" in line, line
        address = re.search(r" on (\S+:\d+) ", line).group(1)
        model = create_student(STUDENT, random_seed=0)
        x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        with EdgeClient(model, address, "fp32") as client:
            got = client.classify(x)["topk"][0]["index"]
        with torch.no_grad():
            want = int(model(x).argmax())
        assert got == want
    finally:
        server.terminate()
        assert server.wait(timeout=60) == 0


def test_onnx_parity_with_the_cuda_provider(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDA provider here (the onnxruntime-gpu package provides it)")
    from hnd.checkpoints import save_checkpoint
    from hnd.export import export_onnx
    from hnd.models import create_student

    model = create_student(STUDENT, random_seed=0)
    save_checkpoint(tmp_path / "student.pt", resolve(STUDENT), model)
    path = export_onnx(create_student(checkpoint=tmp_path / "student.pt"), "encoder", tmp_path / "encoder.onnx").path
    x = torch.randn(2, 3, 224, 224)
    session = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = model.encode(x).numpy()
    assert abs(got - want).max() < 1e-3
