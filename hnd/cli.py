"""Command line: ``hnd models | inspect | predict | config | train | evaluate | data | book | explore |
lab | plan | profile-device | serve | tls-cert | edge | export``.
``--json`` prints one JSON document."""

from __future__ import annotations

import argparse
import json
import os
import sys

from hnd.book import EXECUTORS
from hnd.errors import HndError


def _print_json(doc: object) -> None:
    json.dump(doc, sys.stdout, indent=1)
    sys.stdout.write("\n")


# the training methods for help texts, written here so that `hnd --help` imports neither
# hnd.config nor torch; tests/test_cli.py checks them against hnd.config.METHODS
METHODS_HELP = "naive | kd | hnd | ae | teacher | entropic | head_kd"

MODELS_HELP = """model names (resolved once into a spec; `str(spec)` is the canonical name):
  TEACHER               any torchvision image classifier, cut at its default split point:
                        resnet152, densenet169, mobilenet_v3_large, efficientnet_b0, ... (--all)
  timm/NAME[.TAG]       a timm model as the teacher (hnd[timm]; --timm lists them): timm/resnet50.a1_in1k;
                        without .TAG timm's default tag; every form below applies to it:
                        timm/convnext_atto@stages.1-3ch
  TEACHER@POINT         the teacher cut after another split point: resnet18@layer3
                        (`hnd inspect TEACHER --split-points` lists them)
  TEACHER@POINT-<C>ch   a student: a generic bottleneck head with C channels replaces the teacher
                        up to POINT, the teacher's tail stays: resnet18@layer2-3ch
  TEACHER-<C>ch         the same at the default split point: mobilenet_v3_large-3ch
  <T>_head_mimic-ver<2b|1b>-<C>ch
                        the original's students of the papers' families (T: densenet121/169/201,
                        resnet50/101/152 with ver2b; inception_v3 with ver1b), any C > 0;
                        T@<official point>-<C>ch names the same student
  <student>-entropic    that student with a learned entropy model, sent range-coded
                        (--method entropic; hnd edge --compress entropy): resnet18-3ch-entropic

The default split point of a paper family's teacher is the official one (densenet: transition2,
resnet: layer2, inception_v3: maxpool2); of any other teacher, the end of its last stage at
stride 8 (resnet18: layer2, mobilenet_v3_large: features.6, efficientnet_b0: features.3), which
gives the papers' bottleneck of 1.7% of the input at 3 channels. A user's own nn.Module becomes a
teacher in Python with hnd.register_teacher(name, module, input_size=...).
"""


def _models_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--all", action="store_true", help="also every torchvision image classifier (all are teachers)")
    p.add_argument("--timm", action="store_true",
                   help="also every timm model with pretrained weights, as timm/NAME (needs hnd[timm])")
    p.add_argument("--json", action="store_true", help="print JSON")


def cmd_models(args: argparse.Namespace) -> None:
    from hnd.registry import list_models

    if args.timm:
        from hnd.timm_teachers import installed
        if not installed():
            raise HndError('hnd models --timm needs timm, an optional extra: pip install "hnd[timm]"')
    rows = list_models(all_teachers=args.all, timm=args.timm)
    if args.json:
        _print_json(rows)
        return
    for row in rows:
        mark = " (paper)" if row["official"] else ""
        print(f"{row['kind']:8s} {row['name']}{mark}")
    print("students of any teacher: TEACHER@POINT-<C>ch, e.g. resnet18@layer2-3ch (`hnd models --help`)")
    if not args.all:
        print("every torchvision image classifier is a teacher: `hnd models --all`")
    if not args.timm:
        print("so is every timm model, named timm/NAME[.TAG]: `hnd models --timm`")


def _fmt_shape(shape) -> str:
    return "x".join(str(s) for s in shape)


def _print_split_points(spec) -> None:
    from hnd.analysis import split_point_rows

    rows = split_point_rows(spec)
    print(f"split points of {spec.teacher.name} at input 3x{spec.input_size}x{spec.input_size} "
          f"(default {spec.as_teacher().split_point if not spec.is_student else spec.split_point}):")
    print(f"{'point':48s} {'kind':7s} {'output':>13s} {'bytes fp32':>11s} {'int8':>9s} {'% input':>8s} "
          f"{'cum. MACs':>15s} {'% MACs':>7s}")
    for r in rows:
        print(f"{r.name:48s} {r.kind:7s} {_fmt_shape(r.output_shape):>13s} {r.bytes():11,} {r.bytes('int8'):9,} "
              f"{r.pct_of_input:8.2f} {r.cum_macs:15,} {r.pct_macs:7.2f}")


def _inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="teacher or student name (see `hnd models --help`)")
    p.add_argument("--split-point", help="teachers only: point after which to split (default: the name's)")
    p.add_argument("--split-points", action="store_true",
                   help="list the teacher's valid split points with output shape, bytes and cumulative MACs")
    p.add_argument("--json", action="store_true", help="print JSON")


