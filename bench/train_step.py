"""Training-step speed and peak memory of naive, KD and HND on the paper models.

One step is what ``hnd.training`` runs per batch: forward (including the frozen teacher for KD and
the frozen teacher head for HND), loss, backward and optimizer step, with each method's official
optimizer. Weights are random (``pretrained=False``: nothing is downloaded) and the batch is one
random tensor reused every step, so data loading is not measured. ms/step is the median of the timed
steps (each synchronised), which a busy machine disturbs less than the mean; images/s = batch / it.
GFLOP/s is the step's arithmetic (2 x its MACs, see LEGEND, at the case's input size) per second,
next to one large fp32 matrix product on the same device and threads ("matmul"): a step near
100% of it spends its time on arithmetic, which only less arithmetic can shorten.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on CPU the process's peak RSS, each
(model, method) case running in a fresh subprocess. "built" is the memory after building the
models (CPU: current RSS; CUDA: allocated), "peak" the peak at the end of the case. "1st step s" is
the first step's seconds: under ``--compile`` it holds the compilation, which training would pay
once per process (less where inductor's on-disk cache already holds the graphs).
HND needs the student head's output shape to equal the teacher head's: true at the official sizes,
but not at every ``--input-size`` (e.g. 128 fits DenseNet and ResNet, 131 Inception-v3); a mismatch
shows as an error row.

Usage:
    python bench/train_step.py                                   # 4 paper models x 3 methods, 12 channels
    python bench/train_step.py --models resnet152 --methods kd hnd --steps 5
    python bench/train_step.py --device cpu --batch-size 2 --input-size 128 --models resnet152  # quick
    python bench/train_step.py --device cuda --amp bf16 --channels-last --json train_step.json
    python bench/train_step.py --compile ...                     # each method's loss under torch.compile
    OMP_NUM_THREADS=1 python bench/train_step.py --device cpu --batch-size 32 --input-size 80 --channels 3 \
        --models shufflenet_v2_x1_0@stage2 [--channels-last]          # the cpu profile's students
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from hnd.analysis import analyze
from hnd.config import STUDENT_METHODS, apply_overrides, preset
from hnd.distributed import pick_device
from hnd.errors import HndError
from hnd.registry import resolve, student_spec
from hnd.teachers import PAPER_TEACHERS
from hnd.methods import build_task, make_optimizer
from hnd.precision import AMP_DTYPES, check_amp
from hnd.training import place_task

LEGEND = """\
MACs per training step, per image, at the input size measured (backward ~ 2x forward):
  naive = 3 x student MACs                               (student fwd + bwd)
  kd    = teacher MACs + 3 x student MACs                (frozen teacher fwd + student fwd + bwd)
  hnd   = teacher-head MACs + 3 x student-head MACs      (frozen teacher-head fwd + head fwd + bwd)
'time' ratios are measured ms/step ratios; '% of MACs' = time ratio / MAC ratio x 100
(the HND speed-up over KD as % of the MAC ratio; goal >= 90%).
'GFLOP/s' = 2 x step MACs x batch / (s/step); '% matmul' = it as % of the matmul's GFLOP/s."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(PAPER_TEACHERS), metavar="TEACHER",
                   help="teachers (default: the four paper models; any teacher name, e.g. resnet18@layer3)")
    p.add_argument("--channels", type=int, default=12, help="bottleneck channels of the students")
    p.add_argument("--methods", nargs="+", default=list(STUDENT_METHODS), choices=STUDENT_METHODS)
    p.add_argument("--input-size", type=int, help="default: official (224; Inception-v3 299)")
    p.add_argument("--batch-size", type=int, help="default: 32 on CUDA, 4 on CPU")
    p.add_argument("--steps", type=int, help="timed steps; default: 20 on CUDA, 3 on CPU")
    p.add_argument("--warmup", type=int, help="untimed steps first (at least 1, the first of them shown as "
                   "'1st step s'); default: 5 on CUDA, 1 on CPU")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--amp", choices=("bf16", "fp16"), help="autocast dtype (fp16: CUDA only)")
    p.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    p.add_argument("--compile", action="store_true", help="run each method's loss under torch.compile (inductor)")
    p.add_argument("--json", metavar="FILE", help="also write the rows and ratios to FILE")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one case (JSON) and print its row
    args = p.parse_args(argv)
    if args.one:
        return args
    try:
        args.device = str(pick_device(args.device))
        for teacher in args.models:
            if resolve(teacher).is_student:
                raise HndError(f"--models takes teachers, not the student {teacher}")
    except HndError as exc:
        p.error(str(exc))
    cuda = args.device.startswith("cuda")
    try:
        check_amp(args.amp or "none", torch.device("cuda" if cuda else "cpu"))
    except HndError as exc:
        p.error(str(exc))
    args.batch_size = args.batch_size or (32 if cuda else 4)
    args.steps = args.steps or (20 if cuda else 3)
    args.warmup = max(1, args.warmup) if args.warmup is not None else (5 if cuda else 1)
    return args


