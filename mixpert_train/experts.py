"""Stage 2, disentangled expert tuning: for each domain, start from the joint (versatile) weights, freeze the
trunk and the language model, and train only that expert's k layers + projector on that domain's data.
Output: a Mixpert checkpoint (router still untrained), saved after every domain so a stopped run resumes."""

from __future__ import annotations

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
    llava = load_language_model(joint)
    tokenizer = load_tokenizer(joint)
    pre = Preprocessor(model.cfg.backbone)
    train = read_manifest(data / "train.jsonl", model.cfg.domains)
    for p in model.parameters():
        p.requires_grad_(False)
    accum = max(1, cfg.batch // (cfg.micro_batch * dist.world))
    for domain in todo:
        torch.manual_seed(cfg.seed)
        items = load_items([s for s in train if s.domain == domain], pre, tokenizer, cfg.strict, log)
        hidden = cache_trunk(model, items)
        expert = model.experts[domain].train()
        groups = [{"params": list(expert.layers.parameters()), "lr": cfg.lr_vision},
                  {"params": list(expert.projector.parameters()), "lr": cfg.lr_projector}]
        for g in groups:
            for p in g["params"]:
                p.requires_grad_(True)
        steps = steps_for(len(items), cfg.micro_batch * dist.world * accum, cfg.epochs)
        opt, sched = adamw_cosine([g for g in groups if g["params"]], steps, cfg.warmup, cfg.betas, cfg.weight_decay)
        rng = np.random.default_rng(cfg.seed)
        t0, losses, hits = time.perf_counter(), [], []
        bar = tqdm(total=steps, desc=f"expert {domain}", unit="step", disable=not (progress and dist.main))
        for _ in range(cfg.epochs):
            micro = batches(len(items), cfg.micro_batch * dist.world, rng)
            for start in range(0, len(micro), accum):
                opt.zero_grad(set_to_none=True)
                group = micro[start:start + accum]
                for idx in group:
                    idx = dist.shard(idx)
                    if len(idx) == 0:  # the last micro-batch can be smaller than the world
                        continue
                    part = [items[i] for i in idx]
                    _, rows = item_rows(part, model.cfg.backbone)
                    tokens = expert(torch.cat([hidden[i] for i in idx]), *rows).split(token_sizes(part, model.cfg.backbone))
                    loss, correct = answer_scores(llava, list(tokens), part)
                    (loss / len(group)).backward()
                    losses.append(loss.item())
                    hits += correct.tolist()
                params = [p for g in groups for p in g["params"]]
                dist.sync_grads(params)
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                bar.update()
                bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}", acc=f"{np.mean(hits[-200:]):.2f}")
        bar.close()
        for g in groups:
            for p in g["params"]:
                p.requires_grad_(False)
        expert.eval()
        done.append(domain)
        history[domain] = {"samples": len(items), "steps": steps, "seconds": round(time.perf_counter() - t0, 1),
                           "final_loss": float(np.mean(losses[-10:])), "train_acc": float(np.mean(hits))}
        if dist.main:
            save_checkpoint(model, out, extra={"stage": "experts", "experts_done": done, "history": history,
                                               "config": asdict(cfg), "joint": str(joint.resolve())})
        dist.barrier()
        if dist.main:
            log(f"expert {domain}: {len(items)} samples, {steps} steps in {history[domain]['seconds']:.0f}s, "
                f"loss {history[domain]['final_loss']:.3f}")
    return out