def cmd_inspect(args: argparse.Namespace) -> None:
    from hnd.analysis import analyze, split_point_rows
    from hnd.registry import resolve

    spec = resolve(args.name)
    if args.split_points:
        if args.json:
            _print_json({"model": str(spec), "split_points": [r.to_dict() for r in split_point_rows(spec)]})
        else:
            _print_split_points(spec)
        return
    if args.split_point and spec.is_student:
        raise HndError(f"--split-point applies to teachers; {spec} is a student (name its point: "
                       f"{spec.teacher.name}@POINT-{spec.channels}ch)")
    analysis = analyze(spec, args.split_point)
    if args.json:
        _print_json({"model": str(spec), **analysis.to_dict()})
        return
    s = analysis.summary
    print(f"{s.model} ({s.kind} of {s.teacher}), input {_fmt_shape(s.input_shape)}, split after {s.split_point}")
    print(f"  params {s.params:,}  MACs {s.macs:,}")
    print(f"  head     params {s.head_params:,}  MACs {s.head_macs:,}  output {_fmt_shape(s.head_output_shape)}")
    device_part = "encoder" if s.kind == "student" else "head"
    print(f"  device   params {s.encoder_params:,}  MACs {s.encoder_macs:,}  ({device_part})")
    print(f"  tail     params {s.tail_params:,}  MACs {s.tail_macs:,}")
    b = s.bottleneck_bytes
    print(f"  sent     {_fmt_shape(s.bottleneck_shape)} = {s.bottleneck_pct_of_input:.3f}% of the input; "
          f"bytes fp32 {b['fp32']:,} fp16 {b['fp16']:,} int8 {b['int8']:,}")
    print(f"\n{'layer':44s} {'type':18s} {'output':>13s} {'KiB fp32':>10s} {'params':>12s} "
          f"{'MACs':>15s} {'cum. MACs':>15s}")
    for r in analysis.rows:
        print(f"{r.name:44s} {r.type:18s} {_fmt_shape(r.output_shape):>13s} {r.bytes() / 1024:10.1f} "
              f"{r.params:12,} {r.macs:15,} {r.cum_macs:15,}")


def _predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="teacher or student name")
    p.add_argument("image", help="image file")
    p.add_argument("--checkpoint", help="original naive/KD/HND checkpoint or an hnd checkpoint")
    p.add_argument("--topk", type=int, help="classes to show (default 5, or every class if fewer)")
    p.add_argument("--logits", action="store_true", help="also print all logits")
    p.add_argument("--json", action="store_true", help="print JSON")


def cmd_predict(args: argparse.Namespace) -> None:
    from hnd.image_folders import load_image
    from hnd.inference import predict
    from hnd.models import create_model
    from hnd.registry import resolve

    spec = resolve(args.name)
    if args.topk is not None and args.topk < 1:
        raise HndError(f"--topk must be a positive integer, got {args.topk}")
    image = load_image(args.image)
    if spec.is_student and not args.checkpoint:
        raise HndError(f"{spec} is a student: give its weights with --checkpoint FILE "
                       "(an original naive/KD/HND checkpoint or an hnd checkpoint)")
    model = create_model(spec, checkpoint=args.checkpoint)
    x = model.spec.transforms()(image).unsqueeze(0)  # [1, 3, S, S] at the checkpoint's input size, if it records one
    pred = predict(model, x, args.topk)
    if args.json:
        doc = {"model": str(spec), "topk": [{"index": i, "prob": p} for i, p in pred.topk]}
        if args.logits:
            doc["logits"] = pred.logits
        _print_json(doc)
        return
    categories = spec.teacher.categories or []
    for rank, (i, p) in enumerate(pred.topk, 1):
        label = categories[i] if len(pred.logits) == len(categories) else ""
        print(f"{rank:2d}. {p:.4f}  #{i} {label}")
    if args.logits:
        print("logits:", " ".join(f"{v:.4f}" for v in pred.logits))


def _resolved_config(args: argparse.Namespace):
    from hnd.config import resolve_config
    from hnd.registry import resolve
    from hnd.training import resume_config

    spec = resolve(args.name)
    if getattr(args, "resume", False):
        return resume_config(args.out or _default_out(args), spec, args.method, args.config, args.overrides)
    return resolve_config(spec, args.method, args.config, args.overrides)


def _default_out(args: argparse.Namespace) -> str:
    return f"runs/{args.method}/{args.name}"


def _config_arguments(p: argparse.ArgumentParser) -> None:
    _add_run_arguments(p)


def cmd_config(args: argparse.Namespace) -> None:
    from hnd.config import dump_config

    sys.stdout.write(dump_config(_resolved_config(args)))


