"""python -m mixpert_export build ...: the thin CLI over build.py. Errors a user can act on print one line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mixpert_train.errors import MixpertError


PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8", "int8-dynamic")  # bundle.build.PRECISIONS (a test keeps them equal)


def load_model(args):
    from .bundle.sources import resolve

    return resolve(args.backbone, args.checkpoint, args.weights, args.random_init, args.expert_layers, args.seed)


def cmd_build(args) -> int:
    from .bundle.build import build_bundle, check_gpu_targets, compile_bundle, format_table, summary_rows
    from .bundle.quantize import PRECISIONS as CALIBRATED, calibration_split

    targets = [t.strip().lower() for t in args.gpu_targets.split(",")] if args.gpu_targets else None
    check_gpu_targets(targets, "tensorrt" if args.from_onnx else args.runtime, args.precision)  # before loading weights
    if args.precision in CALIBRATED and not args.from_onnx:
        calibration_split(args.calibration)  # likewise: a missing or thin --calibration is one line, now
    elif args.calibration:
        raise MixpertError(f"--calibration {args.calibration}: only --precision int8 or fp8 calibrates; drop it")
    if args.quantize and (args.precision not in CALIBRATED or args.from_onnx):
        raise MixpertError(f"--quantize {args.quantize}: only --precision int8 or fp8 builds choose what is quantised; drop it")
    if args.from_onnx:
        manifest = compile_bundle(args.from_onnx, args.out, gpu_targets=targets, progress=not args.quiet)
        out = Path(args.out or args.from_onnx)
    else:
        from mixpert_train.staging import check_target

        from .bundle.manifest import BUNDLE

        if args.out:  # refuse a bad --out before loading weights (the default is known only after)
            check_target(args.out, BUNDLE, sources={f: p for f, p in (("--weights", args.weights),
                                                                      ("--checkpoint", args.checkpoint)) if p})
        model, source = load_model(args)
        out = Path(args.out or f"engines/{model.cfg.backbone.name}")
        manifest = build_bundle(model, out, precision=args.precision, max_crops=args.max_crops, runtime=args.runtime,
                                gpu_targets=targets, source=source, progress=not args.quiet, calibration=args.calibration,
                                quantize=args.quantize or "all")
    print(format_table(["part", "file", "onnx", "export", "validation (vs torch fp32)", "engine"], summary_rows(manifest)))
    trt = manifest.get("tensorrt")
    from mixpert_train.families import adapter_for

    from .bundle.manifest import bundle_config

    unit = adapter_for(bundle_config(manifest).backbone).rows
    print(f"\nbundle: {out}  ({manifest['precision']}, max {manifest['max_crops']} {unit} a call, "
          f"engines: {trt['flavour'] + ' ' + trt['version'] if trt else 'none (ONNX Runtime only)'}, "
          f"peak RSS {manifest.get('peak_rss_mb', 0):.0f} MiB)")
    if args.json:
        Path(args.json).write_text(json.dumps(manifest, indent=2))
    return 0


def cmd_run(args) -> int:
    import numpy as np

    from mixpert_train.preprocess import image_paths

    from .bundle.build import format_table
    from .runtime.pipeline import MixpertPipeline

    pipe = MixpertPipeline.from_engines(args.engines, runtime=args.runtime, device=args.device, strategy=args.strategy,
                                        tau=args.tau, lam=args.lam, per_crop=args.per_crop,
                                        preprocess_device=args.preprocess_device, packed=args.packed)
    results = list(pipe.map(image_paths(args.images), workers=args.workers))
    domains = pipe.cfg.domains
    rows = []
    for r in results:
        if not r.ok:
            rows.append([r.source, "ERROR", r.error, "", "", ""])
            continue
        s = np.asarray(r.scores, dtype=float).reshape(-1, len(domains)).mean(0)
        top = " ".join(f"{domains[i]}={s[i]:.2f}" for i in np.argsort(-s)[:2])
        expert = r.expert if isinstance(r.expert, str) else ",".join(r.expert)
        margin = r.margin if isinstance(r.margin, float) else float(np.mean(r.margin))
        rows.append([r.source, expert, top, f"{margin:.3f}", str(r.crops), f"{r.latency_ms:.1f} ms"])
    print(format_table(["image", "expert", "top scores", "margin", "crops", "latency (batch)"], rows))
    d = pipe.describe()
    print(f"\n{d['backend']['runtime']} {d['backend']['version']} on {d['backend']['device']}, "
          f"{d['strategy']} (tau={d['tau']}, lam={d['lam']}){', per-crop' if d['per_crop'] else ''}; "
          f"preprocessing: {d['preprocess']['path']} on {d['preprocess']['device']}")
    if args.json:
        _atomic_write(Path(args.json), json.dumps([r.record() for r in results], indent=2).encode())
    if args.save_features:
        import io

        buf = io.BytesIO()
        arrays = {str(r.index): r.embeddings if args.packed else r.tokens for r in results if r.ok}
        # Qwen3-VL: each image's DeepStack features [taps, L, D_llm] beside its tokens, as "<index>_deepstack"
        arrays |= {f"{r.index}_deepstack": r.deepstack for r in results if r.ok and r.deepstack is not None}
        np.savez(buf, **arrays)
        _atomic_write(Path(args.save_features), buf.getvalue())
    return 0 if all(r.ok for r in results) else 1


def cmd_serve(args) -> int:
    from .serving.serve import serve

    return serve(args)


def cmd_ask(args) -> int:
    from mixpert_train.errors import require_device

    from .runtime.pipeline import MixpertPipeline
    from .serving.ask import LanguageModel, ask

    from mixpert_train.weights import read_snapshot_config

    if args.llm_device:  # before minutes of loading engines and a 7B LLM
        require_device("--llm-device", args.llm_device, "run on a host with a CUDA GPU, or drop --llm-device (the CPU)")
    read_snapshot_config(args.llm, "--llm")  # likewise: a wrong --llm is one line naming --llm
    pipe = MixpertPipeline.from_engines(args.engines, runtime=args.runtime, device=args.device, strategy=args.strategy,
                                        tau=args.tau, packed=True)
    llm = LanguageModel.from_snapshot(args.llm, device=args.llm_device or "cpu")
    a = ask(pipe, llm, args.image, args.question, args.max_new_tokens)
    if args.json:
        print(json.dumps(a.record()))
        return 0
    scores = " ".join(f"{d}={s:.2f}" for d, s in zip(pipe.cfg.domains, a.scores))
    print(a.text)
    print(f"\nexpert {a.expert} (margin {a.margin:.3f}; {scores}); {a.image_positions} image embeddings in a "
          f"{a.prompt_tokens}-token prompt; vision {a.vision_ms:.0f} ms, LLM {a.llm_ms:.0f} ms")
    return 0


def cmd_triton(args) -> int:
    from .serving.triton_repo import write_repository

    per = {}
    for item in filter(None, (args.expert_instances or "").split(",")):
        name, _, n = item.partition("=")
        if not n.isdigit():
            raise MixpertError(f"--expert-instances {args.expert_instances!r}: expected name=count[,name=count]")
        per[name.strip()] = int(n)
    out = write_repository(args.engines, args.out, platform=args.platform, kind=args.kind, instances=args.instances,
                           expert_instances=per, max_batch_size=args.max_batch_size, packed=args.packed)
    for model in sorted(p.name for p in Path(out).iterdir() if p.is_dir()):
        cfg = (Path(out) / model / "config.pbtxt").read_text()
        plat = next((l.split(":", 1)[1].strip().strip('"') for l in cfg.splitlines()
                     if l.startswith(("platform", "backend"))), "?")
        print(f"{model:28s} {plat}")
    print(f"\nmodel repository: {out}  (tritonserver --model-repository {out})")
    return 0


def cmd_triton_start(args) -> int:
    from .serving.triton_repo import start_local

    return start_local(args.repository, args.host, {"http": args.http_port, "grpc": args.grpc_port,
                                                    "metrics": args.metrics_port}, args.verbose)


def _atomic_write(path: Path, data: bytes):
    import os

    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors naming the command the user typed (a mistyped `build` flag is `build`'s
    error, not the top-level usage), and a close match for a mistyped flag."""

    def error(self, message: str):
        import difflib

        if message.startswith("unrecognized arguments:"):
            flags = [o for a in self._actions for o in a.option_strings]
            for word in message.split(":", 1)[1].split():
                close = difflib.get_close_matches(word.split("=")[0], flags, n=1)
                if word.startswith("-") and close:
                    message += f" (did you mean {close[0]}?)"
                    break
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def unit_interval(flag: str):
    """argparse type for a routing threshold: a probability or a difference of two, so within [0, 1]."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not 0.0 <= v <= 1.0:
            raise argparse.ArgumentTypeError(f"{text} is outside [0, 1]: {ROUTING_RANGE[flag]}")
        return v
    return parse


ROUTING_RANGE = {"--tau": "top1 - top2 of softmax scores lies in [0, 1] (0: always the top expert, 1: every image to versatile)",
                 "--lam": "the top softmax score lies in [0, 1] (0: always the top expert, 1: every image to versatile)"}


def registry_help() -> tuple[str, str]:
    """--backbone and --weights help from the registry and the family adapters (no list kept by hand)."""
    from mixpert_train.backbones import REGISTRY
    from mixpert_train.families import ADAPTERS

    types = ", ".join(t for ad in ADAPTERS.values() for t in ad.config_types)
    return (f"registry name: {', '.join(REGISTRY)} (optional with --weights/--checkpoint)",
            f"local Hugging Face snapshot directory of an MLLM (config.json model_type {types}); only its vision tower "
            "and projector tensors are read")


def main(argv=None) -> int:
    from . import __version__

    p = Parser(prog="python -m mixpert_export", description=__doc__)
    p.add_argument("--version", action="version", version=f"mixpert-deploy {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=Parser)
    backbone_help, weights_help = registry_help()
    b = sub.add_parser("build", help="export ONNX parts, validate them against torch, build TensorRT engines")
    b.add_argument("--backbone", help=backbone_help)
    src = b.add_argument_group("source (one of)")
    src.add_argument("--weights", help=weights_help)
    src.add_argument("--checkpoint", help="Mixpert checkpoint directory written by mixpert_train")
    src.add_argument("--random-init", action="store_true", help="random weights: architecture only (shapes, latency)")
    src.add_argument("--from-onnx", metavar="DIR", help="compile the engines of an exported bundle (device compile)")
    b.add_argument("--out", help="bundle directory (default engines/<backbone>)")
    b.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="fp32 | fp16 | bf16; int8 or fp8: QDQ parts for TensorRT calibrated on --calibration and "
                        "gated on its held-out images; int8-dynamic: ONNX Runtime CPU dynamic int8, no calibration")
    b.add_argument("--calibration", metavar="DIR-or-glob", help="int8 / fp8: a few hundred images like the ones you "
                   "will serve (every 5th held out for the gate: per part cosine, tokens cosine, routing agreement)")
    b.add_argument("--quantize", choices=["all", "experts"], help="int8 / fp8: all (default: trunk, experts, single "
                   "encoder; the speed) or experts (the trunk, so the routing, stays fp32; the experts' memory)")
    b.add_argument("--max-crops", type=int, help="crops a call at most (default 4 images x max crops an image); patch families (qwen2-vl): "
                   "patches a call, the patch budget (default: one image at max_pixels)")
    b.add_argument("--runtime", default="auto", choices=["auto", "onnxruntime", "tensorrt"],
                   help="auto: ONNX always, TensorRT engines too where tensorrt or tensorrt_rtx is installed")
    b.add_argument("--gpu-targets", help="TensorRT-RTX targets: sm80,sm86,sm89,sm120 or current")
    b.add_argument("--expert-layers", type=int, help="k, the expert depth (default: the backbone's, 2)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--json", help="also write the manifest here")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.set_defaults(func=cmd_build)
    r = sub.add_parser("run", help="route and encode images with a built bundle")
    r.add_argument("--engines", required=True, help="bundle directory (from build)")
    r.add_argument("images", nargs="+", help="image files, directories of images, or quoted glob patterns")
    r.add_argument("--workers", type=int, help="threads preprocessing the next images while a call runs "
                                               "(default min(4, cores); 0: none)")
    r.add_argument("--runtime", default="auto", choices=["auto", "torch", "onnxruntime", "tensorrt"])
    r.add_argument("--preprocess-device", help="resize with torch on this device (cpu, cuda; cuda also decodes JPEG there); "
                                                  "default: PIL on the host, bit-identical to transformers")
    r.add_argument("--device", help="cpu or cuda (default: the runtime's)")
    r.add_argument("--strategy", choices=["direct", "score-threshold", "score-difference"])
    r.add_argument("--tau", type=unit_interval("--tau"), help="score-difference threshold in [0, 1] (default: the bundle's, 0.6)")
    r.add_argument("--lam", type=unit_interval("--lam"), help="score-threshold threshold in [0, 1] (default: the bundle's)")
    r.add_argument("--per-crop", action="store_true", help="route every crop on its own (paper Table 8)")
    r.add_argument("--json", help="one record per input: path, expert, scores, margin, crops, or its error")
    r.add_argument("--save-features", help=".npz with one [n_crops, T, D_llm] array per processed image, keyed by position "
                                           "([L, D_llm] packed embeddings with --packed); Qwen3-VL adds each image's "
                                           "DeepStack features [taps, L, D_llm] as <position>_deepstack")
    r.add_argument("--packed", action="store_true", help="the embeddings the MLLM splices in for each image "
                                                         "(LLaVA-OV: anyres packing with the snapshot's image_newline)")
    r.set_defaults(func=cmd_run)
    s = sub.add_parser("serve", help="serve the pipeline on a Triton Inference Server started through PyTriton")
    s.add_argument("--engines", required=True, help="bundle directory (from build)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    s.add_argument("--http-port", type=int, default=8000)
    s.add_argument("--grpc-port", type=int, default=8001)
    s.add_argument("--metrics-port", type=int, default=8002)
    s.add_argument("--runtime", default="auto", choices=["auto", "torch", "onnxruntime", "tensorrt"])
    s.add_argument("--preprocess-device", help="resize with torch on this device (cpu, cuda; cuda also decodes JPEG there); "
                                                  "default: PIL on the host, bit-identical to transformers")
    s.add_argument("--device", help="cpu or cuda (default: the runtime's)")
    s.add_argument("--strategy", choices=["direct", "score-threshold", "score-difference"])
    s.add_argument("--tau", type=unit_interval("--tau"), help="score-difference threshold in [0, 1] (default: the bundle's)")
    s.add_argument("--max-batch-size", type=int, default=32, help="requests Triton merges into one pipeline call")
    s.add_argument("--max-queue-delay-us", type=int, default=2000, help="dynamic batcher wait for more requests")
    s.add_argument("--packed", action="store_true", help="answer with `embeddings` [1, L, D_llm], the sequence the "
                                                         "MLLM splices in, in place of per-crop `tokens`")
    s.add_argument("--instances", type=int, default=2, help="model instances sharing the pipeline: the next merged "
                   "batch is preprocessed while one runs (default 2)")
    s.add_argument("--workers", type=int, help="threads decoding a merged batch's images (default min(4, cores); 0: none)")
    s.add_argument("--verbose", action="store_true", help="Triton's own log")
    s.set_defaults(func=cmd_serve)
    a = sub.add_parser("ask", help="answer a question about an image: the bundle's embeddings + a snapshot's LLM")
    a.add_argument("--engines", required=True, help="bundle directory (from build)")
    a.add_argument("--llm", required=True, help="local MLLM snapshot: its language model, tokenizer and prompt template")
    a.add_argument("image")
    a.add_argument("question")
    a.add_argument("--runtime", default="auto", choices=["auto", "torch", "onnxruntime", "tensorrt"])
    a.add_argument("--device", help="the engines' device: cpu or cuda (default: the runtime's)")
    a.add_argument("--llm-device", help="the language model's device (default cpu)")
    a.add_argument("--strategy", choices=["direct", "score-threshold", "score-difference"])
    a.add_argument("--tau", type=unit_interval("--tau"), help="score-difference threshold in [0, 1] (default: the bundle's)")
    a.add_argument("--max-new-tokens", type=int, default=32)
    a.add_argument("--json", action="store_true", help="one JSON record: text, token ids, expert, scores, timings")
    a.set_defaults(func=cmd_ask)
    t = sub.add_parser("triton", help="write a Triton model repository (parts + a Python-backend 'mixpert' model)")
    t.add_argument("--engines", required=True, help="bundle directory (from build)")
    t.add_argument("--out", required=True, help="model repository directory to write")
    t.add_argument("--platform", default="auto", choices=["auto", "tensorrt_plan", "onnxruntime_onnx", "python"],
                   help="auto: TensorRT plans where the bundle has standard-TensorRT engines, else ONNX; python: the "
                        "parts run ONNX Runtime inside Triton's Python backend (a Triton with no onnxruntime backend)")
    t.add_argument("--kind", default="gpu", choices=["gpu", "cpu"], help="instance group kind of the ONNX parts")
    t.add_argument("--instances", type=int, default=1, help="instances of each part and of the mixpert model")
    t.add_argument("--expert-instances", help="per expert, e.g. general=2,chart=1 (default --instances)")
    t.add_argument("--max-batch-size", type=int, default=16, help="requests the mixpert model takes a call")
    t.add_argument("--packed", action="store_true", help="the mixpert model answers with `embeddings` [1, L, D_llm], "
                                                         "the sequence the MLLM splices in, as serve --packed does")
    t.set_defaults(func=cmd_triton)
    ts = sub.add_parser("triton-start", help="run a repository written with `triton --platform python` on the "
                                             "tritonserver nvidia-pytriton ships (CPU, no container needed)")
    ts.add_argument("repository", help="model repository directory (from triton --platform python)")
    ts.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    ts.add_argument("--http-port", type=int, default=8000)
    ts.add_argument("--grpc-port", type=int, default=8001)
    ts.add_argument("--metrics-port", type=int, default=8002)
    ts.add_argument("--verbose", action="store_true", help="Triton's verbose log (kept in the log file)")
    ts.set_defaults(func=cmd_triton_start)
    args, extra = p.parse_known_args(argv)
    if extra:  # the subcommand's own error and usage, not the top level's
        sub.choices[args.cmd].error(f"unrecognized arguments: {' '.join(extra)}")
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
