"""The edge device without torch: what `pip install "hnd[edge]"` costs and how fast it runs.

1. Installed size: a fresh virtualenv with the `edge` extra (numpy, Pillow, constriction,
   ONNX Runtime) next to this checkout's full environment (.venv, torch included).
2. Cold start: from starting `hnd edge --onnx` in that virtualenv to its first answer from a
   local `hnd serve` (random weights), median of --repeats runs.
3. Per-image encoder time at batch 1 and one thread (a Pi-class setting), ONNX Runtime against
   PyTorch, for the papers' DenseNet-169 3ch student (224 px) and the book's student
   (ShuffleNet V2 cut after stage2, 3 channels, 80 px).

Usage:
    python bench/edge.py [--repeats 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from hnd.checkpoints import save_checkpoint
from hnd.devices import median_seconds
from hnd.export import export_onnx
from hnd.models import create_student

ROOT = Path(__file__).resolve().parents[1]
STUDENTS = {"densenet169_head_mimic-ver2b-3ch": None, "shufflenet_v2_x1_0@stage2-3ch": 80}


def folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink()) / 1e6


def edge_venv(folder: Path) -> Path:
    """A virtualenv with hnd[edge] (this checkout, editable) and the tested versions."""
    subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
    subprocess.run([str(folder / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    "-c", str(ROOT / "constraints.txt"), "-e", f"{ROOT}[edge]"], check=True)
    return folder


def serve(name: str, checkpoint: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "hnd", "serve", name, "--checkpoint", str(checkpoint), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    while not any(line.startswith("hnd serve:") for line in lines):
        if proc.poll() is not None:
            raise SystemExit("".join(lines))
        time.sleep(0.05)
    return proc, re.search(r" on (\S+:\d+) ", "".join(lines)).group(1)


def encoder_ms(name: str, size: int | None, folder: Path) -> dict:
    """Median ms per image of the encoder, PyTorch and ONNX Runtime, batch 1, one thread."""
    import onnxruntime as ort

    torch.set_num_threads(1)
    model = create_student(name, pretrained=False, input_size=size)
    onnx = export_onnx(model, "encoder", folder / f"{name}.onnx").path
    x = torch.randn(1, 3, model.spec.input_size, model.spec.input_size)
    with torch.no_grad():
        torch_s = median_seconds(lambda: model.encode(x), 30, 5)
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    ort_s = median_seconds(lambda: session.run(None, feed), 30, 5)
    return {"student": name, "input": model.spec.input_size, "torch_ms": 1e3 * torch_s, "onnxruntime_ms": 1e3 * ort_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="cold starts timed (default 3)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    from matplotlib import cbook

    photo = cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        venv = edge_venv(tmp / "edge")
        figures = {"edge_venv_mb": folder_mb(venv), "full_venv_mb": folder_mb(ROOT / ".venv")}
        name, size = "shufflenet_v2_x1_0@stage2-3ch", 80
        model = create_student(name, pretrained=False, input_size=size)
        save_checkpoint(tmp / "student.pt", model.spec, model)
        onnx = export_onnx(model, "encoder", tmp / "encoder.onnx").path
        proc, address = serve(name, tmp / "student.pt")
        try:
            starts = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                subprocess.run([str(venv / "bin" / "hnd"), "edge", name, photo, "--server", address, "--onnx", str(onnx),
                                "--json"], check=True, capture_output=True)
                starts.append(time.perf_counter() - start)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        figures["cold_start_s"] = statistics.median(starts)
        figures["encoders"] = [encoder_ms(n, s, tmp) for n, s in STUDENTS.items()]
    print(f"installed: hnd[edge] virtualenv {figures['edge_venv_mb']:.0f} MB; this checkout's .venv "
          f"{figures['full_venv_mb']:.0f} MB (torch and the book)")
    print(f"cold start of `hnd edge --onnx` to its first answer: {figures['cold_start_s']:.2f} s "
          f"(median of {args.repeats})")
    print("encoder per image, batch 1, one thread:")
    for row in figures["encoders"]:
        print(f"  {row['student']:36s} {row['input']:4d} px  PyTorch {row['torch_ms']:7.2f} ms  "
              f"ONNX Runtime {row['onnxruntime_ms']:7.2f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