def _train_arguments(p: argparse.ArgumentParser) -> None:
    _add_run_arguments(p)
    p.add_argument("--data", required=True, help="image folder with train/<class>/ and val/<class>/")
    p.add_argument("--out", help="run folder (default runs/METHOD/NAME)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def cmd_train(args: argparse.Namespace) -> None:
    from hnd.training import fit

    config = _resolved_config(args)
    out = args.out or _default_out(args)
    result = fit(config, args.data, out, resume=args.resume, progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) == 0:
        test = result["test"]
        coded = f", {test['bytes_per_image']:.1f} bytes per image" if test.get("bytes_per_image") is not None else ""
        print(f"{config.method} {config.model}: best epoch {result['best_epoch']} "
              f"(selection top-1 {result['select_top1']:.2f}%); test top-1 {test['top1']:.2f}% "
              f"top-5 {test['top5']:.2f}% on {test['images']} images{coded}; {result['checkpoint']}")


def _evaluate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="the checkpoint's model name")
    p.add_argument("--method", required=True, help=METHODS_HELP)
    p.add_argument("--checkpoint", required=True, help="original naive/KD/HND checkpoint or an hnd checkpoint")
    p.add_argument("--data", required=True, help="image folder with val/<class>/")
    p.add_argument("--student-only", action="store_true", help="skip the teacher")
    p.add_argument("--batch-size", type=int, default=50, help="default 50, as the original's test batch")
    p.add_argument("--workers", type=int, default=-1, help="data-loading processes (default min(cpus, 8))")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print JSON")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from hnd.evaluation import evaluate_checkpoint
    from hnd.registry import resolve

    result = evaluate_checkpoint(resolve(args.name), args.method, args.checkpoint, args.data,
                                 student_only=args.student_only, batch_size=args.batch_size,
                                 num_workers=args.workers, device=args.device,
                                 progress=not args.no_progress and not args.json)
    if args.json:
        _print_json(result)
        return
    print(f"{result['model']} ({result['format']}, {result['method']}) on {result['data']}")
    for who in ("student", "teacher"):
        acc = result[who]
        if acc:
            label = "model" if who == "student" else "teacher"
            coded = (f", {acc['bytes_per_image']:.1f} bytes per image range-coded one at a time"
                     if acc.get("bytes_per_image") is not None else "")
            print(f"  {label:8s} top-1 {acc['top1']:.2f}%  top-5 {acc['top5']:.2f}%  ({acc['images']} images{coded})")


def _data_synth_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="new folder to create")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--train-per-class", type=int, default=100)
    p.add_argument("--val-per-class", type=int, default=20)
    p.add_argument("--image-size", type=int, default=72)
    p.add_argument("--seed", type=int, default=0)


def cmd_data_synth(args: argparse.Namespace) -> None:
    from hnd.synth import write_synthetic_dataset

    summary = write_synthetic_dataset(args.out, classes=args.classes, train_per_class=args.train_per_class,
                                      val_per_class=args.val_per_class, image_size=args.image_size,
                                      seed=args.seed)
    print(f"wrote {summary['root']}: {len(summary['classes'])} classes, "
          + ", ".join(f"{split} {n}" for split, n in summary["counts"].items()) + " images")


def _print_layout(layout) -> None:
    counts = ", ".join(f"{split} {n} images" for split, n in layout.counts().items())
    print(f"{layout.root}: {len(layout.classes)} classes, {counts}")


def _data_check_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("root")
    p.add_argument("--verify", action="store_true", help="open every image and list unreadable ones")
    p.add_argument("--json", action="store_true", help="print JSON")


def cmd_data_check(args: argparse.Namespace) -> None:
    from hnd.image_folders import check_layout, load_image

    layout = check_layout(args.root)
    bad = []
    if args.verify:
        for items in layout.samples.values():
            for path, _ in items:
                try:
                    load_image(path)
                except HndError as exc:
                    bad.append(str(exc))
    if args.json:
        _print_json({"root": str(layout.root), "classes": layout.classes, "counts": layout.counts(),
                     "unreadable": bad})
    else:
        _print_layout(layout)
        for line in bad:
            print(f"  {line}")
    if bad:
        raise HndError(f"{len(bad)} unreadable images; delete them or train with skip_bad_images=true")


def _data_imagenet_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", help="folder holding the three ILSVRC2012 archives")


def cmd_data_imagenet(args: argparse.Namespace) -> None:
    from hnd.data import prepare_imagenet

    _print_layout(prepare_imagenet(args.root))


# The command-line flag of each job option (hnd.book.cells.JOB_OPTIONS) that `hnd book run` takes.
_JOB_FLAGS = {
    "partition": ("--partition", {"help": "Slurm partition"}),
    "gpus": ("--gpus-per-job", {"type": int, "help": "GPUs per cell; more than one trains under torchrun"}),
    "cpus": ("--cpus-per-job", {"type": int, "help": "CPUs per cell (data loading, torch threads)"}),
    "time": ("--time", {"help": "time limit per job: minutes, HH:MM:SS or D-HH:MM:SS (default 1440)"}),
    "account": ("--account", {"help": "Slurm account to charge"}),
    "mem": ("--mem", {"help": "memory per job, e.g. 64G"}),
    "sbatch": ("--sbatch", {"action": "append", "metavar": "FLAG",
                            "help": "extra sbatch flag, e.g. --sbatch=--qos=high (repeatable)"}),
}


