"""Split computing over TCP: the frame format, a server process and edge clients."""

from __future__ import annotations

import contextlib
import json
import math
import re
import selectors
import socket
import struct
import subprocess
import sys
import threading
import zlib

import pytest
import torch

from conftest import error
from hnd.registry import resolve
from hnd.cli import main
from hnd.tensor_codec import TENSOR_FORMATS
from hnd.errors import HndError
from hnd.protocol import (FORMAT_CODES, MAGIC, FrameError, decode_request, decode_response, encode_error,
                          encode_request, encode_result, header_bytes, read_frame, request_bytes)
from hnd.edge import parse_address
from hnd.serving import EdgeClient
from hnd.models import create_student

NAME = "resnet50_head_mimic-ver2b-3ch"
SHAPE = (3, 29, 29)  # the bottleneck at 224 px


# --- frame format ------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", TENSOR_FORMATS)
def test_request_round_trip_and_overhead(fmt):
    z = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    frame = encode_request(z, fmt)
    decoded, got_fmt = decode_request(frame)
    decoded = torch.from_numpy(decoded)
    assert got_fmt == fmt and decoded.shape == SHAPE
    tolerance = {"fp32": 0, "fp16": 2e-3}.get(fmt, (z.max() - z.min()).item() / 255 / 2 + 1e-6)
    assert (decoded - z).abs().max().item() <= tolerance
    assert header_bytes(3) == 32 <= 64
    if fmt != "int8+zlib":
        assert len(frame) == request_bytes(SHAPE, fmt)


def test_response_round_trip():
    result = decode_response(encode_result([(7, 0.5), (2, 0.25)], 0.001, 0.002, batch=3))
    assert result.topk == [(7, 0.5), (2, 0.25)] and result.batch == 3
    assert result.queue_s == pytest.approx(0.001) and result.compute_s == pytest.approx(0.002)
    assert error(decode_response, encode_error("bad\nshape")) == "server: bad shape"


def _pair():
    a, b = socket.socketpair()
    b.settimeout(2)
    return a, b


def test_reader_checks_header_before_reading_payload():
    header = MAGIC + bytes([1, 1, FORMAT_CODES["fp32"], 3]) + struct.pack("<3I", *SHAPE) + struct.pack("<ffI", 0, 0,
                                                                                                        2 ** 31)
    a, b = _pair()
    with a, b:
        a.sendall(header)  # no payload follows: reading it would time out instead
        with pytest.raises(FrameError, match="over the"):
            read_frame(b, 1 << 20)
    for bad, match in ((b"GET / HTTP/1.1\r\n", "bad magic"), (MAGIC + bytes([9, 1, 1, 3]), "version 9"),
                       (MAGIC + bytes([1, 1, 1, 0]), "ndim 0"), (MAGIC + bytes([1, 7, 0, 0]), "frame type 7")):
        a, b = _pair()
        with a, b:
            a.sendall(bad)
            with pytest.raises(FrameError, match=match):
                read_frame(b, 1 << 20)
    a, b = _pair()
    with a, b:
        a.sendall(encode_request(torch.zeros(SHAPE), "fp32")[:100])
        a.close()
        with pytest.raises(FrameError, match="closed"):
            read_frame(b, 1 << 20)


def test_damaged_payloads_are_one_line_errors():
    frame = bytearray(encode_request(torch.zeros(SHAPE), "int8+zlib"))
    codes = zlib.compress(bytes(10 * 3 * 29 * 29))  # expands past the codes the shape allows
    bomb = bytes(frame[:28]) + struct.pack("<I", len(codes)) + codes
    assert "exactly" in error(decode_request, bomb)
    frame[6] = 9
    assert "format code 9" in error(decode_request, bytes(frame))


# --- a server process --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_student(NAME, pretrained=False, num_classes=10)


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    from hnd.checkpoints import save_checkpoint

    path = tmp_path_factory.mktemp("serving") / "student.pt"
    save_checkpoint(path, resolve(NAME), model)
    return path


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    """``hnd serve`` in its own process; yields (address, log file)."""
    with _serving(checkpoint, tmp_path_factory.mktemp("serving-log"), wait_ms=100) as served:
        yield served


