"""Mixpert's latency over the single encoder, measured side by side in one process on the same runtime.

    python benchmarks/latency.py --backbone tiny|llava-ov-7b [--bundle DIR] --runtime onnxruntime|torch|tensorrt
        [--device cpu|cuda] --batch 1 4 --crops 1 [--rounds N] [--runs N] [--cases a b c]
        [--baseline FILE [--max-regression 3%] [--confidence 0.95]] [--inject-slowdown 10%]

The regression gate (README, "The latency gate"): a baseline is --runs 5 separate processes; a gate (by default
--runs 3) is compared with it per gated ratio (b/a, c/a) and point, the run being the unit; a regression when the
whole t interval of the growth lies above --max-regression (default 3%). --inject-slowdown makes b and c slower by
a busy wait in this harness, to test the gate; such a report is never accepted as a baseline.

Cases, same inputs, interleaved rounds (order rotated each round), warm-up first:
  a  single encoder: the unsplit tower + projector as one model
  b  Mixpert pipeline, every image of one domain            (trunk, router, 1 expert)
  c  Mixpert pipeline, a mixed batch: image i -> domain i%5 (trunk, router, min(B,5) experts)
  d  two full encoders per image (the multi-encoder design of the paper's Fig. 1(b))
  e  dense mixture: every expert on every image             (what routing saves)
  f  bare parts: trunk, router, one expert on all crops, no routing or grouping  (b/f = the orchestrator's overhead)
Ratios b/a, c/a, d/a, e/a are taken per round and reported as median [min, max]. Absolute times are context only.
Every case ends with its tokens on the host, as the pipeline's do, and runs the batch in the calls the pipeline
makes of it (patch families: images grouped up to the call's patch budget; see MixpertPipeline.calls).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from mixpert_export.runtime.pipeline import ImageResult, MixpertPipeline
from mixpert_train.model import pool_matrix

CASES = ("a_single", "b_one_domain", "c_mixed", "d_two_encoders", "e_dense", "f_bare_parts")
RATIOS = ("b_one_domain", "c_mixed", "d_two_encoders", "e_dense")
# f: trunk + router + one expert called directly, no pipeline: b/f is the orchestrator's own overhead
GATED = ("b_one_domain", "c_mixed")  # what the regression gate watches
# --rounds by default: at least DEFAULT_ROUNDS, and enough to time each point for MIN_POINT_S (up to MAX_ROUNDS), so
# millisecond calls (tiny, a GPU) get the rounds their round-to-round scatter needs and 5-second calls are not
# repeated for minutes; the README's gate figures were measured with these defaults
DEFAULT_ROUNDS, MIN_POINT_S, MAX_ROUNDS = 15, 3.0, 300
DEFAULT_MAX_REGRESSION = "3%"
DEFAULT_GATE_RUNS = 3  # --runs with --baseline: the gate judges the mean of this many separate processes


def device_name(backend) -> str:
    """The GPU's name where the backend runs on one, else the host CPU's (backend None: the host)."""
    d = backend.describe() if backend is not None else {}
    if str(d.get("device", "cpu")).startswith("cuda") or d.get("runtime", "").startswith("tensorrt"):
        import torch

        return torch.cuda.get_device_name(0)
    model = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} x{os.cpu_count()}"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:60]


def write_report(out: str | Path, stem: str, report: dict, md: str) -> None:
    """A benchmark's report as out/stem.json (every figure) and out/stem.md (the table), and where they went."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (out / f"{stem}.md").write_text(md)
    print(f"written: {out / stem}.{{md,json}}")


