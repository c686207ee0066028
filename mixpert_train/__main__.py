"""python -m mixpert_train data | joint | experts | control | router | eval: one stage each, resumable from its output
directory. Under torchrun, joint and experts run data-parallel (rank 0 writes). Training pins the CPU kernels
(mixpert_train.determinism) so a run is reproducible across x86-64 machines."""

from __future__ import annotations

import argparse
import sys

from .errors import MixpertError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mixpert_train", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("data", help="write the synthetic five-domain dataset (JSONL manifests + images)")
    d.add_argument("--out", required=True)
    d.add_argument("--n-per-domain", type=int, default=200)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--backbone", default="tiny", help="whose domain set to generate (tiny-internvl: chart, doc, general)")

    j = sub.add_parser("joint", help="joint SFT of a tiny MLLM of the backbone's family (LLaVA-OV, InternVL) on all domains")
    j.add_argument("--data", required=True)
    j.add_argument("--out", required=True)
    j.add_argument("--backbone", default="tiny")
    j.add_argument("--epochs", type=int, default=10)
    j.add_argument("--batch", type=int, default=16)
    j.add_argument("--lr", type=float, default=1e-3)
    j.add_argument("--vision-lr", type=float, default=5e-4)
    j.add_argument("--seed", type=int, default=0)
    j.add_argument("--strict", action="store_true", help="a bad image is an error instead of skipped")
    j.add_argument("--domains", nargs="+", help="train on these domains only (the probe 'one domain alone from the "
                                                "pre-joint start'); default: all")

    e = sub.add_parser("experts", help="disentangled expert tuning (trunk and LM frozen), one expert per domain")
    e.add_argument("--data", required=True)
    e.add_argument("--joint", required=True, help="the joint model: our joint stage's output or a LLaVA-OV snapshot (--weights)")
    e.add_argument("--out", required=True)
    e.add_argument("--domains", nargs="+", help="only these domains (default: all)")
    e.add_argument("--expert-layers", type=int, help="k (default: the backbone's, 2)")
    e.add_argument("--epochs", type=int, default=1)
    e.add_argument("--batch", type=int, default=256, help="global batch (accumulated)")
    e.add_argument("--micro-batch", type=int, default=16)
    e.add_argument("--lr-projector", type=float, default=1e-5)
    e.add_argument("--lr-vision", type=float, default=2e-6)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--strict", action="store_true")
    e.add_argument("--no-select-on-val", action="store_true",
                   help="keep the last state instead of the one best on the domain's validation split")

    c = sub.add_parser("control", help="the paper's Table 7 control: the versatile expert tuned on all domains mixed")
    c.add_argument("--data", required=True)
    c.add_argument("--joint", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--steps", type=int, help="optimiser steps (default: what one expert takes)")
    for flag, default in (("--epochs", 1), ("--batch", 256), ("--micro-batch", 16), ("--seed", 0)):
        c.add_argument(flag, type=int, default=default)
    c.add_argument("--lr-projector", type=float, default=1e-5)
    c.add_argument("--lr-vision", type=float, default=2e-6)

    r = sub.add_parser("router", help="train the router on pooled trunk features (trunk frozen)")
    r.add_argument("--data", required=True)
    r.add_argument("--experts", required=True, help="checkpoint from the experts stage")
    r.add_argument("--out", required=True, help="the final Mixpert checkpoint")
    r.add_argument("--epochs", type=int, default=1)
    r.add_argument("--batch", type=int, default=128)
    r.add_argument("--lr", type=float, default=2e-4)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--strict", action="store_true")

    v = sub.add_parser("eval", help="answer accuracy per domain: joint vs oracle vs routing strategies, tau sweep")
    v.add_argument("--data", required=True)
    v.add_argument("--checkpoint", required=True)
    v.add_argument("--joint", help="the joint model (default: the one the checkpoint records)")
    v.add_argument("--out", required=True)
    v.add_argument("--split", default="test", choices=["val", "test"])
    v.add_argument("--control", help="a checkpoint from the control stage (adds the Table 7 row and comparison)")
    v.add_argument("--domain-alone", nargs="+", metavar="DOMAIN=SNAPSHOT",
                   help="each domain's model trained on that domain alone (joint --domains), for finding 1b")

    for sp in (d, j, e, c, r, v):
        sp.add_argument("--quiet", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    prog = not a.quiet
    if a.cmd in ("joint", "experts", "control", "router"):
        from .determinism import deterministic, pin_kernels

        if "torch" not in sys.modules:
            pin_kernels()
        deterministic()
    try:
        if a.cmd == "data":
            from .data.synthetic import generate

            from .backbones import get_backbone
            from .model import MixpertConfig

            domains = MixpertConfig.for_backbone(get_backbone(a.backbone)).domains
            print(generate(a.out, a.n_per_domain, a.seed, progress=prog, domains=domains))
        elif a.cmd == "joint":
            from .joint import JointConfig, run_joint

            run_joint(a.data, a.out, JointConfig(a.backbone, a.epochs, a.batch, a.lr, a.vision_lr, seed=a.seed, strict=a.strict,
                                                 domains=tuple(a.domains) if a.domains else None), prog)
        elif a.cmd == "experts":
            from .experts import ExpertConfig, run_experts

            cfg = ExpertConfig(a.epochs, a.batch, a.micro_batch, a.lr_projector, a.lr_vision, seed=a.seed,
                               expert_layers=a.expert_layers, strict=a.strict, select_on_val=not a.no_select_on_val)
            run_experts(a.data, a.joint, a.out, cfg, a.domains, prog)
        elif a.cmd == "control":
            from .experts import ExpertConfig, run_control

            cfg = ExpertConfig(a.epochs, a.batch, a.micro_batch, a.lr_projector, a.lr_vision, seed=a.seed)
            run_control(a.data, a.joint, a.out, cfg, a.steps, prog)
        elif a.cmd == "router":
            from .router import RouterConfig, run_router

            run_router(a.data, a.experts, a.out, RouterConfig(a.epochs, a.batch, a.lr, seed=a.seed, strict=a.strict), prog)
        elif a.cmd == "eval":
            from .evaluate import run_eval

            alone = {}
            for spec in a.domain_alone or ():
                dom, sep, where = spec.partition("=")
                if not sep or not dom or not where:
                    raise MixpertError(f"--domain-alone {spec!r}: write DOMAIN=SNAPSHOT, e.g. chart=runs/demo/domain-alone/chart")
                alone[dom] = where
            run_eval(a.data, a.checkpoint, a.out, a.joint, a.split, prog, control=a.control, domain_only=alone or None)
    except MixpertError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
