"""Vision tower + projector tensors from a local Hugging Face MLLM snapshot (safetensors only): LLaVA-OneVision,
InternVL (-hf and original layouts) or Qwen2-VL, the family read from config.json's model_type.

Only the shards that hold vision or projector tensors are opened, and only those tensors are read: the
language model never leaves the disk. The key layouts transformers has written are accepted.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .backbones import REGISTRY, Backbone
from .families import adapter_for, adapter_for_config, processor_from_snapshot
from .errors import MixpertError
from .model import VERSATILE, MixpertConfig, MixpertVision

_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.(.+)$")


def read_snapshot_config(snapshot: str | Path, flag: str = "--weights") -> dict:
    """The snapshot's config.json; `flag` is the option the user passed the directory with (named in errors)."""
    snap = Path(snapshot)
    if not snap.is_dir():
        raise MixpertError(f"{flag} {snap}: no such directory; pass a local MLLM snapshot (config.json + *.safetensors)")
    path = snap / "config.json"
    if not path.is_file():
        raise MixpertError(f"{path}: missing; {flag} must be a Hugging Face snapshot directory with config.json")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MixpertError(f"{path}: not valid JSON ({e}); re-download or re-save the snapshot") from None


def backbone_from_snapshot(snapshot: str | Path, name: str | None = None) -> Backbone:
    """The snapshot's own architecture; the registry entry `name` (if any) adds k and the domain set. A snapshot
    of another family than the entry's is refused in one line naming both."""
    cfg = read_snapshot_config(snapshot)
    source = str(Path(snapshot) / "config.json")
    ad = adapter_for_config(cfg, source)
    base = REGISTRY.get(name) if name else None
    if base is not None and base.family != ad.family:
        raise MixpertError(f"{source}: a {cfg.get('model_type')} snapshot ({ad.family} tower), but --backbone {name} "
                           f"takes the {base.family} tower; pass the matching --backbone or the right snapshot")
    processor, processor_file = processor_from_snapshot(snapshot, ad) if ad.reads_processor_file(cfg) else (None, None)
    return ad.backbone_from_config(cfg, name or Path(snapshot).name, base, source, processor, processor_file)


def _shard_map(snap: Path) -> dict[str, Path]:
    """tensor name -> shard file, from the index if sharded, else from the single file's header."""
    index = snap / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
            raise MixpertError(f"{index}: unreadable index ({e}); re-download the snapshot") from None
        return {k: snap / v for k, v in weight_map.items()}
    single = snap / "model.safetensors"
    if not single.is_file():
        raise MixpertError(f"{snap}: no model.safetensors or model.safetensors.index.json; only safetensors snapshots are supported (no pickle)")
    with _open(single) as f:
        return {k: single for k in f.keys()}


def _open(path: Path):
    if not path.is_file():
        raise MixpertError(f"{path}: shard missing; re-download the snapshot")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise MixpertError(f"{path}: corrupt or truncated safetensors shard ({e}); re-download it") from None


def canonical_name(key: str, bb: Backbone) -> str | None:
    """'tower.<canonical>' / 'projector.<canonical>' for a vision or projector key, None for anything else.
    Canonical tower names: embeddings.* and encoder.layers.<i>.* whatever the family calls its layer list."""
    ad = adapter_for(bb)
    for p in ad.projector_prefixes:  # first: a family may keep its projector inside the tower (Qwen2-VL's merger)
        if key.startswith(p):
            return "projector." + key[len(p):]
    for p in ad.tower_prefixes:
        if key.startswith(p):
            rest = key[len(p):]
            if rest.startswith(ad.layer_prefix):
                rest = "encoder.layers." + rest[len(ad.layer_prefix):]
            elif rest.startswith(ad.embeddings_prefix):
                rest = "embeddings." + rest[len(ad.embeddings_prefix):]
            return "tower." + rest
    if key in ad.packing_keys:
        return "packing.image_newline"
    return None


def bb_kind(bb: Backbone) -> str:
    return " / ".join(adapter_for(bb).config_types)