def _book_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="cpu", help="smoke | cpu | paper (notebooks/profiles/*.yaml; default cpu)")
    p.add_argument("--only", metavar="PATTERN", help="run only cells whose id matches (glob or substring)")
    p.add_argument("--jobs", type=int, help="cells run at once (default: the profile's, else 1)")
    p.add_argument("--data", help="dataset root (required by the paper profile; default: the profile's)")
    p.add_argument("--out", help="runs folder (default runs/book/PROFILE)")
    p.add_argument("--full", action="store_true", help="allow a full-scale (GPU) profile such as paper")
    jobs = p.add_argument_group("cluster jobs", "one job per cell through submitit; these override the "
                                "profile's slurm options")
    jobs.add_argument("--executor", choices=EXECUTORS,
                      help="run each cell as a Slurm job, or as a local submitit job (default: from this command)")
    for key, (flag, options) in _JOB_FLAGS.items():
        jobs.add_argument(flag, dest=f"job_{key}", **{"metavar": flag[2:].replace("-", "_").upper(), **options})
    jobs.add_argument("--poll", type=float, help="seconds between looks at the jobs (default 30 on Slurm, 1 local)")


def cmd_book_run(args: argparse.Namespace) -> int:
    from hnd.book.grid import run_grid, summary_table

    options = {key: getattr(args, f"job_{key}") for key in _JOB_FLAGS}
    options = {key: value for key, value in options.items() if value is not None}
    if args.executor is None and options:
        raise HndError(f"{', '.join(_JOB_FLAGS[k][0] for k in options)} only apply to jobs; add --executor slurm or "
                       "--executor local")
    try:
        summaries = run_grid(args.profile, runs=args.out, only=args.only, jobs=args.jobs, data=args.data,
                             full=args.full, executor=args.executor, job_options=options, poll=args.poll,
                             log=lambda line: print(line, flush=True))  # also when sent to a file (nohup)
    except KeyboardInterrupt:
        if args.executor is None:
            raise
        print(f"\nhnd book run: stopped following the jobs; they go on. `hnd book status --profile {args.profile}` "
              "shows them; the same command follows them again", file=sys.stderr)
        return 130
    print(summary_table(summaries))
    return 1 if any(s["status"] != "done" for s in summaries) else 0


def _book_status_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="cpu", help="profile whose runs to show (default cpu)")
    p.add_argument("--runs", help="runs folder (default runs/book/PROFILE)")
    p.add_argument("--json", action="store_true", help="print JSON")


def cmd_book_status(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hnd.book.cluster import grid_status, status_table
    from hnd.book.grid import default_runs

    rows = grid_status(Path(args.runs) if args.runs else default_runs(Path("."), args.profile))
    if args.json:
        _print_json(rows)
    else:
        print(status_table(rows))
    return 1 if any(row["status"] == "failed" for row in rows) else 0


def _book_build_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="cpu", help="profile whose runs to render (default cpu)")
    p.add_argument("--runs", help="runs folder (default runs/book/PROFILE)")


def cmd_book_build(args: argparse.Namespace) -> int:
    from hnd.book.build import build_book

    return build_book(args.profile, runs=args.runs)


def _default_runs() -> str | None:
    """The cpu book's runs when ``./run.sh book`` has made them here, else none."""
    from pathlib import Path

    from hnd.book.grid import default_runs
    from hnd.book.results import GRID_FILE

    runs = default_runs(Path("."), "cpu")
    return str(runs) if (runs / GRID_FILE).is_file() else None


def _explore_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", help="book runs whose accuracies to show (default runs/book/cpu when it exists)")
    p.add_argument("--port", type=int, default=8866, help="port on 127.0.0.1 (default 8866)")


def cmd_explore(args: argparse.Namespace) -> int:
    from hnd.book.apps import explorer_command, serve

    runs = args.runs if args.runs is not None else _default_runs()
    if runs:
        from hnd.book.results import grid_cells

        grid_cells(runs)  # a folder without a grid is a one-line error here, not in the app
        print(f"explorer: accuracies from the runs in {runs}")
    command, env = explorer_command(args.port, runs)
    return serve("explorer", command, env, args.port)


def _lab_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--notebooks", default="notebooks", help="folder to serve (default notebooks)")
    p.add_argument("--port", type=int, default=8888, help="port on 127.0.0.1 (default 8888)")


def cmd_lab(args: argparse.Namespace) -> int:
    import secrets

    from hnd.book.apps import lab_command, serve

    token = os.environ.get("JUPYTER_TOKEN") or secrets.token_hex(16)
    command, env = lab_command(args.port, args.notebooks, token)
    return serve("JupyterLab", command, env, args.port, f"/lab?token={token}")


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:9.2f}"


