"""The main job on the embedded default (tiny backbone, CPU): data -> joint SFT -> five experts -> router ->
eval -> engines -> the pipeline on held-out images -> Mixpert's overhead over the single encoder -> held-out answers
through the deployed path (engines + the LLM, as `python -m mixpert_export ask` runs them).

    python demo.py [--out runs/demo] [--engines engines/demo]      (make demo)

Every step reuses what an earlier run finished; delete a directory to redo that step and those after it.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "benchmarks"))


def newer(a: Path, b: Path) -> bool:
    return a.exists() and b.exists() and a.stat().st_mtime >= b.stat().st_mtime


def step(name: str):
    print(f"\n=== {name}", flush=True)
    return time.perf_counter()


def seed_table(reports: list[dict], domains) -> str:
    """Mean and spread (min..max) over seeds of every row: same joint model, experts and router retrained."""
    cols = list(domains) + ["all"]
    lines = [f"### Answer accuracy over {len(reports)} seeds of expert tuning + router (mean, min..max), %", "",
             "| model | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for row in reports[0]["accuracy"]:
        cells = []
        for c in cols:
            v = [100 * r["accuracy"][row][c] for r in reports]
            cells.append(f"{np.mean(v):.1f} ({min(v):.1f}..{max(v):.1f})" if len(v) > 1 else f"{v[0]:.1f}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def verdict(reports: list[dict], default: str) -> str:
    """Joint vs the paper's default routing, paired on the same images, per seed: no best-row picking."""
    parts = []
    for i, r in enumerate(reports):
        a, v = r["accuracy"], r["accuracy"][default]["vs_joint"]
        parts.append(f"seed {i}: {100 * a['joint']['all']:.1f}% -> {100 * a[default]['all']:.1f}% "
                     f"({v['better']} images better, {v['worse']} worse, sign-test p={v['p_value']:.2f})")
    gains = [r["accuracy"][default]["all"] - r["accuracy"]["joint"]["all"] for r in reports]
    sig = [r["accuracy"][default]["vs_joint"]["p_value"] < 0.05 for r in reports]
    if all(g > 0 for g in gains) and all(sig):
        word = "specialisation helps on this miniature, consistently and beyond chance"
    elif all(g > 0 for g in gains):
        word = "Mixpert is ahead in every seed, but not beyond chance at this sample size"
    elif all(g <= 0 for g in gains):
        word = "specialisation does NOT beat joint training on this miniature"
    else:
        word = "no consistent difference between Mixpert and joint training on this miniature"
    return (f"Verdict (joint vs Mixpert with the paper's default routing, {default}): " + "; ".join(parts)
            + f". {word}. A few hundred synthetic images and minutes of CPU training are far from the paper's "
            "scale: read this as a working pipeline, not as a reproduction of the paper's gains.")


def deployed_accuracy(engines: Path, joint: Path, test, domains) -> dict:
    """Held-out exact match through what a user deploys: the bundle on ONNX Runtime (packed embeddings) and
    `ask`'s language-model path (the joint snapshot's LLM, greedy), for the paper's routing and for versatile
    everywhere (the joint model's own vision weights). Greedy answer tokens equal to the reference answer = a hit,
    the same criterion as the evaluator's teacher-forced exact match."""
    from mixpert_export.runtime.pipeline import MixpertPipeline
    from mixpert_export.serving.ask import LanguageModel

    llm = LanguageModel.from_snapshot(joint)
    images = [s.image for s in test]
    out = {"rows": {}, "vision_ms": [], "llm_ms": []}
    for label, tau in (("Mixpert, score-difference (paper default)", None), ("versatile everywhere (joint weights)", 1.01)):
        pipe = MixpertPipeline.from_engines(engines, runtime="onnxruntime", packed=True, tau=tau)
        hits = {d: [] for d in domains}
        t = time.perf_counter()
        results = list(pipe.map(images))  # bytes -> packed embeddings, calls of several images
        out["vision_ms"].append((time.perf_counter() - t) * 1e3 / len(images))
        for s, r in zip(test, results):
            want = llm.tokenizer(s.answer, add_special_tokens=False)["input_ids"]
            if not r.ok:
                hits[s.domain].append(False)
                continue
            t = time.perf_counter()
            got, _ = llm.generate(r.embeddings, s.question, max_new_tokens=len(want))
            out["llm_ms"].append((time.perf_counter() - t) * 1e3)
            hits[s.domain].append(got == want)
        out["rows"][label] = {d: 100.0 * float(np.mean(h)) for d, h in hits.items()} | {
            "all": 100.0 * float(np.mean([x for h in hits.values() for x in h]))}
    return out


