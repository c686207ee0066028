"""Patch families (Qwen2-VL): which attention form a call of several images should take, measured side by side.

    python benchmarks/attention_form.py --backbone tiny-qwen2-vl|qwen2-vl-7b [--bundle DIR] [--runtime onnxruntime]
        [--sizes 448x448 640x480 336x224 224x224] [--rounds 5]

The parts attend over all patches of a call with a block-diagonal mask built in the graph from the per-patch image
ids (attention stays inside each image, as transformers' per-image split over cu_seqlens does). Forms, same images,
interleaved rounds, the whole Mixpert pipeline call (trunk, router, the expert, tokens on the host):
  one_call     every image in one call: one launch a part, attention over the call's P patches (P^2 scores)
  per_image    one call an image: attention over each image's own n_i patches (sum n_i^2), a launch a part an image
  budget       the pipeline's default: consecutive images share a call while it stays within Adapter.call_rows
(Padding to the longest image, the third form, would need a [images, longest, D] layout of every part; its attention
work is images x longest^2 >= sum n_i^2 with per_image's launches saved: per_image bounds it from below on CPU.)
Reported: per_image / one_call and budget / one_call per round, median [min, max], and each form's attention share
of FLOPs (approximate for budget: per call, weighted by patches).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import device_name, inputs, slug, write_report  # noqa: E402

from mixpert_export.runtime.pipeline import ImageResult, MixpertPipeline  # noqa: E402


def attention_share(bb, counts: list[int], one_call: bool) -> float:
    """Attention FLOPs (QK^T and AV: 4 n^2 d a layer) over all FLOPs of the layers (linear: 2 n x params)."""
    d, layers = bb.hidden_size, bb.layers_in_use
    per_layer = 4 * d * d + 2 * d * d * int(bb.vision.get("mlp_ratio", 4))  # qkv + proj + MLP weights
    linear = 2 * sum(counts) * per_layer * layers
    attn = 4 * d * layers * (sum(counts) ** 2 if one_call else sum(n * n for n in counts))
    return attn / (attn + linear)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="tiny-qwen2-vl")
    ap.add_argument("--bundle")
    ap.add_argument("--runtime", default="onnxruntime", choices=["torch", "onnxruntime"])
    ap.add_argument("--sizes", nargs="+", default=["448x448", "640x480", "336x224", "224x224"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args(argv)
    bundle = Path(a.bundle or f"engines/{a.backbone}-fp32-bench")
    if not (bundle / "manifest.json").is_file():
        from mixpert_export.bundle.build import build_bundle
        from mixpert_export.bundle.sources import resolve

        model, source = resolve(a.backbone, random_init=True)
        build_bundle(model, bundle, runtime="onnxruntime", source=source)
    pipe = MixpertPipeline.from_engines(bundle, runtime=a.runtime)
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in a.sizes]
    per_image, grids = inputs(pipe, len(sizes), 0, sizes)
    counts = [len(p) for p in per_image]
    if sum(counts) > pipe.max_crops:
        print(f"error: the mix has {sum(counts)} patches, the bundle takes {pipe.max_crops} a call", file=sys.stderr)
        return 2
    expert = pipe.cfg.domains[0]

    def items(idx):
        out = []
        for i in idx:
            res = ImageResult(i, "bench")
            res.grid = grids[i]
            out.append((res, per_image[i]))
        return out

    calls = pipe.calls(counts)  # the pipeline's grouping: a call closes before the image that would pass call_rows
    forms = {"one_call": lambda: pipe.run_crops(items(range(len(sizes))), experts=[expert] * len(sizes)),
             "per_image": lambda: [pipe.run_crops(items([i]), experts=[expert]) for i in range(len(sizes))],
             "budget": lambda: [pipe.run_crops(items(c), experts=[expert] * len(c)) for c in calls]}
    for fn in forms.values():  # warm-up
        fn()
    times = {k: [] for k in forms}
    for r in range(a.rounds):
        names = list(forms)
        for k in names[r % len(names):] + names[:r % len(names)]:  # rotate: no form always runs first
            t = time.perf_counter()
            forms[k]()
            times[k].append((time.perf_counter() - t) * 1e3)
    ratio = lambda k: [x / o for x, o in zip(times[k], times["one_call"])]  # noqa: E731
    bb = pipe.cfg.backbone
    report = {"backbone": bb.name, "runtime": a.runtime, "device": device_name(pipe.backend),
              "date": time.strftime("%Y-%m-%d %H:%M"), "sizes": [list(s) for s in sizes], "patches": counts,
              "ms": {k: {"median": statistics.median(v), "all": v} for k, v in times.items()},
              "call_rows": pipe.call_rows, "budget_calls": calls,
              "over_one_call": {k: {"median": statistics.median(ratio(k)), "min": min(ratio(k)), "max": max(ratio(k))}
                                for k in ("per_image", "budget")},
              "attention_share": {"one_call": attention_share(bb, counts, True),
                                  "per_image": attention_share(bb, counts, False),
                                  "budget": sum(attention_share(bb, [counts[i] for i in c], True) * sum(counts[i] for i in c)
                                                for c in calls) / sum(counts)}}
    r = report["over_one_call"]
    md = (f"### Attention form: {bb.name} on {a.runtime}, {report['device']}\n\n"
          f"Measured {report['date']}, {a.rounds} interleaved rounds; images {', '.join(a.sizes)} = {counts} patches.\n\n"
          "| form | median ms (context) | attention share of FLOPs |\n|---|---|---|\n"
          + "".join(f"| {k} | {report['ms'][k]['median']:.1f} | {report['attention_share'][k]:.1%} |\n" for k in forms)
          + f"\nper_image / one_call: **{r['per_image']['median']:.3f}** [{r['per_image']['min']:.3f}, {r['per_image']['max']:.3f}]; "
          f"budget ({pipe.call_rows} patches a call: calls {calls}) / one_call: **{r['budget']['median']:.3f}** "
          f"[{r['budget']['min']:.3f}, {r['budget']['max']:.3f}]\n")
    print(md)
    write_report(a.out, f"attention_form_{slug(report['device'])}_{a.runtime}_{bb.name}", report, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
