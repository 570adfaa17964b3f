"""Split computing over a real network: the server runs a student's decoder and tail on
bottlenecks sent by edge devices, which run the encoder.

:class:`SplitServer` answers many edge devices at once with asyncio and decodes their
requests in dynamic batches (up to ``max_batch`` images, waiting at most ``max_wait_ms``
after the first); :class:`EdgeClient` encodes an image locally, sends the bottleneck in one
of :data:`hnd.protocol.WIRE_FORMATS` (``entropy`` for entropic students) and reports where
the time went. Frames are those of
:mod:`hnd.protocol`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from hnd.edge import EdgeLink, answer
from hnd.entropy import coding_tables
from hnd.errors import HndError
from hnd.protocol import (BUSY, DEFAULT_MAX_FRAME_BYTES, MAX_TOKEN_BYTES, UNAUTHORIZED, FrameError, check_wire_format,
                          decode_request, encode_error, encode_hello, encode_request, encode_result, header_bytes,
                          hello_token, read_frame_async, request_header)
from hnd.students import Student

log = logging.getLogger("hnd.serving")


def check_student(model: object) -> Student:
    """``model`` if it is a student (the only models with an encoder/decoder split)."""
    if not isinstance(model, Student):
        raise HndError(f"{getattr(model, 'spec', type(model).__name__)} is not a student: only students split "
                       "into an encoder and a decoder")
    return model


def bottleneck_shape(model: Student, input_size: int) -> tuple[int, ...]:
    """Shape of one image's bottleneck ``z`` [C, H, W] for a square input of ``input_size``."""
    with torch.no_grad():
        param = next(model.parameters())
        z = model.encode(torch.zeros(1, 3, input_size, input_size, device=param.device, dtype=param.dtype))
    return tuple(z.shape[1:])


class ServerMetrics:
    """The server's Prometheus metrics, in a registry of their own (``registry``; serve it with
    ``prometheus_client.start_http_server(port, registry=...)``): requests by outcome
    (answered, refused, busy, unauthorized, failed, broken: framing that ends the connection),
    requests in flight, bytes received in requests, and
    histograms of batch size, queue seconds and compute seconds."""

    def __init__(self):
        try:
            import prometheus_client as prom
        except ImportError:
            raise HndError("metrics need the `prometheus_client` package (pip install -e '.[deploy]')") from None
        self.registry = prom.CollectorRegistry()
        self.requests = prom.Counter("hnd_requests", "Requests by outcome", ["outcome"], registry=self.registry)
        self.received = prom.Counter("hnd_received_bytes", "Bytes of request frames", registry=self.registry)
        self.batch = prom.Histogram("hnd_batch_size", "Images decoded together", registry=self.registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 255))
        times = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
        self.queue = prom.Histogram("hnd_queue_seconds", "Seconds a request waited for its batch",
                                    registry=self.registry, buckets=times)
        self.compute = prom.Histogram("hnd_compute_seconds", "Seconds of decoder + tail per batch",
                                      registry=self.registry, buckets=times)
        self.in_flight = prom.Gauge("hnd_requests_in_flight", "Requests read and not yet answered",
                                    registry=self.registry)
        for outcome in ("answered", "refused", "busy", "unauthorized", "failed", "broken"):
            self.requests.labels(outcome)  # every series exists from the start

    def count(self, outcome: str, nbytes: int = 0) -> None:
        self.requests.labels(outcome).inc()
        self.received.inc(nbytes)

    def observe(self, batch: int, queue_s: float, compute_s: float) -> None:
        self.batch.observe(batch)
        self.queue.observe(queue_s)
        self.compute.observe(compute_s)

    def serve(self, port: int, host: str = "127.0.0.1"):
        """Expose the metrics over HTTP at ``http://host:port/metrics``."""
        import prometheus_client as prom

        try:
            return prom.start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise HndError(f"cannot serve metrics on {host}:{port} ({exc.strerror or exc})") from None


@dataclass
class _Pending:
    z: torch.Tensor
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