def inputs(pipe: MixpertPipeline, batch: int, crops: int, sizes=(), seed: int = 0):
    """(rows per image, grids or Nones): random crop bytes (the parts' uint8 input) for crop families; for patch
    families noise images of `sizes` (w, h), cycled, through the family's own preprocessing (their real grids)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    if pipe.unit == "crops":
        shape = tuple(pipe.io["pixels"][0][1:])
        return [rng.integers(0, 256, (crops,) + shape, dtype=np.uint8) for _ in range(batch)], [None] * batch
    made = [pipe.preprocess.rows(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
            for w, h in (sizes[i % len(sizes)] for i in range(batch))]
    return [px for px, _ in made], [g for _, g in made]


def cases(pipe: MixpertPipeline, batch: int, crops: int, sizes=(), seed: int = 0) -> dict:
    """The six workloads on the same pixels, each a zero-argument callable. Each runs the calls the pipeline makes
    of the batch (MixpertPipeline.calls: one call for crop families within the bundle's max; patch families group
    images up to their call budget, since a call attends over all its patches), so every case pays what the product
    pays, the single encoder included."""
    be, cfg = pipe.backend, pipe.cfg
    per_image, grids = inputs(pipe, batch, crops, sizes, seed)
    merge = pipe.io["merge"]
    calls = [{"images": idx, "pixels": np.concatenate([per_image[i] for i in idx]),
              "pool": pool_matrix([len(per_image[i]) for i in idx]), "grids": [grids[i] for i in idx]}
             for idx in pipe.calls([len(px) for px in per_image])]

    def feeds(c):  # per-row inputs computed on every call as the pipeline does (the single encoder needs them too)
        return {"pixel_values": be.from_host(c["pixels"])} | pipe.row_feeds(c["grids"])

    def items(c):
        out = []
        for i in c["images"]:
            res = ImageResult(i, "bench")
            res.grid = grids[i]
            out.append((res, per_image[i]))
        return out

    def single():
        return [be.to_host(be.infer("single_encoder", feeds(c))["tokens"]) for c in calls]

    def experts(h, f, e, n):
        if not pipe.io["rows"]:  # crop families: the backends' own (static, graph) expert path
            return be.run_experts(h, [(f"expert_{e}", np.arange(n))], n)
        rows = {k: v for k, v in f.items() if k != "pixel_values"}
        return be.run_experts(h, [(f"expert_{e}", np.arange(n))], n, rows=rows, merge=merge)

    def trunk_router(c):
        f = feeds(c)
        h = be.infer("trunk", f)["hidden"]
        be.to_host(be.infer("router", {"hidden": h, "pool": be.from_host(c["pool"])})["scores"])
        return f, h

    def dense():
        out = []
        for c in calls:
            f, h = trunk_router(c)
            out += [experts(h, f, e, len(c["pixels"])) for e in cfg.experts]
        return out

    def bare():  # the backend's own expert path (graphs where it has them), no routing or grouping
        out = []
        for c in calls:
            f, h = trunk_router(c)
            out.append(experts(h, f, cfg.domains[0], len(c["pixels"])))
        return out

    def routed(expert_of):  # the pipeline, with given experts (image i -> expert_of(i)); the router still runs
        return lambda: [pipe.run_crops(items(c), experts=[expert_of(i) for i in c["images"]]) for c in calls]

    return {
        "f_bare_parts": bare,
        "a_single": single,
        "b_one_domain": routed(lambda i: cfg.domains[0]),
        "c_mixed": routed(lambda i: cfg.domains[i % len(cfg.domains)]),
        "d_two_encoders": lambda: (single(), single()),
        "e_dense": dense,
    }


def _timer(backend):
    """Milliseconds of fn(): CUDA events on a GPU backend, perf_counter on CPU (after a device sync)."""
    desc = backend.describe()
    on_gpu = str(desc.get("device", "")).startswith("cuda") or desc.get("runtime", "").startswith("tensorrt")
    if on_gpu:
        import torch

        def timed(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        return timed

    def timed(fn):
        t = time.perf_counter()
        fn()
        backend.synchronize()
        return (time.perf_counter() - t) * 1e3
    return timed


def slowed(fn, backend, fraction: float):
    """fn, then a busy wait of `fraction` of fn's own time: a known slowdown of one path, for testing the gate only.
    It lives in this harness, never in the product path, and a run that used it is refused as a baseline."""
    def run():
        t = time.perf_counter()
        out = fn()
        backend.synchronize()
        until = time.perf_counter() + fraction * (time.perf_counter() - t)
        while time.perf_counter() < until:
            pass
        return out
    return run


def measure(pipe: MixpertPipeline, batch: int, crops: int, rounds: int, warmup: int, sizes=(),
            only=CASES, inject: float = 0.0) -> dict:
    work = {k: fn for k, fn in cases(pipe, batch, crops, sizes).items() if k in only}
    if inject:
        work |= {k: slowed(work[k], pipe.backend, inject) for k in GATED if k in work}
    timed = _timer(pipe.backend)
    round_s = 0.0
    for _ in range(max(warmup, 1 if rounds is None else 0)):
        t = time.perf_counter()
        for fn in work.values():
            fn()
        pipe.backend.synchronize()
        round_s = time.perf_counter() - t  # the last warm-up round's time sizes the auto rounds
    if rounds is None:
        rounds = int(min(MAX_ROUNDS, max(DEFAULT_ROUNDS, np.ceil(MIN_POINT_S / max(round_s, 1e-6)))))
    names = tuple(k for k in CASES if k in work)
    times = {k: [] for k in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate: no case always runs first
        for k in order:
            times[k].append(timed(work[k]))
    out = {"batch": batch, "crops": crops}
    if pipe.unit != "crops":  # patch families: the point is the size mix; `crops` holds the batch's patches
        per_image, grids = inputs(pipe, batch, crops, sizes)
        counts = [len(p) for p in per_image]
        out |= {"crops": int(sum(counts)), "sizes": [list(sizes[i % len(sizes)]) for i in range(batch)],
                "grids": [list(g) for g in grids], "call_rows": pipe.call_rows, "calls": pipe.calls(counts)}
    return summarize(out, times)


def summarize(out: dict, times: dict) -> dict:
    """A point's statistics from its per-round times {case: [ms per round]} (one run's, or several runs' pooled)."""
    out = out | {"rounds": len(times["a_single"]), "cases": {}, "ratios": {}}
    for k, ts in times.items():
        out["cases"][k] = {"median_ms": statistics.median(ts), "p90_ms": float(np.percentile(ts, 90)), "all_ms": ts}
    for k in (k for k in RATIOS if k in times):
        rs = [x / a for x, a in zip(times[k], times["a_single"])]
        out["ratios"][k] = {"median": statistics.median(rs), "min": min(rs), "max": max(rs),
                            "p10": float(np.percentile(rs, 10)), "p90": float(np.percentile(rs, 90))}
    if "f_bare_parts" not in times or "b_one_domain" not in times:
        return out
    over = [b - f for b, f in zip(times["b_one_domain"], times["f_bare_parts"])]
    out["orchestrator"] = {"b_over_f": statistics.median(b / f for b, f in zip(times["b_one_domain"], times["f_bare_parts"])),
                           "extra_ms": statistics.median(over)}
    return out


