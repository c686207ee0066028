"""Where a bundle's model came from, and how to get it back as torch modules (the torch backend's weights).

A manifest records the source: a checkpoint or snapshot path, or a random-init seed (deterministic), so the
torch reference never needs a second copy of the weights inside the bundle.
"""

from __future__ import annotations

from pathlib import Path

from mixpert_train.backbones import REGISTRY, get_backbone
from mixpert_train.errors import MixpertError
from mixpert_train.model import MixpertConfig, MixpertVision, build_model


def resolve(backbone: str | None = None, checkpoint: str | None = None, weights: str | None = None,
            random_init: bool = False, expert_layers: int | None = None, seed: int = 0) -> tuple[MixpertVision, dict]:
    """The model for `build`, and the source record the manifest keeps."""
    given = [n for n, v in (("--checkpoint", checkpoint), ("--weights", weights), ("--random-init", random_init)) if v]
    if len(given) > 1:
        raise MixpertError(f"pass one of --checkpoint, --weights, --random-init (got {', '.join(given)})")
    if checkpoint:
        from mixpert_train.checkpoint import load_checkpoint

        model = load_checkpoint(checkpoint)
        if backbone and backbone != model.cfg.backbone.name:
            raise MixpertError(f"--checkpoint {checkpoint} is a {model.cfg.backbone.name} model, not --backbone {backbone}")
        return model, {"kind": "checkpoint", "path": str(Path(checkpoint).resolve())}
    if weights:
        from mixpert_train.weights import model_from_snapshot

        model = model_from_snapshot(weights, backbone, expert_layers=expert_layers)
        return model, {"kind": "weights", "path": str(Path(weights).resolve())}
    if not backbone:
        raise MixpertError("pass --backbone NAME (" + ", ".join(sorted(REGISTRY)) + "), or --weights DIR / --checkpoint DIR")
    bb = get_backbone(backbone)
    if not random_init and bb.name != "tiny":
        from mixpert_train.weights import bb_kind

        raise MixpertError(f"--backbone {bb.name} needs weights: --weights DIR (a local Hugging Face snapshot, model_type "
                           f"{bb_kind(bb)}), --checkpoint DIR (from python -m mixpert_train), or --random-init for shapes "
                           "and latency")
    cfg = MixpertConfig.for_backbone(bb, expert_layers=expert_layers)
    return build_model(cfg, seed=seed), {"kind": "random-init", "seed": seed}


def model_from_source(source: dict, cfg: MixpertConfig, manifest_path: Path) -> MixpertVision:
    """The torch model a bundle was built from, as its manifest records it."""
    kind = source.get("kind")
    if kind == "random-init":
        model = build_model(cfg, seed=source.get("seed", 0))
    elif kind in ("checkpoint", "weights"):
        path = Path(source["path"])
        if not path.exists():
            raise MixpertError(f"{manifest_path}: the torch runtime needs the {kind} the bundle was built from, "
                               f"{path}, which is gone; restore it or use --runtime onnxruntime")
        if kind == "checkpoint":
            from mixpert_train.checkpoint import load_checkpoint

            model = load_checkpoint(path)
        else:
            from mixpert_train.weights import load_snapshot

            model = build_model(cfg)
            load_snapshot(model, path)
    else:
        raise MixpertError(f"{manifest_path}: source {kind!r} cannot be reloaded into torch; use --runtime onnxruntime")
    if model.cfg.to_dict()["backbone"] != cfg.to_dict()["backbone"] or model.cfg.expert_layers != cfg.expert_layers:
        raise MixpertError(f"{manifest_path}: the {kind} at {source.get('path')} no longer matches the bundle's model; rebuild the bundle")
    return model
