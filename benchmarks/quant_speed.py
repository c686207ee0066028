"""Quantised bundles against fp32, side by side in one process on ONNX Runtime CPU: the speed-up of each precision
over fp32 for the single encoder (a) and Mixpert one-domain (b), and the bundle sizes on disk.

    python benchmarks/quant_speed.py --bundles engines/x-fp32 engines/x-int8-dynamic engines/x-int8 [engines/x-fp8] \
        [--batch 1] [--crops 1] [--sizes 448x448] [--rounds 5] [--out benchmarks/results]

The first bundle is the reference (fp32). Every bundle runs latency.py's cases a and b on the same pixels (its
`cases`: the calls the pipeline makes), all interleaved round by round with the order rotated; a speed-up is
taken per round (fp32 time / quantised time) and reported as median [min, max]. Sizes: every file the bundle's
manifest lists (ONNX and external data; engines apart).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import latency  # noqa: E402

from mixpert_export.bundle import manifest as mf  # noqa: E402
from mixpert_export.runtime.pipeline import MixpertPipeline  # noqa: E402

CASES = {"a_single": "single encoder", "b_one_domain": "Mixpert, one domain"}


def onnx_bytes(bundle: Path, manifest: dict) -> int:
    return sum((bundle / f).stat().st_size for p in manifest["parts"].values() for f in p["onnx"]["sha256"])


def measure(bundles: list[Path], batch: int, crops: int, sizes, rounds: int, warmup: int) -> dict:
    pipes = [MixpertPipeline.from_engines(b, runtime="onnxruntime", device="cpu") for b in bundles]
    labels = [p.manifest["precision"] for p in pipes]
    if len(set(labels)) != len(labels):
        raise SystemExit(f"error: two bundles of the same precision ({labels}); pass one per precision")
    if labels[0] != "fp32":
        raise SystemExit(f"error: the first bundle is the reference and must be fp32, not {labels[0]}")
    names = {p.cfg.backbone.name for p in pipes}
    if len(names) != 1:
        raise SystemExit(f"error: bundles of different backbones {sorted(names)}")
    work = {}
    for label, pipe in zip(labels, pipes):
        c = latency.cases(pipe, batch, crops, sizes)
        work |= {(label, k): c[k] for k in CASES}
    timed = latency._timer(pipes[0].backend)
    for _ in range(warmup):
        for fn in work.values():
            fn()
    keys = list(work)
    times = {k: [] for k in keys}
    for r in range(rounds):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            times[k].append(timed(work[k]))
    rows = []
    for label, bundle, pipe in zip(labels, bundles, pipes):
        row = {"precision": label, "onnx_bytes": onnx_bytes(bundle, pipe.manifest)}
        for k in CASES:
            row[f"{k}_ms"] = statistics.median(times[(label, k)])
            sp = [a / b for a, b in zip(times[("fp32", k)], times[(label, k)])]
            row[f"{k}_speedup"] = {"median": statistics.median(sp), "min": min(sp), "max": max(sp)}
        q = pipe.manifest.get("quantization")
        if q:
            row["gate"] = q["gate"]
        rows.append(row)
    patches = pipes[0].unit != "crops"
    return {"backbone": names.pop(), "device": latency.device_name(pipes[0].backend), "runtime": "onnxruntime CPU",
            "date": time.strftime("%Y-%m-%d %H:%M"), "batch": batch, "crops": 0 if patches else crops,
            "sizes": [list(s) for s in sizes] if patches else None, "rounds": rounds,
            "rows": rows, "bundles": [str(b) for b in bundles]}


def markdown(rep: dict) -> str:
    unit = (f"{rep['batch']} image(s) x {rep['crops']} crop(s)" if rep["crops"] else
            f"{rep['batch']} image(s) of {', '.join('x'.join(map(str, s)) for s in rep['sizes'])}")
    lines = [f"### Quantised vs fp32: {rep['backbone']} on {rep['runtime']}, {rep['device']}", "",
             f"Measured {rep['date']}, one process, {rep['rounds']} interleaved rounds, {unit}; speed-up = fp32 time / "
             "this precision's, per round, median [min, max].", "",
             "| precision | ONNX on disk | a single encoder (ms) | speed-up a | b Mixpert one domain (ms) | speed-up b |",
             "|---|---|---|---|---|---|"]
    for r in rep["rows"]:
        cell = lambda k: f"x{r[k]['median']:.2f} [{r[k]['min']:.2f}, {r[k]['max']:.2f}]"  # noqa: E731
        lines.append(f"| {r['precision']} | {r['onnx_bytes'] / 2**20:,.1f} MiB | {r['a_single_ms']:.1f} | "
                     f"{cell('a_single_speedup')} | {r['b_one_domain_ms']:.1f} | {cell('b_one_domain_speedup')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundles", nargs="+", required=True, help="fp32 first, then one bundle per quantised precision")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--crops", type=int, default=1, help="crop families: crops an image")
    ap.add_argument("--sizes", nargs="+", default=["448x448"], help="patch families: image sizes WxH")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args(argv)
    bundles = [Path(b) for b in a.bundles]
    for b in bundles:
        mf.read_manifest(b)  # a missing or foreign bundle is one line before anything loads
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in a.sizes]
    rep = measure(bundles, a.batch, a.crops, sizes, a.rounds, a.warmup)
    md = markdown(rep)
    print(md)
    latency.write_report(a.out, f"quant_speed_{latency.slug(rep['device'])}_onnxruntime_{rep['backbone']}", rep, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
