"""A request's whole path: encoded image bytes -> crops -> tokens, measured side by side in one run.

    python benchmarks/e2e.py --backbone tiny [--bundle DIR] [--runtime onnxruntime] [--rounds 5] [--workers 2]
        [--overlap-sizes small 768x1024 ...] [--out benchmarks/results]

1. Preprocessing per core (one thread, torch limited to one): the mix's bytes -> rows with the family's
   transformers PIL processor (the reference: its float32 pixel_values), and the uint8 rows the engines take
   (they normalise in-graph) from the package's bit-identical PIL path and from torch's uint8 resize
   (preprocess_device.py, within 2 byte levels). Interleaved rounds, order rotated; the speed-ups are taken
   per round and reported as median [min, max]. Crops/s per core = the mix's crops / its time.
2. Overlap, on the bundle: inference alone (the crops made beforehand, the same calls `map` makes; the single
   encoder on the same crops beside it), preprocessing alone (the same worker threads `map` uses, no inference),
   and `pipe.map(images, workers)`, which overlaps the two. Reported: end-to-end images/s, the ratio
   end-to-end / max(preprocessing alone, inference alone) (1.0: fully hidden), and the share of wall time not
   overlapped = (end-to-end - max) / end-to-end. Host CPU per image: the thread CPU time of each image's decode
   and preprocessing in map() (ImageResult.host_ms), beside the wall time per image. Per-image latency: each size
   alone, decode to tokens, serially.

The size mix: small (320x240), 768x1024, 1920x1080, 2000x1500, each as JPEG (quality 90) and PNG; content is
smooth shading, edges and sensor-like noise, so the files compress like photographs and documents do.
Absolute times are context only, with the device named.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import device_name, slug  # noqa: E402

SIZES = {"small": (320, 240), "768x1024": (768, 1024), "1920x1080": (1920, 1080), "2000x1500": (2000, 1500)}
PATHS = ("transformers", "fast_pil", "torch_uint8")


def encoded_mix(sizes: list[str], seed: int = 0) -> list[tuple[str, bytes]]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for name in sizes:
        w, h = SIZES[name]
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        base = 128 + 90 * np.sin(x[..., None] / (w / 7) + y[..., None] / (h / 5) + np.arange(3) * 1.3)
        base[(x // 97 + y // 61) % 5 == 0] = 245  # flat paper-like blocks with hard edges
        img = np.clip(base + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
        for fmt in ("JPEG", "PNG"):
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
            out.append((f"{name}.{fmt.lower()}", buf.getvalue()))
    return out


def preprocessors(backbone) -> dict:
    """bytes -> what each path hands on: transformers' processor its float32 pixel_values (the reference, decoded
    by PIL as every path is); the package's paths the uint8 rows the engines take (they normalise in-graph)."""
    from mixpert_train.preprocess import Preprocessor, load_image

    ref, fast, torch_cpu = (Preprocessor(backbone, fast=False), Preprocessor(backbone),
                            Preprocessor(backbone, device="cpu"))
    # contiguous: the copy a call's batch makes is counted too
    return {"transformers": lambda data: ref.pixel_values(load_image(data))[0],
            "fast_pil": lambda data: np.ascontiguousarray(fast.prepare(data)[0]),
            "torch_uint8": lambda data: np.ascontiguousarray(torch_cpu.prepare(data)[0])}