class SplitServer:
    """Serve ``model.decode`` to edge devices (see the module docstring).

    Requests must carry a bottleneck of the shape the encoder gives at ``input_size`` (default:
    that of the model's spec, ``model.spec``). A request that is well framed but wrong (shape,
    format code, damaged payload) gets an error frame and the connection stays open; broken
    framing (bad magic, over ``max_frame_bytes``, truncated, ``read_timeout_s`` inside a
    frame) gets an error frame if possible and the connection is closed, as is one idle for
    ``idle_timeout_s``.

    Facing a network: ``ssl_context`` (:func:`hnd.tls.server_context`) serves TLS 1.3 only;
    ``tokens`` (:class:`hnd.access.TokenFile`) makes a hello frame with a known token the first
    frame of every connection, read with a limit of its own size and within ``hello_timeout_s``
    in all, so a connection without one is refused before any other read or model work. A token
    removed from the file closes its connections at their next request; a second hello on an
    authorized connection is an error frame. Admission: connections still owing their hello
    count against ``max_pending``, authorized (or, without tokens, all) ones against
    ``max_connections``, so slow clients cannot take the slots of authorized ones; past either
    a new connection gets a "busy" error and is closed; past ``max_queue`` waiting requests a
    request gets a "busy" error at once (clients retry with backoff). A connection has at most
    one request in flight: its next frame is read after the answer is written, so what a client
    pipelines waits in the TCP window, not in this process. :meth:`close` aborts every
    connection still open (after :meth:`drain`), so stopping never waits for idle clients.
    """

    def __init__(self, model: Student, *, host: str = "127.0.0.1", port: int = 0,
                 device: str = "cpu", max_batch: int = 8, max_wait_ms: float = 5.0,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, read_timeout_s: float = 10.0,
                 idle_timeout_s: float = 300.0, topk: int = 5, input_size: int | None = None,
                 max_queue: int | None = None, max_connections: int = 256, max_pending: int = 64,
                 hello_timeout_s: float = 5.0, ssl_context=None, tokens=None, metrics: bool = False):
        if (max_batch < 1 or max_wait_ms < 0 or topk < 1 or max_frame_bytes < 64 or max_connections < 1
                or max_pending < 1 or not hello_timeout_s > 0):
            raise HndError("max_batch, max_connections, max_pending and topk must be >= 1, max_wait_ms >= 0, "
                           "hello_timeout_s > 0 and max_frame_bytes >= 64")
        if max_queue is not None and max_queue < 1:
            raise HndError(f"max_queue must be >= 1, got {max_queue}")
        self.ssl_context, self.tokens, self.max_connections = ssl_context, tokens, max_connections
        self.max_pending, self.hello_timeout_s = max_pending, hello_timeout_s
        self._open = 0  # connections being served (with tokens: authorized ones)
        self._pending = 0  # connections still owing their hello
        self._connections: dict[asyncio.Task, asyncio.StreamWriter] = {}  # open, for close()
        self._inflight = 0  # requests read and not yet answered
        self.metrics = ServerMetrics() if metrics else None
        self.name = str(check_student(model).spec)
        self.device = _check_device(device)
        self.model = model.to(self.device).eval()
        self.input_size = input_size or model.spec.input_size  # the checkpoint's, if it records one
        self._tables = coding_tables(model.prior)  # entropic students: what requests are coded with

        self.host, self.port = host, port
        self.max_batch, self.max_wait_s, self.topk = max_batch, max_wait_ms / 1e3, topk
        self.max_frame_bytes = max_frame_bytes
        self.read_timeout_s, self.idle_timeout_s = read_timeout_s, idle_timeout_s
        self.max_queue = max_queue or 4 * max_batch
        threads = torch.get_num_threads()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hnd-decode",
                                            initializer=torch.set_num_threads, initargs=(threads,))
        # All torch work on the worker thread, this probe included (see _decode).
        self.shape = self._executor.submit(bottleneck_shape, self.model, self.input_size).result()
        self._queue: asyncio.Queue | None = None
        self._server: asyncio.base_events.Server | None = None
        self._worker: asyncio.Task | None = None

    async def start(self) -> tuple[str, int]:
        """Listen; returns the bound (host, port) (port 0 picks a free one)."""
        self._queue = asyncio.Queue(self.max_queue)
        self._worker = asyncio.create_task(self._batch_loop())
        self._server = await asyncio.start_server(self._connection, self.host, self.port,
                                                  limit=min(self.max_frame_bytes, 1 << 20), ssl=self.ssl_context,
                                                  ssl_handshake_timeout=self.read_timeout_s if self.ssl_context
                                                  else None)
        host, port = self._server.sockets[0].getsockname()[:2]
        self.port = port
        return host, port

    async def serve_forever(self) -> None:
        if self._server is None:
            await self.start()
        async with self._server:
            await self._server.serve_forever()

    async def drain(self, timeout_s: float = 30.0) -> int:
        """Stop accepting connections and wait, at most ``timeout_s``, until every request
        already read has been answered; returns how many were still unanswered."""
        if self._server is not None:
            self._server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self._inflight and loop.time() < deadline:
            await asyncio.sleep(0.01)
        return self._inflight

    async def close(self) -> None:
        """Stop listening, abort every connection still open (an idle client, a TLS client
        whose shutdown handshake would take asyncio's 30 s) and stop the decoder: bounded."""
        if self._server is not None:
            self._server.close()
        for task, writer in list(self._connections.items()):
            writer.transport.abort()
            task.cancel()
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=1.0)
        if self._server is not None:  # Python 3.12+ also waits here for the connections aborted above
            try:
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            except asyncio.TimeoutError:
                log.warning("closing: connections still open after 1 s")
        if self._worker is not None:
            self._worker.cancel()
        self._executor.shutdown(wait=False)

    # --- connections ---------------------------------------------------------------------------

    def _in_flight(self, change: int) -> None:
        self._inflight += change
        if self.metrics is not None:
            self.metrics.in_flight.set(self._inflight)

    def _count(self, outcome: str, nbytes: int = 0) -> None:
        if self.metrics is not None:
            self.metrics.count(outcome, nbytes)

    async def _greet(self, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str | None:
        """With tokens: read the hello (nothing larger, all of it within ``hello_timeout_s``),
        answer it; the accepted token, or None if refused."""
        refusal = ("this server needs a hello frame with a client token first (protocol version 3: "
                   "hnd edge --token-file FILE)")
        try:
            frame = await asyncio.wait_for(read_frame_async(reader, header_bytes(0) + MAX_TOKEN_BYTES,
                                                            first_timeout=self.read_timeout_s,
                                                            timeout=self.read_timeout_s), self.hello_timeout_s)
            token = hello_token(frame) if frame is not None else None
        except asyncio.TimeoutError:
            log.warning("%s: refused: no hello within %g s", peer, self.hello_timeout_s)
            refusal, token = f"no hello within {self.hello_timeout_s:g} s", None
        except FrameError as exc:
            log.warning("%s: refused: %s", peer, exc)
            token = None
        if token is None or not self.tokens.accepts(token):
            log.warning("%s: refused: %s", peer, "no hello" if token is None else "unknown token")
            self._count("unauthorized")
            writer.write(encode_error(refusal if token is None else "unknown client token", UNAUTHORIZED))
            return None
        writer.write(encode_hello())
        await writer.drain()
        return token

    async def _busy(self, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, why: str) -> None:
        """Refuse a connection past a limit: a busy error, then close (what the client sent is
        read first, 64 KiB at most: closing on unread data would reset)."""
        log.warning("%s: busy: %s", peer, why)
        self._count("busy")
        writer.write(encode_error(f"busy: {why}; retry later", BUSY))
        try:
            await asyncio.wait_for(reader.read(1 << 16), self.read_timeout_s)
        except (asyncio.TimeoutError, ConnectionError, OSError):
            pass

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = "%s:%s" % writer.get_extra_info("peername")[:2]
        task = asyncio.current_task()
        self._connections[task] = writer
        try:
            await self._admit(peer, reader, writer)
        except (ConnectionError, OSError) as exc:
            log.info("%s: connection lost: %s", peer, exc)
        except asyncio.CancelledError:  # close(): the server stops
            pass
        finally:
            del self._connections[task]
            await _close(writer)

    async def _admit(self, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """The hello within its own budget of slots, then a slot among the authorized, then requests."""
        token = None
        if self.tokens is not None:
            if self._pending >= self.max_pending:
                return await self._busy(peer, reader, writer, f"{self.max_pending} connections still owe their hello")
            self._pending += 1
            try:
                token = await self._greet(peer, reader, writer)
            finally:
                self._pending -= 1
            if token is None:
                return
        if self._open >= self.max_connections:
            return await self._busy(peer, reader, writer, f"{self.max_connections} connections open")
        self._open += 1
        try:
            await self._requests(peer, reader, writer, token)
        finally:
            self._open -= 1

    async def _requests(self, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        token: str | None) -> None:
        """Answer one request frame at a time until the client closes, idles or breaks framing."""
        while True:
            try:
                frame = await read_frame_async(reader, self.max_frame_bytes, first_timeout=self.idle_timeout_s,
                                               timeout=self.read_timeout_s)
            except FrameError as exc:
                log.warning("%s: closing: %s", peer, exc)
                self._count("broken")
                writer.write(encode_error(str(exc)))
                return
            if frame is None:
                return
            if token is not None and not self.tokens.accepts(token):
                log.warning("%s: closing: its token was removed", peer)
                self._count("unauthorized", len(frame))
                writer.write(encode_error("this client token is no longer accepted", UNAUTHORIZED))
                return
            self._in_flight(+1)
            try:
                writer.write(await self._reply(peer, frame, token))
                await writer.drain()
            finally:
                self._in_flight(-1)

    async def _reply(self, peer: str, frame: bytes, token: str | None) -> bytes:
        """The answer to one frame: a request's result or error; to a hello, a welcome where no
        token is needed (a client configured with one), else an error (it was said once)."""
        if hello_token(frame) is None:
            return await self._answer(peer, frame)
        if token is None:
            return encode_hello()
        self._count("refused", len(frame))
        return encode_error("this connection said hello already; send requests")

    async def _answer(self, peer: str, frame: bytes) -> bytes:
        """Response frame for one complete request frame; user mistakes become error frames."""
        try:
            head = request_header(frame)
            if head.fmt is not None and head.shape != self.shape:
                raise HndError(f"{self.name} takes a bottleneck of shape {list(self.shape)} (input "
                               f"{self.input_size}px), got {list(head.shape)}")
            z, fmt = decode_request(frame, self._tables)  # entropy: bounded by the checked shape
            z = torch.from_numpy(z)
        except HndError as exc:
            log.warning("%s: rejected %d-byte request: %s", peer, len(frame), exc)
            self._count("refused", len(frame))
            return encode_error(str(exc))
        pending = _Pending(z, asyncio.get_running_loop().create_future())
        try:
            self._queue.put_nowait(pending)
        except asyncio.QueueFull:
            log.warning("%s: busy: %d requests queued", peer, self.max_queue)
            self._count("busy", len(frame))
            return encode_error(f"busy: {self.max_queue} requests queued; retry later", BUSY)
        try:
            topk, queue_s, compute_s, batch = await pending.future
        except Exception as exc:  # the decoder failed: report it, keep serving
            log.error("%s: decoding failed: %s", peer, exc)
            self._count("failed", len(frame))
            return encode_error(f"decoding failed: {type(exc).__name__}: {exc}")
        self._count("answered", len(frame))
        if self.metrics is not None:
            self.metrics.observe(batch, queue_s, compute_s)
        log.info("%s: %s %d bytes batch %d queue %.2f ms compute %.2f ms top-1 %d (%.3f)", peer, fmt,
                 len(frame), batch, queue_s * 1e3, compute_s * 1e3, topk[0][0], topk[0][1])
        return encode_result(topk, queue_s, compute_s, batch)

    # --- dynamic batching ----------------------------------------------------------------------

    async def _batch_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), left))
                except asyncio.TimeoutError:
                    break
            started = time.perf_counter()
            try:
                probs, indices, compute_s = await loop.run_in_executor(
                    self._executor, self._decode, [p.z for p in batch])
            except Exception as exc:  # noqa: BLE001 - every waiting request must be answered
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            for row, p in enumerate(batch):
                if not p.future.done():
                    topk = list(zip(indices[row].tolist(), probs[row].tolist()))
                    p.future.set_result((topk, started - p.enqueued, compute_s, len(batch)))

    def _decode(self, zs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Decoder + tail on the batch's bottlenecks, stacked to [N, C, H, W]. Runs in the worker
        thread, stacking included: torch work on the event loop's thread would start a second
        pool of compute threads that competes with the worker's (measured 35% slower)."""
        start = time.perf_counter()
        with torch.no_grad():
            logits = self.model.decode(torch.stack(zs).to(self.device))
            probs, indices = torch.softmax(logits, dim=1).topk(min(self.topk, logits.shape[1]), dim=1)
            probs, indices = probs.cpu(), indices.cpu()
        return probs, indices, time.perf_counter() - start


async def _close(writer: asyncio.StreamWriter) -> None:
    """Flush and close, 1 s at most (a TLS shutdown with a silent peer would take 30 s), then abort."""
    try:
        await asyncio.wait_for(writer.drain(), 1.0)
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), 1.0)
    except (ConnectionError, OSError, asyncio.TimeoutError):
        writer.transport.abort()


