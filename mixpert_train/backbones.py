"""Backbone registry: what each supported MLLM vision side looks like, as data, plus the adapter seam.

An entry says what a LLaVA-OV-shaped config.json says (tower, feature layer, projector, anyres grid)
and what a snapshot does not (expert depth k). A new tower family is one `Adapter` and one entry.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from torch import nn
from transformers import SiglipVisionConfig
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer, SiglipVisionEmbeddings

from .errors import MixpertError


@dataclass(frozen=True)
class Backbone:
    name: str
    family: str  # key into ADAPTERS
    vision: dict  # the tower's config (transformers' names), e.g. SiglipVisionConfig kwargs
    llm_hidden_size: int  # projector output width (the language model's hidden size)
    feature_layer: int = -1  # index into the tower's hidden states (0 = embeddings); LLaVA-OV: -1
    select_strategy: str = "full"  # "default" drops the first token (CLS), "full" keeps all
    projector_act: str = "gelu"
    projector_bias: bool = True
    grid_pinpoints: tuple = ()  # anyres grid resolutions (h, w)
    max_grid_crops: int = 9  # anyres_max_9: at most 9 grid crops, plus the base image
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)
    expert_layers: int = 2  # k: the last k layers in use become per-domain experts (paper: 2)

    @property
    def hidden_size(self) -> int:
        return int(self.vision["hidden_size"])

    @property
    def crop_size(self) -> int:
        return int(self.vision["image_size"])

    @property
    def tokens_per_crop(self) -> int:
        n = (self.crop_size // int(self.vision["patch_size"])) ** 2
        return n - 1 if self.select_strategy == "default" else n

    @property
    def tower_layers(self) -> int:
        return int(self.vision["num_hidden_layers"])

    @property
    def layers_in_use(self) -> int:
        """Layers that feed the projector: hidden_states has tower_layers + 1 entries (embeddings first)."""
        n = self.tower_layers + 1
        idx = self.feature_layer if self.feature_layer >= 0 else n + self.feature_layer
        if not 0 <= idx < n:
            raise MixpertError(f"backbone {self.name}: feature_layer {self.feature_layer} is outside 0..{n - 1}")
        return idx

    @property
    def max_crops(self) -> int:
        """Crops of one image at most: the grid crops plus the base image."""
        return self.max_grid_crops + 1

    def replace(self, **changes) -> "Backbone":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["grid_pinpoints"] = [list(p) for p in self.grid_pinpoints]
        d["image_mean"], d["image_std"] = list(self.image_mean), list(self.image_std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Backbone":
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["grid_pinpoints"] = tuple(tuple(p) for p in d.get("grid_pinpoints", ()))
        for key in ("image_mean", "image_std"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


def _grid(base: int, n: int) -> tuple:
    return tuple((base * i, base * j) for i in range(1, n + 1) for j in range(1, n + 1))


# Hugging Face's LLaVA-OV-7B config: SigLIP so400m-patch14-384 with 26 layers (the 27th and the pooling
# head are removed), feature layer -1 (the 26th layer's output, no post-layernorm), strategy "full".
_SO400M_26 = dict(
    hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
    image_size=384, patch_size=14, num_channels=3, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
    vision_use_head=False,
)

REGISTRY: dict[str, Backbone] = {
    "llava-ov-7b": Backbone(
        name="llava-ov-7b", family="siglip", vision=_SO400M_26, llm_hidden_size=3584,
        grid_pinpoints=_grid(384, 6),
    ),
    # A SigLIP-style tower of about 2.7M parameters: same code path, 64 tokens a crop, seconds on a CPU.
    "tiny": Backbone(
        name="tiny", family="siglip",
        vision=dict(
            hidden_size=192, intermediate_size=768, num_hidden_layers=6, num_attention_heads=6,
            image_size=64, patch_size=8, num_channels=3, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
            vision_use_head=False,
        ),
        llm_hidden_size=256, grid_pinpoints=_grid(64, 3),
    ),
}


def get_backbone(name: str) -> Backbone:
    try:
        return REGISTRY[name]
    except KeyError:
        raise MixpertError(f"unknown backbone {name!r}: choose one of {', '.join(sorted(REGISTRY))}") from None


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
        raise MixpertError(f"{source}: vision tower {vision.get('model_type')!r} has no adapter; add one in mixpert_train/backbones.py")
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


# ---------------------------------------------------------------------------------------------
# The adapter seam: how to build one family's embeddings and layers, and where its tensors live.
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Adapter:
    family: str
    # Snapshot key prefixes of the tower, newest layouts first; the canonical names below them are
    # `embeddings.*` and `encoder.layers.<i>.*`, as transformers' vision model names them.
    tower_prefixes: tuple = field(default=())
    projector_prefixes: tuple = field(default=())

    def embeddings(self, bb: Backbone) -> nn.Module:
        raise NotImplementedError

    def layer(self, bb: Backbone) -> nn.Module:
        raise NotImplementedError


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


ADAPTERS: dict[str, Adapter] = {"siglip": SiglipAdapter()}


def adapter_for(bb: Backbone) -> Adapter:
    try:
        return ADAPTERS[bb.family]
    except KeyError:
        raise MixpertError(f"backbone {bb.name}: no adapter for family {bb.family!r}") from None
