"""python -m mixpert_export build ...: the thin CLI over build.py. Errors a user can act on print one line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mixpert_train.errors import MixpertError


def load_model(args):
    """The model to export, and where it came from: --checkpoint, --weights, or --random-init."""
    from mixpert_train.backbones import REGISTRY, get_backbone
    from mixpert_train.model import MixpertConfig, build_model

    given = [x for x in ("checkpoint", "weights") if getattr(args, x)] + (["random-init"] if args.random_init else [])
    if len(given) > 1:
        raise MixpertError(f"pass one of --checkpoint, --weights, --random-init (got {', '.join('--' + g for g in given)})")
    if args.checkpoint:
        from mixpert_train.checkpoint import load_checkpoint

        model = load_checkpoint(args.checkpoint)
        if args.backbone and args.backbone != model.cfg.backbone.name:
            raise MixpertError(f"--checkpoint {args.checkpoint} is a {model.cfg.backbone.name} model, not --backbone {args.backbone}")
        return model, {"kind": "checkpoint", "path": str(Path(args.checkpoint).resolve())}
    if args.weights:
        from mixpert_train.weights import model_from_snapshot

        model = model_from_snapshot(args.weights, args.backbone, expert_layers=args.expert_layers)
        return model, {"kind": "weights", "path": str(Path(args.weights).resolve())}
    if not args.backbone:
        raise MixpertError("pass --backbone NAME (" + ", ".join(sorted(REGISTRY)) + "), or --weights DIR / --checkpoint DIR")
    bb = get_backbone(args.backbone)
    if not args.random_init and bb.name != "tiny":
        raise MixpertError(f"--backbone {bb.name} needs weights: --weights DIR (a local Hugging Face LLaVA-OneVision "
                           "snapshot), --checkpoint DIR (from python -m mixpert_train), or --random-init for shapes and latency")
    cfg = MixpertConfig.for_backbone(bb, expert_layers=args.expert_layers)
    return build_model(cfg, seed=args.seed), {"kind": "random-init", "seed": args.seed}


def cmd_build(args) -> int:
    from .build import build_bundle, compile_bundle, format_table, summary_rows

    targets = [t.strip().lower() for t in args.gpu_targets.split(",")] if args.gpu_targets else None
    if args.from_onnx:
        manifest = compile_bundle(args.from_onnx, args.out, gpu_targets=targets, progress=not args.quiet)
        out = Path(args.out or args.from_onnx)
    else:
        model, source = load_model(args)
        out = Path(args.out or f"engines/{model.cfg.backbone.name}")
        manifest = build_bundle(model, out, precision=args.precision, max_crops=args.max_crops, runtime=args.runtime,
                                gpu_targets=targets, source=source, progress=not args.quiet)
    print(format_table(["part", "file", "onnx", "export", "validation (vs torch fp32)", "engine"], summary_rows(manifest)))
    trt = manifest.get("tensorrt")
    print(f"\nbundle: {out}  ({manifest['precision']}, max {manifest['max_crops']} crops a call, "
          f"engines: {trt['flavour'] + ' ' + trt['version'] if trt else 'none (ONNX Runtime only)'}, "
          f"peak RSS {manifest.get('peak_rss_mb', 0):.0f} MiB)")
    if args.json:
        Path(args.json).write_text(json.dumps(manifest, indent=2))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mixpert_export", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="export ONNX parts, validate them against torch, build TensorRT engines")
    b.add_argument("--backbone", help="registry name: tiny, llava-ov-7b (optional with --weights/--checkpoint)")
    src = b.add_argument_group("source (one of)")
    src.add_argument("--weights", help="local Hugging Face LLaVA-OneVision snapshot directory")
    src.add_argument("--checkpoint", help="Mixpert checkpoint directory written by mixpert_train")
    src.add_argument("--random-init", action="store_true", help="random weights: architecture only (shapes, latency)")
    src.add_argument("--from-onnx", metavar="DIR", help="compile the engines of an exported bundle (device compile)")
    b.add_argument("--out", help="bundle directory (default engines/<backbone>)")
    b.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16", "int8"])
    b.add_argument("--max-crops", type=int, help="crops a call at most (default 4 images x max crops an image)")
    b.add_argument("--runtime", default="auto", choices=["auto", "onnxruntime", "tensorrt"],
                   help="auto: ONNX always, TensorRT engines too where tensorrt or tensorrt_rtx is installed")
    b.add_argument("--gpu-targets", help="TensorRT-RTX targets: sm80,sm86,sm89,sm120 or current")
    b.add_argument("--expert-layers", type=int, help="k, the expert depth (default: the backbone's, 2)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--json", help="also write the manifest here")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.set_defaults(func=cmd_build)
    args = p.parse_args(argv)
    try:
        return args.func(args)
    except MixpertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written (the bundle is built in a temporary directory)", file=sys.stderr)
        return 130
    except OSError as e:
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
