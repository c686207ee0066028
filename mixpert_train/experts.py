"""Stage 2, disentangled expert tuning: for each domain, start from the joint (versatile) weights, freeze the
trunk and the language model, and train only that expert's k layers + projector on that domain's data; the state
kept is the one that answers the domain's validation split best (the joint weights included, test never looked at).
Output: a Mixpert checkpoint (router still untrained), saved after every domain so a stopped run resumes.

`run_control`: the paper's Table 7 control, the same tuning of a copy of the versatile expert on all domains' data
mixed, for the steps one expert takes: what more tuning without specialisation gives."""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpoint import CHECKPOINT, META, load_checkpoint, read_checkpoint_meta, save_checkpoint
from .data.manifest import read_manifest
from .loop import Dist, adamw_cosine, steps_for
from .mllm import answer_scores, batches, item_rows, load_items, load_tokenizer, token_sizes
from .model import VERSATILE
from .preprocess import Preprocessor
from .staging import check_target
from .weights import model_from_snapshot


@dataclass
class ExpertConfig:
    """The paper's defaults; the tiny model needs larger rates and more epochs (see the demo)."""
    epochs: int = 1
    batch: int = 256  # global batch, reached by accumulating micro-batches
    micro_batch: int = 16
    lr_projector: float = 1e-5
    lr_vision: float = 2e-6
    betas: tuple = (0.9, 0.98)
    weight_decay: float = 0.01
    warmup: float = 0.03
    seed: int = 0
    expert_layers: int | None = None  # k (default: the backbone's, 2)
    strict: bool = False
    select_on_val: bool = True  # keep the epoch (0 = the joint weights) with the best validation accuracy


def joint_backbone(joint: Path) -> str | None:
    """The registry name our joint stage recorded (a plain HF snapshot has none: its config.json decides)."""
    import json

    rec = Path(joint) / "mixpert_stage.json"
    return json.loads(rec.read_text())["config"]["backbone"] if rec.is_file() else None


def load_language_model(joint: Path):
    """The frozen MLLM around the vision side (its language model is what the loss goes through)."""
    from transformers import AutoModelForImageTextToText

    llava = AutoModelForImageTextToText.from_pretrained(str(joint)).eval()  # LLaVA-OV or InternVL, from config.json
    for p in llava.parameters():
        p.requires_grad_(False)
    return llava


@torch.no_grad()
def cache_trunk(model, items, batch: int = 32) -> list[torch.Tensor]:
    """The frozen trunk's output for every item, computed once (the trunk never changes here)."""
    out = []
    for i in range(0, len(items), batch):
        part = items[i:i + batch]
        x, rows = item_rows(part, model.cfg.backbone)
        out += list(model.trunk(x, *rows).split([len(it.crops) for it in part]))
    return out


@torch.no_grad()
def expert_correct(expert, llava, items, hidden, backbone, batch: int = 32) -> np.ndarray:
    """Exact match per item of `expert` on cached trunk outputs (teacher forcing, the loss's own criterion)."""
    expert.eval()
    out = []
    for lo in range(0, len(items), batch):
        part = items[lo:lo + batch]
        _, rows = item_rows(part, backbone)
        tokens = expert(torch.cat(hidden[lo:lo + batch]), *rows).split(token_sizes(part, backbone))
        out.append(answer_scores(llava, list(tokens), part)[1].numpy())
    return np.concatenate(out) if out else np.zeros(0, bool)


