"""How far the latency gate can be trusted on this machine: its false alarms and its detection of a known slowdown.

    python benchmarks/gate_check.py --bundle DIR [--trials 10] [--inject 10%] [--baseline-runs 5] \
        [--out benchmarks/results] -- [latency.py settings: --batch 1 4 --crops 1 --cases a b c ...]

What it does, named before any timing (README, "The latency gate"):
  1. a baseline: `latency.py SETTINGS --runs 5` (five separate processes);
  2. `--trials` times, alternating which goes first: a clean gate, `latency.py SETTINGS --baseline B` (by default
     3 separate runs), and an injected one, the same with `--inject-slowdown 10%` (b and c slower by a busy wait in
     the harness);
  3. every trial is kept: a false alarm is a clean gate that exits 1, a detection an injected gate that exits 1.
The gate's own settings (--rounds, --runs, --max-regression, --confidence) are latency.py's defaults unless given
after `--`. Any other exit code stops the check: it means the gate could not judge, which is neither outcome.
Writes gate_check_<device>_<runtime>_<backbone>_<precision>.{md,json} with every trial's rows.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import latency  # noqa: E402


def run_latency(args: list[str], out: Path) -> tuple[int, dict]:
    """latency.py in its own process (fresh state, as a CI job runs it); (exit code, the report it wrote)."""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(HERE / "latency.py"), *args, "--out", str(out)], capture_output=True, text=True)
    if r.returncode not in (0, 1):
        raise SystemExit(f"error: latency.py {' '.join(args)} exited {r.returncode}: "
                         f"{(r.stderr.strip().splitlines() or ['(no output)'])[-1]}")
    (js,) = sorted(out.glob("latency_*.json"))
    report = json.loads(js.read_text())
    report["wall_s"] = time.perf_counter() - t0
    return r.returncode, report


def trial_record(kind: str, rc: int, report: dict) -> dict:
    return {"kind": kind, "exit": rc, "alarm": rc == 1, "wall_s": round(report["wall_s"], 1),
            "rows": [{k: g[k] for k in ("case", "batch", "crops", "growth", "low", "high", "run_sd", "detectable",
                                         "regressed")} for g in report["gate"]["rows"]]}


def growths(trials: list[dict]) -> str:
    cells = []
    for j, r in enumerate(trials[0]["rows"]):
        g = [t["rows"][j]["growth"] for t in trials]
        cells.append(f"{r['case'][0]}/a {r['batch']}x{r['crops']} {sum(g) / len(g):+.1%} [{min(g):+.1%}, {max(g):+.1%}]")
    return ", ".join(cells)


def markdown(rep: dict) -> str:
    clean = [t for t in rep["trials"] if t["kind"] == "clean"]
    inj = [t for t in rep["trials"] if t["kind"] == "injected"]
    base = rep["baseline"]
    lines = [f"### Latency gate check: {rep['backbone']} on {rep['runtime']} ({rep['precision']}), {rep['device']}", "",
             f"Finished {rep['date']} ({rep['wall_min']:.0f} min). Settings: `latency.py {' '.join(rep['settings'])}`; "
             f"baseline `--runs {rep['baseline_runs']}`; each trial one gate with latency.py's defaults "
             f"(--runs {latency.DEFAULT_GATE_RUNS}, --rounds >= {latency.DEFAULT_ROUNDS} and >= "
             f"{latency.MIN_POINT_S:.0f} s a point, --max-regression {latency.DEFAULT_MAX_REGRESSION}, --confidence "
             "0.95) unless the settings say otherwise; clean and injected trials alternate.", "",
             f"- **False alarms: {sum(t['alarm'] for t in clean)}/{len(clean)}** clean gates against a baseline "
             "from the same machine.",
             f"- **Detections: {sum(t['alarm'] for t in inj)}/{len(inj)}** gates with b and c slowed by "
             f"{rep['inject']:.0%} (a busy wait in the harness).",
             "- Mean growth [min, max] over the trials, clean: " + growths(clean) + "; injected: " + growths(inj) + ".",
             "- Baseline run-to-run spread of the median log ratio per run (sd): "
             + ", ".join(f"{k[0]}/a at {b}x{c} {sd:.2%}" for (k, b, c), sd in
                         ((tuple(x["key"]), x["run_sd"]) for x in base["spread"])), "",
             "| trial | kind | exit | " + " | ".join(f"{r['case'][0]}/a {r['batch']}x{r['crops']} growth [95% CI]"
                                                   for r in rep["trials"][0]["rows"]) + " |",
             "|---|---|---|" + "---|" * len(rep["trials"][0]["rows"])]
    for t in rep["trials"]:
        cells = [f"{'**' if r['regressed'] else ''}{r['growth']:+.1%} [{r['low']:+.1%}, {r['high']:+.1%}]"
                 f"{'**' if r['regressed'] else ''}" for r in t["rows"]]
        lines.append(f"| {t['trial']} | {t['kind']} | {t['exit']} | " + " | ".join(cells) + " |")
    lines += ["", "Bold: the row's whole interval lies above the allowance (a regression; exit 1 if any row is)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, settings = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--trials", type=int, default=10, help="clean and injected gate runs, each (default 10)")
    ap.add_argument("--inject", default="10%", help="the known slowdown of b and c (default 10%%)")
    ap.add_argument("--baseline-runs", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args(own)
    for flag in ("--bundle", "--out", "--baseline", "--inject-slowdown"):
        if flag in settings:
            ap.error(f"{flag} after --: the check sets it itself")
    t0 = time.perf_counter()
    settings = ["--bundle", a.bundle, *settings]
    with tempfile.TemporaryDirectory(prefix="gate-check-") as tmp:
        tmp = Path(tmp)
        print(f"baseline: {a.baseline_runs} runs", flush=True)
        _, base = run_latency(settings + ["--runs", str(a.baseline_runs)], tmp / "base")
        (base_path,) = (tmp / "base").glob("latency_*.json")
        spread = []
        for point in base["results"]:
            for k in latency.GATED:
                xs = [latency.run_value(p, k) for run in base["runs"] for p in run
                      if (p["batch"], p["crops"]) == (point["batch"], point["crops"])]
                mean = sum(xs) / len(xs)
                sd = (sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5
                spread.append({"key": [k, point["batch"], point["crops"]], "run_sd": sd, "runs": xs})
        trials = []
        for i in range(a.trials):
            order = ("clean", "injected") if i % 2 == 0 else ("injected", "clean")
            for kind in order:
                extra = ["--inject-slowdown", a.inject] if kind == "injected" else []
                rc, rep = run_latency(settings + ["--baseline", str(base_path), *extra], tmp / f"{kind}{i}")
                trials.append(trial_record(kind, rc, rep) | {"trial": i + 1, "ran": len(trials) + 1})
                worst = max(trials[-1]["rows"], key=lambda r: r["low"])
                print(f"trial {i + 1} {kind}: exit {rc}; highest lower bound {worst['case'][0]}/a "
                      f"{worst['batch']}x{worst['crops']} {worst['growth']:+.1%} [{worst['low']:+.1%}, "
                      f"{worst['high']:+.1%}]", flush=True)
        trials.sort(key=lambda t: (t["trial"], t["kind"]))  # per trial: clean, then injected ("ran" keeps the order)
    report = {k: base[k] for k in ("backbone", "runtime", "precision", "device", "backend")}
    report |= {"date": time.strftime("%Y-%m-%d %H:%M"), "wall_min": (time.perf_counter() - t0) / 60,
               "settings": settings[2:], "baseline_runs": a.baseline_runs, "inject": latency._percent(a.inject),
               "baseline": {"results": base["results"], "spread": spread}, "trials": trials,
               "false_alarms": sum(t["alarm"] for t in trials if t["kind"] == "clean"),
               "detections": sum(t["alarm"] for t in trials if t["kind"] == "injected")}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"gate_check_{latency.slug(report['device'])}_{report['runtime']}_{report['backbone']}_{report['precision']}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2))
    md = markdown(report)
    (out / f"{stem}.md").write_text(md)
    print("\n" + md + f"\nwritten: {out / stem}.{{md,json}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