def _mib(n_bytes: float) -> float:
    return n_bytes / 2**20


def _peak_rss_mib() -> float:
    """Peak resident set size of this process (ru_maxrss: KiB on Linux, bytes on macOS)."""
    unit = 1 if sys.platform == "darwin" else 1024
    return _mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit)


def _rss_mib() -> float:
    """Current resident set size (Linux); elsewhere the peak so far."""
    try:
        with open("/proc/self/statm") as f:
            return _mib(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
    except OSError:
        return _peak_rss_mib()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build(case: dict, device: torch.device):
    """The method's task (random weights) on ``device``, its optimizer and grad scaler."""
    config = apply_overrides(preset(student_spec(case["model"], case["channels"]), case["method"]),
                             {"pretrained": False, "batch_size": case["batch"], "amp": case["amp"] or "none",
                              "channels_last": case["channels_last"],
                              "input_size": case["input_size"]})  # generic heads are built for it
    torch.manual_seed(0)
    task = build_task(config, num_classes=1000)
    place_task(task, config, device)
    task.train_mode()
    scaler = torch.amp.GradScaler(device.type, enabled=config.amp == "fp16")
    return task, make_optimizer(config, task.trained)[0], scaler


def measure(case: dict) -> dict:
    """Build one (model, method) case and time ``warmup + steps`` training steps in this process."""
    device = torch.device(case["device"])
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    task, optimizer, scaler = _build(case, device)
    _sync(device)
    built = _mib(torch.cuda.memory_allocated(device)) if cuda else _rss_mib()
    size = case["input_size"]
    x = torch.randn(case["batch"], 3, size, size, device=device)
    if case["channels_last"]:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (case["batch"],), device=device)
    amp_dtype = AMP_DTYPES[case["amp"] or "none"]
    loss_of = functools.partial(task.loss, task.trained)
    if case["compile"]:
        loss_of = torch.compile(loss_of)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            loss, _ = loss_of(x, y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    start = time.perf_counter()
    step()  # the first step: with --compile, the compilation
    _sync(device)
    first_step_s = time.perf_counter() - start
    for _ in range(case["warmup"] - 1):  # the rest of the warm-up
        step()
    _sync(device)
    times = []
    for _ in range(case["steps"]):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    peak = _mib(torch.cuda.max_memory_allocated(device)) if cuda else _peak_rss_mib()
    return {**case, "ms_per_step": 1000 * seconds, "ms_steps": [1000 * t for t in times],
            "images_per_s": case["batch"] / seconds, "first_step_s": first_step_s,
            "built_mib": built, "peak_mib": peak}


def run_case(case: dict) -> dict:
    """Measure a case: in this process on CUDA, in a fresh subprocess on CPU (own peak RSS)."""
    if case["device"].startswith("cuda"):
        try:
            return measure(case)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            return {**case, "error": "out of memory"}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", json.dumps(case)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"]
        return {**case, "error": lines[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def step_macs(teacher: str, channels: int, input_size: int | None = None) -> dict[str, int]:
    """MACs per image of one training step of each method (see LEGEND) at ``input_size``, from
    ``hnd.analysis``."""
    s = analyze(student_spec(teacher, channels).at_input_size(input_size)).summary
    t = analyze(resolve(teacher).at_input_size(input_size)).summary
    return {"naive": 3 * s.macs, "kd": t.macs + 3 * s.macs, "hnd": t.head_macs + 3 * s.head_macs}


def matmul_gflops(device: str, n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of an n x n fp32 matrix product on ``device`` with this process's threads (median
    of ``repeats``): what the hardware gives dense arithmetic, the yardstick of a step's GFLOP/s."""
    a, b = (torch.randn(n, n, device=device) for _ in range(2))
    times = []
    for _ in range(repeats + 1):  # the first one warms up
        _sync(torch.device(device))
        start = time.perf_counter()
        a @ b
        _sync(torch.device(device))
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times[1:]) / 1e9


def ratios(rows: list[dict], teacher: str, macs: dict[str, int]) -> dict:
    """Measured time ratios KD/HND and naive/HND next to the MAC ratios, for one model."""
    ms = {r["method"]: r["ms_per_step"] for r in rows if r["model"] == teacher and "ms_per_step" in r}
    out = {"model": teacher, "gmacs_per_image": {m: v / 1e9 for m, v in macs.items()}}
    for other in ("kd", "naive"):
        mac_ratio = macs[other] / macs["hnd"]
        time_ratio = ms[other] / ms["hnd"] if other in ms and "hnd" in ms else None
        out[other] = {"time_ratio": time_ratio, "mac_ratio": mac_ratio,
                      "pct_of_macs": None if time_ratio is None else 100 * time_ratio / mac_ratio}
    return out


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


ROW_FORMAT = "{:<13} {:<6} {:>5} {:>5} {:>9} {:>10} {:>10} {:>10} {:>8} {:>8} {:>10}"
HEADER = ("model", "method", "batch", "size", "images/s", "ms/step", "built MiB", "peak MiB", "GFLOP/s", "% matmul",
          "1st step s")


def with_arithmetic(row: dict, macs_per_image: int | None, matmul: float) -> dict:
    """``row`` with the step's GFLOP/s and that as % of the matmul's (for the methods LEGEND counts)."""
    if "error" in row or macs_per_image is None:
        return row
    gflops = 2 * macs_per_image * row["batch"] / (row["ms_per_step"] / 1000) / 1e9
    return {**row, "gflops": gflops, "pct_of_matmul": 100 * gflops / matmul}


def print_row(row: dict) -> None:
    if "error" in row:
        values, tail = ["-"] * 7, f"  error: {row['error']}"
    else:
        values, tail = [f"{row['images_per_s']:.2f}", f"{row['ms_per_step']:.1f}", f"{row['built_mib']:.0f}",
                        f"{row['peak_mib']:.0f}", _fmt(row.get("gflops"), ".1f"),
                        _fmt(row.get("pct_of_matmul"), ".0f"), f"{row['first_step_s']:.1f}"], ""
    print(ROW_FORMAT.format(row["model"], row["method"], row["batch"], row["input_size"], *values) + tail,
          flush=True)


def print_ratios(table: list[dict]) -> None:
    print("\n" + LEGEND + "\n")
    fmt = "{:<13} {:>12} {:>12} {:>10} {:>14} {:>14} {:>10}"
    print(fmt.format("model", "KD/HND time", "KD/HND MACs", "% of MACs", "naive/HND time", "naive/HND MACs",
                     "% of MACs"))
    for r in table:
        kd, naive = r["kd"], r["naive"]
        print(fmt.format(r["model"], _fmt(kd["time_ratio"], ".2f"), f"{kd['mac_ratio']:.2f}",
                         _fmt(kd["pct_of_macs"], ".0f"), _fmt(naive["time_ratio"], ".2f"),
                         f"{naive['mac_ratio']:.2f}", _fmt(naive["pct_of_macs"], ".0f")))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return
    env = {"torch": torch.__version__, "device": args.device, "threads": torch.get_num_threads(),
           "amp": args.amp or "none", "channels_last": args.channels_last, "compile": args.compile}
    if args.device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
    env["matmul_gflops"] = round(matmul_gflops(args.device), 1)
    print(" ".join(f"{k}={v}" for k, v in env.items()))
    print(f"students: {args.channels} bottleneck channels; steps={args.steps} after warmup={args.warmup}\n")
    print(ROW_FORMAT.format(*HEADER))
    rows, table = [], []
    for teacher in args.models:
        size = args.input_size or resolve(teacher).input_size
        macs = step_macs(teacher, args.channels, size)
        for method in args.methods:
            case = {"model": teacher, "method": method, "channels": args.channels, "device": args.device,
                    "batch": args.batch_size, "input_size": size, "steps": args.steps, "warmup": args.warmup,
                    "amp": args.amp, "channels_last": args.channels_last, "compile": args.compile}
            rows.append(with_arithmetic(run_case(case), macs.get(method), env["matmul_gflops"]))
            print_row(rows[-1])
        if "hnd" in args.methods:
            table.append(ratios(rows, teacher, macs))
    if table:
        print_ratios(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"env": env, "rows": rows, "ratios": table}, f, indent=1)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
