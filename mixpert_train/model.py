"""THE Mixpert split: trunk (embeddings + first L-k layers), router, experts (last k layers + projector), route().

Training, export, runtime and benchmarks import this file; nothing else defines which layer goes where,
the domain list, or the routing rule.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .backbones import Backbone
from .families import adapter_for
from .errors import MixpertError

DOMAINS: tuple[str, ...] = ("chart", "doc", "math", "ocr", "general")
VERSATILE = "versatile"  # the original joint-SFT weights; the fallback expert
STRATEGIES = ("direct", "score-threshold", "score-difference")
DEFAULT_STRATEGY = "score-difference"  # the paper's default
DEFAULT_TAU = 0.6  # score-difference: top1 - top2 <= tau -> versatile (paper: below; equal only at the edges)
DEFAULT_LAM = 0.5  # score-threshold: top1 <= lam -> versatile (our default; the paper sweeps it)


@dataclass(frozen=True)
class MixpertConfig:
    """A backbone plus how it is split and routed. Written verbatim into checkpoints and manifests."""

    backbone: Backbone
    expert_layers: int  # k, 0 (projector only) .. L (whole tower but the patch embedding)
    domains: tuple[str, ...] = DOMAINS
    strategy: str = DEFAULT_STRATEGY
    tau: float = DEFAULT_TAU
    lam: float = DEFAULT_LAM

    def __post_init__(self):
        L = self.backbone.layers_in_use
        if not 0 <= self.expert_layers <= L:
            raise MixpertError(f"expert layers k={self.expert_layers} must be within 0..{L} for {self.backbone.name}")
        if self.strategy not in STRATEGIES:
            raise MixpertError(f"unknown routing strategy {self.strategy!r}: choose one of {', '.join(STRATEGIES)}")
        if VERSATILE in self.domains or len(set(self.domains)) != len(self.domains):
            raise MixpertError(f"domains {self.domains} must be distinct and must not include {VERSATILE!r}")
        bad = [d for d in self.domains if not isinstance(d, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", d)]
        if bad:  # they name files (expert_<d>.onnx) and serving models
            raise MixpertError(f"domain names {bad} must be letters, digits, '_' and '-' only")

    @classmethod
    def for_backbone(cls, backbone: Backbone, **overrides) -> "MixpertConfig":
        """The backbone's split: its k and its domain set (the entry's, else the paper's five) unless overridden."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        overrides.setdefault("expert_layers", backbone.expert_layers)
        overrides.setdefault("domains", tuple(backbone.domains) or DOMAINS)
        return cls(backbone=backbone, **overrides)

    @property
    def experts(self) -> tuple[str, ...]:
        return tuple(self.domains) + (VERSATILE,)

    @property
    def trunk_layers(self) -> range:
        """Global indices of the tower layers the trunk runs."""
        return range(0, self.backbone.layers_in_use - self.expert_layers)

    @property
    def expert_layer_range(self) -> range:
        """Global indices of the tower layers each expert owns a copy of."""
        L = self.backbone.layers_in_use
        return range(L - self.expert_layers, L)

    def replace(self, **changes) -> "MixpertConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return {
            "backbone": self.backbone.to_dict(), "expert_layers": self.expert_layers, "domains": list(self.domains),
            "routing": {"strategy": self.strategy, "tau": self.tau, "lam": self.lam},
        }

    @classmethod
    def from_dict(cls, d: dict) -> "MixpertConfig":
        r = d.get("routing", {})
        return cls(
            backbone=Backbone.from_dict(d["backbone"]), expert_layers=int(d["expert_layers"]),
            domains=tuple(d.get("domains", DOMAINS)), strategy=r.get("strategy", DEFAULT_STRATEGY),
            tau=float(r.get("tau", DEFAULT_TAU)), lam=float(r.get("lam", DEFAULT_LAM)),
        )


# ---------------------------------------------------------------------------------------------
# The three parts.
# ---------------------------------------------------------------------------------------------

