"""Entropic students: the learned prior's rate against the range coder's real bytes, exact and
bounded decoding, the ``entropy`` wire format, split inference over TCP, two-stage training
with exact resume, and ONNX export."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from conftest import error
from hnd.checkpoints import load_model, read_file, save_checkpoint
from hnd.cli import main
from hnd.codec import decode_coded, encode_coded, encode_tensor
from hnd.tensor_codec import TENSOR_FORMATS
from hnd.config import resolve_config
from hnd.entropy import FactorizedPrior, coding_tables, table_fingerprint
from hnd.protocol import (FORMAT_CODES, MAGIC, decode_request, decode_response, check_wire_format, encode_request,
                          read_frame)
from hnd.models import create_student
from hnd.registry import resolve
from hnd.edge import parse_address
from hnd.serving import EdgeClient
from hnd.synth import write_synthetic_dataset
from hnd.training import fit, read_metrics, resume_config

NAME = "resnet18@layer2-3ch-entropic"
PLAIN = "resnet18@layer2-3ch"
SHAPE = (3, 29, 29)  # the bottleneck at 224 px
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hnd", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout)


# --- the prior and the range coder ---------------------------------------------------------------

@contextmanager
def _one_thread():
    """Many tiny ops: one thread is 10x faster than two when other processes share the CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _fitted_prior(channels: int, seed: int, steps: int = 300) -> FactorizedPrior:
    """A prior fitted to Laplace latents of scale 2 by minimizing its own rate (noisy values)."""
    torch.manual_seed(seed)
    prior = FactorizedPrior(channels)
    optimizer = torch.optim.Adam(prior.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(seed)
    laplace = torch.distributions.Laplace(0.0, 2.0)
    with _one_thread():
        for _ in range(steps):
            y = laplace.icdf(torch.rand(16, channels, 8, 8, generator=g).clamp(1e-6, 1 - 1e-6))
            _, bits = prior(y)
            optimizer.zero_grad()
            bits.mean().backward()
            optimizer.step()
    prior.eval().update_tables()
    return prior


@pytest.fixture(scope="module")
def priors() -> dict:
    """{(kind, channels): prior with tables}: fitted briefly, or untrained."""
    out = {}
    for channels in (3, 12):
        out["fitted", channels] = _fitted_prior(channels, seed=channels)
        torch.manual_seed(100 + channels)
        untrained = FactorizedPrior(channels).eval()
        untrained.update_tables()
        out["untrained", channels] = untrained
    return out


def _latents(shape, seed: int, scale: float = 2.0, offset: float = 0.0) -> torch.Tensor:
    """Laplace-distributed latents of ``shape``, per-channel offsets around ``offset``."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(shape, generator=g).clamp(1e-6, 1 - 1e-6)
    shift = offset + torch.randn(shape[0], 1, 1, generator=g)
    return torch.distributions.Laplace(0.0, scale).icdf(u) + shift


@pytest.mark.parametrize("kind", ["fitted", "untrained"])
@pytest.mark.parametrize("shape", [(3, 29, 29), (12, 29, 29)])
def test_coded_bytes_match_the_rate_estimate(priors, kind, shape):
    prior = priors[kind, shape[0]]
    assert prior.has_tables and not prior.training
    scales = (2.0, 1.0, 4.0) if kind == "fitted" else (3.0, 10.0, 30.0)
    for seed, scale in enumerate(scales):
        z = _latents(shape, seed, scale)
        with torch.no_grad():
            y_hat, bits = prior(z[None])
        estimate = bits.item() / 8
        coded = len(encode_coded(prior, z))
        assert abs(coded - estimate) <= 0.02 * estimate + 8, (coded, estimate)
        assert torch.equal(y_hat[0], decode_coded(prior, encode_coded(prior, z), shape))


def test_fitting_lowers_the_rate(priors):
    """The fitted prior codes its own kind of latents in fewer bytes than an untrained one."""
    z = _latents((3, 29, 29), seed=7)
    assert len(encode_coded(priors["fitted", 3], z)) < 0.9 * len(encode_coded(priors["untrained", 3], z))


def test_decode_is_bit_exact_and_clamps(priors):
    """200 tensors of all scales and offsets, many far outside the coded range: the decoded
    tensor is exactly the model's rounded and clamped bottleneck."""
    g = torch.Generator().manual_seed(0)
    outside = 0
    for i in range(200):
        channels = (3, 12)[i % 2]
        prior = priors[("fitted", "untrained")[(i // 2) % 2], channels]
        h, w = int(torch.randint(1, 30, (1,), generator=g)), int(torch.randint(1, 30, (1,), generator=g))
        scale = 10 ** (torch.rand(1, generator=g).item() * 5 - 2)  # 0.01 .. 1000
        offset = (torch.rand(1, generator=g).item() - 0.5) * 2 * scale
        z = torch.randn(channels, h, w, generator=g) * scale + offset
        if i % 10 == 0:
            z.view(-1)[:3] = torch.tensor([1e30, -float("inf"), float("inf")])
        expected = prior.quantize(z[None])[0]
        low = prior.low.view(-1, 1, 1)
        high = low + prior.pmf.shape[1] - 1
        outside += int(((torch.round(z) < low) | (torch.round(z) > high)).sum())
        decoded = decode_coded(prior, encode_coded(prior, z), z.shape)
        assert decoded.dtype == torch.float32 and torch.equal(decoded, expected), i
        assert ((decoded >= low) & (decoded <= high)).all()
    assert outside > 1000  # the clamping was exercised


def test_nan_is_a_one_line_error(priors):
    z = torch.zeros(SHAPE)
    z[1, 2, 3] = float("nan")
    assert "nan" in error(encode_coded, priors["fitted", 3], z)


@pytest.fixture(scope="module")
def payload(priors) -> bytes:
    return encode_coded(priors["fitted", 3], _latents(SHAPE, seed=11))


def _flip(data: bytes, at: int) -> bytes:
    damaged = bytearray(data)
    damaged[at] ^= 0x5A
    return bytes(damaged)


@pytest.mark.parametrize("damage", ["truncated", "truncated word", "header only", "flipped byte",
                                    "flipped checksum", "zero word appended", "words appended", "empty",
                                    "not whole words", "wrong channels"])
def test_damaged_payloads_are_one_line_errors(priors, payload, damage):
    prior = priors["fitted", 3]
    shape = (12, 29, 29) if damage == "wrong channels" else SHAPE
    data = {"truncated": payload[:len(payload) // 2 // 4 * 4], "truncated word": payload[:-4],
            "header only": payload[:4], "flipped byte": _flip(payload, len(payload) // 2),
            "flipped checksum": _flip(payload, 1), "zero word appended": payload + bytes(4),
            "words appended": payload + bytes(range(1, 9)), "empty": b"", "not whole words": payload[:-1],
            "wrong channels": payload}[damage]
    message = error(decode_coded, prior, data, shape)
    assert "entropy-coded" in message
    if damage == "wrong channels":
        assert "12 channels" in message
    if damage == "not whole words":
        assert "32-bit words" in message


@pytest.mark.parametrize("fill", ["random", "zeros", "ones"])
def test_decoding_work_is_bounded_by_the_shape(priors, fill):
    """A MiB of junk is refused after decoding at most the shape's symbols (bench/coder.py times it)."""
    data = {"random": os.urandom(1 << 20), "zeros": bytes(1 << 20), "ones": b"\xff" * (1 << 20)}[fill]
    assert "entropy-coded" in error(decode_coded, priors["fitted", 3], bytes(4) + data, SHAPE)


def test_other_tables_do_not_decode(priors):
    z = _latents(SHAPE, seed=3)
    other = _fitted_prior(3, seed=99, steps=50)
    assert table_fingerprint(other) != table_fingerprint(priors["fitted", 3])
    data = encode_coded(priors["fitted", 3], z)
    assert "entropy-coded" in error(decode_coded, other, data, SHAPE)  # the coder or the checksum notices


def test_a_prior_without_tables_is_a_one_line_error():
    prior = FactorizedPrior(3).eval()
    assert not prior.has_tables
    assert "no entropy-coding tables" in error(encode_coded, prior, torch.zeros(SHAPE))
    assert "entropic" in error(check_wire_format, "entropy", coding_tables(prior))
    assert "entropic" in error(check_wire_format, "entropy", None)
    assert "entropic" in error(encode_request, torch.zeros(SHAPE), "entropy")
    assert check_wire_format("int8", coding_tables(prior)) == "int8"


def test_tables_survive_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = create_student(NAME, pretrained=False, num_classes=10).eval()
    model.head.prior.update_tables()
    save_checkpoint(tmp_path / "s.pt", resolve(NAME), model)
    loaded = load_model(resolve(NAME), tmp_path / "s.pt")
    assert loaded.prior.has_tables and table_fingerprint(loaded.prior) == table_fingerprint(model.prior)
    z = _latents(SHAPE, seed=5)
    assert encode_coded(loaded.prior, z) == encode_coded(model.prior, z)


# --- the wire format -----------------------------------------------------------------------------

def _entropy_frame(shape, data: bytes, tables: int, *, version: int = 2, code: int = 5) -> bytes:
    """A request frame built by hand: prefix, shape, tables CRC, reserved, length, payload."""
    return (MAGIC + bytes([version, 1, code, len(shape)]) + struct.pack(f"<{len(shape)}I", *shape)
            + struct.pack("<III", tables, 0, len(data)) + data)


def test_entropy_requests_are_version_2_and_others_version_1(priors):
    prior = priors["fitted", 3]
    z = _latents(SHAPE, seed=2)
    frame = encode_request(z, "entropy", coding_tables(prior))
    assert frame[4] == 2 and frame[6] == FORMAT_CODES["entropy"] == 5
    data = encode_coded(prior, z)
    assert frame == _entropy_frame(SHAPE, data, table_fingerprint(prior))
    decoded, fmt = decode_request(frame, coding_tables(prior))
    assert fmt == "entropy" and torch.equal(torch.from_numpy(decoded), prior.quantize(z[None])[0])
    for fmt in TENSOR_FORMATS:
        assert encode_request(z, fmt, coding_tables(prior))[4] == 1, fmt


def test_version_1_frames(priors):
    prior = priors["fitted", 3]
    z = _latents(SHAPE, seed=4)
    frame = bytearray(encode_request(z, "entropy", coding_tables(prior)))
    frame[4] = 1  # format code 5 did not exist in version 1
    message = error(decode_request, bytes(frame), coding_tables(prior))
    assert "code 5" in message and "version-1" in message
    assert "1 fp32, 2 fp16, 3 int8, 4 int8+zlib" in message and "entropy" not in message
    # Version-1 frames written by hand (as a version-1 peer would) still parse.
    raw = encode_tensor(z, "fp32")
    v1 = MAGIC + bytes([1, 1, 1, 3]) + struct.pack("<3I", *SHAPE) + struct.pack("<ffI", 0, 0, len(raw)) + raw
    decoded, fmt = decode_request(v1, coding_tables(prior))
    assert fmt == "fp32" and torch.equal(torch.from_numpy(decoded), z)
    q = encode_tensor(z, "int8")
    v1 = MAGIC + bytes([1, 1, 3, 3]) + struct.pack("<3I", *SHAPE) + q[:8] + struct.pack("<I", len(q) - 8) + q[8:]
    decoded, fmt = decode_request(v1, None)
    assert fmt == "int8" and (torch.from_numpy(decoded) - z).abs().max() <= (z.max() - z.min()) / 255 / 2 + 1e-5


def test_entropy_requests_need_the_same_tables(priors):
    prior, other = priors["fitted", 3], priors["untrained", 3]
    frame = encode_request(_latents(SHAPE, seed=6), "entropy", coding_tables(prior))
    assert "other coding tables" in error(decode_request, frame, coding_tables(other))
    assert "no entropy coding tables" in error(decode_request, frame, None)
    assert "no entropy coding tables" in error(decode_request, frame, coding_tables(FactorizedPrior(3)))
    flat = _entropy_frame((3, 841), encode_coded(prior, torch.zeros(SHAPE)), table_fingerprint(prior))
    assert "[C, H, W]" in error(decode_request, flat, coding_tables(prior))


# --- split inference over TCP ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    student = create_student(NAME, pretrained=False, num_classes=10).eval()
    student.head.prior.update_tables()
    return student


@pytest.fixture(scope="module")
def checkpoints(model, tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("entropic")
    save_checkpoint(folder / "entropic.pt", resolve(NAME), model)
    torch.manual_seed(1)
    save_checkpoint(folder / "plain.pt", resolve(PLAIN), create_student(PLAIN, pretrained=False, num_classes=10))
    return {"entropic": folder / "entropic.pt", "plain": folder / "plain.pt"}


@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory):
    """``hnd serve`` of the entropic student in its own process; yields (address, log file)."""
    log_path = tmp_path_factory.mktemp("entropic-log") / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "hnd", "serve", NAME, "--checkpoint",
                                 str(checkpoints["entropic"]), "--port", "0", "--max-wait-ms", "1",
                                 "--max-frame-bytes", str(2 << 20)],
                                stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        line = ""
        while not line and time.monotonic() < deadline and proc.poll() is None:
            line = proc.stdout.readline()
        assert line.startswith("hnd serve:"), (line, log_path.read_text()[-2000:])
        assert "bottleneck 3x29x29" in line
        yield re.search(r" on (\S+:\d+) ", line).group(1), log_path
    finally:
        proc.kill()
        proc.wait(10)
        proc.stdout.close()


def _image(seed: int) -> torch.Tensor:
    return torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def _local(model, x) -> tuple[list[int], torch.Tensor]:
    with torch.no_grad():
        probs, indices = torch.softmax(model(x), dim=1).topk(5, dim=1)
    return indices[0].tolist(), probs[0]


def _check_same(rows: list[dict], model, x) -> None:
    indices, probs = _local(model, x)
    assert [t["index"] for t in rows] == indices
    assert torch.allclose(torch.tensor([t["prob"] for t in rows]), probs, rtol=0, atol=1e-5)


def _problems(log_path: Path) -> list[str]:
    return [line for line in log_path.read_text().splitlines()
            if re.search(r"WARNING|ERROR|rejected|failed|Traceback", line)]


def test_split_inference_matches_one_process(server, model):
    address, log_path = server
    with EdgeClient(model, address, "entropy") as client:
        for seed in range(3):
            x = _image(seed)
            got = client.classify(x)
            _check_same(got["topk"], model, x)
            with torch.no_grad():
                data = encode_coded(model.prior, model.encode(x)[0])
            assert got["format"] == "entropy" and got["payload_bytes"] == len(data)
            assert got["bytes"] == 32 + len(data) < 32 + 3 * 29 * 29  # smaller than int8
    assert re.search(r" entropy \d+ bytes batch", log_path.read_text())
    assert not _problems(log_path)


def test_cli_edge_entropy_json(server, model, checkpoints, image_file, capsys):
    from hnd.data import image_tensor

    address, log_path = server
    assert main(["edge", NAME, str(image_file), str(image_file), "--server", address, "--checkpoint",
                 str(checkpoints["entropic"]), "--compress", "entropy", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 2 and all(r["format"] == "entropy" for r in rows)
    x = image_tensor(resolve(NAME), image_file)
    for row in rows:
        _check_same(row["topk"], model, x)
    with torch.no_grad():
        assert rows[0]["payload_bytes"] == len(encode_coded(model.prior, model.encode(x)[0]))
    assert not _problems(log_path)


def test_entropy_needs_an_entropic_student(checkpoints, server, image_file, capsys):
    torch.manual_seed(1)
    plain = create_student(PLAIN, pretrained=False, num_classes=10)
    assert "entropic" in error(EdgeClient, plain, server[0], "entropy")
    untrained = create_student(NAME, pretrained=False, num_classes=10)  # no tables yet
    assert "entropic" in error(EdgeClient, untrained, server[0], "entropy")
    assert main(["edge", PLAIN, str(image_file), "--server", server[0], "--checkpoint", str(checkpoints["plain"]),
                 "--compress", "entropy"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("hnd: error: ") and err.count("\n") == 1, err
    assert "entropic" in err and "Traceback" not in err


def _raw(address: str) -> socket.socket:
    return socket.create_connection(parse_address(address), timeout=30)


def test_corrupted_entropy_frames_get_errors_and_the_connection_keeps_working(server, model):
    address, log_path = server
    prior = model.prior
    x = _image(5)
    with torch.no_grad():
        z = model.encode(x)[0]
    data = encode_coded(prior, z)
    crc = table_fingerprint(prior)
    good = encode_request(z, "entropy", coding_tables(prior))
    v1 = bytearray(good)
    v1[4] = 1
    bad = {
        "flipped byte": (_entropy_frame(SHAPE, _flip(data, len(data) // 2), crc), "entropy-coded"),
        "truncated": (_entropy_frame(SHAPE, data[:-4], crc), "entropy-coded"),
        "words appended": (_entropy_frame(SHAPE, data + bytes(8), crc), "entropy-coded"),
        "not whole words": (_entropy_frame(SHAPE, data[:-1], crc), "32-bit words"),
        "empty": (_entropy_frame(SHAPE, b"", crc), "checksum"),
        "random MiB": (_entropy_frame(SHAPE, os.urandom(1 << 20), crc), "entropy-coded"),
        "other tables": (_entropy_frame(SHAPE, data, crc ^ 1), "other coding tables"),
        "more symbols": (_entropy_frame((3, 290, 290), data, crc), "shape [3, 29, 29]"),
        "more channels": (_entropy_frame((12, 29, 29), data, crc), "shape [3, 29, 29]"),
        "version 1": (bytes(v1), "code 5"),
    }
    with _raw(address) as sock:
        for name, (frame, message) in bad.items():  # each answered within the socket's timeout
            sock.sendall(frame)
            text = error(decode_response, read_frame(sock))
            assert text.startswith("server: ") and message in text, (name, text)
            sock.sendall(good)
            result = decode_response(read_frame(sock))
            _check_same([{"index": i, "prob": p} for i, p in result.topk], model, x)
    with _raw(address) as sock:  # a shape over the frame limit is broken framing: refused unread, closed
        sock.sendall(_entropy_frame((3, 1 << 15, 1 << 15), data, crc))
        assert "over the" in error(decode_response, read_frame(sock))
        assert sock.recv(1) == b""
    log = log_path.read_text()
    assert log.count("rejected") >= len(bad) and "Traceback" not in log and "decoding failed" not in log


# --- ONNX ------------------------------------------------------------------------------------------

def test_export_of_an_entropic_student_matches_pytorch(checkpoints, model, tmp_path, capsys):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from hnd.export import PARTS, check_onnx, export_onnx, run_onnx
    from hnd.models import create_student

    path = str(checkpoints["entropic"])
    exporting = create_student(NAME, checkpoint=path)
    parts = {part: export_onnx(exporting, part, tmp_path / f"{part}.onnx").path for part in PARTS}
    encoder, server_part = model.split()
    server_part.eval()
    x = torch.cat([_image(8), _image(9)])
    with torch.no_grad():
        z, expected = encoder(x), model(x)
    assert check_onnx(parts["encoder"], encoder, x) <= 1e-4
    assert check_onnx(parts["server"], server_part, z) <= 1e-4 * max(1.0, float(expected.abs().max()))
    assert check_onnx(parts["server"], server_part, z + 0.3) <= 1e-4 * max(1.0, float(expected.abs().max()))
    # The server part rounds and clamps as the coder does: values far outside decode as the edge coded them.
    far = z * 1e4
    with torch.no_grad():
        assert torch.allclose(run_onnx(parts["server"], far), model.decode(far), atol=1e-4)
    chained = run_onnx(parts["server"], run_onnx(parts["encoder"], x))
    assert (chained - expected).abs().max() <= 1e-4 * max(1.0, float(expected.abs().max()))

    out = tmp_path / "cli.onnx"
    assert main(["export", NAME, "--part", "server", "--checkpoint", path, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert float(printed.split("max abs diff ")[1].split()[0]) <= 1e-4 * max(1.0, float(expected.abs().max()))


# --- training ----------------------------------------------------------------------------------------

TEACHER = "resnet18"
# Tiny and quick: 64-px inputs, 4 classes of 6 training images (2 held out), no worker processes.
TINY = ["input_size=64", "batch_size=8", "eval_batch_size=16", "num_workers=0", "holdout_per_class=2",
        "milestones=[1]"]
STAGES = ["epochs=3", "stage1_epochs=2", "stage2_milestones=[1]"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return Path(write_synthetic_dataset(tmp_path_factory.mktemp("data") / "synth", classes=4, train_per_class=6,
                                        val_per_class=2, image_size=64, seed=0)["root"])


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> Path:
    """A 4-class ResNet-18 teacher with fixed random weights (distillation needs no good teacher)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    save_checkpoint(path, resolve(TEACHER), resolve(TEACHER).build(pretrained=False, num_classes=4), part="teacher")
    return path


def _config(teacher_ckpt: Path, *extra: str):
    return resolve_config(resolve(PLAIN), "entropic", None, [*TINY, f"teacher_checkpoint={teacher_ckpt}", *extra])


@pytest.fixture(scope="module")
def runs(synth, teacher_ckpt, tmp_path_factory) -> dict:
    """An uninterrupted 3-epoch run (2 epochs of stage 1, 1 of stage 2) and one stopped after
    epoch 2 (its last.pt kept) and resumed to 3."""
    root = tmp_path_factory.mktemp("entropic-runs")
    whole = fit(_config(teacher_ckpt, *STAGES), synth, root / "whole", progress=False)
    fit(_config(teacher_ckpt, *STAGES[1:], "epochs=2"), synth, root / "resumed", progress=False)
    shutil.copy(root / "resumed" / "last.pt", root / "epoch2.pt")
    config = resume_config(root / "resumed", resolve(PLAIN), "entropic", assignments=["epochs=3"])
    resumed = fit(config, synth, root / "resumed", resume=True, progress=False)
    return {"root": root, "whole": whole, "resumed": resumed}


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_entropic_run_two_stages(runs, synth):
    root, result = runs["root"], runs["whole"]
    assert result["model"] == NAME and result["method"] == "entropic"
    assert result["test"]["bytes_per_image"] > 0 and result["test"]["images"] == 8
    assert json.loads((root / "whole" / "result.json").read_text()) == result
    lines = read_metrics(root / "whole")
    assert [m["stage"] for m in lines] == [1, 1, 2]
    assert all(m["train_bytes_estimate"] > 0 for m in lines[:2]) and "train_bytes_estimate" not in lines[2]
    assert "train_top1" in lines[2] and "train_top1" not in lines[0]
    assert all(m["select_bytes_per_image"] > 0 for m in lines)
    assert [m["lr"] for m in lines] == pytest.approx([1e-3, 1e-4, 1e-3])  # stage 2: its own lr and schedule
    last = read_file(root / "whole" / "last.pt")
    assert last["epoch"] == 3 and last["stage"] == 2 and last["config"]["model"] == NAME

    # Stage 2 changes only the decoder and the tail: encoder and entropy model stay as they were.
    before = read_file(root / "epoch2.pt")
    assert before["epoch"] == 2 and before["stage"] == 1
    a, b = before["state_dict"], last["state_dict"]
    frozen = [k for k in a if k.startswith(("head.encoder.", "head.prior."))]
    trained = [k for k in a if k.startswith(("head.decoder.", "tail.")) and a[k].is_floating_point()]
    assert any(k.startswith("head.prior.table") for k in frozen) and frozen and trained
    assert all(torch.equal(a[k], b[k]) for k in frozen), [k for k in frozen if not torch.equal(a[k], b[k])]
    assert any(k.startswith("head.decoder.") and not torch.equal(a[k], b[k]) for k in trained)
    assert any(k.startswith("tail.") and not torch.equal(a[k], b[k]) for k in trained)
    model = load_model(None, root / "whole" / "best.pt")  # rebuilt from the file alone, tables included
    assert str(model.spec) == NAME and model.prior.has_tables


def test_entropic_resume_matches_uninterrupted(runs):
    root = runs["root"]
    a, b = read_file(root / "whole" / "last.pt"), read_file(root / "resumed" / "last.pt")
    assert b["epoch"] == 3 and b["stage"] == 2
    assert _same_weights(a["state_dict"], b["state_dict"])
    assert _same_weights(a["optimizer"]["state"][0], b["optimizer"]["state"][0])

    def numbers(path):
        return [{k: v for k, v in m.items() if k not in ("seconds", "images_per_s")} for m in read_metrics(path)]

    assert numbers(root / "resumed") == numbers(root / "whole")
    assert runs["resumed"]["test"] == runs["whole"]["test"]


def test_evaluate_cli_prints_bytes_per_image(runs, synth, capsys):
    best = runs["root"] / "whole" / "best.pt"
    assert main(["evaluate", NAME, "--method", "entropic", "--checkpoint", str(best), "--data", str(synth),
                 "--workers", "0", "--student-only", "--no-progress"]) == 0
    out = capsys.readouterr().out
    found = re.search(r"([\d.]+) bytes per image range-coded", out)
    assert found, out
    assert float(found.group(1)) == pytest.approx(runs["whole"]["test"]["bytes_per_image"], abs=0.05)


def test_torchrun_two_processes(synth, teacher_ckpt, tmp_path):
    """Both stages under torchrun (gloo, 2 processes): the coded bytes and accuracy that the
    processes all-reduce equal a one-process evaluation of the saved model."""
    from hnd.evaluation import evaluate_checkpoint

    out = tmp_path / "two"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(_free_port()), "-m", "hnd", "train", PLAIN, "--method", "entropic", "--data", str(synth), *TINY,
                           "batch_size=4", "epochs=2", "stage1_epochs=1", "stage2_milestones=[1]",
                           f"teacher_checkpoint={teacher_ckpt}", "--no-progress", "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("best epoch") == 1 and "bytes per image" in done.stdout
    assert [m["stage"] for m in read_metrics(out)] == [1, 2]
    assert read_metrics(out)[0]["images"] == 16
    result = json.loads((out / "result.json").read_text())["test"]
    again = evaluate_checkpoint(None, "entropic", out / "best.pt", synth, student_only=True, num_workers=0)["student"]
    assert [result[k] for k in ("top1", "top5", "images", "bytes_per_image")] == \
        [again[k] for k in ("top1", "top5", "images", "bytes_per_image")]
    assert result["bytes_per_image"] > 0


@pytest.mark.parametrize("args, message", [
    (["config", "resnet18-3ch", "--method", "entropic", "beta=0"], "beta"),
    (["config", "resnet18-3ch", "--method", "entropic", "beta=-1"], "beta"),
    (["config", "resnet18-3ch", "--method", "entropic", "beta=abc"], "beta"),
    (["config", "resnet18-3ch", "--method", "entropic", "stage1_epochs=30"], "stage1_epochs"),
    (["train", "resnet18-3ch-entropic", "--method", "hnd", "--data", "x"], "--method entropic"),
])
def test_cli_errors_are_one_line(args, message, capsys):
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("hnd: error: ") and captured.err.count("\n") == 1, captured.err
    assert message in captured.err and captured.out == ""


def test_config_of_an_entropic_run(capsys):
    assert main(["config", "resnet18-3ch", "--method", "entropic", "beta=0.5"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^model: resnet18@layer2-3ch-entropic$", printed, re.M)
    assert re.search(r"^beta: 0\.5$", printed, re.M)
