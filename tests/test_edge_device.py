"""An edge device without torch: `hnd edge --onnx` runs the exported encoder with ONNX Runtime
in a process where torch cannot be imported, sends real photographs to `hnd serve` in every wire
format, entropy coding included, and gets the answers the PyTorch edge gets."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import randomize
from hnd.checkpoints import save_checkpoint
from hnd.codec import encode_coded
from hnd.cli import main
from hnd.encoder_bundle import file_sha256
from hnd.export import export_onnx
from hnd.models import create_student

NAME = "resnet18@layer2-3ch-entropic"
FORMATS = {"fp32": ["--bits", "32"], "fp16": ["--bits", "16"], "int8": [], "int8+zlib": ["--compress", "zlib"],
           "entropy": ["--compress", "entropy"]}
WITHOUT_TORCH = ("import sys; sys.modules['torch'] = None; sys.modules['torchvision'] = None\n"
                 "from hnd.cli import main\nsys.exit(main(sys.argv[1:]))")


@pytest.fixture(scope="module")
def device(tmp_path_factory):
    """A saved entropic student at 64 px, its exported encoder, three photographs as files and
    `hnd serve` with the checkpoint; yields (address, checkpoint, encoder, photographs)."""
    pytest.importorskip("skimage")
    from hnd.book.photographs import reference_photographs

    folder = tmp_path_factory.mktemp("edge-device")
    model = create_student(NAME, pretrained=False, num_classes=6, input_size=64)
    randomize(model, seed=11)
    model.head.prior.update_tables()
    save_checkpoint(folder / "student.pt", model.spec, model)
    encoder = export_onnx(model, "encoder", folder / "encoder.onnx").path
    photos = []
    for name, image in list(reference_photographs().items())[:3]:
        photos.append(str(folder / f"{name}.png"))
        image.save(photos[-1])
    with _serving(folder / "student.pt") as address:
        yield address, folder / "student.pt", encoder, photos


@contextlib.contextmanager
def _serving(checkpoint: Path, extra: list[str] = ()):
    """`hnd serve` of the student in ``checkpoint`` on a free port; yields its address."""
    server = subprocess.Popen([sys.executable, "-m", "hnd", "serve", NAME, "--checkpoint", str(checkpoint),
                               "--port", "0", *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(server.stdout), daemon=True).start()
    try:
        deadline = time.monotonic() + 120
        while not any(line.startswith("hnd serve:") for line in lines):
            assert server.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.05)
        yield re.search(r" on (\S+:\d+) ", "".join(lines)).group(1)
    finally:
        server.terminate()
        server.wait(timeout=60)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_the_onnx_edge_without_torch_answers_as_the_torch_edge(device, fmt, capsys):
    address, checkpoint, encoder, photos = device
    done = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, "edge", NAME, *photos, "--server", address,
                           "--onnx", str(encoder), *FORMATS[fmt], "--json"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    onnx = json.loads(done.stdout)
    assert main(["edge", NAME, *photos, "--server", address, "--checkpoint", str(checkpoint), *FORMATS[fmt],
                 "--json"]) == 0
    torch_side = json.loads(capsys.readouterr().out)
    for a, b in zip(onnx, torch_side):
        assert a["format"] == b["format"] == fmt
        assert a["topk"][0]["index"] == b["topk"][0]["index"], a["image"]
        assert [t["prob"] for t in a["topk"]] == pytest.approx([t["prob"] for t in b["topk"]], abs=2e-3)
        if fmt != "int8+zlib":  # the same shape and format: the same frame size; entropy: the same symbols
            assert a["bytes"] == b["bytes"], a["image"]


def test_onnx_edge_mistakes_are_one_line(device, tmp_path, capsys):
    address, checkpoint, encoder, photos = device
    assert main(["edge", "resnet18@layer2-3ch", photos[0], "--server", address, "--onnx", str(encoder)]) == 2
    assert "holds the encoder of resnet18@layer2-3ch-entropic, not resnet18@layer2-3ch" in capsys.readouterr().err
    assert main(["edge", NAME, photos[0], "--server", address, "--onnx", str(encoder), "--checkpoint",
                 str(checkpoint)]) == 2
    assert "drop --checkpoint" in capsys.readouterr().err
    bad = tmp_path / "encoder.onnx"  # a damaged file whose sidecar names it
    bad.write_bytes(b"not an onnx model")
    sidecar = json.loads(encoder.with_suffix(".json").read_text())
    (tmp_path / "encoder.json").write_text(json.dumps({**sidecar, "onnx_sha256": file_sha256(bad)}))
    assert main(["edge", NAME, photos[0], "--server", address, "--onnx", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot load" in err and "onnxruntime" in err


def test_the_edge_extra_installs_into_a_virtualenv_without_torch(device, tmp_path, capsys):
    """`pip install "hnd[edge]"` in a fresh virtualenv: torch cannot be imported there, and its
    `hnd edge --onnx`, over TLS with a client token, gets the answers the PyTorch edge gets in
    every wire format, with the same bytes where the format fixes them."""
    from hnd.tls import make_self_signed

    _, checkpoint, encoder, photos = device
    root = Path(__file__).resolve().parents[1]
    venv = tmp_path / "edge"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    install = subprocess.run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-c",
                              str(root / "constraints.txt"), "-e", f"{root}[edge]"],
                             capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stderr[-2000:]
    probe = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True, timeout=60)
    assert probe.returncode == 1 and "No module named 'torch'" in probe.stderr

    # The entropy payload the virtualenv codes from the encoder's output is the PyTorch side's.
    code = ("import sys\nimport onnxruntime as ort\nfrom PIL import Image\n"
            "from hnd.encoder_bundle import EncoderBundle\n"
            "bundle = EncoderBundle.read(sys.argv[1])\n"
            "x = bundle.preprocessing.array(Image.open(sys.argv[2]))[None]\n"
            "session = ort.InferenceSession(str(bundle.onnx), providers=['CPUExecutionProvider'])\n"
            "print(bundle.tables.encode(session.run(None, {session.get_inputs()[0].name: x})[0][0]).hex())")
    coded = subprocess.run([python, "-c", code, str(encoder), photos[0]], capture_output=True, text=True, timeout=120)
    assert coded.returncode == 0, coded.stderr
    model = create_student(checkpoint=checkpoint)
    with Image.open(photos[0]) as image, torch.no_grad():
        z = model.encode(model.spec.transforms()(image.convert("RGB"))[None])[0]
    assert bytes.fromhex(coded.stdout.strip()) == encode_coded(model.prior, z)

    cert, key = make_self_signed(tmp_path / "tls")
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("a-device-token-0123456789abcdef\n")
    secure = ["--tls-cert", str(cert), "--tls-key", str(key), "--token-file", str(tokens)]
    with _serving(checkpoint, secure) as address:
        client = ["--server", address, "--tls-ca", str(cert), "--token-file", str(tokens), "--json"]
        for fmt, flags in FORMATS.items():
            done = subprocess.run([str(venv / "bin" / "hnd"), "edge", NAME, *photos[:2], "--onnx", str(encoder),
                                   *flags, *client], capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr
            assert main(["edge", NAME, *photos[:2], "--checkpoint", str(checkpoint), *flags, *client]) == 0
            want = json.loads(capsys.readouterr().out)  # the PyTorch edge, in this process
            for a, b in zip(json.loads(done.stdout), want, strict=True):
                assert a["topk"][0]["index"] == b["topk"][0]["index"], (fmt, a["image"])
                assert [t["prob"] for t in a["topk"]] == pytest.approx([t["prob"] for t in b["topk"]], abs=2e-3)
                assert fmt == "int8+zlib" or a["bytes"] == b["bytes"], (fmt, a["image"])


def test_an_encoder_with_other_coding_tables_is_refused_in_one_line(device, tmp_path, capsys):
    """The same student name with other weights: its coding tables' fingerprint is not the
    server's, and the server's refusal reaches the user as one line."""
    address, _, _, photos = device
    other = create_student(NAME, pretrained=False, num_classes=6, input_size=64)
    randomize(other, seed=12)
    other.head.prior.update_tables()
    encoder = export_onnx(other, "encoder", tmp_path / "other.onnx").path
    assert main(["edge", NAME, photos[0], "--server", address, "--onnx", str(encoder), "--compress", "entropy"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "other coding tables than this server's model" in err