class PixelInput(nn.Module):
    """The parts' pixel input: uint8 rows as the preprocessor cuts them (io()["pixels"]) -> the tower's float32
    input, inside the graph. Each byte indexes its channel's 256-entry table (preprocess.lookup_table: transformers'
    own rescale and normalise arithmetic for every byte value, so the values are the processor's bits), then the
    family's layout (unpack_pixels). Exports as Cast, Add, Gather on a 768-entry table (and Qwen2-VL's Expand): the
    host sends a quarter of the bytes and never normalises. The trunk itself keeps taking float32 pixel_values,
    for training and for comparing with transformers."""

    def __init__(self, cfg: MixpertConfig):
        super().__init__()
        from .preprocess import Preprocessor

        bb = cfg.backbone
        pre = Preprocessor(bb)
        pre.require_table()
        self.adapter, self.backbone = pre.adapter, bb
        self.register_buffer("table", torch.from_numpy(pre.table.reshape(-1).copy()))
        self.register_buffer("offsets", torch.from_numpy(pre.adapter.pixel_channels(bb) * pre.table.shape[1]))

    def forward(self, pixels):
        index = pixels.long() + self.offsets
        values = self.table.index_select(0, index.reshape(-1)).reshape(index.shape)  # one Gather on the table
        return self.adapter.unpack_pixels(self.backbone, values)


def _taps(cfg: MixpertConfig, layers: range) -> list[int]:
    """The DeepStack taps (Adapter.taps) among `layers`: a tap's merger belongs to the part that runs its layer."""
    return [t for t in adapter_for(cfg.backbone).taps(cfg.backbone) if t in layers]


class Trunk(nn.Module):
    """pixel_values [N_crops, 3, H, W] -> hidden [N_crops, T, D]: patch embedding + the first L-k layers.
    Patch families (Qwen2-VL): pixel_values [P, C*t*p*p] and the per-row inputs (position_ids, segment_ids) ->
    hidden [P, D]; the family's context turns the row inputs into what each layer takes, and its embeddings may
    read them too (Qwen3-VL's position table). DeepStack taps among the trunk's layers: `features` also gives
    their mergers' outputs (`deepstack`)."""

    def __init__(self, cfg: MixpertConfig):
        super().__init__()
        ad = adapter_for(cfg.backbone)
        self.embeddings = ad.embeddings(cfg.backbone)
        self.context = ad.context(cfg.backbone)
        self.indices = list(cfg.trunk_layers)
        self.layers = nn.ModuleList(ad.layer(cfg.backbone, i) for i in cfg.trunk_layers)
        self.taps = _taps(cfg, cfg.trunk_layers)
        if self.taps:
            self.deepstack = nn.ModuleList(ad.tap_projector(cfg.backbone) for _ in self.taps)

    def features(self, pixel_values, *rows):
        """(hidden, [each trunk tap's merger output])."""
        h = self.embeddings(pixel_values, *rows)
        ctx = self.context(*rows) if self.context is not None else ()
        deep = []
        for i, layer in zip(self.indices, self.layers):
            h = layer(h, *ctx)
            if i in self.taps:
                deep.append(self.deepstack[self.taps.index(i)](h))
        return h, deep

    def forward(self, pixel_values, *rows):
        return self.features(pixel_values, *rows)[0]


class Expert(nn.Module):
    """hidden [N_crops, T, D] -> tokens [N_crops, T', D_llm]: the last k layers + feature selection + projector.
    Patch families: hidden [P, D] and the rows' inputs -> tokens [P / merge, D_llm] (the merger). DeepStack taps
    among the last k layers are the expert's (copied per domain as the projector is): `features` gives them."""

    def __init__(self, cfg: MixpertConfig):
        super().__init__()
        ad = adapter_for(cfg.backbone)
        self.context = ad.context(cfg.backbone)
        self.indices = list(cfg.expert_layer_range)
        self.layers = nn.ModuleList(ad.layer(cfg.backbone, i) for i in cfg.expert_layer_range)
        self.projector = ad.projector(cfg.backbone)
        self.drop_first = cfg.backbone.select_strategy == "default"
        self.taps = _taps(cfg, cfg.expert_layer_range)
        if self.taps:
            self.deepstack = nn.ModuleList(ad.tap_projector(cfg.backbone) for _ in self.taps)

    def features(self, hidden, *rows):
        """(tokens, [each expert tap's merger output])."""
        deep = []
        if self.layers:
            ctx = self.context(*rows) if self.context is not None else ()
            for i, layer in zip(self.indices, self.layers):
                hidden = layer(hidden, *ctx)
                if i in self.taps:
                    deep.append(self.deepstack[self.taps.index(i)](hidden))
        if self.drop_first:
            hidden = hidden[:, 1:]
        return self.projector(hidden), deep

    def forward(self, hidden, *rows):
        return self.features(hidden, *rows)[0]


