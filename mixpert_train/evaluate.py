"""Stage 4, eval: exact-match answer accuracy per domain for the joint model, Mixpert with the true-domain
expert (oracle), with each routing strategy, and a tau sweep (the shape of the paper's Tables 4 and 5), plus
the router's per-domain accuracy (Table 3). Every expert answers every test image once; the configurations
are then read off those answers, so each row is the same model on the same images."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpoint import load_checkpoint, read_checkpoint_meta
from .data.manifest import read_manifest
from .experts import load_language_model
from .mllm import answer_scores, item_rows, load_items, load_tokenizer, reference_crop_tokens, token_sizes, write_json
from .model import VERSATILE, pool_matrix, route
from .preprocess import Preprocessor

TAUS = (0.1, 0.3, 0.5, 0.6, 0.7)


@torch.no_grad()
def evaluate(data: str | Path, checkpoint: str | Path, joint: str | Path | None = None, split: str = "test",
             taus=TAUS, batch: int = 16, progress: bool = True, log=print) -> dict:
    data, checkpoint = Path(data), Path(checkpoint)
    meta = read_checkpoint_meta(checkpoint)
    joint = Path(joint or meta.get("extra", {}).get("joint", ""))
    model = load_checkpoint(checkpoint)
    cfg = model.cfg
    llava = load_language_model(joint)
    tokenizer = load_tokenizer(joint)
    items = load_items(read_manifest(data / f"{split}.jsonl", cfg.domains), Preprocessor(cfg.backbone), tokenizer, log=log)
    t0 = time.perf_counter()
    n, experts = len(items), list(cfg.experts)
    correct = {e: np.zeros(n, bool) for e in experts + ["joint"]}
    scores = np.zeros((n, len(cfg.domains)))
    for lo in tqdm(range(0, n, batch), desc=f"eval {split}", unit="batch", disable=not progress):
        part = items[lo:lo + batch]
        sizes, out = [len(it.crops) for it in part], token_sizes(part, cfg.backbone)
        crops, rows = item_rows(part, cfg.backbone)
        hidden = model.trunk(crops, *rows)
        scores[lo:lo + len(part)] = model.router(hidden, torch.from_numpy(pool_matrix(sizes))).numpy()
        for e in experts:
            _, ok = answer_scores(llava, list(model.experts[e](hidden, *rows).split(out)), part)
            correct[e][lo:lo + len(part)] = ok.numpy()
        _, ok = answer_scores(llava, list(reference_crop_tokens(llava, crops, [it.grid for it in part]).split(out)), part)
        correct["joint"][lo:lo + len(part)] = ok.numpy()  # transformers' own vision path: the joint model
    domain = np.array([it.sample.domain for it in items])

    def accuracy(chosen: list[str]) -> dict:
        hit = np.array([correct[e][i] for i, e in enumerate(chosen)])
        better, worse = int(np.sum(hit & ~correct["joint"])), int(np.sum(~hit & correct["joint"]))
        return _per_domain(hit, domain, cfg.domains) | {"to_versatile": float(np.mean([e == VERSATILE for e in chosen])),
                                                        "vs_joint": {"better": better, "worse": worse,
                                                                     "p_value": sign_test(better, worse)}}

    rows = {"joint": _per_domain(correct["joint"], domain, cfg.domains),
            "versatile everywhere": accuracy([VERSATILE] * n),
            "oracle (true domain)": accuracy(list(domain)),
            "direct": accuracy(route(scores, cfg.domains, "direct")),
            f"score-threshold (lam={cfg.lam})": accuracy(route(scores, cfg.domains, "score-threshold", lam=cfg.lam)),
            f"score-difference (tau={cfg.tau})": accuracy(route(scores, cfg.domains, "score-difference", tau=cfg.tau))}
    sweep = {str(t): accuracy(route(scores, cfg.domains, "score-difference", tau=t)) for t in taus}
    router_pred = np.array(cfg.domains)[scores.argmax(1)]
    report = {"split": split, "samples": n, "checkpoint": str(checkpoint), "joint": str(joint),
              "router_accuracy": _per_domain(router_pred == domain, domain, cfg.domains),
              "accuracy": rows, "tau_sweep": sweep, "seconds": round(time.perf_counter() - t0, 1),
              "training": meta.get("extra", {})}
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
    return "\n".join(lines) + "\n"


def run_eval(data, checkpoint, out, joint=None, split="test", progress=True, log=print) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report = evaluate(data, checkpoint, joint, split, progress=progress, log=log)
    domains = load_checkpoint_domains(checkpoint)
    write_json(out / "eval.json", report)
    md = markdown(report, domains)
    (out / "eval.md").write_text(md)
    log(md)
    return report


def load_checkpoint_domains(checkpoint) -> tuple:
    return tuple(read_checkpoint_meta(checkpoint)["domains"])