@contextlib.contextmanager
def _serving(checkpoint, folder, wait_ms: int):
    log_path = folder / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "hnd", "serve", NAME, "--checkpoint", str(checkpoint),
                                 "--port", "0", "--max-batch", "8", "--max-wait-ms", str(wait_ms),
                                 "--max-frame-bytes", "65536"],
                                stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        line = _ready_line(proc, timeout=120)
        address = re.search(r" on (\S+:\d+) ", line).group(1)
        yield address, log_path
    finally:
        proc.kill()
        proc.wait(10)
        proc.stdout.close()


def _ready_line(proc: subprocess.Popen, timeout: float) -> str:
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise AssertionError("server did not start in time")
    line = proc.stdout.readline()
    assert line.startswith("hnd serve:"), line
    return line


def _image(seed: int) -> torch.Tensor:
    return torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def _local_topk(model, x) -> list[tuple[int, float]]:
    with torch.no_grad():
        probs, indices = torch.softmax(model(x), dim=1).topk(5, dim=1)
    return list(zip(indices[0].tolist(), probs[0].tolist()))


def test_fp32_matches_one_process_and_int8_keeps_top1(server, model):
    address, _ = server
    with EdgeClient(model, address, "fp32") as fp32, EdgeClient(model, address, "int8") as int8:
        for seed in range(2):
            x = _image(seed)
            local = _local_topk(model, x)
            got = fp32.classify(x[0])
            assert [(t["index"], t["prob"]) for t in got["topk"]] == local
            assert got["bytes"] == 32 + 4 * 3 * 29 * 29 and got["payload_bytes"] == 4 * 3 * 29 * 29
            q = int8.classify(x)
            assert q["topk"][0]["index"] == local[0][0]
            assert q["topk"][0]["prob"] == pytest.approx(local[0][1], abs=0.05)
            assert q["bytes"] == 32 + 3 * 29 * 29
            for key in ("encoder_s", "encode_s", "transfer_s", "server_queue_s", "server_compute_s"):
                assert 0 <= q[key] <= q["total_s"]


def test_rate_limit_slows_the_send(server, model):
    with EdgeClient(model, server[0], "fp32", rate_limit_mbps=0.5) as client:
        got = client.classify(_image(0))
    assert got["transfer_s"] >= got["bytes"] * 8 / 0.5e6 * 0.9  # ~0.16 s for 10 KB


def test_concurrent_edge_devices_are_batched(checkpoint, model, tmp_path):
    """Eight devices at once: with a batching window longer than any of them takes to send (a
    batch goes when full), their requests are decoded together, whatever the machine's load."""
    with _serving(checkpoint, tmp_path, wait_ms=10_000) as (address, log_path):
        _eight_devices_at_once(address, log_path, model)