def run_once(a, bundle: Path, only, inject: float, setup_mismatch) -> dict | None:
    """One run in this process: load the bundle, then every (batch, crops) point; None when the setup cannot be gated."""
    options = {"torch": {"graphs": a.graphs, "compile": a.compile, "streams": a.streams},
               "onnxruntime": {"cuda_graphs": a.graphs} if a.device == "cuda" else {}}.get(a.runtime, {})
    pipe = MixpertPipeline.from_engines(bundle, runtime=a.runtime, device=a.device, backend_options=options)
    report = {"backbone": pipe.cfg.backbone.name, "runtime": a.runtime, "precision": pipe.manifest["precision"],
              "device": device_name(pipe.backend), "backend": pipe.backend.describe(),
              "date": time.strftime("%Y-%m-%d %H:%M"), "results": []}
    if inject:
        report["injected_slowdown"] = inject
    if setup_mismatch(report):
        return None
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in a.sizes]
    for crops in (a.crops if pipe.unit == "crops" else [0]):
        for batch in a.batch:
            if pipe.unit == "crops" and batch * crops > pipe.max_crops:
                print(f"skip {batch}x{crops}: the bundle takes {pipe.max_crops} crops a call", file=sys.stderr)
                continue
            r = measure(pipe, batch, crops, a.rounds, a.warmup, sizes, only=only, inject=inject)
            report["results"].append(r)
            print(f"{batch} x {crops}: a {r['cases']['a_single']['median_ms']:.1f} ms; "
                  + ", ".join(f"{k[0]}/a {v['median']:.3f}" for k, v in r["ratios"].items()), flush=True)
    return report


