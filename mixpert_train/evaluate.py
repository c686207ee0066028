"""Stage 4, eval: exact-match answer accuracy per domain for the joint model, Mixpert with the true-domain
expert (oracle), with each routing strategy, and a tau sweep (the shape of the paper's Tables 4 and 5), plus
the router's per-domain accuracy (Table 3). Every expert answers every test image once; the configurations
are then read off those answers, so each row is the same model on the same images.

With the miniature's probes (the demo passes them): each domain's model trained on that domain alone from the
pre-joint start, and the Table 7 control (the versatile expert further tuned on all domains mixed). COMPARISONS names,
before any run, the paired tests the report gives: exact sign tests on the same held-out images."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpoint import load_checkpoint, read_checkpoint_meta
from .data.manifest import read_manifest
from .errors import MixpertError
from .experts import load_language_model
from .mllm import answer_scores, item_rows, load_items, load_tokenizer, reference_crop_tokens, token_sizes, write_json
from .model import VERSATILE, pool_matrix, route
from .preprocess import Preprocessor

TAUS = (0.1, 0.3, 0.5, 0.6, 0.7)
JOINT, DOMAIN_ONLY, FURTHER, CONTROL = ("joint", "domain alone from the pre-joint start", "further-tuned on its domain",
                                        "Table 7 control (all domains mixed)")
MIXPERT = "Mixpert"  # the checkpoint's own routing (strategy, tau): the paper's score-difference at 0.6 by default
# The paired comparisons, fixed before any run: (name, a, b, images): a against b on the same held-out images;
# "own": one test per domain on that domain's images; "all": one test on every image.
COMPARISONS = (
    ("1a further-tuned vs joint", FURTHER, JOINT, "own"),
    ("1b joint vs domain alone", JOINT, DOMAIN_ONLY, "own"),
    ("2a Mixpert vs joint", MIXPERT, JOINT, "all"),
    ("2b Mixpert vs Table 7 control", MIXPERT, CONTROL, "all"),
)


def paired(a: np.ndarray, b: np.ndarray) -> dict:
    """a vs b right/wrong on the same images: accuracies, the discordant counts and the exact sign test's p."""
    better, worse = int(np.sum(a & ~b)), int(np.sum(~a & b))
    return {"a": float(np.mean(a)), "b": float(np.mean(b)), "n": int(len(a)), "better": better, "worse": worse,
            "p_value": sign_test(better, worse)}


@torch.no_grad()
def mllm_correct(llava, items, backbone, batch: int = 16) -> np.ndarray:
    """Exact match per item of a whole MLLM through transformers' own vision path (the joint model's own answers)."""
    out = []
    for lo in range(0, len(items), batch):
        part = items[lo:lo + batch]
        crops = torch.cat([it.crops for it in part])
        tokens = reference_crop_tokens(llava, crops, [it.grid for it in part])
        out.append(answer_scores(llava, list(tokens.split(token_sizes(part, backbone))), part)[1].numpy())
    return np.concatenate(out) if out else np.zeros(0, bool)