def _check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise HndError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise HndError("device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    return dev


def serve(model: Student, *, host: str = "127.0.0.1", port: int = 8765, ready=print,
          metrics_port: int | None = None, drain_timeout_s: float = 30.0, **options) -> None:
    """Serve the student ``model`` (:func:`hnd.models.create_student`) until SIGTERM or SIGINT,
    then drain: stop accepting, answer the requests already read (at most ``drain_timeout_s``)
    and return. ``ready`` gets one line with the address once the server listens;
    ``metrics_port`` serves Prometheus metrics on 127.0.0.1. ``options`` go to
    :class:`SplitServer`."""
    server = SplitServer(model, host=host, port=port, metrics=metrics_port is not None, **options)
    if metrics_port is not None:
        server.metrics.serve(metrics_port)

    async def run() -> None:
        bound_host, bound_port = await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        secure = ", TLS" if server.ssl_context else ""
        secure += ", client tokens" if server.tokens else ""
        ready(f"hnd serve: {server.name} on {bound_host}:{bound_port} (bottleneck "
              f"{'x'.join(map(str, server.shape))}, device {server.device}, max batch {server.max_batch}{secure})")
        try:
            await stop.wait()
            log.info("draining: %d requests in flight", server._inflight)
            left = await server.drain(drain_timeout_s)
            ready(f"hnd serve: stopped ({left} requests unanswered after {drain_timeout_s:g} s)" if left
                  else "hnd serve: stopped, every request answered")
        finally:
            await server.close()

    try:
        asyncio.run(run())
    except OSError as exc:
        raise HndError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None


class EdgeClient:
    """The edge device's side with the student in PyTorch: encoder locally, bottleneck over one
    :class:`hnd.edge.EdgeLink` (TLS, token, busy retries, rate limit: see there). ``fmt`` is one
    of :data:`hnd.protocol.WIRE_FORMATS` (``entropy`` needs an entropic student with coding
    tables). A device without torch runs the exported encoder instead (:class:`hnd.edge.OnnxEdge`).
    """

    def __init__(self, model: Student, server: str = "127.0.0.1:8765", fmt: str = "int8",
                 rate_limit_mbps: float | None = None, timeout_s: float = 60.0,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES, *, ssl_context=None, token: str | None = None,
                 retries: int = 5):
        self.model = check_student(model).eval()
        self.name = str(model.spec)
        self._tables = coding_tables(model.prior)
        self.fmt = check_wire_format(fmt, self._tables)
        self.link = EdgeLink(server, rate_limit_mbps=rate_limit_mbps, timeout_s=timeout_s,
                             max_frame_bytes=max_frame_bytes, ssl_context=ssl_context, token=token, retries=retries)

    def close(self) -> None:
        self.link.close()

    def __enter__(self) -> EdgeClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def classify(self, image: torch.Tensor) -> dict:
        """Classify one normalized image [3, H, W] or [1, 3, H, W]: the server's top-k and the
        time breakdown in seconds (transfer = round trip minus the server's queue and compute)."""
        if image.ndim == 3:
            image = image.unsqueeze(0)
        if image.ndim != 4 or image.shape[0] != 1 or image.shape[1] != 3:
            raise HndError(f"classify takes one image [3, H, W] or [1, 3, H, W], got {list(image.shape)}")
        start = time.perf_counter()
        with torch.no_grad():
            z = self.model.encode(image)[0]  # [C, H', W']
        encoded = time.perf_counter()
        frame = encode_request(z.cpu().numpy(), self.fmt, self._tables)
        return answer(self.link.send(frame, image.shape[-1]), frame, self.fmt, start, encoded)