def separate_runs(argv: list[str], bundle: Path, runs: int):
    """This command `runs` times, one process after another (each its own load, warm-up and rounds), without
    --runs/--baseline/--out; yields each run's report as it finishes."""
    import subprocess
    import tempfile

    drop = {"--runs", "--baseline", "--out", "--bundle"}
    args, i = [], 0
    while i < len(argv):
        name = argv[i].split("=")[0]
        if name in drop:
            i += 1 if "=" in argv[i] else 2
            continue
        args.append(argv[i])
        i += 1
    with tempfile.TemporaryDirectory() as tmp:
        for j in range(runs):
            d = Path(tmp) / str(j)
            print(f"run {j + 1}/{runs}", flush=True)
            subprocess.run([sys.executable, __file__, *args, "--bundle", str(bundle), "--out", str(d)], check=True)
            (js,) = d.glob("latency_*.json")
            yield json.loads(js.read_text())


def pooled(runs: list[list[dict]]) -> list[dict]:
    """Per (batch, crops) point, the rounds of every run together (for the table and the plot; the gate uses runs)."""
    points = []
    for first in runs[0]:
        key = (first["batch"], first["crops"])
        same = [p for run in runs for p in run if (p["batch"], p["crops"]) == key]
        times = {k: [t for p in same for t in p["cases"][k]["all_ms"]] for k in first["cases"]}
        meta = {k: v for k, v in first.items() if k not in ("rounds", "cases", "ratios", "orchestrator")}
        points.append(summarize(meta, times) | {"runs": len(same)})
    return points