def deployed_table(dep: dict, domains) -> str:
    lines = ["| engines (ONNX Runtime) + LLM, held-out exact match % | " + " | ".join(domains) + " | all |",
             "|---|" + "---|" * (len(domains) + 1)]
    for label, row in dep["rows"].items():
        lines.append(f"| {label} | " + " | ".join(f"{row[d]:.1f}" for d in domains) + f" | {row['all']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--engines", default="engines/demo")
    ap.add_argument("--n-per-domain", type=int, default=150)
    ap.add_argument("--joint-epochs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, default=3, help="expert tuning + router + eval repeated with this many seeds")
    a = ap.parse_args(argv)

    from mixpert_train.data.synthetic import generate
    from mixpert_train.errors import MixpertError
    from mixpert_train.evaluate import markdown, run_eval
    from mixpert_train.experts import ExpertConfig, run_experts
    from mixpert_train.joint import JointConfig, run_joint
    from mixpert_train.router import RouterConfig, run_router

    out, engines = Path(a.out), Path(a.engines)
    data, joint, experts, final, ev = (out / x for x in ("data", "joint", "experts", "mixpert", "eval"))
    times = {}
    t_all = time.perf_counter()
    try:
        t = step("1/8 data: synthetic chart / doc / math / ocr / general")
        if not (data / "test.jsonl").is_file():
            print(generate(data, a.n_per_domain, a.seed, fractions=(0.7, 0.1, 0.2)))
        else:
            print(f"reusing {data}")
        times["data"] = time.perf_counter() - t

        t = step("2/8 joint SFT of a tiny LLaVA-OneVision (all domains mixed)")
        run_joint(data, joint, JointConfig(epochs=a.joint_epochs, seed=a.seed))
        times["joint"] = time.perf_counter() - t

        reports = []
        for seed in range(a.seed, a.seed + a.seeds):
            sfx = "" if seed == a.seed else f"-seed{seed}"
            e_dir, f_dir, v_dir = (out / f"{x}{sfx}" for x in ("experts", "mixpert", "eval"))
            t = step(f"3/8 disentangled expert tuning, seed {seed} (trunk and language model frozen)")
            # the paper's optimiser and schedule; rates and epochs scaled for a model trained from scratch in minutes
            run_experts(data, joint, e_dir, ExpertConfig(epochs=3, batch=32, micro_batch=16, lr_projector=1e-3,
                                                         lr_vision=3e-4, seed=seed))
            times["experts"] = times.get("experts", 0) + time.perf_counter() - t
            t = step(f"4/8 router on pooled trunk features, seed {seed}")
            run_router(data, e_dir, f_dir, RouterConfig(epochs=30, batch=64, lr=2e-3, seed=seed))
            times["router"] = times.get("router", 0) + time.perf_counter() - t
            t = step(f"5/8 eval on held-out images, seed {seed}")
            if newer(v_dir / "eval.json", f_dir / "mixpert.json"):
                reports.append(json.loads((v_dir / "eval.json").read_text()))
                print(f"reusing {v_dir / 'eval.json'}")
            else:
                reports.append(run_eval(data, f_dir, v_dir, log=lambda s: None))
            times["eval"] = times.get("eval", 0) + time.perf_counter() - t
        report = reports[0]

        t = step("6/8 engines: ONNX parts validated against torch, TensorRT engines where TensorRT(-RTX) is installed")
        from mixpert_export.bundle.build import build_bundle, format_table, summary_rows
        from mixpert_export.bundle.sources import resolve

        if newer(engines / "manifest.json", final / "mixpert.json") and \
                "packing" in json.loads((engines / "manifest.json").read_text()):
            manifest = json.loads((engines / "manifest.json").read_text())
            print(f"reusing {engines}")
        else:
            model, source = resolve(checkpoint=str(final))
            manifest = build_bundle(model, engines, max_crops=40, source=source)
        print(format_table(["part", "file", "onnx", "export", "validation (vs torch fp32)", "engine"], summary_rows(manifest)))
        times["engines"] = time.perf_counter() - t

        t = step("7/8 the pipeline on held-out images, and its overhead over the single encoder")
        from mixpert_export.runtime.pipeline import MixpertPipeline
        from mixpert_train.data.manifest import read_manifest

        test = read_manifest(data / "test.jsonl")
        pipe = MixpertPipeline.from_engines(engines, runtime="onnxruntime")
        results = pipe([s.image for s in test])
        routed = {}
        for s, r in zip(test, results):
            routed.setdefault(s.domain, []).append(r.expert)
        import latency

        bench_dir = out / "bench"
        latency.main(["--bundle", str(engines), "--batch", "1", "4", "--crops", "1", "--rounds", "9", "--out", str(bench_dir)])
        bench = json.loads(next(bench_dir.glob("latency_*.json")).read_text())
        times["pipeline+bench"] = time.perf_counter() - t
        t = step("8/8 answers through the deployed path: engines (packed embeddings) + the joint snapshot's LLM")
        deployed = deployed_accuracy(engines, joint, test, list(dict.fromkeys(s.domain for s in test)))
        times["deployed answers"] = time.perf_counter() - t
    except MixpertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    domains = list(routed)
    print("\n" + "=" * 100 + "\nMIXPERT DEMO REPORT (tiny backbone, CPU)\n" + "=" * 100)
    print("### Held-out answers through the deployed path (what a user runs: `ask`'s engines + LLM)\n")
    print(deployed_table(deployed, domains))
    print(f"\nPer image: engines {np.mean(deployed['vision_ms']):.1f} ms (decode to packed embeddings, amortised over "
          f"calls), LLM {np.median(deployed['llm_ms']):.1f} ms (median, greedy answer). The evaluator's table below (torch, teacher forcing) "
          "is the training-side cross-check of the same model.\n")
    print(markdown(report, tuple(domains)))
    print("### Where the ONNX Runtime pipeline sent the held-out images (by true domain)\n")
    for d in domains:
        counts = {e: routed[d].count(e) for e in sorted(set(routed[d]))}
        print(f"- {d}: " + ", ".join(f"{e} {n}" for e, n in counts.items()))
    print(f"\n### Overhead over the single encoder, same runtime, one process ({bench['device']}, {bench['runtime']})\n")
    print(latency.markdown(bench))
    print(seed_table(reports, domains))
    default = next(k for k in report["accuracy"] if k.startswith("score-difference"))
    print(verdict(reports, default))
    print("\nWritten:")
    for what, where in (("data", data), ("joint model (HF snapshot)", joint), ("Mixpert checkpoint", final),
                        ("eval report", ev / "eval.md"), ("engines + manifest", engines),
                        ("latency table and plot", bench_dir)):
        print(f"  {what:28s} {where}")
    print("\nWall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items())
          + f"; total {time.perf_counter() - t_all:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