def _plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="teacher name, e.g. densenet169")
    p.add_argument("--rate", type=float, required=True, help="data rate of the link, Mbit/s")
    p.add_argument("--rtt", type=float, default=0.0, help="round-trip time, ms (default 0)")
    p.add_argument("--device", default="this-machine", help="device profile name or file (default this-machine)")
    p.add_argument("--server", default="gpu-server", help="server profile name or file (default gpu-server)")
    p.add_argument("--channels", type=int, nargs="+", default=[3, 6, 9, 12], help="student bottleneck channels")
    p.add_argument("--formats", nargs="+", default=["fp32", "fp16", "int8"], help="student tensor formats")
    p.add_argument("--split-format", default="int8", help="tensor format of teacher splits (default int8)")
    p.add_argument("--lossless-ratio", type=float, help="measured zlib ratio (bytes after / before) on int8 bottlenecks")
    p.add_argument("--input-bytes", type=float, help="bytes of the offloaded input (default raw RGB)")
    p.add_argument("--images", metavar="DIR", help="measure the offloaded input: encode images found under DIR")
    p.add_argument("--codec", default="jpeg", help="with --images: jpeg | webp | png (default jpeg)")
    p.add_argument("--quality", type=int, default=75, help="with --images: codec quality 1-100 (default 75)")
    p.add_argument("--entropic", nargs="+", default=[], metavar="RUN",
                   help="finished entropic training runs (folders): plan their students with their measured bytes")
    p.add_argument("--input-size", type=int, help="image side (default the teacher's; entropic runs need theirs)")
    p.add_argument("--top", type=int, default=20, help="rows of the table (default 20; 0 for all)")
    p.add_argument("--json", action="store_true", help="print JSON")


def cmd_plan(args: argparse.Namespace) -> None:
    from hnd.devices import load_device_profile
    from hnd.latency import coded_student, crossovers, measure_input_codec, options, plan
    from hnd.registry import resolve

    spec = resolve(args.name).at_input_size(args.input_size)
    if spec.is_student:
        raise HndError(f"hnd plan takes a teacher (its students are planned with it), not the student {spec}; "
                       f"e.g. {spec.as_teacher()}")
    device, server = load_device_profile(args.device), load_device_profile(args.server)
    codec = measure_input_codec(spec, args.images, args.codec, args.quality) if args.images else None
    coded = [coded_student(run) for run in args.entropic]
    opts = options(spec, device, server, channels=args.channels, formats=args.formats,
                   lossless_ratio=args.lossless_ratio, input_bytes=args.input_bytes, split_format=args.split_format,
                   input_codec=codec, coded=coded)
    ranked = plan(opts, args.rate, args.rtt)
    cross = crossovers(opts, args.rtt)
    if args.json:
        _print_json({"teacher": str(spec), "rate_mbps": args.rate, "rtt_ms": args.rtt,
                     "device": device.name, "server": server.name,
                     "options": [{**o.to_dict(), "delay_s": d, "breakdown_s": o.breakdown(args.rate, args.rtt)}
                                 for o, d in ranked],
                     "crossovers": cross})
        return
    best, best_delay = ranked[0]
    print(f"{spec} at {args.rate:g} Mbit/s, RTT {args.rtt:g} ms; device {device.name}, server {server.name}")
    print(f"best: {best.label}: {best_delay * 1e3:.2f} ms")
    shown = ranked if args.top <= 0 else ranked[:args.top]
    width = max(len(o.label) for o, _ in shown)
    print(f"\n{'#':>3s} {'option':{width}s} {'delay ms':>9s} {'device':>9s} {'encode':>9s} {'transfer':>9s} "
          f"{'rtt':>9s} {'server':>9s} {'bytes':>10s} {'top-1 %':>8s}")
    for rank, (o, d) in enumerate(shown, 1):
        b = o.breakdown(args.rate, args.rtt)
        acc = f"{o.accuracy:8.2f}" if o.accuracy is not None else f"{'-':>8s}"
        print(f"{rank:3d} {o.label:{width}s} {_ms(d)} {_ms(b['device'])} {_ms(b['encode'])} {_ms(b['transfer'])} "
              f"{_ms(b['rtt'])} {_ms(b['server'])} {o.bytes:10,.0f} {acc}")
    if len(shown) < len(ranked):
        print(f"... {len(ranked) - len(shown)} more (--top 0 shows all)")
    print(f"\nbest option by data rate (0.1 to 1000 Mbit/s, RTT {args.rtt:g} ms):")
    if not cross:
        print(f"  {best.label} throughout")
    for c in cross:
        print(f"  at {c['rate_mbps']:10.3f} Mbit/s: {c['from']} -> {c['to']}")


def _profile_device_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="+", metavar="MODEL", help="teachers, students or mobilenet_v2")
    p.add_argument("--out", required=True, help="profile file to write (.yaml or .json)")
    p.add_argument("--name", default="this-machine", help="profile name (default this-machine)")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per layer (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs per layer first (default 5)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default torch's)")


def cmd_profile_device(args: argparse.Namespace) -> None:
    from hnd.devices import measure_device_profile, save_device_profile

    profile = measure_device_profile(args.models, repeats=args.repeats, warmup=args.warmup, threads=args.threads,
                                     name=args.name)
    save_device_profile(profile, args.out)
    layers = sum(len(t) for t in profile.layer_seconds.values())
    print(f"wrote {args.out}: {profile.name}, {layers} layers of {len(profile.layer_seconds)} models, "
          f"{profile.macs_per_s:.3g} MACs/s, int8 encoding {profile.encode_bytes_per_s:.3g} bytes/s")


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="student name")
    p.add_argument("--part", required=True, choices=["encoder", "server"],
                   help="encoder (image -> z, edge) or server (z -> logits)")
    p.add_argument("--format", default="onnx", choices=["onnx"], help="file format (onnx)")
    p.add_argument("--checkpoint", help="weights to export (default: the pretrained student)")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    p.add_argument("--out", required=True, help="file to write")


