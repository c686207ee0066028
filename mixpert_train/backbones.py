"""Backbone registry: what each supported MLLM vision side looks like, as data, plus the adapter interface.

An entry says what a LLaVA-OV-shaped config.json says (tower, feature layer, projector, anyres grid)
and what a snapshot does not (expert depth k). A new tower family is one module in families/ (its `Adapter`)
and one entry here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from torch import nn

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
    # The snapshot's own image-processor config (preprocessor_config.json, as transformers saved it): when set, it
    # alone defines preprocessing (size, grid, resampling, mean/std); None (registry entries, --random-init): the
    # processor is built from the fields above.
    processor: dict | None = None

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
    packing_keys: tuple = field(default=())  # snapshot keys of model.Packing's image_newline, if the family has one

    def embeddings(self, bb: Backbone) -> nn.Module:
        raise NotImplementedError

    def pack(self, bb: Backbone, tokens, image_size: tuple[int, int], newline):
        """One image's per-crop tokens [n_crops, T, D_llm] -> the embeddings [L, D_llm] the family's MLLM puts at
        its image-token positions, in order. image_size: the original (height, width)."""
        raise NotImplementedError(f"{self.family}: no packing of visual tokens for the LLM yet")

    def layer(self, bb: Backbone) -> nn.Module:
        raise NotImplementedError