def markdown(report: dict) -> str:
    lines = [f"### Latency: {report['backbone']} on {report['runtime']} ({report['precision']}), {report['device']}", "",
             f"Measured {report['date']}, "
             + (f"{len(report['runs'])} runs (separate processes), rounds pooled" if report.get("runs") else "one process")
             + ", interleaved rounds; ratios per round, median [min, max].", "",
             f"| batch x {'patches' if report['results'] and 'grids' in report['results'][0] else 'crops'} | a single (ms) | b/a one-domain | c/a mixed | d/a two encoders | e/a dense | orchestrator b/f (ms) |",
             "|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        cell = lambda k: (f"{r['ratios'][k]['median']:.3f} [{r['ratios'][k]['min']:.3f}, {r['ratios'][k]['max']:.3f}]"  # noqa: E731
                          if k in r["ratios"] else "not run")
        calls = f" ({len(r['calls'])} calls)" if len(r.get("calls", [])) > 1 else ""
        orch = r.get("orchestrator")
        lines.append(f"| {r['batch']} x {r['crops']}{calls} | {r['cases']['a_single']['median_ms']:.1f} | "
                     + " | ".join(cell(k) for k in RATIOS)
                     + (f" | {orch['b_over_f']:.3f} ({orch['extra_ms']:+.2f}) |" if orch else " | not run |"))
    if report.get("injected_slowdown"):
        lines += ["", f"**Injected slowdown** (gate testing only): b and c each ran {report['injected_slowdown']:.0%} "
                  "longer by a busy wait in the harness."]
    if report.get("gate"):
        g = report["gate"]
        lines += ["", f"Gate against `{g['baseline']}`: growth of each ratio over the baseline, mean of the runs' median "
                  f"log ratios [{g['confidence']:.0%} t interval on the pooled run-to-run spread]; a regression when the "
                  f"whole interval exceeds +{g['max_regression']:.1%}.", ""]
        lines += [f"- {'REGRESSION ' if row['regressed'] else ''}{gate_line(row)}" for row in g["rows"]]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = sorted(report["results"], key=lambda r: (r["batch"] * r["crops"], r["crops"]))
    colors = {k: f"C{i}" for i, k in enumerate(CASES)}  # one colour per case in both panels
    labels = {"a_single": "a single encoder", "b_one_domain": "b Mixpert, one domain", "c_mixed": "c Mixpert, mixed",
              "d_two_encoders": "d two encoders", "e_dense": "e dense mixture"}
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = [f"{r['batch']}x{r['crops']}" for r in res]
    for k in (k for k in CASES[:5] if k in res[0]["cases"]):
        ax1.plot(x, [r["cases"][k]["median_ms"] for r in res], marker="o", color=colors[k], label=labels[k])
    unit = "patches" if res and "grids" in res[0] else "crops"
    ax1.set_xlabel(f"images x {unit}"), ax1.set_ylabel("median latency (ms)"), ax1.set_yscale("log")
    ax1.set_title("latency"), ax1.legend(fontsize=8)
    w = 0.8 / len(RATIOS)
    for i, k in enumerate(k for k in RATIOS if k in res[0]["ratios"]):
        med = [r["ratios"][k]["median"] for r in res]
        lo = [m - r["ratios"][k]["min"] for m, r in zip(med, res)]
        hi = [r["ratios"][k]["max"] - m for m, r in zip(med, res)]
        ax2.bar(np.arange(len(res)) + (i - 1.5) * w, med, w, yerr=[lo, hi], capsize=2, color=colors[k], label=labels[k])
    ax2.axhline(1.0, color="k", lw=0.8), ax2.axhline(1.02, color="r", lw=0.8, ls="--", label="2% budget")
    ax2.set_xticks(np.arange(len(res)), x), ax2.set_ylabel("ratio to single encoder (same run)")
    ax2.set_title("overhead"), ax2.legend(fontsize=8)
    fig.suptitle(f"Mixpert vs single encoder: {report['backbone']}, {report['runtime']} {report['precision']}, {report['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_value(point: dict, case: str) -> float:
    """One run's figure for a gated ratio: the median over its rounds of log(case / a), each round's two times taken
    back to back on the same machine state."""
    return float(np.median(np.log(np.asarray(point["cases"][case]["all_ms"]) / np.asarray(point["cases"]["a_single"]["all_ms"]))))


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile (numerical integration of the density; no scipy in this project)."""
    from math import exp, lgamma, pi, sqrt

    c = exp(lgamma((df + 1) / 2) - lgamma(df / 2)) / sqrt(df * pi)  # lgamma: no overflow at large df
    integrate = getattr(np, "trapezoid", None) or np.trapz  # numpy 2 renamed it

    def cdf(x):
        grid = np.linspace(0, x, 20001)
        return 0.5 + integrate(c * (1 + grid ** 2 / df) ** (-(df + 1) / 2), grid)
    lo, hi = 0.0, 1000.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def runs_of(report: dict) -> list[list[dict]]:
    """The report's runs (separate processes), each a list of (batch, crops) points; an old report is one run."""
    return report.get("runs") or [report["results"]]


def gate(report: dict, baseline: dict, max_regression: float, confidence: float = 0.95) -> list[dict]:
    """Every gated ratio at every (batch, crops) point both reports measured: its growth over the baseline, a
    confidence interval, and whether it regressed.

    The unit is the run (a separate process): each run gives the median over its rounds of log(b/a); the spread
    between runs, pooled over the baseline's runs and this report's, is what the interval is built from, because on
    a shared machine the ratio drifts from run to run by more than rounds within a run vary. The growth is the
    difference of the mean run figures, the interval Student's t on the pooled run-to-run spread; a regression only
    when the whole interval lies above the allowed growth."""
    base_runs, cur_runs = runs_of(baseline), runs_of(report)
    rows = []
    for r in report["results"]:
        key = (r["batch"], r["crops"])
        for k in GATED:
            xb = [run_value(p, k) for run in base_runs for p in run if (p["batch"], p["crops"]) == key and k in p["cases"]]
            xc = [run_value(p, k) for run in cur_runs for p in run if (p["batch"], p["crops"]) == key and k in p["cases"]]
            if len(xb) < 2 or not xc:
                continue
            df = len(xb) - 1 + len(xc) - 1
            var = (np.var(xb) * len(xb) + np.var(xc) * len(xc)) / df  # pooled run-to-run variance of log(b/a)
            se = float(np.sqrt(var * (1 / len(xb) + 1 / len(xc))))
            d, t = float(np.mean(xc) - np.mean(xb)), t_quantile(0.5 + confidence / 2, df)
            rows.append({"case": k, "batch": r["batch"], "crops": r["crops"],
                         "ratio": float(np.exp(np.mean(xc))), "baseline_ratio": float(np.exp(np.mean(xb))),
                         "growth": float(np.expm1(d)), "low": float(np.expm1(d - t * se)), "high": float(np.expm1(d + t * se)),
                         "run_sd": float(np.sqrt(var)), "runs": [len(xc), len(xb)],
                         # growth flagged about 19 times in 20 (power 0.95): the allowance plus (t + z_0.95) errors
                         "detectable": float(np.expm1(np.log1p(max_regression) + (t + 1.645) * se)),
                         "regressed": bool(d - t * se > np.log1p(max_regression))})
    return rows


def gate_line(g: dict) -> str:
    return (f"{g['case']} at {g['batch']}x{g['crops']}: growth {g['growth']:+.1%} [{g['low']:+.1%}, {g['high']:+.1%}] "
            f"over the baseline (ratio {g['ratio']:.3f} vs {g['baseline_ratio']:.3f}; {g['runs'][0]} vs {g['runs'][1]} runs, "
            f"run-to-run sd {g['run_sd']:.1%}; catches >= {g['detectable']:+.1%})")


GATE_KEYS = ("device", "runtime", "backbone", "precision")


def baseline_problem(baseline: dict) -> str | None:
    """Why `baseline` cannot be a baseline whatever is measured against it (one run: no spread; an injected
    slowdown), or None."""
    if len(runs_of(baseline)) < 2:
        return (f"it holds {len(runs_of(baseline))} run; the gate needs the run-to-run spread: measure the baseline "
                "with --runs 5")
    if baseline.get("injected_slowdown"):
        return f"the baseline ran with an injected slowdown of {baseline['injected_slowdown']:.0%} (gate testing only)"
    return None


def gate_mismatch(report: dict, baseline: dict) -> str | None:
    """Why this run cannot be gated against `baseline` (not a baseline, another device, runtime, backbone or
    precision, or no (batch, crops) point in common), or None. Ratios from different machines are not comparable."""
    why = baseline_problem(baseline)
    if why:
        return why
    for k in GATE_KEYS:
        if k in baseline and baseline[k] != report.get(k):
            return f"the baseline was measured with {k} {baseline[k]!r}, this run has {report.get(k)!r}"
    common = {(r["batch"], r["crops"]) for r in report["results"]} & {(r["batch"], r["crops"]) for r in baseline["results"]}
    if not common:
        return "no (batch, crops) point in common with the baseline: nothing would be compared"
    return None


def _percent(text: str) -> float:
    return float(text.rstrip("%")) / 100 if text.endswith("%") else float(text)


def ensure_bundle(args) -> Path:
    if args.bundle:
        return Path(args.bundle)
    out = Path("engines") / f"{args.backbone}-{args.precision}-bench"
    if not (out / "manifest.json").is_file():
        from mixpert_export.bundle.build import build_bundle
        from mixpert_export.bundle.sources import resolve

        model, source = resolve(args.backbone, random_init=True)
        rows = None if model.cfg.backbone.pixels else max(args.batch) * max(args.crops)  # patches: the family's budget
        build_bundle(model, out, precision=args.precision, runtime="onnxruntime" if args.runtime != "tensorrt" else "tensorrt",
                     max_crops=rows, source=source)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="tiny")
    ap.add_argument("--bundle", help="a built bundle (default: build engines/<backbone>-<precision>-bench, random init)")
    ap.add_argument("--runtime", default="onnxruntime", choices=["torch", "onnxruntime", "tensorrt"])
    ap.add_argument("--device", help="cpu or cuda")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--crops", type=int, nargs="+", default=[1])
    ap.add_argument("--sizes", nargs="+", default=["448x448", "640x480", "336x224", "224x224"],
                    help="patch families (qwen2-vl): image sizes WxH of the mix, cycled over the batch (--crops unused)")
    ap.add_argument("--rounds", type=int, default=None,
                    help=f"interleaved rounds per point (default: at least {DEFAULT_ROUNDS}, and enough for "
                         f"{MIN_POINT_S:.0f} s of timing a point, at most {MAX_ROUNDS}: what the gate's figures were "
                         "measured with)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--runs", type=int, default=None,
                    help="separate processes, one after another; the gate's unit (default 1, with --baseline "
                         f"{DEFAULT_GATE_RUNS}; a baseline needs >= 2: --runs 5 is what the README's figures use)")
    ap.add_argument("--cases", nargs="+", choices=[k[0] for k in CASES], default=[k[0] for k in CASES],
                    help="which cases to time (a is always timed); a gate needs a, b, c: '--cases a b c' is the quick gate")
    ap.add_argument("--graphs", action=argparse.BooleanOptionalAction, default=None,
                    help="CUDA graphs per part and crop bucket, torch or ONNX Runtime's CUDA EP (default on with --device cuda)")
    ap.add_argument("--compile", action="store_true", help="torch: torch.compile the parts (and the baseline)")
    ap.add_argument("--streams", type=int, default=1, help="torch on CUDA: expert groups on this many streams")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--baseline", help="results JSON to gate against (an earlier run of this script on the same setup)")
    ap.add_argument("--max-regression", default=DEFAULT_MAX_REGRESSION,
                    help="allowed growth of b/a and c/a over the baseline; a regression when the whole confidence "
                         f"interval of the growth lies above it (default {DEFAULT_MAX_REGRESSION})")
    ap.add_argument("--confidence", type=float, default=0.95, help="of the gate's two-sided intervals (default 0.95)")
    ap.add_argument("--inject-slowdown", default="0%", metavar="PCT",
                    help="gate testing only: b and c run this much longer (a busy wait in this harness, never in the "
                         "product); the report is marked and refused as a baseline")
    a = ap.parse_args(argv)
    only = {k for k in CASES if k[0] in set(a.cases) | {"a"}}
    inject = _percent(a.inject_slowdown)
    baseline = None
    if a.baseline:  # read before anything is written: the run's output may have the baseline's name
        try:
            baseline = json.loads(Path(a.baseline).read_text())
        except (OSError, ValueError) as e:
            print(f"error: --baseline {a.baseline}: {e.__class__.__name__}: {e}; pass a JSON this script wrote", file=sys.stderr)
            return 2
        why = baseline_problem(baseline)  # before minutes of timing
        if why:
            print(f"error: {a.baseline}: {why}; measure a baseline on this setup (--runs 5, no --baseline)", file=sys.stderr)
            return 2
        if not set(GATED) <= only:
            print("error: --baseline gates b/a and c/a: keep cases a, b and c in --cases", file=sys.stderr)
            return 2
    bundle = ensure_bundle(a)
    if a.runs is None:
        a.runs = DEFAULT_GATE_RUNS if a.baseline else 1
    if a.runs < 1:
        print(f"error: --runs {a.runs}: at least one", file=sys.stderr)
        return 2

    def setup_mismatch(report):  # checked as soon as the device is known, before minutes of timing
        why = gate_mismatch(report | {"results": baseline["results"]}, baseline) if baseline is not None else None
        if why:
            print(f"error: {a.baseline}: {why}; measure a baseline on this setup (--runs 5, no --baseline)", file=sys.stderr)
        return why

    if a.runs > 1:  # the runs are child processes; this one only collects them
        report, runs = None, []
        for child in separate_runs(argv if argv is not None else sys.argv[1:], bundle, a.runs):
            if report is None:
                report = {k: v for k, v in child.items() if k != "results"}
                if setup_mismatch(report | {"results": child["results"]}):
                    return 2
            runs.append(child["results"])
        report |= {"runs": runs, "results": pooled(runs)}
    else:
        report = run_once(a, bundle, only, inject, setup_mismatch)
        if report is None:
            return 2
    bad = []
    if baseline is not None:
        why = gate_mismatch(report, baseline)
        if why:
            print(f"error: {a.baseline}: {why}; measure a baseline on this setup (--runs 5, no --baseline)", file=sys.stderr)
            return 2
        rows = gate(report, baseline, _percent(a.max_regression), a.confidence)
        report["gate"] = {"baseline": a.baseline, "max_regression": _percent(a.max_regression),
                          "confidence": a.confidence, "rows": rows}
        bad = [g for g in rows if g["regressed"]]
    md = markdown(report)
    print("\n" + md)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    variant = "".join(f"_{k}" for k in ("cuda_graphs", "compile") if report["backend"].get(k))
    variant += f"_streams{a.streams}" if a.runtime == "torch" and a.streams > 1 else ""
    variant += "_gate" if baseline is not None else ""  # a gate run never replaces the baseline it was judged by
    variant += "_injected" if inject else ""
    stem = f"latency_{slug(report['device'])}_{a.runtime}_{report['backbone']}_{report['precision']}{variant}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    (out / f"{stem}.md").write_text(md)
    plot(report, out / f"{stem}.png")
    print(f"written: {out / stem}.{{md,json,png}}")
    for g in bad:
        print(f"REGRESSION {gate_line(g)}", file=sys.stderr)
    if bad:
        return 1
    if baseline is not None:
        print(f"gate: no ratio's {a.confidence:.0%} interval lies above +{_percent(a.max_regression):.1%} growth over {a.baseline}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