@torch.no_grad()
def evaluate(data: str | Path, checkpoint: str | Path, joint: str | Path | None = None, split: str = "test",
             taus=TAUS, batch: int = 16, control: str | Path | None = None, domain_only: dict | None = None,
             progress: bool = True, log=print, cache: dict | None = None) -> dict:
    """The report of one Mixpert checkpoint on `split`. `control`: a run_control checkpoint (its versatile expert is
    the Table 7 control); `domain_only`: domain -> the snapshot trained on that domain alone (the joint stage with
    --domains), each answering its own domain's images. `cache`: a dict kept across calls (the demo's seeds) that
    holds whole-MLLM answers (joint, domain alone), which do not change with the experts."""
    data, checkpoint = Path(data), Path(checkpoint)
    meta = read_checkpoint_meta(checkpoint)
    joint = Path(joint or meta.get("extra", {}).get("joint", ""))
    model = load_checkpoint(checkpoint)
    cfg = model.cfg
    llava = load_language_model(joint)
    tokenizer = load_tokenizer(joint)
    items = load_items(read_manifest(data / f"{split}.jsonl", cfg.domains), Preprocessor(cfg.backbone), tokenizer, log=log)
    def answers(snapshot: Path, key: str, picked: list):
        k = (str(Path(snapshot).resolve()), str(data.resolve()), split, key)
        if cache is not None and k in cache:
            return cache[k]
        llm = llava if snapshot == joint else load_language_model(Path(snapshot))
        got = mllm_correct(llm, picked, cfg.backbone, batch)
        if cache is not None:
            cache[k] = got
        return got

    t0 = time.perf_counter()
    n, experts = len(items), list(cfg.experts)
    ctrl = load_checkpoint(control).experts[VERSATILE] if control else None
    correct = {e: np.zeros(n, bool) for e in experts + ([CONTROL] if ctrl is not None else [])}
    scores = np.zeros((n, len(cfg.domains)))
    for lo in tqdm(range(0, n, batch), desc=f"eval {split}", unit="batch", disable=not progress):
        part = items[lo:lo + batch]
        sizes, out = [len(it.crops) for it in part], token_sizes(part, cfg.backbone)
        crops, rows = item_rows(part, cfg.backbone)
        hidden = model.trunk(crops, *rows)
        scores[lo:lo + len(part)] = model.router(hidden, torch.from_numpy(pool_matrix(sizes))).numpy()
        for e, ex in [(e, model.experts[e]) for e in experts] + ([(CONTROL, ctrl)] if ctrl is not None else []):
            _, ok = answer_scores(llava, list(ex(hidden, *rows).split(out)), part)
            correct[e][lo:lo + len(part)] = ok.numpy()
    correct[JOINT] = answers(joint, "all", items)  # transformers' own vision path: the joint model
    domain = np.array([it.sample.domain for it in items])
    if domain_only:
        missing = [d for d in cfg.domains if d not in domain_only and np.any(domain == d)]
        if missing:
            raise MixpertError(f"--domain-alone: no model for {', '.join(missing)}; pass DOMAIN=SNAPSHOT for every domain")
        correct[DOMAIN_ONLY] = np.zeros(n, bool)
        for d, snap in domain_only.items():
            own = np.flatnonzero(domain == d)
            correct[DOMAIN_ONLY][own] = answers(Path(snap), d, [items[i] for i in own])

    def accuracy(chosen: list[str]) -> tuple[dict, np.ndarray]:
        hit = np.array([correct[e][i] for i, e in enumerate(chosen)], dtype=bool)
        v = paired(hit, correct[JOINT])
        return _per_domain(hit, domain, cfg.domains) | {
            "to_versatile": float(np.mean([e == VERSATILE for e in chosen])),
            "vs_joint": {"better": v["better"], "worse": v["worse"], "p_value": v["p_value"]}}, hit

    routed = {"versatile everywhere": [VERSATILE] * n, "oracle (true domain)": list(domain),
              "direct": route(scores, cfg.domains, "direct"),
              f"score-threshold (lam={cfg.lam})": route(scores, cfg.domains, "score-threshold", lam=cfg.lam),
              f"score-difference (tau={cfg.tau})": route(scores, cfg.domains, "score-difference", tau=cfg.tau)}
    rows, hits = {JOINT: _per_domain(correct[JOINT], domain, cfg.domains)}, {JOINT: correct[JOINT]}
    if DOMAIN_ONLY in correct:
        rows[DOMAIN_ONLY], hits[DOMAIN_ONLY] = _per_domain(correct[DOMAIN_ONLY], domain, cfg.domains), correct[DOMAIN_ONLY]
    rows[FURTHER], hits[FURTHER] = accuracy(list(domain))  # each domain's expert on its own images: the oracle's answers
    if CONTROL in correct:
        rows[CONTROL], hits[CONTROL] = accuracy([CONTROL] * n)
    for name, chosen in routed.items():
        rows[name], hits[name] = accuracy(chosen)
    default = {"direct": "direct", "score-threshold": f"score-threshold (lam={cfg.lam})",
               "score-difference": f"score-difference (tau={cfg.tau})"}[cfg.strategy]
    hits[MIXPERT] = hits[default]
    comparisons = {}
    for name, a, b, over in COMPARISONS:
        if a not in hits or b not in hits:
            continue
        if over == "all":
            comparisons[name] = paired(hits[a], hits[b])
        else:
            comparisons[name] = {d: paired(hits[a][domain == d], hits[b][domain == d]) for d in cfg.domains
                                 if np.any(domain == d)}
    sweep = {str(t): accuracy(route(scores, cfg.domains, "score-difference", tau=t))[0] for t in taus}
    router_pred = np.array(cfg.domains)[scores.argmax(1)]
    report = {"split": split, "samples": n, "checkpoint": str(checkpoint), "joint": str(joint),
              "mixpert_row": default, "router_accuracy": _per_domain(router_pred == domain, domain, cfg.domains),
              "accuracy": rows, "comparisons": comparisons, "tau_sweep": sweep,
              "seconds": round(time.perf_counter() - t0, 1), "training": meta.get("extra", {})}
    return report