def cmd_export(args: argparse.Namespace) -> None:
    from hnd.export import export_onnx
    from hnd.models import create_student

    model = create_student(args.name, checkpoint=args.checkpoint)
    done = export_onnx(model, args.part, args.out, opset=args.opset)
    print(f"wrote {done.path}: {model.spec} {args.part}, {done.size_bytes / 1e6:.2f} MB; "
          f"onnxruntime vs PyTorch max abs diff {done.max_abs_diff:.2e} (batch {done.batch})"
          + (f"; beside it {done.path.with_suffix('.json').name}: what the device needs besides the file"
             if args.part == "encoder" else ""))


_RANDOM_SEED = 0  # --random-weights: the same weights in the server and the edge process


def _split_student(args: argparse.Namespace, spec):
    """The student of `serve` and `edge`: from --checkpoint (its own input size), or random."""
    from hnd.models import create_student

    if not args.checkpoint and not args.random_weights:
        raise HndError(f"give the weights of {spec} with --checkpoint FILE (the same file on the server "
                       "and the edge device), or --random-weights for a test")
    if args.checkpoint:
        return create_student(spec, checkpoint=args.checkpoint)
    return create_student(spec, random_seed=_RANDOM_SEED)


def _serve_security(args: argparse.Namespace) -> dict:
    """TLS and tokens for `hnd serve`; off loopback both are required unless --insecure."""
    import ipaddress

    if bool(args.tls_cert) != bool(args.tls_key):
        raise HndError("TLS needs both --tls-cert and --tls-key")
    out = {}
    if args.tls_cert:
        from hnd.tls import server_context

        out["ssl_context"] = server_context(args.tls_cert, args.tls_key)
    if args.token_file:
        from hnd.access import TokenFile

        out["tokens"] = TokenFile(args.token_file)
    try:
        loopback = args.host == "localhost" or ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and not (out.get("ssl_context") and out.get("tokens")) and not args.insecure:
        raise HndError(f"serving on {args.host} would let anyone who reaches the port use the model and read the "
                       "answers: add --tls-cert, --tls-key and --token-file, or --insecure on a trusted network")
    return out


def _serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="student name")
    p.add_argument("--checkpoint", help="the student's weights (any supported checkpoint format)")
    p.add_argument("--random-weights", action="store_true", help="fixed random weights instead (tests)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="TCP port (default 8765; 0 picks a free one)")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    p.add_argument("--max-batch", type=int, default=8, help="images decoded together at most (default 8)")
    p.add_argument("--max-wait-ms", type=float, default=5.0,
                   help="wait after a request for others to batch with it (default 5)")
    p.add_argument("--topk", type=int, default=5, help="classes in each answer (default 5)")
    p.add_argument("--input-size", type=int, help="image side the edge devices encode (default the model's)")
    p.add_argument("--max-frame-bytes", type=int, help="largest request accepted (default 16 MiB)")
    p.add_argument("--tls-cert", metavar="FILE", help="serve TLS 1.3 with this certificate chain (PEM)")
    p.add_argument("--tls-key", metavar="FILE", help="the certificate's private key (PEM)")
    p.add_argument("--token-file", metavar="FILE",
                   help="client tokens, one per line, re-read when the file changes; clients must present one")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --host without TLS and tokens (a trusted network only)")
    p.add_argument("--max-connections", type=int, default=256,
                   help="open connections at most (with tokens: authorized ones); more get a busy error "
                        "(default 256)")
    p.add_argument("--max-pending", type=int, default=64,
                   help="with tokens: connections still owing their hello at most (default 64)")
    p.add_argument("--hello-timeout", type=float, default=5.0,
                   help="with tokens: seconds for the whole hello frame to arrive (default 5)")
    p.add_argument("--max-queue", type=int, help="requests waiting at most; more get a busy error "
                                                 "(default 4 x --max-batch)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on 127.0.0.1:PORT/metrics")
    p.add_argument("--drain-timeout", type=float, default=30.0,
                   help="on SIGTERM/SIGINT, seconds to finish the requests in flight (default 30)")


def cmd_serve(args: argparse.Namespace) -> None:
    import logging

    from hnd.registry import resolve
    from hnd.serving import serve

    spec = resolve(args.name)
    model = _split_student(args, spec)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    serve_options = {"device": args.device, "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms,
                     "topk": args.topk, "input_size": args.input_size, "max_connections": args.max_connections,
                     "max_queue": args.max_queue, "max_pending": args.max_pending,
                     "hello_timeout_s": args.hello_timeout}
    if args.max_frame_bytes:
        serve_options["max_frame_bytes"] = args.max_frame_bytes
    serve_options.update(_serve_security(args))
    serve(model, host=args.host, port=args.port, ready=lambda line: print(line, flush=True),
          metrics_port=args.metrics_port, drain_timeout_s=args.drain_timeout, **serve_options)


def _tls_cert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="folder for cert.pem and key.pem")
    p.add_argument("--name", action="append", help="DNS name or IP address the certificate is for "
                                                   "(repeatable; default localhost and 127.0.0.1)")
    p.add_argument("--days", type=int, default=30, help="validity in days (default 30)")