def _eight_devices_at_once(address: str, log_path, model) -> None:
    x = _image(3)
    expected = _local_topk(model, x)[0][0]
    results, failures = [], []
    start = threading.Barrier(8)

    def device():
        try:
            with EdgeClient(model, address, "fp16") as client:
                start.wait(30)
                for _ in range(2):
                    results.append(client.classify(x))
        except Exception as exc:  # noqa: BLE001 - reported below
            failures.append(exc)

    threads = [threading.Thread(target=device) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures and len(results) == 16
    assert all(r["topk"][0]["index"] == expected for r in results)
    assert [r["batch"] for r in results] == [8] * 16  # two full batches
    assert re.search(r"batch 8 ", log_path.read_text())


@pytest.mark.parametrize("given, name", [("resnet18-3ch", "resnet18@layer2-3ch"),
                                         ("timm/regnetx_002-3ch", "timm/regnetx_002.pycls_in1k@s2-3ch")])
def test_a_student_of_any_teacher_serves_like_one_process(given, name):
    """``hnd serve`` with --random-weights for a generic student (ResNet-18 cut after layer2,
    and a timm RegNet's: tails that are traced graphs): an edge client holding the same fixed
    weights gets exactly the single-process top-k, and the server takes the bottleneck of the
    spec's input size."""
    from hnd.models import create_student

    if given.startswith("timm/"):
        pytest.importorskip("timm")
    model = create_student(name, random_seed=0)  # the weights of --random-weights
    with torch.no_grad():
        shape = tuple(model.encode(torch.zeros(1, 3, 224, 224)).shape[1:])  # [3, H, W]
    proc = subprocess.Popen([sys.executable, "-m", "hnd", "serve", given, "--random-weights", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = _ready_line(proc, timeout=120)
        assert f"{name} on " in line and f"bottleneck {'x'.join(map(str, shape))}" in line
        address = re.search(r" on (\S+:\d+) ", line).group(1)
        with EdgeClient(model, address, "fp32") as client:
            for seed in range(2):
                x = _image(seed)
                got = client.classify(x)
                assert [(t["index"], t["prob"]) for t in got["topk"]] == _local_topk(model, x)
                assert got["payload_bytes"] == 4 * math.prod(shape)
    finally:
        proc.kill()
        proc.wait(10)
        proc.stdout.close()
    assert error(create_student, "resnet18", random_seed=0) == (
        "resnet18 is a teacher: split computing here needs a student such as resnet18-3ch (see `hnd models`)")


def _raw(address: str) -> socket.socket:
    sock = socket.create_connection(parse_address(address), timeout=30)
    return sock


def _closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionError:
        return True


def test_malformed_requests_get_errors_and_the_server_keeps_serving(server, model):
    address, _ = server
    good = encode_request(torch.zeros(SHAPE), "int8")
    with _raw(address) as sock:  # recoverable: wrong shape, unknown format; the connection stays
        sock.sendall(encode_request(torch.zeros(3, 28, 28), "fp32"))
        assert "shape [3, 29, 29]" in error(decode_response, read_frame(sock))
        wrong_fmt = bytearray(good)
        wrong_fmt[6] = 200
        sock.sendall(bytes(wrong_fmt))
        assert "format code 200" in error(decode_response, read_frame(sock))
        sock.sendall(good)
        assert len(decode_response(read_frame(sock)).topk) == 5
    with _raw(address) as sock:  # a length far over the limit: refused unread, closed
        sock.sendall(good[:28] + struct.pack("<I", 2 ** 31))
        assert "over the" in error(decode_response, read_frame(sock))
        assert _closed(sock)
    with _raw(address) as sock:  # garbage
        sock.sendall(b"\x00garbage that is no frame at all")
        assert "bad magic" in error(decode_response, read_frame(sock))
        assert _closed(sock)
    for cut in (3, 20, len(good) // 2):  # an edge device that stops mid-frame
        sock = _raw(address)
        sock.sendall(good[:cut])
        sock.close()
    with EdgeClient(model, address, "int8+zlib") as client:
        assert client.classify(_image(0))["topk"][0]["index"] == _local_topk(model, _image(0))[0][0]


def test_cli_edge_json(server, model, checkpoint, image_file, capsys):
    from hnd.data import image_tensor

    assert main(["edge", NAME, str(image_file), str(image_file), "--server", server[0], "--checkpoint",
                 str(checkpoint), "--bits", "32", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    local = _local_topk(model, image_tensor(resolve(NAME), image_file))
    assert len(rows) == 2 and rows[0]["image"] == str(image_file)
    assert [(t["index"], t["prob"]) for t in rows[0]["topk"]] == local
    assert rows[0]["bytes"] == 32 + 4 * 3 * 29 * 29 and rows[0]["format"] == "fp32"


def test_cli_edge_errors(server, model, image_file, capsys):
    assert main(["edge", NAME, str(image_file), "--server", server[0], "--bits", "16", "--compress", "zlib",
                 "--random-weights"]) == 2
    assert capsys.readouterr().err.startswith("hnd: error: --compress zlib applies to --bits 8")
    assert main(["edge", NAME, str(image_file), "--server", server[0]]) == 2
    assert "--checkpoint FILE" in capsys.readouterr().err
    assert "HOST:PORT" in error(parse_address, "localhost")
    with pytest.raises(HndError, match="cannot connect"):
        EdgeClient(model, "127.0.0.1:1")