def per_core(backbone, mix, rounds: int) -> dict:
    """Bytes -> crops on one core for each path, interleaved rounds; speed-ups per round."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pre = preprocessors(backbone)
        crops = {name: len(pre["fast_pil"](data)) for name, data in mix}  # rows an image
        for p in pre.values():  # warm-up: imports, tables, first allocations
            p(mix[0][1])
        from mixpert_train.preprocess import load_image

        work = dict(pre) | {"decode": load_image}  # decoding alone: what every path pays first
        times = {k: [] for k in work}
        per_image = {k: {name: [] for name, _ in mix} for k in work}
        keys = list(work)
        for r in range(rounds):
            for k in keys[r % len(keys):] + keys[:r % len(keys)]:
                total = 0.0
                for name, data in mix:
                    t = time.perf_counter()
                    work[k](data)
                    dt = time.perf_counter() - t
                    per_image[k][name].append(dt * 1e3)
                    total += dt
                times[k].append(total)
    finally:
        torch.set_num_threads(threads)
    n = sum(crops.values())
    out = {"crops": crops, "paths": {}, "speedup": {}}
    for k in PATHS:
        out["paths"][k] = {"median_s": statistics.median(times[k]), "crops_per_s_per_core": n / statistics.median(times[k]),
                           "per_image_ms": {name: statistics.median(v) for name, v in per_image[k].items()}}
    out["decode_s"] = statistics.median(times["decode"])
    out["speedup_after_decode"] = {}
    for k in ("fast_pil", "torch_uint8"):
        rs = [a / b for a, b in zip(times["transformers"], times[k])]
        out["speedup"][k] = {"median": statistics.median(rs), "min": min(rs), "max": max(rs)}
        rs = [(a - d) / (b - d) for a, b, d in zip(times["transformers"], times[k], times["decode"])]
        out["speedup_after_decode"][k] = {"median": statistics.median(rs), "min": min(rs), "max": max(rs)}
    return out


def overlap(pipe, mix, workers: int, rounds: int, path: str) -> dict:
    """Inference alone, preprocessing alone, and map() over the same images, interleaved rounds."""
    from mixpert_export.runtime.pipeline import ImageResult

    images = [data for _, data in mix]
    prepared = [pipe.preprocess.prepare(d) for d in images]  # (rows, image size, grid)
    crops = [px for px, _, _ in prepared]
    calls = pipe.calls([len(px) for px in crops])  # the calls map() makes when every image is ready
    be = pipe.backend

    def item(i):
        res = ImageResult(i, "bench")
        res.image_size, res.grid = prepared[i][1], prepared[i][2]
        return res, crops[i]

    def infer():
        for call in calls:
            pipe.run_crops([item(i) for i in call])

    def single():  # the unsplit encoder on the same calls, with the per-row inputs a patch family's parts take
        for call in calls:
            px = np.concatenate([crops[i] for i in call])
            feeds = {"pixel_values": be.from_host(px)} | pipe.row_feeds([prepared[i][2] for i in call])
            be.to_host(be.infer("single_encoder", feeds)["tokens"])

    def prep():
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(pipe.preprocess.prepare, images))

    host_ms = []  # per image: the host CPU time its decode + preprocessing took (thread CPU time), from map()

    def e2e():
        res = list(pipe.map(images, workers=workers))
        assert all(r.ok for r in res), [r.error for r in res if not r.ok]
        host_ms.append([r.host_ms for r in res])

    work = {"inference": infer, "single_encoder": single, "preprocessing": prep, "end_to_end": e2e}
    for fn in work.values():
        fn()  # warm-up
    names = list(work)
    times = {k: [] for k in names}
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            work[k]()
            be.synchronize()
            times[k].append(time.perf_counter() - t)
    ratio = [e / max(p, i) for e, p, i in zip(times["end_to_end"], times["preprocessing"], times["inference"])]
    hidden = [(e - max(p, i)) / e for e, p, i in zip(times["end_to_end"], times["preprocessing"], times["inference"])]
    med = {k: statistics.median(v) for k, v in times.items()}
    latency = {}
    for name, data in mix:  # one request alone: decode -> tokens, nothing else in flight
        ts = []
        for _ in range(max(1, rounds // 2)):
            t = time.perf_counter()
            assert pipe([data])[0].ok
            ts.append((time.perf_counter() - t) * 1e3)
        latency[name] = statistics.median(ts)
    return {"images": len(images), "crops": int(sum(len(c) for c in crops)), "calls": len(calls), "workers": workers,
            "preprocess_path": path, "median_s": med, "all_s": times,
            "images_per_s": len(images) / med["end_to_end"],
            "e2e_over_max": {"median": statistics.median(ratio), "min": min(ratio), "max": max(ratio)},
            "not_overlapped_share": {"median": statistics.median(hidden), "min": min(hidden), "max": max(hidden)},
            "serial_sum_s": med["preprocessing"] + med["inference"], "latency_ms": latency,
            # the claim "the host only decodes" as figures: host CPU per image on the request path beside wall time
            "host_cpu_ms_per_image": statistics.median(float(np.mean(r)) for r in host_ms),
            "wall_ms_per_image": med["end_to_end"] / len(images) * 1e3}


def markdown(rep: dict) -> str:
    pc, unit = rep["per_core"], rep.get("unit", "crops")
    title = "bytes -> tokens" if rep["overlap"] else "bytes -> rows, preprocessing only"
    lines = [f"# End to end: {title}, {rep['backbone']} on {rep['runtime']} ({rep['device']})", "",
             f"{rep['date']}, {rep['rounds']} interleaved rounds; {rep['workers']} preprocessing thread(s), runtime intra-op "
             f"threads: {rep['intra_threads'] or 'its default'}. Absolute times are context only.", "",
             "## Preprocessing per core (one thread)", "",
             f"| path | {unit}/s per core | mix time | speed-up vs transformers, median [min, max] |", "|---|---|---|---|"]
    for k in PATHS:
        p = pc["paths"][k]
        s = pc["speedup"].get(k)
        lines.append(f"| {k} | {p['crops_per_s_per_core']:.1f} | {p['median_s'] * 1e3:.0f} ms | "
                     + (f"x{s['median']:.2f} [{s['min']:.2f}, {s['max']:.2f}] |" if s else "1 (reference) |"))
    lines += ["", f"Decoding alone (every path pays it first): {pc['decode_s'] * 1e3:.0f} ms for the mix. Speed-up of the "
              "work after decoding: " + ", ".join(f"{k} x{v['median']:.2f} [{v['min']:.2f}, {v['max']:.2f}]"
                                                 for k, v in pc["speedup_after_decode"].items()) + "."]
    lines += ["", f"| image | {unit} | " + " | ".join(f"{k} ms" for k in PATHS) + " |", "|---|---|" + "---|" * len(PATHS)]
    for name, n in pc["crops"].items():
        lines.append(f"| {name} | {n} | " + " | ".join(f"{pc['paths'][k]['per_image_ms'][name]:.1f}" for k in PATHS) + " |")
    for key, ov in rep["overlap"].items():
        m = ov["median_s"]
        lines += ["", f"## Overlap, preprocessing = {ov['preprocess_path']} ({key})", "",
                  f"{ov['images']} images, {ov['crops']} {unit}, {ov['calls']} calls, {ov['workers']} preprocessing threads.", "",
                  "| measured | median |", "|---|---|",
                  f"| preprocessing alone ({ov['workers']} threads) | {m['preprocessing'] * 1e3:.0f} ms |",
                  f"| inference alone (Mixpert) | {m['inference'] * 1e3:.0f} ms |",
                  f"| inference alone (single encoder, same {unit}) | {m['single_encoder'] * 1e3:.0f} ms |",
                  f"| serial sum (preprocessing + inference) | {ov['serial_sum_s'] * 1e3:.0f} ms |",
                  f"| end to end, overlapped (`pipe.map`) | {m['end_to_end'] * 1e3:.0f} ms ({ov['images_per_s']:.2f} images/s) |",
                  f"| end to end / max(preprocessing, inference) | {ov['e2e_over_max']['median']:.3f} "
                  f"[{ov['e2e_over_max']['min']:.3f}, {ov['e2e_over_max']['max']:.3f}] (target <= 1.1) |",
                  f"| share of wall time not overlapped | {ov['not_overlapped_share']['median'] * 100:.1f}% |",
                  f"| host CPU per image (decode + preprocessing, thread CPU time) | {ov['host_cpu_ms_per_image']:.1f} ms |",
                  f"| wall time per image, end to end | {ov['wall_ms_per_image']:.1f} ms |", "",
                  "| image alone, decode -> tokens | ms |", "|---|---|"]
        lines += [f"| {name} | {ms:.0f} |" for name, ms in ov["latency_ms"].items()]
    return "\n".join(lines) + "\n"


def plot(rep: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if rep["overlap"] else 1  # --preprocessing-only: the per-core panel alone
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
    ax1 = axes[0, 0]
    pc = rep["per_core"]["paths"]
    ax1.bar(PATHS, [pc[k]["crops_per_s_per_core"] for k in PATHS], color=["#999", "#1f77b4", "#2ca02c"])
    ax1.set_ylabel(f"{rep.get('unit', 'crops')}/s per core")
    ax1.set_title("Preprocessing, one core")
    if rep["overlap"]:
        ax2 = axes[0, 1]
        labels, pre, inf, e2e = [], [], [], []
        for key, ov in rep["overlap"].items():
            labels.append(key)
            pre.append(ov["median_s"]["preprocessing"])
            inf.append(ov["median_s"]["inference"])
            e2e.append(ov["median_s"]["end_to_end"])
        x = np.arange(len(labels))
        ax2.bar(x - 0.3, pre, 0.2, label="preprocessing alone")
        ax2.bar(x - 0.1, inf, 0.2, label="inference alone")
        ax2.bar(x + 0.1, np.add(pre, inf), 0.2, label="serial sum", color="#ccc")
        ax2.bar(x + 0.3, e2e, 0.2, label="end to end (overlapped)", color="#d62728")
        for xi, p, i in zip(x, pre, inf):  # the target: 1.1 x the slower stage alone
            ax2.hlines(1.1 * max(p, i), xi - 0.4, xi + 0.4, colors="k", linestyles="dashed", linewidth=1)
        ax2.set_xticks(x, labels)
        ax2.set_ylabel("seconds for the mix")
        ax2.set_title("Overlap (dashed: 1.1 x the slower stage alone)")
        ax2.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=4)
    fig.suptitle(f"{rep['backbone']} on {rep['runtime']} ({rep['device']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="tiny")
    ap.add_argument("--bundle", help="bundle directory (default: a random-init tiny bundle built in a temp dir)")
    ap.add_argument("--runtime", default="onnxruntime")
    ap.add_argument("--device", default=None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--workers", type=int, default=1, help="preprocessing threads of map() (default 1)")
    ap.add_argument("--intra-threads", type=int, default=None,
                    help="ONNX Runtime intra-op threads (default: its own, all cores). On a machine with few cores, "
                         "workers + intra-threads <= cores lets the two stages run at once rather than take turns")
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES), help="the per-core mix")
    ap.add_argument("--overlap-sizes", nargs="+", choices=list(SIZES),
                    help="the overlap mix (default --sizes; a real-scale model on CPU needs a smaller one)")
    ap.add_argument("--repeat", type=int, default=1, help="the overlap mix repeated, for steadier figures")
    ap.add_argument("--no-torch-path", action="store_true", help="overlap with the PIL path only")
    ap.add_argument("--preprocessing-only", action="store_true",
                    help="per-core preprocessing only (any backbone, no bundle, no inference)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)

    from mixpert_export.runtime.pipeline import MixpertPipeline
    from mixpert_train.backbones import get_backbone
    from mixpert_train.families import adapter_for

    if args.preprocessing_only:
        bb = get_backbone(args.backbone)
        mix = encoded_mix(args.sizes)
        print(f"per-core preprocessing over {len(mix)} images ...", flush=True)
        rep = {"backbone": bb.name, "runtime": "none", "device": device_name(None), "date": time.strftime("%Y-%m-%d"),
               "rounds": args.rounds, "workers": 1, "intra_threads": None, "sizes": args.sizes,
               "unit": adapter_for(bb).rows, "per_core": per_core(bb, mix, args.rounds), "overlap": {}}
        return write(rep, Path(args.out), f"preprocess_{slug(rep['device'])}_{bb.name}")

    tmp = None
    bundle = args.bundle
    if bundle is None:
        if not args.backbone.startswith("tiny"):
            ap.error("--bundle is needed for a real-scale backbone (build one with --random-init)")
        from mixpert_export.bundle.build import build_bundle
        from mixpert_export.bundle.sources import resolve

        tmp = tempfile.TemporaryDirectory()
        model, source = resolve(args.backbone, random_init=True)
        bundle = Path(tmp.name) / "bundle"
        build_bundle(model, bundle, runtime="onnxruntime", source=source, progress=False)
    opts = {"threads": args.intra_threads} if args.intra_threads and args.runtime == "onnxruntime" else {}
    pipes = {"fast_pil": MixpertPipeline.from_engines(bundle, runtime=args.runtime, device=args.device, backend_options=opts)}
    if not args.no_torch_path:
        on = "cuda" if args.device == "cuda" else "cpu"  # on a GPU the crops are made there and stay there
        pipes[f"torch_{on}"] = MixpertPipeline.from_engines(bundle, runtime=args.runtime, device=args.device,
                                                            backend_options=opts, preprocess_device=on)
    bb = pipes["fast_pil"].cfg.backbone
    if bb.name != get_backbone(args.backbone).name:
        ap.error(f"--bundle {bundle} is {bb.name}, not {args.backbone}")
    mix = encoded_mix(args.sizes)
    print(f"per-core preprocessing over {len(mix)} images ...", flush=True)
    rep = {"backbone": bb.name, "runtime": pipes["fast_pil"].backend.describe()["runtime"],
           "device": device_name(pipes["fast_pil"].backend), "date": time.strftime("%Y-%m-%d"), "rounds": args.rounds,
           "workers": args.workers, "intra_threads": args.intra_threads,
           "sizes": args.sizes, "unit": pipes["fast_pil"].unit, "per_core": per_core(bb, mix, args.rounds), "overlap": {}}
    omix = encoded_mix(args.overlap_sizes or args.sizes) * args.repeat
    for key, pipe in pipes.items():
        print(f"overlap with {key} preprocessing over {len(omix)} images ...", flush=True)
        rep["overlap"][key] = overlap(pipe, omix, args.workers, args.rounds, pipe.preprocess.describe()["path"])
    write(rep, Path(args.out), f"e2e_{slug(rep['device'])}_{slug(rep['runtime'])}_{bb.name}")
    if tmp:
        tmp.cleanup()
    return 0


def write(rep: dict, out: Path, stem: str) -> int:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(rep, indent=2))
    (out / f"{stem}.md").write_text(markdown(rep))
    plot(rep, out / f"{stem}.png")
    print(markdown(rep))
    print(f"results: {out / stem}.{{md,json,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
