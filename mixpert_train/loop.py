"""What every training stage shares: AdamW with a cosine schedule and linear warm-up, and the few lines that
make a stage run data-parallel under torchrun (gradients averaged across processes; rank 0 writes)."""

from __future__ import annotations

import math
import os

import numpy as np
import torch


def adamw_cosine(groups, total_steps: int, warmup_frac: float = 0.03, betas=(0.9, 0.98), weight_decay: float = 0.01):
    opt = torch.optim.AdamW(groups, betas=betas, weight_decay=weight_decay)
    warm = max(1, int(total_steps * warmup_frac))

    def factor(step):
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total_steps - warm))))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


class Dist:
    """torchrun's environment: WORLD_SIZE > 1 starts a process group (gloo on CPU, nccl on GPU)."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, index: np.ndarray) -> np.ndarray:
        """This process's share of a global batch."""
        return index[self.rank::self.world]

    def sync_grads(self, params) -> None:
        """Average gradients over processes (what DDP does, without its bucketing)."""
        if self.world == 1:
            return
        for p in params:  # every rank joins every all-reduce, even with no gradient (an empty shard)
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            torch.distributed.all_reduce(p.grad)
            p.grad /= self.world

    def barrier(self):
        if self.world > 1:
            torch.distributed.barrier()


def steps_for(n_items: int, batch: int, epochs: int) -> int:
    return max(1, math.ceil(n_items / batch)) * epochs
