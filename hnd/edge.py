"""The edge device's side of split computing, without torch: one connection to the server
(:class:`EdgeLink`: TLS, a client token, retries when the server is busy, an emulated slow link)
and a device that runs an exported encoder with ONNX Runtime (:class:`OnnxEdge`), preprocesses
with Pillow and numpy and frames its bottleneck with :mod:`hnd.protocol`. The torch client
(:class:`hnd.serving.EdgeClient`) sends through the same link, so both speak the same bytes.
"""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass

from hnd.errors import HndError
from hnd.protocol import (BUSY, DEFAULT_MAX_FRAME_BYTES, FrameError, Result, ServerError, check_wire_format,
                          decode_response, encode_hello, encode_request, hello_token, read_frame, request_header)


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (IPv6 as ``[::1]:PORT``) -> (host, port); a one-line error otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise HndError(f"server address must be HOST:PORT with a port from 1 to 65535, got {address!r}")
    return host.strip("[]"), int(port)


@dataclass
class Sent:
    """One request's answer and when its steps ended (``time.perf_counter`` seconds)."""

    result: Result
    framed: float
    received: float


class EdgeLink:
    """One TCP connection to ``hnd serve``. ``ssl_context`` (:func:`hnd.tls.client_context`)
    speaks TLS and checks the server's certificate for the host name of ``server``; ``token`` is
    sent in a hello frame before any request. A "busy" answer is retried ``retries`` times,
    after 50 ms, 100 ms, 200 ms, ... (capped at 2 s); ``rate_limit_mbps`` emulates a slower link
    by making each send take at least ``bytes * 8 / rate`` seconds."""

    def __init__(self, server: str = "127.0.0.1:8765", *, rate_limit_mbps: float | None = None,
                 timeout_s: float = 60.0, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, ssl_context=None,
                 token: str | None = None, retries: int = 5):
        if rate_limit_mbps is not None and not rate_limit_mbps > 0:
            raise HndError(f"rate limit must be a positive number of Mbit/s, got {rate_limit_mbps}")
        self.rate_limit_mbps = rate_limit_mbps
        self.address = parse_address(server)
        self.server = server
        self.max_frame_bytes = max_frame_bytes
        self.retries, self.timeout_s, self.ssl_context, self.token = retries, timeout_s, ssl_context, token
        self.sock = self._connect()

    def _connect(self) -> socket.socket:
        """A connection to the server: TCP, then TLS when asked, then the hello with the token."""
        server = self.server
        try:
            sock = socket.create_connection(self.address, timeout=self.timeout_s)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.ssl_context is not None:
                sock = self.ssl_context.wrap_socket(sock, server_hostname=self.address[0])
        except ssl.SSLCertVerificationError as exc:
            raise HndError(f"server {server} failed the TLS certificate check: {exc.verify_message}") from None
        except ssl.SSLError as exc:
            raise HndError(f"TLS with server {server} failed: {exc.reason or exc}") from None
        except OSError as exc:
            raise HndError(f"cannot connect to server {server} ({exc.strerror or exc})") from None
        if self.token is None:
            return sock
        try:
            sock.sendall(encode_hello(self.token))
            reply = read_frame(sock, self.max_frame_bytes)
        except (OSError, FrameError) as exc:  # a TLS server drops a plaintext hello unanswered
            sock.close()
            hint = "" if self.ssl_context is not None else "; if it speaks TLS, add --tls-ca FILE or --tls"
            raise HndError(f"server {server} closed the connection during the hello "
                           f"({getattr(exc, 'strerror', None) or exc}{hint})") from None
        except HndError:
            sock.close()
            raise
        if hello_token(reply) is None:
            sock.close()
            decode_response(reply)  # an error frame: raise the server's message
            raise FrameError("the server answered the hello with a result frame")
        return sock

    def send(self, frame: bytes, input_size: int) -> Sent:
        """Send one request frame and read its answer, retrying while the server is busy.
        ``input_size``: the side of the image this device encoded, named if the server wants
        another bottleneck shape."""
        framed = time.perf_counter()
        for attempt in range(self.retries + 1):
            try:
                if self.rate_limit_mbps:  # the frame is on a slow link before the server can see it
                    time.sleep(len(frame) * 8 / (self.rate_limit_mbps * 1e6))
                self.sock.sendall(frame)
                reply = read_frame(self.sock, self.max_frame_bytes)
            except socket.timeout:
                raise HndError(f"server {self.address[0]}:{self.address[1]} did not answer in time") from None
            except OSError as exc:
                raise HndError(f"connection to the server failed ({exc.strerror or exc})") from None
            received = time.perf_counter()
            try:
                return Sent(decode_response(reply), framed, received)
            except ServerError as exc:
                if "takes a bottleneck of shape" in str(exc):  # name this side's size too
                    raise ServerError(f"{exc}; this device encoded a {input_size}px image (set the same "
                                      "--input-size on both sides)", exc.code) from None
                if exc.code != BUSY or attempt == self.retries:
                    raise
                time.sleep(min(2.0, 0.05 * 2 ** attempt))
                self.sock.close()  # a server at its connection limit has closed this one
                self.sock = self._connect()
        raise AssertionError("unreachable")

    def close(self) -> None:
        self.sock.close()


