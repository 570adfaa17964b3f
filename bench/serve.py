"""Split inference on loopback: what the protocol adds, what the server sustains, how fast the
edge encoder is.

Prints (and with --json writes) four measurements, bounded in count and time:

1. bytes on the wire per request vs the raw bottleneck payload, per tensor format
   (goal: overhead <= 64 bytes);
2. server throughput with N concurrent clients sending bottlenecks (dynamic batching) vs the
   server part's offline batched throughput on the same machine (goal >= 90%);
3. p50/p99 request latency under that load;
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
import threading
import time

import torch
import torchvision

from hnd.codec import TENSOR_FORMATS, tensor_bytes
from hnd.errors import HndError
from hnd.latency import median_seconds
from hnd.protocol import decode_response, encode_request, read_frame
from hnd.registry import resolve


def start_server(name: str, max_batch: int, max_wait_ms: float) -> tuple[subprocess.Popen, int]:
    """``hnd serve`` as its own process on a free loopback port (random weights)."""
    server = subprocess.Popen([sys.executable, "-m", "hnd", "serve", name, "--random-weights", "--port", "0",
                               "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms)],
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
           computes: list[float] | None = None) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
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

    # 3. The server under N clients.
    server, port = start_server(args.model, args.max_batch, args.max_wait_ms)
    frames = [encode_request(z[i], args.format) for i in range(len(z))]
    warm: list[float] = []
    client(port, frames[:2], warm, [])
    latencies: list[float] = []
    batches: list[int] = []
    computes: list[float] = []
    workers = [threading.Thread(target=client, args=(port, frames[c::args.clients], latencies, batches, computes))
               for c in range(args.clients)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.perf_counter() - start
    server.terminate()
    server.wait(10)
    served_ips = len(latencies) / wall
    lat = sorted(latencies)
    p50, p99 = lat[len(lat) // 2], lat[min(len(lat) - 1, int(0.99 * len(lat)))]
    print(f"\nserver, {args.clients} clients x {args.requests} requests ({args.format}), max batch "
          f"{args.max_batch}, max wait {args.max_wait_ms:g} ms")
    print(f"  served          {served_ips:8.1f} images/s  (mean batch {statistics.fmean(batches):.2f})")
    print(f"  offline batched {offline_ips:8.1f} images/s  (decode of {len(batch)} bottlenecks)")
    print(f"  server compute  {1e3 * statistics.median(computes):8.1f} ms per batch (offline {1e3 * offline_s:.1f} ms)")
    print(f"  ratio           {served_ips / offline_ips:8.1%}   (goal >= 90%)")
    print(f"  latency         p50 {1e3 * p50:.1f} ms, p99 {1e3 * p99:.1f} ms")

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

        from hnd.book.grid import machine_facts

        hw = machine_facts()
        rows = [f"| bytes per request, {fmt} | {o['frame_bytes']:,} (raw payload {o['raw_payload_bytes']:,}, "
                f"overhead {o['frame_bytes'] - o['raw_payload_bytes']:+,}) | overhead <= 64 |"
                for fmt, o in overhead.items()]
        rows += [f"| served, {args.clients} clients x {args.requests} requests, {args.format} | "
                 f"{served_ips:.1f} images/s (mean batch {statistics.fmean(batches):.2f}) | |",
                 f"| server part offline, batch {len(batch)} | {offline_ips:.1f} images/s | |",
                 f"| served / offline | {served_ips / offline_ips:.0%} | >= 90% |",
                 f"| request latency p50 / p99 | {1e3 * p50:.1f} / {1e3 * p99:.1f} ms | |",
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
               "served_images_per_s": served_ips, "offline_images_per_s": offline_ips,
               "mean_batch": statistics.fmean(batches), "p50_s": p50, "p99_s": p99,
               "encoder_s": encoder_s, "mobilenet_v2_s": mobilenet_s, "torch_threads": torch.get_num_threads()}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