class Router(nn.Module):
    """(hidden [N_crops, T, D], pool [B, N_crops]) -> softmax scores [B, n_domains].

    `pool` averages crops into images (row b holds 1/n_b on the crops of image b; see pool_matrix), so
    the global average pool over all tokens of all crops of one image is one matmul and exports as such.
    Patch families: hidden [P, D] and pool [B, P], 1/n_b on the n_b patches of image b (the same matrix over
    patches): the average over every token of the image again.
    The router computes in fp32 whatever the trunk's precision: it is tiny and decides the routing.
    """

    def __init__(self, cfg: MixpertConfig):
        super().__init__()
        d = cfg.backbone.hidden_size
        self.fc1 = nn.Linear(d, d)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(d, len(cfg.domains))

    def logits(self, hidden, pool):
        h = hidden.float()
        pooled = pool.float() @ (h.mean(dim=1) if h.dim() == 3 else h)
        return self.fc2(self.act(self.fc1(pooled)))

    def forward(self, hidden, pool):
        return torch.softmax(self.logits(hidden, pool), dim=-1)


class Deepstack(nn.Module):
    """A part that has DeepStack taps as its graph: (its main output, deepstack [merged, taps, D_llm]), the
    taps stacked along axis 1 in tower order (the bundle's contract, mixpert_export/bundle/contract.py)."""

    def __init__(self, part: nn.Module):
        super().__init__()
        self.part = part

    def forward(self, x, *rows):
        main, deep = self.part.features(x, *rows)
        return main, torch.stack(deep, dim=1)


class SingleEncoder(nn.Module):
    """The unsplit baseline: the vision tower + projector as one model (trunk then one expert)."""

    def __init__(self, trunk: Trunk, expert: Expert):
        super().__init__()
        self.trunk, self.expert = trunk, expert

    def features(self, pixel_values, *rows):
        """(tokens, every DeepStack tap's merger output, in tower order)."""
        hidden, deep = self.trunk.features(pixel_values, *rows)
        tokens, more = self.expert.features(hidden, *rows)
        return tokens, deep + more

    def forward(self, pixel_values, *rows):
        return self.expert(self.trunk(pixel_values, *rows), *rows)


class Packing(nn.Module):
    """What the MLLM adds around an image's visual tokens before its language model: LLaVA-OneVision's learned
    `image_newline` [D_llm] (the snapshot's own tensor), frozen; nothing for families without one (InternVL). It
    travels in the checkpoint and the bundle so the deployed pipeline packs tokens exactly as the MLLM does without
    the snapshot at hand. Not counted in the vision side's parameters (it belongs to the LLM's input)."""

    def __init__(self, cfg: MixpertConfig):
        super().__init__()
        if adapter_for(cfg.backbone).packing_keys:
            self.image_newline = nn.Parameter(torch.empty(cfg.backbone.llm_hidden_size), requires_grad=False)


class MixpertVision(nn.Module):
    """Trunk + router + one expert per name in cfg.experts (the domains, then versatile), and the packing
    tensors the runtime needs to hand the LLM its embeddings."""

    def __init__(self, cfg: MixpertConfig):
        super().__init__()
        self.cfg = cfg
        self.trunk = Trunk(cfg)
        self.router = Router(cfg)
        self.experts = nn.ModuleDict({name: Expert(cfg) for name in cfg.experts})
        self.packing = Packing(cfg)

    def single_encoder(self) -> SingleEncoder:
        return SingleEncoder(self.trunk, self.experts[VERSATILE])

    def reset_experts_to_versatile(self):
        """Every domain expert starts as a copy of the versatile (joint) weights, as in the paper."""
        src = self.experts[VERSATILE].state_dict()
        for name in self.cfg.domains:
            self.experts[name].load_state_dict(src)


def build_model(cfg: MixpertConfig, device: str | torch.device = "cpu", seed: int | None = 0) -> MixpertVision:
    """Build the split. On 'meta' nothing is allocated (shapes, params, FLOPs); elsewhere weights are
    random (fast, deterministic for a seed) until a checkpoint or snapshot is loaded over them."""
    with torch.device("meta"):
        model = MixpertVision(cfg)
    if str(device) == "meta":
        return model
    model = model.to_empty(device=device)
    init_weights(model, seed)
    return model.eval()