def answer(sent: Sent, frame: bytes, fmt: str, start: float, encoded: float) -> dict:
    """The server's top-k and the time breakdown in seconds (transfer = round trip minus the
    server's queue and compute) of one image sent as ``frame``."""
    result, server_s = sent.result, sent.result.queue_s + sent.result.compute_s
    return {"topk": [{"index": i, "prob": p} for i, p in result.topk], "format": fmt,
            "bytes": len(frame), "payload_bytes": len(request_header(frame).payload),
            "batch": result.batch, "encoder_s": encoded - start, "encode_s": sent.framed - encoded,
            "transfer_s": max(0.0, sent.received - sent.framed - server_s), "server_queue_s": result.queue_s,
            "server_compute_s": result.compute_s, "total_s": time.perf_counter() - start}


class OnnxEdge:
    """An edge device without torch: the encoder exported by ``hnd export --part encoder``,
    run by ONNX Runtime (one thread by default, a Pi-class setting), fed by the preprocessing
    its sidecar records, sending the bottleneck in ``fmt`` over an :class:`EdgeLink`."""

    def __init__(self, onnx: str, server: str = "127.0.0.1:8765", fmt: str = "int8", *, threads: int = 1,
                 **link_options):
        from hnd.encoder_bundle import EncoderBundle

        self.bundle = EncoderBundle.read(onnx)
        self.fmt = check_wire_format(fmt, self.bundle.tables)
        try:
            import onnxruntime as ort
        except ImportError:
            raise HndError("running an exported encoder needs onnxruntime: pip install 'hnd[edge]'") from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = options.inter_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(self.bundle.onnx), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for a bad file
            raise HndError(f"cannot load {self.bundle.onnx} with onnxruntime ({str(exc).splitlines()[0]})") from None
        self.input = self.session.get_inputs()[0].name
        self.link = EdgeLink(server, **link_options)

    def classify(self, image) -> dict:
        """Classify one PIL image: the server's top-k and the time breakdown in seconds."""
        start = time.perf_counter()
        x = self.bundle.preprocessing.array(image)[None]  # [1, 3, S, S]
        z = self.session.run(None, {self.input: x})[0][0]  # [C, H', W']
        encoded = time.perf_counter()
        frame = encode_request(z, self.fmt, self.bundle.tables)
        sent = self.link.send(frame, self.bundle.preprocessing.input_size)
        return answer(sent, frame, self.fmt, start, encoded)

    def close(self) -> None:
        self.link.close()

    def __enter__(self) -> OnnxEdge:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