def cmd_tls_cert(args: argparse.Namespace) -> None:
    from hnd.tls import make_self_signed

    cert, key = make_self_signed(args.out, tuple(args.name or ("localhost", "127.0.0.1")), days=args.days)
    print(f"wrote {cert} and {key}: hnd serve --tls-cert {cert} --tls-key {key}; hnd edge --tls-ca {cert}")


def _edge_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="student name (the server's)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    p.add_argument("--server", required=True, help="HOST:PORT of `hnd serve`")
    p.add_argument("--checkpoint", help="the student's weights (the server's file)")
    p.add_argument("--onnx", metavar="FILE", help="the encoder exported by `hnd export --part encoder` (with its "
                                                  "sidecar .json): runs with onnxruntime, without torch")
    p.add_argument("--random-weights", action="store_true", help="the fixed random weights of `serve --random-weights`")
    p.add_argument("--input-size", type=int, help="image side to encode (default the checkpoint's; the server's "
                                                   "--input-size must agree)")
    p.add_argument("--bits", type=int, default=8, help="32 (fp32), 16 (fp16) or 8 (int8, default)")
    p.add_argument("--compress", choices=("none", "zlib", "entropy"), default="none",
                   help="zlib: with --bits 8, zlib the codes; entropy: range-code the bottleneck with an entropic "
                        "student's tables")
    p.add_argument("--rate-limit", type=float, metavar="MBPS", help="emulate a link of this many Mbit/s")
    p.add_argument("--tls", action="store_true", help="speak TLS, trusting the system's certificate authorities")
    p.add_argument("--tls-ca", metavar="FILE", help="speak TLS, trusting the certificates in FILE (PEM)")
    p.add_argument("--token-file", metavar="FILE", help="send the first token in FILE in a hello frame")
    p.add_argument("--retries", type=int, default=5, help="retries of a request the server answers busy (default 5)")
    p.add_argument("--json", action="store_true", help="print JSON")


def cmd_edge(args: argparse.Namespace) -> None:
    if args.bits not in (32, 16, 8):
        raise HndError(f"--bits must be 32, 16 or 8, got {args.bits}")
    if args.compress == "zlib" and args.bits != 8:
        raise HndError("--compress zlib applies to --bits 8 only (float tensors barely compress)")
    if args.compress == "entropy":
        fmt = "entropy"  # the student's own range coder; --bits does not apply
    else:
        fmt = {32: "fp32", 16: "fp16", 8: "int8"}[args.bits] + ("+zlib" if args.compress == "zlib" else "")
    link = {"rate_limit_mbps": args.rate_limit, "retries": args.retries}
    if args.tls_ca or args.tls:
        from hnd.tls import client_context

        link["ssl_context"] = client_context(args.tls_ca)
    if args.token_file:
        from hnd.access import read_token

        link["token"] = read_token(args.token_file)
    results = _edge_onnx(args, fmt, link) if args.onnx else _edge_torch(args, fmt, link)
    if args.json:
        _print_json(results)
        return
    for r in results:
        print(f"{r['image']}: {r['format']}, {r['bytes']:,} bytes on the wire ({r['payload_bytes']:,} payload), "
              f"server batch {r['batch']}")
        for rank, t in enumerate(r["topk"], 1):
            print(f"  {rank:2d}. {t['prob']:.4f}  #{t['index']}")
        print("  ms: " + "  ".join(f"{k[:-2].replace('_', ' ')} {r[k] * 1e3:.2f}" for k in
                                   ("encoder_s", "encode_s", "transfer_s", "server_queue_s", "server_compute_s",
                                    "total_s")))


def _edge_onnx(args: argparse.Namespace, fmt: str, link: dict) -> list[dict]:
    """`hnd edge --onnx`: the exported encoder with onnxruntime; torch is never imported."""
    from PIL import Image, UnidentifiedImageError

    from hnd.edge import OnnxEdge

    if args.checkpoint or args.random_weights or args.input_size:
        raise HndError("--onnx runs the exported encoder at its recorded size; drop --checkpoint, "
                       "--random-weights and --input-size")
    results = []
    with OnnxEdge(args.onnx, args.server, fmt, **link) as edge:
        if edge.bundle.model != args.name:
            raise HndError(f"{args.onnx} holds the encoder of {edge.bundle.model}, not {args.name}")
        for path in args.images:
            try:
                with Image.open(path) as image:
                    results.append({"image": path, **edge.classify(image)})
            except (OSError, UnidentifiedImageError):
                raise HndError(f"cannot read {path} as an image; use a file Pillow can open (JPEG, PNG, ...)") from None
    return results


