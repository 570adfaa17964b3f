"""Command line: ``hnd models | inspect | predict``. ``--json`` prints one JSON document."""

from __future__ import annotations

import argparse
import json
import sys

from hnd.errors import HndError


def _print_json(doc: object) -> None:
    json.dump(doc, sys.stdout, indent=1)
    sys.stdout.write("\n")


def cmd_models(args: argparse.Namespace) -> None:
    from hnd.models import list_models

    rows = list_models()
    if args.json:
        _print_json(rows)
        return
    for row in rows:
        mark = " (paper)" if row["official"] else ""
        print(f"{row['kind']:8s} {row['name']}{mark}")
    print("students take any positive channel count: <teacher>_head_mimic-ver<2b|1b>-<C>ch")


def _fmt_shape(shape) -> str:
    return "x".join(str(s) for s in shape)


def cmd_inspect(args: argparse.Namespace) -> None:
    from hnd.analysis import analyze

    analysis = analyze(args.name, args.split_point)
    if args.json:
        _print_json({"model": args.name, **analysis.to_dict()})
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


def cmd_predict(args: argparse.Namespace) -> None:
    from hnd.checkpoints import load_model
    from hnd.data import image_tensor
    from hnd.inference import predict
    from hnd.models import build_model, resolve
    from hnd.teachers import teacher_spec

    teacher, student = resolve(args.name)
    if args.topk < 1:
        raise HndError(f"--topk must be a positive integer, got {args.topk}")
    x = image_tensor(args.name, args.image)
    if args.checkpoint:
        model = load_model(args.name, args.checkpoint)
    elif student is None:
        model = build_model(args.name, pretrained=True)
    else:
        raise HndError(f"{args.name} is a student: give its weights with --checkpoint FILE "
                       "(an original naive/KD/HND checkpoint or an hnd checkpoint)")
    pred = predict(model, x, args.topk)
    if args.json:
        doc = {"model": args.name, "topk": [{"index": i, "prob": p} for i, p in pred.topk]}
        if args.logits:
            doc["logits"] = pred.logits
        _print_json(doc)
        return
    categories = teacher_spec(teacher).weights.meta["categories"]
    for rank, (i, p) in enumerate(pred.topk, 1):
        label = categories[i] if len(pred.logits) == len(categories) else ""
        print(f"{rank:2d}. {p:.4f}  #{i} {label}")
    if args.logits:
        print("logits:", " ".join(f"{v:.4f}" for v in pred.logits))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hnd", description="Head Network Distillation for split computing.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("models", help="list teachers and students")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("inspect", help="per-layer sizes, params and MACs of a model and its split")
    p.add_argument("name", help="teacher or student name (see `hnd models`)")
    p.add_argument("--split-point", help="teachers only: stage after which to split (default: official)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("predict", help="classify one image in eval mode")
    p.add_argument("name", help="teacher or student name")
    p.add_argument("image", help="image file")
    p.add_argument("--checkpoint", help="original naive/KD/HND checkpoint or an hnd checkpoint")
    p.add_argument("--topk", type=int, default=5, help="classes to show (default 5)")
    p.add_argument("--logits", action="store_true", help="also print all logits")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_predict)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except HndError as exc:
        print(f"hnd: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hnd: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `hnd inspect X | head`
        sys.stdout = None
        return 141
    return 0