def tune_expert(expert, llava, items, hidden, cfg: ExpertConfig, backbone, steps: int | None = None, val=None,
                desc: str = "expert", progress: bool = True, dist: Dist | None = None) -> dict:
    """Train `expert`'s layers + projector on (items, their cached trunk outputs) with the paper's optimiser and
    schedule, for cfg.epochs passes or exactly `steps` optimiser steps; with `val` = (items, hidden), keep the state
    whose validation accuracy is best (checked at the start and after every pass; ties keep the earlier one)."""
    dist = dist or Dist()
    torch.manual_seed(cfg.seed)
    groups = [{"params": list(expert.layers.parameters()), "lr": cfg.lr_vision},
              {"params": list(expert.projector.parameters()), "lr": cfg.lr_projector}]
    params = [p for g in groups for p in g["params"]]
    for p in params:
        p.requires_grad_(True)
    accum = max(1, cfg.batch // (cfg.micro_batch * dist.world))
    per_pass = steps_for(len(items), cfg.micro_batch * dist.world * accum, 1)
    total = steps if steps is not None else per_pass * cfg.epochs
    opt, sched = adamw_cosine([g for g in groups if g["params"]], total, cfg.warmup, cfg.betas, cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    t0, losses, hits, val_acc = time.perf_counter(), [], [], []
    best = None

    def check(step):
        nonlocal best
        if val is None:
            return
        acc = float(np.mean(expert_correct(expert, llava, val[0], val[1], backbone)))
        val_acc.append({"step": step, "val_acc": acc})
        if best is None or acc > best[0]:
            best = (acc, step, copy.deepcopy(expert.state_dict()))

    check(0)
    bar = tqdm(total=total, desc=desc, unit="step", disable=not (progress and dist.main))
    done = 0
    while done < total:
        micro = batches(len(items), cfg.micro_batch * dist.world, rng)
        for start in range(0, len(micro), accum):
            if done == total:
                break
            expert.train()
            opt.zero_grad(set_to_none=True)
            group = micro[start:start + accum]
            for idx in group:
                idx = dist.shard(idx)
                if len(idx) == 0:  # the last micro-batch can be smaller than the world
                    continue
                part = [items[i] for i in idx]
                _, rows = item_rows(part, backbone)
                tokens = expert(torch.cat([hidden[i] for i in idx]), *rows).split(token_sizes(part, backbone))
                loss, correct = answer_scores(llava, list(tokens), part)
                (loss / len(group)).backward()
                losses.append(loss.item())
                hits += correct.tolist()
            dist.sync_grads(params)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            done += 1
            bar.update()
            bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}", acc=f"{np.mean(hits[-200:]):.2f}")
        check(done)  # after every pass over the items (and at the end)
    bar.close()
    for p in params:
        p.requires_grad_(False)
    if best is not None:
        expert.load_state_dict(best[2])
    expert.eval()
    return {"samples": len(items), "steps": total, "seconds": round(time.perf_counter() - t0, 1),
            "final_loss": float(np.mean(losses[-10:])) if losses else None,
            "train_acc": float(np.mean(hits)) if hits else None, "val": val_acc,
            **({"kept_step": best[1], "kept_val_acc": best[0]} if best is not None else {})}


def _prepare(data: Path, joint: Path, model, cfg: ExpertConfig):
    llava = load_language_model(joint)
    tokenizer = load_tokenizer(joint)
    pre = Preprocessor(model.cfg.backbone)
    train = read_manifest(data / "train.jsonl", model.cfg.domains)
    val = read_manifest(data / "val.jsonl", model.cfg.domains) if cfg.select_on_val else []
    for p in model.parameters():
        p.requires_grad_(False)
    return llava, tokenizer, pre, train, val


def run_experts(data: str | Path, joint: str | Path, out: str | Path, cfg: ExpertConfig = ExpertConfig(),
                domains=None, progress: bool = True, log=print) -> Path:
    data, joint, out = Path(data), Path(joint), Path(out)
    dist = Dist()
    done: list[str] = []
    if (out / META).is_file():  # resume: domains already tuned are kept
        meta = read_checkpoint_meta(out)
        done = list(meta.get("extra", {}).get("experts_done", []))
        model = load_checkpoint(out)
        history = meta.get("extra", {}).get("history", {})
    else:
        check_target(out, CHECKPOINT, sources={"--data": data, "--joint": joint})  # before minutes of tuning
        model = model_from_snapshot(joint, joint_backbone(joint), expert_layers=cfg.expert_layers)
        history = {}
    todo = [d for d in (domains or model.cfg.domains) if d not in done]
    if not todo:
        log(f"experts: {out} has every expert tuned, reusing it (delete it to retune)")
        return out
    llava, tokenizer, pre, train, val = _prepare(data, joint, model, cfg)
    bb = model.cfg.backbone
    for domain in todo:
        items = load_items([s for s in train if s.domain == domain], pre, tokenizer, cfg.strict, log)
        v_items = load_items([s for s in val if s.domain == domain], pre, tokenizer, cfg.strict, log)
        v = (v_items, cache_trunk(model, v_items)) if v_items else None
        history[domain] = tune_expert(model.experts[domain], llava, items, cache_trunk(model, items), cfg, bb, val=v,
                                      desc=f"expert {domain}", progress=progress, dist=dist)
        done.append(domain)
        if dist.main:
            save_checkpoint(model, out, extra={"stage": "experts", "experts_done": done, "history": history,
                                               "config": asdict(cfg), "joint": str(joint.resolve())})
        dist.barrier()
        h = history[domain]
        if dist.main:
            kept = f", kept step {h['kept_step']} (val {h['kept_val_acc']:.2f})" if "kept_step" in h else ""
            log(f"expert {domain}: {h['samples']} samples, {h['steps']} steps in {h['seconds']:.0f}s, "
                f"loss {h['final_loss']:.3f}{kept}")
    return out


def one_expert_steps(n_per_domain: list[int], cfg: ExpertConfig, world: int = 1) -> int:
    """The optimiser steps one expert takes on a domain of average size (the control's budget)."""
    accum = max(1, cfg.batch // (cfg.micro_batch * world))
    return steps_for(int(round(np.mean(n_per_domain))), cfg.micro_batch * world * accum, cfg.epochs)


def run_control(data: str | Path, joint: str | Path, out: str | Path, cfg: ExpertConfig = ExpertConfig(),
                steps: int | None = None, progress: bool = True, log=print) -> Path:
    """Table 7 control: a copy of the versatile expert tuned on every domain's training data mixed, for `steps`
    (default: one expert's steps), selected on the mixed validation split. Written as a Mixpert checkpoint whose
    versatile expert is the control (extra.stage == "control"); the domain experts stay the joint weights."""
    data, joint, out = Path(data), Path(joint), Path(out)
    if CHECKPOINT.holds(out) and read_checkpoint_meta(out).get("extra", {}).get("stage") == "control":
        log(f"control: {out} is complete, reusing it (delete it to retune)")
        return out
    check_target(out, CHECKPOINT, sources={"--data": data, "--joint": joint})
    dist = Dist()
    model = model_from_snapshot(joint, joint_backbone(joint), expert_layers=cfg.expert_layers)
    llava, tokenizer, pre, train, val = _prepare(data, joint, model, cfg)
    bb = model.cfg.backbone
    items = load_items(train, pre, tokenizer, cfg.strict, log)
    if steps is None:
        steps = one_expert_steps([sum(s.domain == d for s in train) for d in model.cfg.domains], cfg, dist.world)
    v_items = load_items(val, pre, tokenizer, cfg.strict, log)
    v = (v_items, cache_trunk(model, v_items)) if v_items else None
    h = tune_expert(model.experts[VERSATILE], llava, items, cache_trunk(model, items), cfg, bb, steps=steps, val=v,
                    desc="control (all domains)", progress=progress, dist=dist)
    if dist.main:
        save_checkpoint(model, out, extra={"stage": "control", "tuned_expert": VERSATILE, "history": {"mixed": h},
                                           "config": asdict(cfg), "joint": str(joint.resolve())})
    dist.barrier()
    log(f"control: {h['samples']} samples (all domains), {h['steps']} steps in {h['seconds']:.0f}s"
        + (f", kept step {h['kept_step']} (val {h['kept_val_acc']:.2f})" if "kept_step" in h else ""))
    return out
