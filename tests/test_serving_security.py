"""Split serving facing a network: TLS 1.3, client tokens, admission limits, drain on SIGTERM,
metrics. Loopback only; every wait is bounded."""

from __future__ import annotations

import json
import re
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import torch

from conftest import error
from hnd.registry import resolve
from hnd.access import TokenFile, read_token
from hnd.cli import main
from hnd.errors import HndError
from hnd.protocol import (BUSY, UNAUTHORIZED, FrameError, ServerError, decode_response, encode_error,
                          encode_hello, encode_request, hello_token, read_frame)
from hnd.edge import parse_address
from hnd.serving import EdgeClient
from hnd.tls import client_context, make_self_signed
from test_cluster import _wait
from test_serving import NAME, SHAPE, model  # noqa: F401 - the served student, a module fixture

TOKEN = "edge-device-token-0123456789"


@pytest.fixture(scope="module")
def files(model, tmp_path_factory):
    """A checkpoint, a certificate with its key, another CA's certificate and a token file."""
    from hnd.checkpoints import save_checkpoint

    root = tmp_path_factory.mktemp("secure")
    save_checkpoint(root / "student.pt", resolve(NAME), model)
    cert, key = make_self_signed(root / "tls")
    other, _ = make_self_signed(root / "other")
    (root / "tokens.txt").write_text(f"# edge devices\n{TOKEN}\n\nanother-token-abcdefghij\n")
    return {"checkpoint": root / "student.pt", "cert": cert, "key": key, "other_ca": other,
            "tokens": root / "tokens.txt", "root": root}


