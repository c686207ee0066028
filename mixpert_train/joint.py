"""Stage 1, joint SFT: the starting point the paper assumes. A tiny transformers LLaVA-OneVision trained on all
domains mixed (vision tower, projector and language model), loss on answer tokens only. Output: a Hugging Face
snapshot directory (model, tokenizer, image processor), the same kind of directory `--weights` takes."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .backbones import get_backbone
from .data.manifest import read_manifest
from .errors import MixpertError
from .loop import Dist, adamw_cosine, steps_for
from .model import MixpertConfig
from .mllm import (answer_scores, batches, build_tokenizer, is_vision_parameter, load_items, reference_crop_tokens,
                   tiny_mllm, token_sizes, write_json)
from .preprocess import Preprocessor
from .staging import Output, check_target, staged_dir

DONE = "mixpert_stage.json"
JOINT = Output("joint-stage model", DONE)


@dataclass
class JointConfig:
    backbone: str = "tiny"
    epochs: int = 10
    batch: int = 16
    lr: float = 1e-3  # tiny model from scratch; LLaVA-OV's own SFT used 1e-5 (LM) / 2e-6 (vision)
    vision_lr: float = 5e-4
    weight_decay: float = 0.01
    warmup: float = 0.05
    seed: int = 0
    strict: bool = False
    # Train on these domains only (None: all). The miniature's probe "that domain alone from the pre-joint start":
    # the same recipe and start, one domain's data; the vocabulary stays the whole data's, so ids are shared.
    domains: tuple | None = None


def stage_done(out: Path) -> bool:
    return (Path(out) / DONE).is_file()


def run_joint(data: str | Path, out: str | Path, cfg: JointConfig = JointConfig(), progress: bool = True, log=print) -> Path:
    data, out = Path(data), Path(out)
    if stage_done(out):
        log(f"joint: {out} is complete, reusing it (delete it to retrain)")
        return out
    check_target(out, JOINT, sources={"--data": data})  # before minutes of training
    dist = Dist()
    torch.manual_seed(cfg.seed)
    bb = get_backbone(cfg.backbone)
    domains = MixpertConfig.for_backbone(bb).domains
    train = read_manifest(data / "train.jsonl", domains)
    vocab_text = train + read_manifest(data / "val.jsonl", domains) + read_manifest(data / "test.jsonl", domains)
    tokenizer = build_tokenizer(vocab_text)  # a closed vocabulary of the data's words (no labels are learnt from it)
    llava = tiny_mllm(bb, len(tokenizer), seed=cfg.seed)
    pre = Preprocessor(bb)
    if cfg.domains is not None:
        unknown = [d for d in cfg.domains if d not in domains]
        if unknown:
            raise MixpertError(f"--domains {' '.join(unknown)}: not among {cfg.backbone}'s domains ({', '.join(domains)})")
        train = [s for s in train if s.domain in cfg.domains]
    items = load_items(train, pre, tokenizer, cfg.strict, log)
    vision = [p for n, p in llava.named_parameters() if is_vision_parameter(llava, n)]
    rest = [p for n, p in llava.named_parameters() if not is_vision_parameter(llava, n)]
    total = steps_for(len(items), cfg.batch, cfg.epochs)
    opt, sched = adamw_cosine([{"params": rest, "lr": cfg.lr}, {"params": vision, "lr": cfg.vision_lr}], total,
                              cfg.warmup, weight_decay=cfg.weight_decay)
    rng = np.random.default_rng(cfg.seed)
    llava.train()
    t0, history = time.perf_counter(), []
    bar = tqdm(total=total, desc="joint SFT", unit="step", disable=not (progress and dist.main))
    for epoch in range(cfg.epochs):
        losses, hits = [], []
        for idx in batches(len(items), cfg.batch, rng):
            part = [items[i] for i in dist.shard(idx)]
            opt.zero_grad(set_to_none=True)
            if not part:  # the last batch can be smaller than the world; still join the all-reduce
                dist.sync_grads(llava.parameters())
                opt.step()
                sched.step()
                continue
            crops = torch.cat([it.crops for it in part])
            tokens = reference_crop_tokens(llava, crops, [it.grid for it in part]).split(token_sizes(part, bb))
            loss, correct = answer_scores(llava, list(tokens), part)
            loss.backward()
            dist.sync_grads(llava.parameters())
            torch.nn.utils.clip_grad_norm_(llava.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            hits += correct.tolist()
            bar.update()
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", acc=f"{np.mean(hits):.2f}")
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)), "train_acc": float(np.mean(hits))})
    bar.close()
    seconds = time.perf_counter() - t0
    if dist.main:
        with staged_dir(out, JOINT) as tmp:
            llava.save_pretrained(tmp)
            tokenizer.save_pretrained(str(tmp))
            pre.processor.save_pretrained(str(tmp))
            write_json(tmp / DONE, {"stage": "joint", "config": asdict(cfg), "history": history, "seconds": round(seconds, 1),
                                    "train_samples": len(items), "world_size": dist.world})
    dist.barrier()
    if dist.main:
        log(f"joint: {len(items)} samples x {cfg.epochs} epochs in {seconds:.0f}s, last loss {history[-1]['loss']:.3f}, "
            f"train acc {history[-1]['train_acc']:.2f} -> {out}")
    return out