def target_key(canonical: str, cfg: MixpertConfig) -> str | None:
    """Where a canonical snapshot tensor goes in MixpertVision (versatile expert), or None if unused
    (the deleted last layer, post-layernorm, pooling head)."""
    kind, rest = canonical.split(".", 1)
    if kind == "packing":
        return canonical
    if kind == "projector":
        return f"experts.{VERSATILE}.projector.{rest}"
    if rest.startswith("embeddings."):
        return f"trunk.{rest}"
    m = _LAYER.match(rest)
    if not m:
        where = adapter_for(cfg.backbone).tower_target(rest, cfg)
        return None if where is None else {"trunk": "trunk.", "expert": f"experts.{VERSATILE}."}[where[0]] + where[1]
    i, tail = int(m.group(1)), m.group(2)
    if i in cfg.trunk_layers:
        return f"trunk.layers.{i}.{tail}"
    if i in cfg.expert_layer_range:
        return f"experts.{VERSATILE}.layers.{i - cfg.expert_layer_range.start}.{tail}"
    return None


@torch.no_grad()
def load_snapshot(model: MixpertVision, snapshot: str | Path) -> dict:
    """Fill the trunk and the versatile expert from the snapshot, then copy versatile into every domain
    expert. The router keeps its initialisation (a snapshot has none). Returns a small report."""
    snap, cfg = Path(snapshot), model.cfg
    read_snapshot_config(snap)
    shards = _shard_map(snap)
    ad = adapter_for(cfg.backbone)
    wanted: dict[str, tuple[str, Path, tuple | None]] = {}  # model key -> (snapshot key, shard, slice of it)
    for key, shard in shards.items():
        for name, part in ad.rename(key):  # an older layout's key -> transformers' names (a fused tensor -> parts)
            canon = canonical_name(name, cfg.backbone)
            tgt = target_key(canon, cfg) if canon else None
            if tgt is not None:
                wanted[tgt] = (key, shard, part)
    state = model.state_dict()
    need = [k for k in state if k.startswith(("trunk.", f"experts.{VERSATILE}.", "packing."))]
    need = [k for k in need if not k.endswith("position_ids")]  # a buffer, not a weight
    missing = [k for k in need if k not in wanted]
    if missing:
        raise MixpertError(f"{snap}: tensor for {missing[0]} not found ({len(missing)} missing); "
                           f"is this a complete snapshot of this architecture (model_type {bb_kind(cfg.backbone)})?")
    by_shard: dict[Path, list[str]] = {}
    for tgt in need:
        by_shard.setdefault(wanted[tgt][1], []).append(tgt)
    for shard, targets in sorted(by_shard.items()):
        with _open(shard) as f:
            for tgt in targets:
                key = wanted[tgt][0]
                try:
                    t = f.get_tensor(key)
                    part = wanted[tgt][2]
                    if part is not None:  # (i, n): the i-th of n equal slices along dim 0 (a fused q/k/v)
                        i, n = part
                        t = t[i * (t.shape[0] // n):(i + 1) * (t.shape[0] // n)]
                except (SafetensorError, OSError, ValueError) as e:
                    raise MixpertError(f"{shard}: tensor {key} unreadable ({e}); re-download this shard") from None
                if tuple(t.shape) != tuple(state[tgt].shape):
                    raise MixpertError(f"{shard}: tensor {key} has shape {tuple(t.shape)}, expected "
                                       f"{tuple(state[tgt].shape)}; the snapshot does not match its config.json")
                state[tgt].copy_(t.to(state[tgt].dtype))
    model.reset_experts_to_versatile()
    return {"snapshot": str(snap), "tensors": len(need), "shards_opened": len(by_shard),
            "shards_total": len(set(shards.values()))}


def model_from_snapshot(snapshot: str | Path, backbone: str | None = None, **overrides) -> MixpertVision:
    """The whole path for `--weights DIR`: architecture from the snapshot, tensors from its shards."""
    from .model import build_model

    bb = backbone_from_snapshot(snapshot, backbone)
    cfg = MixpertConfig.for_backbone(bb, **overrides)
    model = build_model(cfg)
    load_snapshot(model, snapshot)
    return model

