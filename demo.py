"""The main job on the embedded default (tiny backbone, CPU): data with a designed domain conflict -> joint SFT ->
the probes of the conflict (each domain alone from the pre-joint start) -> five experts -> the Table 7 control ->
router -> eval with paired tests named before the run -> engines -> the pipeline on held-out images -> Mixpert's
overhead over the single encoder -> held-out answers through the deployed path (engines + the LLM, as
`python -m mixpert_export ask` runs them). Writes runs/demo/report.json beside the printed report.

    python demo.py [--out runs/demo] [--engines engines/demo] [--scale 1]      (make demo)

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

from mixpert_train.determinism import pin_kernels  # noqa: E402  (imports no torch)

PINNED: dict = {}  # the kernel pins `python demo.py` set before torch was first imported


DEFAULT_N = 360  # images a domain at --scale 1
FRACTIONS = (0.6, 0.15, 0.25)  # train / val / test: 216 / 54 / 90 a domain


def newer(a: Path, b: Path) -> bool:
    return a.exists() and b.exists() and a.stat().st_mtime >= b.stat().st_mtime


def reusable_bundle(engines: Path, checkpoint: Path) -> bool:
    """A bundle newer than the checkpoint that this version reads (its format version; a bundle from before an
    upgrade is rebuilt, not refused) and that carries the packing tensors."""
    from mixpert_export.bundle import manifest as mf
    from mixpert_train.errors import MixpertError

    if not newer(engines / mf.NAME, checkpoint / "mixpert.json"):
        return False
    try:
        return "packing" in mf.read_manifest(engines)
    except MixpertError:
        return False


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


# What each finding needs, per seed (thresholds fixed before the run): 1a every domain's further-tuned model ahead
# of joint on its domain; 1b joint ahead of that domain alone from the pre-joint start, every domain; 2a Mixpert
# ahead of joint with p < 0.01; 2b Mixpert ahead of the Table 7 control with p < 0.05.
P_2A, P_2B = 0.01, 0.05


def findings(reports: list[dict]) -> dict:
    """Per seed, whether each finding holds, read off the comparisons evaluate() names before any run."""
    out = {}
    for r in reports:
        c = r["comparisons"]
        out.setdefault("1a", []).append(all(v["a"] > v["b"] for v in c["1a further-tuned vs joint"].values()))
        out.setdefault("1b", []).append(all(v["a"] > v["b"] for v in c["1b joint vs domain alone"].values()))
        m = c["2a Mixpert vs joint"]
        out.setdefault("2a", []).append(m["a"] > m["b"] and m["p_value"] < P_2A)
        m = c["2b Mixpert vs Table 7 control"]
        out.setdefault("2b", []).append(m["a"] > m["b"] and m["p_value"] < P_2B)
    return out


def findings_text(reports: list[dict], domains) -> str:
    f = findings(reports)
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    lines = ["### The two findings, per seed (paired exact sign tests on the same held-out images)", ""]
    lines.append("| seed | 1a further-tuned vs joint, own domain: " + ", ".join(domains) + " | 1b joint vs domain alone: "
                 + ", ".join(domains) + " | 2a Mixpert vs joint (p) | 2b Mixpert vs Table 7 control (p) |")
    lines.append("|---|---|---|---|---|")
    for i, r in enumerate(reports):
        c = r["comparisons"]
        one_a = ", ".join(f"{pct(c['1a further-tuned vs joint'][d]['a'])}>{pct(c['1a further-tuned vs joint'][d]['b'])}"
                          f" (p={c['1a further-tuned vs joint'][d]['p_value']:.1g})" for d in domains)
        one_b = ", ".join(f"{pct(c['1b joint vs domain alone'][d]['a'])}>{pct(c['1b joint vs domain alone'][d]['b'])}"
                          f" (p={c['1b joint vs domain alone'][d]['p_value']:.1g})" for d in domains)
        a, b = c["2a Mixpert vs joint"], c["2b Mixpert vs Table 7 control"]
        lines.append(f"| {r.get('seed', i)} | {one_a} | {one_b} | {pct(a['a'])} vs {pct(a['b'])} (p={a['p_value']:.2g}) | "
                     f"{pct(b['a'])} vs {pct(b['b'])} (p={b['p_value']:.2g}) |")
    said = {
        "1a": "starting from the joint model, tuning one domain's expert on that domain alone beats joint there, every domain",
        "1b": "joint training beats training on one domain alone from the same start, every domain",
        "2a": f"Mixpert (the paper's score-difference routing) beats the joint model overall, p < {P_2A}",
        "2b": f"Mixpert beats the Table 7 control (more tuning, all domains mixed), p < {P_2B}",
    }
    lines.append("")
    for k, text in said.items():
        held = f[k]
        failed = [r.get("seed", i) for i, (r, h) in enumerate(zip(reports, held)) if not h]
        word = "HOLDS in every seed" if all(held) else f"does NOT hold in seed(s) {failed}"
        lines.append(f"- Finding {k}: {text}: {word}.")
    lines.append("\nA designed conflict on synthetic images at minutes of CPU training: a controlled experiment on the "
                 "mechanism, not a claim about real data or a reproduction of the paper's numbers.")
    return "\n".join(lines) + "\n"


def write_report(path: Path, reports: list[dict], domains, env: dict, times: dict, deployed: dict | None, args) -> dict:
    """runs/demo/report.json: per seed every row's accuracy per domain and overall, every named comparison with its
    p-value, which findings hold, and what the run was (design, environment, scale, wall times)."""
    from mixpert_train.data.synthetic import DESIGN
    from mixpert_train.evaluate import COMPARISONS

    f = findings(reports)
    data = {
        "design": DESIGN, "scale": args.scale, "n_per_domain": args.n_per_domain * args.scale, "domains": list(domains),
        "comparisons_named_before_the_run": [{"name": n, "a": a, "b": b, "images": o} for n, a, b, o in COMPARISONS],
        "thresholds": {"2a": P_2A, "2b": P_2B},
        "seeds": [{"seed": r.get("seed", i), "samples": r["samples"], "rows": r["accuracy"], "mixpert_row": r["mixpert_row"],
                   "router_accuracy": r["router_accuracy"], "comparisons": r["comparisons"]} for i, r in enumerate(reports)],
        "findings_hold": {k: {"every_seed": all(v), "per_seed": v} for k, v in f.items()},
        "environment": env, "wall_seconds": {k: round(v, 1) for k, v in times.items()},
        **({"deployed": deployed["rows"]} if deployed else {}),
    }
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    return data


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
    for label, tau in (("Mixpert, score-difference (paper default)", None), ("versatile everywhere (joint weights)", 1.0)):
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
    ap.add_argument("--n-per-domain", type=int, default=DEFAULT_N, help="images a domain at --scale 1")
    ap.add_argument("--scale", type=int, default=1, help="x more images a domain (same epochs): a stronger, slower run")
    ap.add_argument("--joint-epochs", type=int, default=6, help="joint SFT and each domain-alone model (the joint reaches the shared colours, 4/6, by epoch 3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, default=3, help="expert tuning + control + router + eval repeated with this many seeds")
    a = ap.parse_args(argv)
    if a.scale < 1:
        ap.error(f"--scale {a.scale}: must be 1 or more")

    from mixpert_train.data.synthetic import generate
    from mixpert_train.determinism import deterministic
    from mixpert_train.errors import MixpertError
    from mixpert_train.evaluate import markdown, run_eval
    from mixpert_train.experts import ExpertConfig, run_control, run_experts
    from mixpert_train.joint import JointConfig, run_joint
    from mixpert_train.model import DOMAINS
    from mixpert_train.router import RouterConfig, run_router

    env = deterministic() | {"pinned": PINNED}
    out, engines = Path(a.out), Path(a.engines)
    data, joint, experts, final, ev = (out / x for x in ("data", "joint", "experts", "mixpert", "eval"))
    times = {}
    t_all = time.perf_counter()
    # the paper's optimiser and schedule; rates and epochs scaled for a model trained from scratch in minutes
    expert_cfg = dict(epochs=3, batch=32, micro_batch=16, lr_projector=1e-3, lr_vision=3e-4)
    try:
        t = step("1/10 data: one scene, five readings (the designed conflict; see README)")
        if not (data / "test.jsonl").is_file():
            print(generate(data, a.n_per_domain * a.scale, a.seed, fractions=FRACTIONS))
        else:
            print(f"reusing {data}")
        times["data"] = time.perf_counter() - t

        t = step("2/10 joint SFT of a tiny LLaVA-OneVision (all domains mixed)")
        run_joint(data, joint, JointConfig(epochs=a.joint_epochs, seed=a.seed))
        times["joint"] = time.perf_counter() - t

        t = step("3/10 probe: each domain alone from the pre-joint start (same recipe and seed, that domain's data)")
        alone = {d: out / "domain-alone" / d for d in DOMAINS}
        for d, where in alone.items():
            run_joint(data, where, JointConfig(epochs=a.joint_epochs, seed=a.seed, domains=(d,)), progress=False)
        times["domain alone"] = time.perf_counter() - t

        reports, answers = [], {}  # whole-MLLM answers (joint, domain alone) do not change across seeds
        for seed in range(a.seed, a.seed + a.seeds):
            sfx = "" if seed == a.seed else f"-seed{seed}"
            e_dir, c_dir, f_dir, v_dir = (out / f"{x}{sfx}" for x in ("experts", "control", "mixpert", "eval"))
            t = step(f"4/10 disentangled expert tuning, seed {seed} (trunk and language model frozen; each kept at its "
                     "best epoch on its domain's validation split)")
            run_experts(data, joint, e_dir, ExpertConfig(**expert_cfg, seed=seed))
            times["experts"] = times.get("experts", 0) + time.perf_counter() - t
            t = step(f"5/10 Table 7 control, seed {seed}: the versatile expert tuned on all domains mixed, one expert's steps")
            run_control(data, joint, c_dir, ExpertConfig(**expert_cfg, seed=seed))
            times["control"] = times.get("control", 0) + time.perf_counter() - t
            t = step(f"6/10 router on pooled trunk features, seed {seed}")
            run_router(data, e_dir, f_dir, RouterConfig(epochs=100, batch=64, lr=2e-3, seed=seed))
            times["router"] = times.get("router", 0) + time.perf_counter() - t
            t = step(f"7/10 eval on held-out images, seed {seed}")
            if newer(v_dir / "eval.json", f_dir / "mixpert.json") and newer(v_dir / "eval.json", c_dir / "mixpert.json"):
                reports.append(json.loads((v_dir / "eval.json").read_text()))
                print(f"reusing {v_dir / 'eval.json'}")
            else:
                reports.append(run_eval(data, f_dir, v_dir, log=lambda s: None, control=c_dir, domain_only=alone,
                                        cache=answers))
            reports[-1]["seed"] = seed
            times["eval"] = times.get("eval", 0) + time.perf_counter() - t
        report = reports[0]

        t = step("8/10 engines: ONNX parts validated against torch, TensorRT engines where TensorRT(-RTX) is installed")
        from mixpert_export.bundle.build import build_bundle, format_table, summary_rows
        from mixpert_export.bundle.sources import resolve

        if reusable_bundle(engines, final):
            manifest = json.loads((engines / "manifest.json").read_text())
            print(f"reusing {engines}")
        else:
            model, source = resolve(checkpoint=str(final))
            manifest = build_bundle(model, engines, max_crops=40, source=source)
        print(format_table(["part", "file", "onnx", "export", "validation (vs torch fp32)", "engine"], summary_rows(manifest)))
        times["engines"] = time.perf_counter() - t

        t = step("9/10 the pipeline on held-out images, and its overhead over the single encoder")
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
        t = step("10/10 answers through the deployed path: engines (packed embeddings) + the joint snapshot's LLM")
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
    print(findings_text(reports, domains))
    times["total"] = time.perf_counter() - t_all
    write_report(out / "report.json", reports, domains, env, times, deployed, a)
    print("Written:")
    for what, where in (("data", data), ("joint model (HF snapshot)", joint), ("Mixpert checkpoint", final),
                        ("eval report", ev / "eval.md"), ("engines + manifest", engines),
                        ("latency table and plot", bench_dir), ("machine-readable report", out / "report.json")):
        print(f"  {what:28s} {where}")
    print(f"\nKernels pinned: {env['cpu_capability']} ATen, MKL_CBWR={env.get('MKL_CBWR')}, {env['threads']} threads, "
          "deterministic algorithms (see README: what may still differ across processors)")
    print("Wall time: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()))
    return 0


if __name__ == "__main__":
    PINNED.update(pin_kernels())  # before anything imports torch
    sys.exit(main())