def sign_test(better: int, worse: int) -> float:
    """Two-sided exact sign test on the images where the two models disagree (paired, same images)."""
    n = better + worse
    if n == 0:
        return 1.0
    k = min(better, worse)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def _per_domain(hit: np.ndarray, domain: np.ndarray, domains) -> dict:
    out = {d: float(np.mean(hit[domain == d])) if np.any(domain == d) else None for d in domains}
    out["all"] = float(np.mean(hit)) if len(hit) else None
    return out


def markdown(report: dict, domains) -> str:
    cols = list(domains) + ["all"]
    fmt = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    lines = [f"### Router accuracy on held-out data ({report['split']}, {report['samples']} images), %", "",
             "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols),
             "| " + " | ".join(fmt(report["router_accuracy"][c]) for c in cols) + " |", "",
             "### Answer accuracy (exact match), %", "",
             "| model | " + " | ".join(cols) + " | to versatile | vs joint: better / worse (sign-test p) |",
             "|---|" + "---|" * (len(cols) + 2)]
    for name, row in report["accuracy"].items():
        v = row.get("vs_joint")
        vs = f"{v['better']} / {v['worse']} (p={v['p_value']:.2f})" if v else "-"
        lines.append(f"| {name} | " + " | ".join(fmt(row[c]) for c in cols) + f" | {fmt(row.get('to_versatile'))} | {vs} |")
    lines += ["", "### score-difference tau sweep, %", "", "| tau | " + " | ".join(cols) + " | to versatile |",
              "|---|" + "---|" * (len(cols) + 1)]
    for tau, row in report["tau_sweep"].items():
        lines.append(f"| {tau} | " + " | ".join(fmt(row[c]) for c in cols) + f" | {fmt(row['to_versatile'])} |")
    if report.get("comparisons"):
        lines += ["", "### Paired comparisons named before the run (exact sign test on the same images)", "",
                  "| comparison | images | a % | b % | a right, b wrong | a wrong, b right | p |", "|---|---|---|---|---|---|---|"]
        for name, c in report["comparisons"].items():
            for where, v in ({"all": c}.items() if "p_value" in c else c.items()):
                lines.append(f"| {name} | {where} ({v['n']}) | {100 * v['a']:.1f} | {100 * v['b']:.1f} | {v['better']} | "
                             f"{v['worse']} | {v['p_value']:.2g} |")
    return "\n".join(lines) + "\n"


def run_eval(data, checkpoint, out, joint=None, split="test", progress=True, log=print, control=None,
             domain_only=None, cache=None) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = evaluate(data, checkpoint, joint, split, progress=progress, log=log, control=control, domain_only=domain_only,
                      cache=cache)
    domains = load_checkpoint_domains(checkpoint)
    write_json(out / "eval.json", report)
    md = markdown(report, domains)
    (out / "eval.md").write_text(md)
    log(md)
    return report


def load_checkpoint_domains(checkpoint) -> tuple:
    return tuple(read_checkpoint_meta(checkpoint)["domains"])
