"""Stage 3, the router: the 2-layer MLP on trunk features pooled over all tokens of all crops of an image,
cross-entropy over the domains, balanced sampling, AdamW with cosine annealing; the trunk stays frozen (its
pooled features are computed once). Output: the final Mixpert checkpoint + per-domain held-out accuracy."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from .checkpoint import CHECKPOINT, load_checkpoint, read_checkpoint_meta, save_checkpoint
from .data.manifest import read_manifest
from .errors import MixpertError
from .loop import adamw_cosine
from .families import adapter_for
from .preprocess import ImageError, Preprocessor, load_image
from .staging import check_target


@dataclass
class RouterConfig:
    epochs: int = 1  # paper; the tiny demo's few hundred images need more passes
    batch: int = 128
    lr: float = 2e-4
    weight_decay: float = 0.01
    seed: int = 0
    strict: bool = False


@torch.no_grad()
def pooled_features(model, samples, strict=False, log=print, batch: int = 64) -> tuple[torch.Tensor, np.ndarray]:
    """[N, D] trunk features averaged over every token of every crop of each image, and the domain labels. Crop
    families run the trunk on `batch` images' crops at once; patch families one image a call (its own positions)."""
    pre = Preprocessor(model.cfg.backbone)
    ad = adapter_for(model.cfg.backbone)
    feats, labels, skipped, pending = [], [], 0, []

    def flush():
        if pending:
            h = model.trunk(torch.from_numpy(np.concatenate([c for c, _ in pending])))
            for part in h.split([len(c) for c, _ in pending]):
                feats.append(part.reshape(-1, part.shape[-1]).mean(dim=0))  # every token of every crop of the image
            labels.extend(lab for _, lab in pending)
            pending.clear()

    for s in samples:
        try:
            crops, grid = pre.pixel_values(load_image(s.image))
        except ImageError as e:
            if strict:
                raise MixpertError(f"{e} (run without --strict to skip bad images)") from None
            skipped += 1
            continue
        label = model.cfg.domains.index(s.domain)
        if ad.rows == "crops":
            pending.append((crops, label))
            if len(pending) == batch:
                flush()
            continue
        rows = ad.row_inputs(model.cfg.backbone, [grid])
        h = model.trunk(torch.from_numpy(crops), *(torch.from_numpy(v) for v in rows.values()))
        feats.append(h.reshape(-1, h.shape[-1]).mean(dim=0))  # every patch of the image
        labels.append(label)
    flush()
    if skipped:
        log(f"router: skipped {skipped} unreadable image(s)")
    return torch.stack(feats), np.array(labels)


def router_scores(model, pooled: torch.Tensor) -> torch.Tensor:
    """The router's own forward on pre-pooled features: one token, one crop per image."""
    return model.router(pooled[:, None, :], torch.eye(len(pooled)))


def per_domain_accuracy(model, pooled, labels) -> dict:
    with torch.no_grad():
        pred = router_scores(model, pooled).argmax(-1).numpy()
    out = {d: float(np.mean(pred[labels == i] == i)) if np.any(labels == i) else None for i, d in enumerate(model.cfg.domains)}
    out["all"] = float(np.mean(pred == labels))
    return out


def run_router(data: str | Path, experts_ckpt: str | Path, out: str | Path, cfg: RouterConfig = RouterConfig(),
               progress: bool = True, log=print) -> Path:
    data, out = Path(data), Path(out)
    if CHECKPOINT.holds(out) and read_checkpoint_meta(out).get("extra", {}).get("stage") == "router":
        log(f"router: {out} is complete, reusing it (delete it to retrain)")
        return out
    check_target(out, CHECKPOINT, sources={"--data": data, "--experts": experts_ckpt})
    model = load_checkpoint(experts_ckpt)
    prior = read_checkpoint_meta(experts_ckpt).get("extra", {})
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    x, y = pooled_features(model, read_manifest(data / "train.jsonl", model.cfg.domains), cfg.strict, log)
    xv, yv = pooled_features(model, read_manifest(data / "val.jsonl", model.cfg.domains), cfg.strict, log)
    xt, yt = pooled_features(model, read_manifest(data / "test.jsonl", model.cfg.domains), cfg.strict, log)
    features_s = time.perf_counter() - t0
    counts = np.bincount(y, minlength=len(model.cfg.domains))
    weights = (1.0 / np.maximum(counts, 1))[y]
    weights /= weights.sum()  # balanced sampling: every domain equally likely in a batch
    steps = max(1, int(np.ceil(len(y) / cfg.batch)) * cfg.epochs)
    opt, sched = adamw_cosine(model.router.parameters(), steps, warmup_frac=0.0, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    for g in opt.param_groups:
        g["lr"] = g["initial_lr"] = cfg.lr
    rng = np.random.default_rng(cfg.seed)
    model.router.train()
    yt_ = torch.from_numpy(y)
    for _ in tqdm(range(steps), desc="router", unit="step", disable=not progress):
        idx = rng.choice(len(y), size=min(cfg.batch, len(y)), p=weights)
        logits = model.router.logits(x[idx][:, None, :], torch.eye(len(idx)))
        loss = F.cross_entropy(logits, yt_[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.router.eval()
    report = {"val": per_domain_accuracy(model, xv, yv), "test": per_domain_accuracy(model, xt, yt),
              "train": per_domain_accuracy(model, x, y), "steps": steps, "final_loss": float(loss.detach()),
              "seconds": round(time.perf_counter() - t0, 1), "feature_seconds": round(features_s, 1), "config": asdict(cfg)}
    save_checkpoint(model, out, extra={**prior, "stage": "router", "router": report})
    log("router held-out accuracy: " + ", ".join(f"{d} {v:.2f}" for d, v in report["test"].items() if v is not None))
    return out