def _start(files, *extra: str) -> tuple[subprocess.Popen, str, list[str]]:
    proc = subprocess.Popen([sys.executable, "-m", "hnd", "serve", NAME, "--checkpoint", str(files["checkpoint"]),
                             "--port", "0", *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    deadline = time.monotonic() + 120
    while not any(line.startswith("hnd serve:") for line in lines):
        assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
        time.sleep(0.05)
    line = next(line for line in lines if line.startswith("hnd serve:"))
    return proc, re.search(r" on (\S+:\d+) ", line).group(1), lines


def _stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def secure(files):
    """`hnd serve` with TLS, tokens and metrics; yields (address, metrics port)."""
    metrics = _free_port()
    proc, address, lines = _start(files, "--tls-cert", str(files["cert"]), "--tls-key", str(files["key"]),
                                  "--token-file", str(files["tokens"]), "--metrics-port", str(metrics))
    try:
        yield address, metrics
    finally:
        assert _stop(proc) == 0, "".join(lines)


def _image(seed: int) -> torch.Tensor:
    return torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def _local_top1(model, x) -> int:
    with torch.no_grad():
        return int(model(x).argmax())


def _tls_socket(address: str, ca) -> ssl.SSLSocket:
    host, port = parse_address(address)
    return client_context(ca).wrap_socket(socket.create_connection((host, port), timeout=30), server_hostname=host)


# --- protocol -----------------------------------------------------------------------------------

def test_hello_and_error_codes_on_the_wire():
    a, b = socket.socketpair()
    with a, b:
        b.settimeout(5)
        a.sendall(encode_hello(TOKEN) + encode_hello())
        assert hello_token(read_frame(b)) == TOKEN and hello_token(read_frame(b)) == ""
        a.sendall(encode_error("busy: 2 requests queued; retry later", BUSY))
        with pytest.raises(ServerError, match="server: busy") as busy:
            decode_response(read_frame(b))
        assert busy.value.code == BUSY
        a.sendall(encode_error("shape"))  # as versions 1 and 2 wrote it: code 0
        with pytest.raises(ServerError) as refused:
            decode_response(read_frame(b))
        assert refused.value.code == 0
        oversized = encode_hello("x" * 256)[:8] + struct.pack("<I", 10_000)
        a.sendall(oversized)
        with pytest.raises(FrameError, match="hello token of 10000 bytes is over the 256-byte limit"):
            read_frame(b)
    v2 = bytearray(encode_hello(TOKEN))
    v2[4] = 2  # a hello claiming version 2, which had none
    with pytest.raises(FrameError, match="unknown frame type 4 in a version-2 frame"):
        hello_token(bytes(v2))
    assert "at most 256 bytes" in error(encode_hello, "y" * 257)


# --- tokens ------------------------------------------------------------------------------------

def test_token_file_rules_and_rotation(tmp_path):
    path = tmp_path / "tokens"
    path.write_text(f"{TOKEN}\n")
    tokens = TokenFile(path)
    assert tokens.accepts(TOKEN) and not tokens.accepts(TOKEN[:-1]) and not tokens.accepts("")
    time.sleep(0.01)
    path.write_text("# rotated\nnew-token-0123456789abcdef\n")
    assert tokens.accepts("new-token-0123456789abcdef") and not tokens.accepts(TOKEN)
    path.write_text("short\n")  # a broken rewrite: the last good tokens stay
    assert tokens.accepts("new-token-0123456789abcdef")
    for text, message in (("", "holds no token"), ("short\n", "must be 16 to 256 bytes long, got 5"),
                          ("x" * 300 + "\n", "got 300")):
        path.write_text(text)
        assert message in error(TokenFile, path)
    assert "cannot read token file" in error(read_token, tmp_path / "none")


# --- TLS and tokens ------------------------------------------------------------------------------

def test_a_good_client_is_served_over_tls_with_its_token(secure, files, model):
    address, _ = secure
    with EdgeClient(model, address, "int8", ssl_context=client_context(files["cert"]), token=TOKEN) as client:
        for seed in range(2):
            assert client.classify(_image(seed))["topk"][0]["index"] == _local_top1(model, _image(seed))


def test_refused_clients_get_nothing_served(secure, files, model):
    """Wrong token, no token, plaintext, another CA: each refused before any model work; a good
    client is served afterwards."""
    address, metrics_port = secure
    with pytest.raises(ServerError, match="unknown client token") as wrong:
        EdgeClient(model, address, ssl_context=client_context(files["cert"]), token="not-a-token-at-all-000")
    assert wrong.value.code == UNAUTHORIZED
    with _tls_socket(address, files["cert"]) as sock:  # TLS, but a request instead of a hello
        sock.sendall(encode_request(torch.zeros(SHAPE), "int8"))
        with pytest.raises(ServerError, match="needs a hello frame with a client token first") as none:
            decode_response(read_frame(sock))
        assert none.value.code == UNAUTHORIZED and sock.recv(1) == b""  # and closed
    with pytest.raises(HndError, match="closed the connection during the hello|bad magic|connection closed"):
        EdgeClient(model, address, token=TOKEN)  # plaintext against TLS
    with pytest.raises(HndError, match="failed the TLS certificate check"):
        EdgeClient(model, address, ssl_context=client_context(files["other_ca"]), token=TOKEN)
    with EdgeClient(model, address, ssl_context=client_context(files["cert"]), token=TOKEN) as client:
        assert client.classify(_image(3))["topk"][0]["index"] == _local_top1(model, _image(3))
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    refused = float(re.search(r'hnd_requests_total\{outcome="unauthorized"\} (\S+)', text).group(1))
    answered = float(re.search(r'hnd_requests_total\{outcome="answered"\} (\S+)', text).group(1))
    assert refused >= 2 and answered >= 1 and "hnd_compute_seconds_bucket" in text


def test_malformed_frames_after_a_good_hello(secure, files, model):
    address, _ = secure
    good = encode_request(torch.zeros(SHAPE), "int8")
    with _tls_socket(address, files["cert"]) as sock:
        sock.sendall(encode_hello(TOKEN))
        assert hello_token(read_frame(sock)) == ""  # welcome
        sock.sendall(encode_request(torch.zeros(3, 28, 28), "fp32"))
        assert "shape [3, 29, 29]" in error(decode_response, read_frame(sock))
        sock.sendall(good)
        assert len(decode_response(read_frame(sock)).topk) == 5
        sock.sendall(b"\x00garbage that is no frame at all")
        assert "bad magic" in error(decode_response, read_frame(sock))
    with _tls_socket(address, files["cert"]) as sock:  # a length far over the limit: refused unread
        sock.sendall(encode_hello(TOKEN))
        read_frame(sock)
        sock.sendall(good[:28] + struct.pack("<I", 2 ** 31))
        assert "over the" in error(decode_response, read_frame(sock))
    for cut in (3, 20, len(good) // 2):  # an edge device that stops mid-frame, after its hello
        sock = _tls_socket(address, files["cert"])
        sock.sendall(encode_hello(TOKEN))
        read_frame(sock)
        sock.sendall(good[:cut])
        sock.close()
    with _tls_socket(address, files["cert"]) as sock:  # a hello cut short, then nothing
        sock.sendall(encode_hello(TOKEN)[:10])
    with EdgeClient(model, address, "int8+zlib", ssl_context=client_context(files["cert"]),
                    token=TOKEN) as client:  # and it still serves
        assert client.classify(_image(0))["topk"][0]["index"] == _local_top1(model, _image(0))
    assert _metric(secure[1], "broken") >= 2  # the bad magic and the length over the limit


def _metric(port: int, outcome: str) -> float:
    """A request count by outcome, or ``in_flight``: requests read and not yet answered."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    series = "hnd_requests_in_flight" if outcome == "in_flight" else rf'hnd_requests_total\{{outcome="{outcome}"\}}'
    return float(re.search(rf"^{series} (\S+)", text, re.M).group(1))


def test_a_second_hello_is_an_error_and_a_removed_token_closes_its_connections(files, model, tmp_path):
    tokens = tmp_path / "tokens.txt"
    tokens.write_text(f"{TOKEN}\nanother-token-abcdefghij\n")
    metrics = _free_port()
    proc, address, lines = _start(files, "--token-file", str(tokens), "--metrics-port", str(metrics))
    try:
        with socket.create_connection(parse_address(address), timeout=30) as sock:
            sock.sendall(encode_hello(TOKEN))
            assert hello_token(read_frame(sock)) == ""  # welcome
            sock.sendall(encode_hello(TOKEN))
            assert "said hello already" in error(decode_response, read_frame(sock))
            sock.sendall(encode_request(torch.zeros(SHAPE), "int8"))
            assert len(decode_response(read_frame(sock)).topk) == 5  # the connection stays
        with EdgeClient(model, address, "int8", token=TOKEN) as edge:
            assert edge.classify(_image(1))["topk"]
            tokens.write_text("another-token-abcdefghij\n")  # this device's token withdrawn
            with pytest.raises(ServerError, match="no longer accepted") as refused:
                edge.classify(_image(1))
            assert refused.value.code == UNAUTHORIZED
        assert _metric(metrics, "refused") >= 1 and _metric(metrics, "unauthorized") >= 1
    finally:
        assert _stop(proc) == 0, "".join(lines)


def test_slow_hellos_cannot_take_the_slots_of_authorized_clients(files, model):
    """Two clients trickling their hello fill the slots for connections owing one; a third is
    told busy at once. The authorized client already connected is served all along, and the
    slow ones are closed when their hello deadline passes."""
    proc, address, lines = _start(files, "--token-file", str(files["tokens"]), "--max-connections", "1",
                                  "--max-pending", "2", "--hello-timeout", "2")
    try:
        with EdgeClient(model, address, "int8", token=TOKEN) as edge:
            slow = [socket.create_connection(parse_address(address), timeout=30) for _ in range(2)]
            for sock in slow:
                sock.sendall(encode_hello(TOKEN)[:3])  # and nothing more
            _wait(lambda: "2 connections still owe their hello" in _refusal(address),
                      "a third connection owing its hello to be refused")
            assert edge.classify(_image(2))["topk"][0]["index"] == _local_top1(model, _image(2))
            for sock in slow:  # closed at the deadline, with the reason
                with sock:
                    assert "no hello within 2 s" in error(decode_response, read_frame(sock))
            assert edge.classify(_image(3))["topk"]
    finally:
        assert _stop(proc) == 0, "".join(lines)


def _refusal(address: str) -> str:
    """What a new connection that sends nothing is told first ('' if nothing within 1 s)."""
    with socket.create_connection(parse_address(address), timeout=30) as sock:
        sock.settimeout(1.0)
        try:
            return str(pytest.raises(ServerError, decode_response, read_frame(sock)).value)
        except (socket.timeout, FrameError):
            return ""




def test_an_open_port_needs_tls_and_tokens_or_insecure(capsys):
    assert main(["serve", NAME, "--random-weights", "--host", "0.0.0.0", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "add --tls-cert, --tls-key and --token-file, or --insecure" in err
    assert main(["serve", NAME, "--random-weights", "--tls-cert", "c.pem"]) == 2
    assert "TLS needs both --tls-cert and --tls-key" in capsys.readouterr().err


# --- admission, drain --------------------------------------------------------------------------

def _rss_peak_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def test_overload_gets_busy_answers_and_memory_stays_bounded(files, model):
    """24 clients against 4 connections and 2 queued requests: some are told busy at once, none
    waits past the bound, every accepted request is answered, the server's memory stays put."""
    proc, address, lines = _start(files, "--max-connections", "4", "--max-queue", "2", "--max-batch", "1",
                                  "--max-wait-ms", "0")
    try:
        before = _rss_peak_mb(proc.pid)
        x = _image(7)
        want = _local_top1(model, x)
        outcomes: list[str] = []

        def client() -> None:
            try:
                with EdgeClient(model, address, "fp32", retries=0, timeout_s=60) as edge:
                    for _ in range(3):
                        assert edge.classify(x)["topk"][0]["index"] == want
                        outcomes.append("answered")
            except ServerError as exc:
                outcomes.append("busy" if exc.code == BUSY else f"error: {exc}")
            except HndError as exc:
                outcomes.append(f"error: {exc}")

        threads = [threading.Thread(target=client) for _ in range(24)]
        start = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads) and time.monotonic() - start < 120
        assert "busy" in outcomes and "answered" in outcomes, outcomes
        assert all(o in ("busy", "answered") for o in outcomes), outcomes
        grown = _rss_peak_mb(proc.pid) - before
        assert grown < 150, f"server memory grew by {grown:.0f} MB"
        with EdgeClient(model, address, "int8") as edge:  # and it still serves
            assert edge.classify(x)["topk"][0]["index"] == want
    finally:
        assert _stop(proc) == 0, "".join(lines)


def test_sigterm_answers_the_requests_in_flight_then_exits_0(files, model):
    metrics = _free_port()
    proc, address, lines = _start(files, "--max-batch", "8", "--max-wait-ms", "3000", "--metrics-port", str(metrics))
    try:
        socks = [socket.create_connection(parse_address(address), timeout=30) for _ in range(3)]
        for sock in socks:  # each waits in the batch for up to 3 s
            sock.sendall(encode_request(torch.zeros(SHAPE), "int8"))
        _wait(lambda: _metric(metrics, "in_flight") == 3, "the server to hold the 3 requests")
        proc.send_signal(signal.SIGTERM)
        for sock in socks:
            with sock:
                assert len(decode_response(read_frame(sock)).topk) == 5
        assert proc.wait(timeout=60) == 0
        with pytest.raises(OSError):
            socket.create_connection(parse_address(address), timeout=5)
    finally:
        _stop(proc)
    assert any("stopped, every request answered" in line for line in lines), lines


def test_sigterm_with_idle_tls_clients_stops_within_its_drain_time(files):
    """Idle TLS clients (one authorized, one that never said hello) do not hold the server past
    --drain-timeout: their connections are aborted, not shut down politely for 30 s, and the
    command exits 0 without a traceback."""
    proc, address, lines = _start(files, "--tls-cert", str(files["cert"]), "--tls-key", str(files["key"]),
                                  "--token-file", str(files["tokens"]), "--drain-timeout", "2")
    idle = [_tls_socket(address, files["cert"]) for _ in range(2)]
    try:
        idle[0].sendall(encode_hello(TOKEN))
        assert hello_token(read_frame(idle[0])) == ""
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=2 + 10) == 0  # without the abort: 30 s of TLS shutdown, then more
    finally:
        for sock in idle:
            sock.close()
        _stop(proc)
    assert not any("Traceback" in line or "CancelledError" in line for line in lines), "".join(lines)


def test_tls_cert_command_and_bad_tls_files(tmp_path, capsys):
    import os

    from hnd.tls import server_context

    assert main(["tls-cert", "--out", str(tmp_path / "pair"), "--name", "edge.example.org"]) == 0
    assert "hnd serve --tls-cert" in capsys.readouterr().out
    cert, key = tmp_path / "pair" / "cert.pem", tmp_path / "pair" / "key.pem"
    assert os.stat(key).st_mode & 0o777 == 0o600
    assert server_context(cert, key).minimum_version == ssl.TLSVersion.TLSv1_3
    assert "cannot read TLS file" in error(server_context, tmp_path / "none.pem", key)
    assert f"cannot use TLS certificate {key}" in error(server_context, key, key)
    assert "cannot read TLS CA file" in error(client_context, tmp_path / "none.pem")


def test_the_edge_command_speaks_tls_tokens_and_a_rate_limit(files, image_file, capsys):
    """`hnd edge` as a user runs it against a TLS server with tokens: its own flags, the same
    top-k as `hnd predict` on the whole student, and the emulated link's transfer time."""
    proc, address, lines = _start(files, "--tls-cert", str(files["cert"]), "--tls-key", str(files["key"]),
                                  "--token-file", str(files["tokens"]))
    common = [NAME, str(image_file), "--checkpoint", str(files["checkpoint"])]
    try:
        assert main(["edge", *common, "--server", address, "--tls-ca", str(files["cert"]), "--token-file",
                     str(files["tokens"]), "--bits", "32", "--rate-limit", "2", "--json"]) == 0
        [sent] = json.loads(capsys.readouterr().out)
        assert main(["edge", *common, "--server", address, "--token-file", str(files["tokens"])]) == 2  # no TLS
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "closed the connection during the hello" in err and "--tls-ca" in err
    finally:
        assert _stop(proc) == 0, "".join(lines)
    assert main(["predict", *common, "--json"]) == 0
    whole = json.loads(capsys.readouterr().out)
    assert [t["index"] for t in sent["topk"]] == [t["index"] for t in whole["topk"]]
    assert sent["bytes"] == 32 + 4 * 3 * 29 * 29 and sent["transfer_s"] >= sent["bytes"] * 8 / 2e6 * 0.9


def test_requests_still_waiting_at_the_drain_deadline_are_reported(files):
    """A request held longer than --drain-timeout (its batch waits a minute to fill): the server
    stops at the deadline, says how many went unanswered, and the client's connection is closed."""
    metrics = _free_port()
    proc, address, lines = _start(files, "--max-batch", "8", "--max-wait-ms", "60000", "--drain-timeout", "1",
                                  "--metrics-port", str(metrics))
    try:
        with socket.create_connection(parse_address(address), timeout=30) as sock:
            sock.sendall(encode_request(torch.zeros(SHAPE), "int8"))
            _wait(lambda: _metric(metrics, "in_flight") == 1, "the server to hold the request")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=1 + 10) == 0
            try:
                answer = sock.recv(1)
            except ConnectionResetError:  # aborted
                answer = b""
            assert answer == b""  # closed unanswered
    finally:
        _stop(proc)
    assert any("stopped (1 requests unanswered after 1 s)" in line for line in lines), lines
