"""Split inference on loopback: what the protocol adds, what the server sustains, how fast the
edge encoder is.

Prints (and with --json writes) four measurements, bounded in count and time:

1. bytes on the wire per request vs the raw bottleneck payload, per tensor format
   (goal: overhead <= 64 bytes);
2. server throughput with N concurrent clients sending bottlenecks (dynamic batching) vs the
   server part's offline batched throughput on the same machine (goal >= 90%), in plain TCP
   and with TLS 1.3 + client tokens (goal: >= 95% of plain; the token costs bytes once per
   connection, in the hello, and none per request);
3. p50/p99 request latency under that load, both ways;
4. the student encoder's batch-1 latency vs MobileNetV2's on the same CPU (goal <= 0.5x).

Weights are random: timings do not depend on them. Run from the repository root:
    python bench/serve.py [--model NAME] [--clients 16] [--requests 4] [--max-batch 8] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torchvision

from hnd.tensor_codec import TENSOR_FORMATS, tensor_bytes
from hnd.errors import HndError
from hnd.devices import median_seconds
from hnd.protocol import decode_response, encode_hello, encode_request, hello_token, read_frame
from hnd.registry import resolve
from hnd.tls import client_context, make_self_signed


def start_server(name: str, max_batch: int, max_wait_ms: float, *extra: str) -> tuple[subprocess.Popen, int]:
    """``hnd serve`` as its own process on a free loopback port (random weights)."""
    server = subprocess.Popen([sys.executable, "-m", "hnd", "serve", name, "--random-weights", "--port", "0",
                               "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms), *extra],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        line = server.stdout.readline()
        match = re.search(r" on [^ ]+:(\d+)", line or "")
        if match:
            return server, int(match.group(1))
        if not line and server.poll() is not None:
            break
    server.kill()
    sys.exit("hnd serve did not start")


def client(port: int, frames: list[bytes], latencies: list[float], batches: list[int],
           computes: list[float] | None = None, secure: tuple | None = None) -> None:
    """Send ``frames`` one after another; ``secure`` = (TLS client context, token)."""
    with socket.create_connection(("127.0.0.1", port)) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock = raw
        if secure:
            sock = secure[0].wrap_socket(raw, server_hostname="127.0.0.1")
            sock.sendall(encode_hello(secure[1]))
            assert hello_token(read_frame(sock)) == ""
        for frame in frames:
            start = time.perf_counter()
            sock.sendall(frame)
            result = decode_response(read_frame(sock))
            latencies.append(time.perf_counter() - start)
            batches.append(result.batch)
            if computes is not None:
                computes.append(result.compute_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="densenet169_head_mimic-ver2b-3ch",
                        help="any student name, e.g. resnet18@layer2-3ch (`hnd models --help`)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (>= max batch fills batches)")
    parser.add_argument("--requests", type=int, default=4, help="per client")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--format", default="int8", choices=TENSOR_FORMATS)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--markdown", help="also write them as a Markdown table (the book includes one)")
    args = parser.parse_args()

    try:
        spec = resolve(args.model)
    except HndError as exc:
        parser.error(str(exc))
    if not spec.is_student:
        parser.error(f"{spec} is a teacher; give a student name, e.g. {spec.teacher.name}-3ch")
    args.model = str(spec)
    torch.manual_seed(0)
    model = spec.build(pretrained=False, num_classes=1000).eval()
    size = spec.input_size
    images = torch.randn(args.clients * args.requests, 3, size, size)
    with torch.no_grad():
        z = torch.cat([model.encode(images[i:i + 8]) for i in range(0, len(images), 8)])  # [N, C, H, W]
    print(f"{args.model}: input 3x{size}x{size}, bottleneck {'x'.join(map(str, z.shape[1:]))}, "
          f"torch threads {torch.get_num_threads()}")

    # 1. Protocol overhead.
    overhead = {}
    for fmt in TENSOR_FORMATS:
        frame = encode_request(z[0], fmt)
        raw = tensor_bytes(z.shape[1:], "int8" if fmt == "int8+zlib" else fmt)
        overhead[fmt] = {"frame_bytes": len(frame), "raw_payload_bytes": raw}
    print("\nbytes on the wire per request")
    print(f"  {'format':10s} {'frame':>8s} {'raw payload':>12s} {'overhead':>9s}")
    for fmt, o in overhead.items():
        print(f"  {fmt:10s} {o['frame_bytes']:8,d} {o['raw_payload_bytes']:12,d} "
              f"{o['frame_bytes'] - o['raw_payload_bytes']:9,d}")

    # 2. Offline batched throughput of the server part.
    with torch.no_grad():
        batch = z[:args.max_batch]
        offline_s = median_seconds(lambda: model.decode(batch), args.repeats)
    offline_ips = len(batch) / offline_s

    # 3. The server under N clients, plain and with TLS + tokens.
    frames = [encode_request(z[i], args.format) for i in range(len(z))]

    def load(extra: tuple[str, ...] = (), secure: tuple | None = None) -> dict:
        server, port = start_server(args.model, args.max_batch, args.max_wait_ms, *extra)
        try:
            client(port, frames[:2], [], [], secure=secure)  # warm up
            latencies: list[float] = []
            batches: list[int] = []
            computes: list[float] = []
            workers = [threading.Thread(target=client, args=(port, frames[c::args.clients], latencies, batches,
                                                             computes, secure)) for c in range(args.clients)]
            start = time.perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            wall = time.perf_counter() - start
        finally:
            server.terminate()
            server.wait(30)
        lat = sorted(latencies)
        return {"served_ips": len(latencies) / wall, "mean_batch": statistics.fmean(batches),
                "compute_s": statistics.median(computes), "p50": lat[len(lat) // 2],
                "p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))]}

    plain = load()
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = make_self_signed(tmp)
        token = "bench-token-" + "0" * 20
        (Path(tmp) / "tokens").write_text(token + "\n")
        secured = load(("--tls-cert", str(cert), "--tls-key", str(key), "--token-file", str(Path(tmp) / "tokens")),
                       (client_context(cert), token))
    served_ips, p50, p99 = plain["served_ips"], plain["p50"], plain["p99"]
    print(f"\nserver, {args.clients} clients x {args.requests} requests ({args.format}), max batch "
          f"{args.max_batch}, max wait {args.max_wait_ms:g} ms")
    print(f"  offline batched {offline_ips:8.1f} images/s  (decode of {len(batch)} bottlenecks, "
          f"{1e3 * offline_s:.1f} ms)")
    for label, r in (("plain TCP", plain), ("TLS + token", secured)):
        print(f"  {label:12s} served {r['served_ips']:7.1f} images/s (mean batch {r['mean_batch']:.2f}, "
              f"{r['served_ips'] / offline_ips:.0%} of offline), compute {1e3 * r['compute_s']:.1f} ms per batch, "
              f"latency p50 {1e3 * r['p50']:.1f} ms, p99 {1e3 * r['p99']:.1f} ms")
    print(f"  TLS + token / plain: {secured['served_ips'] / served_ips:.1%} of the throughput (goal >= 95%); "
          f"the token's hello is {len(encode_hello(token))} bytes once per connection, requests carry no token "
          f"({len(frames[0])} bytes either way, before TLS framing)")
    print(f"  ratio           {served_ips / offline_ips:8.1%}   (goal >= 90%)")

    # 4. Encoder vs MobileNetV2, batch 1.
    mobilenet = torchvision.models.mobilenet_v2(weights=None).eval()
    x = images[:1]
    with torch.no_grad():
        encoder_s = median_seconds(lambda: model.encode(x), args.repeats * 3)
        mobilenet_s = median_seconds(lambda: mobilenet(x), args.repeats * 3)
    print(f"\nbatch-1 latency on this CPU: encoder {1e3 * encoder_s:.2f} ms, MobileNetV2 "
          f"{1e3 * mobilenet_s:.2f} ms, ratio {encoder_s / mobilenet_s:.2f} (goal <= 0.5)")

    if args.markdown:
        import platform

        from hnd.machine import machine_facts

        hw = machine_facts()
        rows = [f"| bytes per request, {fmt} | {o['frame_bytes']:,} (raw payload {o['raw_payload_bytes']:,}, "
                f"overhead {o['frame_bytes'] - o['raw_payload_bytes']:+,}) | overhead <= 64 |"
                for fmt, o in overhead.items()]
        rows += [f"| served, {args.clients} clients x {args.requests} requests, {args.format} | "
                 f"{served_ips:.1f} images/s (mean batch {plain['mean_batch']:.2f}) | |",
                 f"| server part offline, batch {len(batch)} | {offline_ips:.1f} images/s | |",
                 f"| served / offline | {served_ips / offline_ips:.0%} | >= 90% |",
                 f"| request latency p50 / p99 | {1e3 * p50:.1f} / {1e3 * p99:.1f} ms | |",
                 f"| served with TLS 1.3 + client token | {secured['served_ips']:.1f} images/s = "
                 f"{secured['served_ips'] / served_ips:.0%} of plain | >= 95% |",
                 f"| latency p50 / p99 with TLS + token | {1e3 * secured['p50']:.1f} / {1e3 * secured['p99']:.1f} ms | |",
                 f"| token bytes per request (after a {len(encode_hello(token))}-byte hello per connection) | 0 | 0 |",
                 f"| encoder batch-1 / MobileNetV2 batch-1 | {1e3 * encoder_s:.2f} / {1e3 * mobilenet_s:.2f} ms "
                 f"= {encoder_s / mobilenet_s:.2f} | <= 0.5 |"]
        text = (f"Measured with `python bench/serve.py --model {args.model} --clients {args.clients} --requests "
                f"{args.requests} --max-batch {args.max_batch}` on {time.strftime('%Y-%m-%d')}: {hw['cpu']}, "
                f"{hw['cpus']} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
                f"Python {platform.python_version()}, random weights.\n\n"
                "| measurement | value | goal |\n|---|---|---|\n" + "\n".join(rows) + "\n")
        with open(args.markdown, "w") as f:
            f.write(text)

    if args.json:
        doc = {"model": args.model, "bottleneck": list(z.shape[1:]), "overhead": overhead,
               "clients": args.clients, "requests": args.requests, "format": args.format,
               "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms,
               "served_images_per_s": served_ips, "offline_images_per_s": offline_ips, "secured": secured,
               "mean_batch": plain["mean_batch"], "p50_s": p50, "p99_s": p99,
               "encoder_s": encoder_s, "mobilenet_v2_s": mobilenet_s, "torch_threads": torch.get_num_threads()}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