def _edge_torch(args: argparse.Namespace, fmt: str, link: dict) -> list[dict]:
    """`hnd edge` with the student in PyTorch, from --checkpoint (its own input size) or random."""
    from hnd.data import image_tensor
    from hnd.registry import resolve
    from hnd.serving import EdgeClient

    model = _split_student(args, resolve(args.name))
    size = args.input_size or model.spec.input_size  # the checkpoint's, as `hnd serve` takes it
    images = [image_tensor(model.spec.at_input_size(size), path) for path in args.images]
    with EdgeClient(model, args.server, fmt, link.pop("rate_limit_mbps"), **link) as client:
        return [{"image": path, **client.classify(x)} for path, x in zip(args.images, images)]


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", help="the student's name, or the teacher's for --method ae or teacher")
    p.add_argument("--method", required=True, help=METHODS_HELP)
    p.add_argument("--config", help="YAML file of config keys applied over the official preset")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config keys, e.g. epochs=2 lr=0.01")


def _command(sub, arguments, handler, name: str, **options) -> argparse.ArgumentParser:
    """Add `hnd ... NAME` with the arguments that ``arguments`` declares, run by ``handler``."""
    p = sub.add_parser(name, **options)
    arguments(p)
    p.set_defaults(func=handler)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hnd", description="Head Network Distillation for split computing.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _command(sub, _models_arguments, cmd_models, "models",
             help="list teachers and students; --help explains model names", description="List teachers and students.",
             epilog=MODELS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    _command(sub, _inspect_arguments, cmd_inspect, "inspect",
             help="per-layer sizes, params and MACs of a model and its split")
    _command(sub, _predict_arguments, cmd_predict, "predict", help="classify one image in eval mode")
    _command(sub, _config_arguments, cmd_config, "config",
             help="print the resolved training config (official preset + overrides)")
    _command(sub, _train_arguments, cmd_train, "train",
             help="train a model with one of the methods (torchrun for several processes)")
    _command(sub, _evaluate_arguments, cmd_evaluate, "evaluate",
             help="top-1/top-5 of a checkpoint (and its teacher) on DATA/val")

    data = sub.add_parser("data", help="datasets: generate, check, prepare ImageNet")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    _command(dsub, _data_synth_arguments, cmd_data_synth, "synth",
             help="write the generated ImageFolder dataset (no download)")
    _command(dsub, _data_check_arguments, cmd_data_check, "check",
             help="check an image folder's layout (and, with --verify, every image)")
    _command(dsub, _data_imagenet_arguments, cmd_data_imagenet, "imagenet",
             help="extract the official ILSVRC2012 archives in ROOT into train/ and val/")

    book = sub.add_parser("book", help="run the book's notebooks over a profile's grid, build the book")
    bsub = book.add_subparsers(dest="book_command", required=True, metavar="ACTION")
    _command(bsub, _book_run_arguments, cmd_book_run, "run",
             help="execute every grid cell of a profile with papermill (resumable)")
    _command(bsub, _book_status_arguments, cmd_book_status, "status",
             help="each cell's state: planned, queued, running, done or failed (with the log's last line)")
    _command(bsub, _book_build_arguments, cmd_book_build, "build",
             help="render the finished notebooks with Jupyter Book into _build/html")

    _command(sub, _explore_arguments, cmd_explore, "explore",
             help="the split explorer as a web app on this machine (Voilà)")
    _command(sub, _lab_arguments, cmd_lab, "lab", help="JupyterLab on the book's notebooks, on this machine")
    _command(sub, _plan_arguments, cmd_plan, "plan",
             help="rank where to split a teacher's work at a data rate (latency model)")
    _command(sub, _profile_device_arguments, cmd_profile_device, "profile-device",
             help="measure this machine's per-layer batch-1 times into a profile")
    _command(sub, _serve_arguments, cmd_serve, "serve",
             help="run a student's decoder and tail as a server for edge devices")
    _command(sub, _tls_cert_arguments, cmd_tls_cert, "tls-cert",
             help="make a self-signed TLS certificate and key for hnd serve (trials, tests)")
    _command(sub, _edge_arguments, cmd_edge, "edge",
             help="classify images by running the encoder here and the rest on a server")
    _command(sub, _export_arguments, cmd_export, "export", help="write a student's edge encoder or server part as ONNX")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse cannot take positionals after options, so key=value pairs anywhere land here.
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        code = args.func(args)
    except HndError as exc:
        message = str(exc)
        if message.startswith("Caught "):  # re-raised from a DataLoader worker, with its traceback
            message = message.strip().splitlines()[-1].split("HndError: ", 1)[-1]
        print(f"hnd: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hnd: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `hnd inspect X | head`
        sys.stdout = None
        return 141
    return code or 0