@torch.no_grad()
def init_weights(module: nn.Module, seed: int | None = 0):
    """Truncated-normal-free, cheap init: N(0, 0.02) weights, zero biases, unit norms. Seconds at 400M."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(0 if seed is None else seed)
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if "norm" in name and leaf == "weight":
            p.fill_(1.0)
        elif leaf == "bias":
            p.zero_()
        else:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    for name, b in module.named_buffers():
        if name.endswith("position_ids"):
            b.copy_(torch.arange(b.shape[-1]).expand_as(b))


# ---------------------------------------------------------------------------------------------
# Pooling and routing: host-side, numpy, shared by training, eval and every runtime.
# ---------------------------------------------------------------------------------------------

def pool_matrix(crops_per_image: Sequence[int], per_crop: bool = False, dtype=np.float32) -> np.ndarray:
    """[B, N_crops] averaging matrix for Router: image b averages its own crops. per_crop=True: identity
    (each crop is routed on its own, the paper's sub-image routing)."""
    counts = [int(c) for c in crops_per_image]
    if any(c < 1 for c in counts):
        raise MixpertError(f"every image needs at least one crop, got crops_per_image={counts}")
    n = sum(counts)
    if per_crop:
        return np.eye(n, dtype=dtype)
    pool = np.zeros((len(counts), n), dtype=dtype)
    start = 0
    for b, c in enumerate(counts):
        pool[b, start:start + c] = 1.0 / c
        start += c
    return pool


def route(scores, domains: Sequence[str] = DOMAINS, strategy: str = DEFAULT_STRATEGY,
          tau: float = DEFAULT_TAU, lam: float = DEFAULT_LAM) -> list[str]:
    """One expert name per row of `scores` [B, n_domains] (softmax probabilities).

    direct: argmax; score-threshold: top1 <= lam -> versatile; score-difference: top1 - top2 <= tau -> versatile.
    At or below, so the edges of [0, 1] mean what a user expects even when a float32 softmax saturates to exactly
    [1, 0, ...]: 1 sends every image to versatile, 0 only exact ties (which have no winner). Rows that are not
    finite go to versatile (the expert that was trained on everything).
    """
    s = np.asarray(scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[1] != len(domains):
        raise MixpertError(f"router scores have shape {s.shape}; expected [B, {len(domains)}]")
    if strategy not in STRATEGIES:
        raise MixpertError(f"unknown routing strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    out = []
    for row in s:
        if not np.all(np.isfinite(row)):
            out.append(VERSATILE)
            continue
        order = np.argsort(-row, kind="stable")
        top1 = row[order[0]]
        top2 = row[order[1]] if len(row) > 1 else -math.inf
        if strategy == "score-threshold" and top1 <= lam:
            out.append(VERSATILE)
        elif strategy == "score-difference" and top1 - top2 <= tau:
            out.append(VERSATILE)
        else:
            out.append(domains[int(order[0])])
    return out


def margins(scores) -> np.ndarray:
    """top1 - top2 per row: how sure the router is (what score-difference thresholds)."""
    s = np.sort(np.asarray(scores, dtype=np.float64), axis=1)
    return s[:, -1] - s[:, -2] if s.shape[1] > 1 else s[:, -1]


# ---------------------------------------------------------------------------------------------
# Accounting: total and activated parameters of the baseline and of Mixpert (the paper's Table 6).
# ---------------------------------------------------------------------------------------------

def _count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def parameter_report(cfg: MixpertConfig) -> dict:
    """Counts on the meta device: no weights are allocated, seconds even at 7B scale."""
    model = build_model(cfg, device="meta")
    trunk, router = _count(model.trunk), _count(model.router)
    expert = _count(model.experts[VERSATILE])
    n_dom = len(cfg.domains)
    baseline = trunk + expert
    return {
        "backbone": cfg.backbone.name, "expert_layers": cfg.expert_layers,
        "trunk": trunk, "router": router, "expert": expert,
        "baseline_total": baseline, "baseline_activated": baseline,
        "mixpert_total": baseline + n_dom * expert + router,
        "mixpert_activated": baseline + router,
        "added_total": n_dom * expert + router, "added_experts": n_dom * expert, "added_activated": router,
    }
