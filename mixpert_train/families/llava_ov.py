"""LLaVA-OneVision's vision side: the SigLIP tower adapter and how a LLaVA-OV config.json maps to a Backbone."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch import nn
from transformers import SiglipVisionConfig
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer, SiglipVisionEmbeddings

from ..backbones import Adapter, Backbone
from ..errors import MixpertError


def backbone_from_llava_config(config: dict, name: str, base: Backbone | None = None, source: str = "config.json") -> Backbone:
    """The architecture a LLaVA-OV config.json describes; `base` adds what a snapshot does not say (k)."""
    if config.get("model_type") != "llava_onevision" or "vision_config" not in config:
        raise MixpertError(
            f"{source}: not a LLaVA-OneVision config (model_type={config.get('model_type')!r}); "
            "pass --weights a llava_onevision snapshot directory"
        )
    vision = dict(config["vision_config"])
    family = {"siglip_vision_model": "siglip"}.get(vision.get("model_type", "siglip_vision_model"))
    if family is None:
        raise MixpertError(f"{source}: vision tower {vision.get('model_type')!r} has no adapter; add one in mixpert_train/families/")
    defaults = {f.name: f.default for f in dataclasses.fields(Backbone) if f.default is not dataclasses.MISSING}
    feature_layer = config.get("vision_feature_layer", -1)
    if not isinstance(feature_layer, int):
        raise MixpertError(f"{source}: vision_feature_layer {feature_layer!r} (several layers) is not supported yet")
    keep = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
            "patch_size", "num_channels", "hidden_act", "layer_norm_eps")
    full = SiglipVisionConfig(**{k: vision[k] for k in keep if k in vision})  # fills transformers' defaults
    vision = {k: getattr(full, k) for k in keep} | {"vision_use_head": False}
    aspect = str(config.get("vision_aspect_ratio", "anyres_max_9"))
    max_grid = int(aspect.rsplit("_", 1)[-1]) if aspect.startswith("anyres_max_") else defaults["max_grid_crops"]
    return Backbone(
        name=name, family=family, vision=vision,
        llm_hidden_size=int(config["text_config"]["hidden_size"]),
        feature_layer=feature_layer,
        select_strategy=config.get("vision_feature_select_strategy", "full"),
        projector_act=config.get("projector_hidden_act", "gelu"),
        projector_bias=bool(config.get("multimodal_projector_bias", True)),
        grid_pinpoints=tuple(tuple(p) for p in config.get("image_grid_pinpoints") or (base.grid_pinpoints if base else ())),
        max_grid_crops=max_grid,
        expert_layers=base.expert_layers if base else defaults["expert_layers"],
    )


class _SiglipLayer(SiglipEncoderLayer):
    """transformers' SiglipEncoderLayer (same tensor names), called as layer(hidden): images need no mask."""

    def forward(self, hidden):
        return super().forward(hidden, None)


@dataclass(frozen=True)
class SiglipAdapter(Adapter):
    family: str = "siglip"
    tower_prefixes: tuple = ("model.vision_tower.vision_model.", "model.vision_tower.",
                             "vision_tower.vision_model.", "vision_tower.")
    projector_prefixes: tuple = ("model.multi_modal_projector.", "multi_modal_projector.")

    def config(self, bb: Backbone):
        cfg = SiglipVisionConfig(**bb.vision)
        cfg._attn_implementation = "sdpa"  # exports to ONNX Attention at opset >= 23
        return cfg

    def embeddings(self, bb: Backbone) -> nn.Module:
        return SiglipVisionEmbeddings(self.config(bb))

    def layer(self, bb: Backbone) -> nn.Module:
        return _SiglipLayer(self.config(bb))
