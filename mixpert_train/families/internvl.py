"""InternVL's vision side (transformers' native InternVLForConditionalGeneration, the `-hf` snapshot layout):
InternViT adapter, how an InternVL config.json maps to a Backbone, pixel shuffle + the LayerNorm-MLP projector,
GotOcr2's dynamic tiles as the image processor, and packing (an image's tiles' tokens, in order)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.internvl.configuration_internvl import InternVLVisionConfig
from transformers.models.internvl.modeling_internvl import InternVLVisionEmbeddings, InternVLVisionLayer

from ..backbones import Adapter, Backbone, stacked_tiles
from ..errors import MixpertError

IMAGENET = {"image_mean": (0.485, 0.456, 0.406), "image_std": (0.229, 0.224, 0.225)}  # InternVL's processor
# InternVLVisionConfig fields that shape the tower's weights or arithmetic (transformers' names).
_VISION_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                "patch_size", "num_channels", "hidden_act", "layer_norm_eps", "attention_bias", "norm_type",
                "use_qk_norm", "layer_scale_init_value", "use_mean_pooling")


def _side(v) -> int:
    """InternVL stores image_size / patch_size as [h, w]; tiles are square."""
    if isinstance(v, (list, tuple)):
        if len(set(v)) != 1:
            raise MixpertError(f"non-square size {v}: only square tiles are supported")
        return int(v[0])
    return int(v)


# The original (trust_remote_code) InternVL layout -> transformers' names, in this order (as transformers' own
# convert_internvl_weights_to_hf.py renames them); attn.qkv is fused q/k/v, split into thirds along dim 0.
_ORIGINAL_VISION = (("^vision_model", "vision_tower"), (r"\.layers\.", ".layer."), ("class_embedding", "cls_token"),
                    ("position_embedding", "position_embeddings"), ("patch_embedding", "patch_embeddings.projection"),
                    (r"\.ls(\d+)$", r".lambda_\1"), (r"attn\.proj", "attention.projection_layer"), (r"\.attn\.", ".attention."),
                    ("norm1", "layernorm_before"), ("norm2", "layernorm_after"))
_ORIGINAL_PROJECTOR = {"mlp1.0.": "multi_modal_projector.layer_norm.", "mlp1.1.": "multi_modal_projector.linear_1.",
                       "mlp1.3.": "multi_modal_projector.linear_2."}


def original_config(config: dict, source: str) -> dict:
    """An original InternVL config.json (model_type internvl_chat: vision_config of intern_vit_6b, llm_config,
    select_layer, ps_version) as the -hf config transformers' conversion writes, plus the tiling it implies."""
    if config.get("ps_version", "v2") != "v2":
        raise MixpertError(f"{source}: ps_version {config.get('ps_version')!r}; only v2 pixel shuffle (InternVL2 and "
                           "later, what transformers implements) is supported")
    v = dict(config.get("vision_config") or {})
    for old, new in (("qkv_bias", "attention_bias"), ("qk_normalization", "use_qk_norm")):
        if old in v:
            v[new] = v.pop(old)
    v["model_type"] = "internvl_vision"
    llm = config.get("llm_config") or {}
    if "hidden_size" not in llm:
        raise MixpertError(f"{source}: llm_config.hidden_size missing; is this an InternVL chat snapshot?")
    size = int(config.get("force_image_size") or v.get("image_size", 448))
    v["image_size"] = size
    return {"model_type": "internvl", "vision_config": v, "text_config": {"hidden_size": llm["hidden_size"]},
            "vision_feature_layer": int(config.get("select_layer", -1)), "vision_feature_select_strategy": "default",
            "downsample_ratio": float(config.get("downsample_ratio", 0.5)), "projector_hidden_act": "gelu",
            "_tiles": {"size": {"height": size, "width": size}, "crop_to_patches": bool(config.get("dynamic_image_size", True)),
                       "min_patches": int(config.get("min_dynamic_patch", 1)), "max_patches": int(config.get("max_dynamic_patch", 12)),
                       "image_mean": list(IMAGENET["image_mean"]), "image_std": list(IMAGENET["image_std"]),
                       "image_processor_type": "GotOcr2ImageProcessor"}}


def processor_call_defaults() -> dict:
    """What transformers' InternVLProcessor passes its image processor on every call (crop_to_patches=True), which
    takes precedence over the image processor's own saved config: the -hf conversion saves crop_to_patches false
    and the processor tiles anyway. The images the MLLM sees are these."""
    from transformers.models.internvl.processing_internvl import InternVLProcessor

    return dict(getattr(InternVLProcessor, "images_kwargs", {}) or {})


def backbone_from_internvl_config(config: dict, name: str, base: Backbone | None = None, source: str = "config.json",
                                  processor: dict | None = None,
                                  processor_source: str = "preprocessor_config.json") -> Backbone:
    """The architecture an InternVL (-hf) config.json describes; `base` adds k and the domain set.
    `processor`: the snapshot's GotOcr2 image-processor config, then the source of truth for tiling."""
    if config.get("model_type") == "internvl_chat":  # the original layout: its own config names, tiling in config.json
        config = original_config(config, source)
        if processor is None:
            processor, processor_source = config["_tiles"], source
    if config.get("model_type") != "internvl" or "vision_config" not in config:
        raise MixpertError(f"{source}: not an InternVL config (model_type={config.get('model_type')!r}); "
                           "pass --weights an internvl (-hf layout) snapshot directory")
    vision_in = dict(config["vision_config"])
    if vision_in.get("model_type", "internvl_vision") != "internvl_vision":
        raise MixpertError(f"{source}: vision tower {vision_in.get('model_type')!r} has no adapter; add one in mixpert_train/families/")
    full = InternVLVisionConfig(**{k: vision_in[k] for k in _VISION_KEYS if k in vision_in})  # transformers' defaults
    vision = {k: getattr(full, k) for k in _VISION_KEYS}
    vision["image_size"], vision["patch_size"] = _side(vision["image_size"]), _side(vision["patch_size"])
    feature_layer = config.get("vision_feature_layer", -1)
    if not isinstance(feature_layer, int):
        raise MixpertError(f"{source}: vision_feature_layer {feature_layer!r} (several layers) is not supported yet")
    if feature_layer == -1 and not vision["use_mean_pooling"]:
        raise MixpertError(f"{source}: use_mean_pooling false puts a final LayerNorm on the features; not supported yet")
    ratio = float(config.get("downsample_ratio", 0.5))
    side = vision["image_size"] // vision["patch_size"]
    if side * ratio != int(side * ratio) or int(round(1 / ratio)) ** 2 * ratio ** 2 != 1:
        raise MixpertError(f"{source}: downsample_ratio {ratio} does not divide the {side}x{side} patch grid")
    defaults = {f.name: f.default for f in dataclasses.fields(Backbone) if f.default is not dataclasses.MISSING}
    norm, max_tiles = {}, base.max_grid_crops if base else 12
    if processor is not None:
        processor = dict(processor) | processor_call_defaults()
        size = processor.get("size") or {}
        if (size.get("height"), size.get("width")) != (vision["image_size"],) * 2:
            raise MixpertError(f"{processor_source}: size {size} differs from the vision tower's image_size "
                               f"{vision['image_size']} in {source}; the snapshot is inconsistent, fix one of the two")
        norm = {k: tuple(processor[k]) for k in ("image_mean", "image_std") if k in processor}
        max_tiles = int(processor.get("max_patches", 12)) if processor.get("crop_to_patches", False) else 0
    return Backbone(
        name=name, family="internvit", vision=vision,
        llm_hidden_size=int(config["text_config"]["hidden_size"]),
        feature_layer=feature_layer, select_strategy=config.get("vision_feature_select_strategy", "default"),
        projector_act=config.get("projector_hidden_act", "gelu"), cls_token=True, downsample_ratio=ratio,
        max_grid_crops=max_tiles, expert_layers=base.expert_layers if base else defaults["expert_layers"],
        domains=base.domains if base else ("chart", "doc", "general"), processor=processor,
        **({"image_mean": base.image_mean, "image_std": base.image_std} if base else IMAGENET) | norm,
    )


def pixel_shuffle(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """InternVL's pixel shuffle (transformers' InternVLModel.pixel_shuffle, the same reshapes and permutes):
    [N, T, D] with T = s*s -> [N, T*r*r, D/(r*r)]."""
    n, t, d = x.shape
    s = int(round(t ** 0.5))
    x = x.reshape(n, s, s, d)
    x = x.reshape(n, s, int(s * ratio), int(d / ratio)).permute(0, 2, 1, 3)
    x = x.reshape(n, int(s * ratio), int(s * ratio), int(d / ratio ** 2)).permute(0, 2, 1, 3)
    return x.reshape(n, -1, x.shape[-1])


class Projector(nn.Module):
    """Pixel shuffle, then LayerNorm -> Linear -> act -> Linear; names as transformers' InternVLMultiModalProjector."""

    def __init__(self, bb: Backbone):
        super().__init__()
        self.ratio = bb.downsample_ratio
        self.layer_norm = nn.LayerNorm(bb.projector_in)
        self.linear_1 = nn.Linear(bb.projector_in, bb.llm_hidden_size)
        self.act = ACT2FN[bb.projector_act]
        self.linear_2 = nn.Linear(bb.llm_hidden_size, bb.llm_hidden_size)

    def forward(self, x):
        x = pixel_shuffle(x, self.ratio)
        return self.linear_2(self.act(self.linear_1(self.layer_norm(x))))


class _Embeddings(InternVLVisionEmbeddings):
    """transformers' embeddings (same tensor names) at the one tile size the tower was trained at: the position
    embeddings are added as they are (its interpolation path is the identity there and would export a bicubic
    resize)."""

    def forward(self, pixel_values):
        x = self.patch_embeddings(pixel_values)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.position_embeddings if self.position_embeddings is not None else x


@dataclass(frozen=True)
class InternVitAdapter(Adapter):
    family: str = "internvit"
    tower_prefixes: tuple = ("model.vision_tower.", "vision_tower.")
    projector_prefixes: tuple = ("model.multi_modal_projector.", "multi_modal_projector.")
    layer_prefix: str = "encoder.layer."
    config_types: tuple = ("internvl", "internvl_chat")  # -hf (transformers) and the original remote-code layout
    processor_types: tuple = ("GotOcr2ImageProcessor",)

    def rename(self, key: str) -> list[tuple[str, tuple | None]]:
        import re

        if key.startswith("vision_model."):
            for pattern, repl in _ORIGINAL_VISION:
                key = re.sub(pattern, repl, key)
            if ".attention.qkv." in key:
                return [(key.replace(".qkv.", f".{n}_proj."), (i, 3)) for i, n in enumerate("qkv")]
            return [(key, None)]
        for old, new in _ORIGINAL_PROJECTOR.items():
            if key.startswith(old):
                return [(new + key[len(old):], None)]
        return [(key, None)]

    def reads_processor_file(self, config: dict) -> bool:
        return config.get("model_type") != "internvl_chat"  # its remote code tiles from config.json, not that file

    def backbone_from_config(self, config, name, base, source, processor, processor_source):
        return backbone_from_internvl_config(config, name, base, source, processor,
                                             processor_source or "preprocessor_config.json")

    def config(self, bb: Backbone) -> InternVLVisionConfig:
        cfg = InternVLVisionConfig(**bb.vision)
        cfg._attn_implementation = "sdpa"
        return cfg

    def embeddings(self, bb: Backbone) -> nn.Module:
        return _Embeddings(self.config(bb))

    def layer(self, bb: Backbone, index: int) -> nn.Module:
        return InternVLVisionLayer(self.config(bb))

    def projector(self, bb: Backbone) -> nn.Module:
        return Projector(bb)

    def image_processor(self, bb: Backbone):
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

        if bb.processor is not None:
            return GotOcr2ImageProcessorPil.from_dict(dict(bb.processor))
        s = bb.crop_size
        return GotOcr2ImageProcessorPil(
            size={"height": s, "width": s}, crop_to_patches=bb.max_grid_crops > 1, min_patches=1,
            max_patches=max(1, bb.max_grid_crops), image_mean=list(bb.image_mean), image_std=list(bb.image_std),
        )

    def fast_preprocessing(self, p) -> bool:
        return bool(p.size.height and p.size.width)

    def fast_rows(self, p, image_size, px):
        """GotOcr2's dynamic tiles: the image resized to the tile grid whose aspect ratio is closest to its own
        (min..max tiles), cut into tiles row by row, then a thumbnail (the whole image at one tile) when there is
        more than one tile; without crop_to_patches, one tile of the whole image."""
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

        th, tw = p.size.height, p.size.width
        if not (p.crop_to_patches and p.max_patches > 1):
            return stacked_tiles(px, [px.resize(tw, th)]), None
        cols, rows = get_optimal_tiled_canvas(tuple(image_size), (th, tw), p.min_patches, p.max_patches)
        canvas = px.resize(tw * cols, th * rows)
        tiles = [canvas[r * th:(r + 1) * th, c * tw:(c + 1) * tw] for r in range(rows) for c in range(cols)]
        if len(tiles) != 1:
            tiles.append(px.resize(tw, th))
        return stacked_tiles(px, tiles), None

    def image_prompt(self, config: dict, tokenizer) -> tuple[str, int, list, list]:
        """InternVLProcessor: its tokenizer's context image token in the prompt becomes start + context x (tokens a
        tile x tiles) + end (replace_image_token); the model fills the context positions."""
        try:
            return (tokenizer.context_image_token, int(tokenizer.context_image_token_id),
                    [int(tokenizer.start_image_token_id)], [int(tokenizer.end_image_token_id)])
        except (AttributeError, TypeError, ValueError):
            raise MixpertError("the snapshot's tokenizer has no start/end/context image tokens (extra_special_tokens "
                               "start_image_token, end_image_token, context_image_token): not an InternVL -hf tokenizer") from None

    def tiny_mllm(self, bb: Backbone, vocab_size: int, image_token_id: int):
        """A tiny InternVL: the backbone's tower + pixel shuffle + projector and a 2-layer Qwen2 language model."""
        from transformers import InternVLConfig, InternVLForConditionalGeneration

        cfg = InternVLConfig(
            vision_config=dict(bb.vision, model_type="internvl_vision"),
            text_config=dict(model_type="qwen2", hidden_size=bb.llm_hidden_size, intermediate_size=2 * bb.llm_hidden_size,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
                             max_position_embeddings=4096, tie_word_embeddings=False),
            image_token_id=image_token_id, downsample_ratio=bb.downsample_ratio, vision_feature_layer=bb.feature_layer,
            vision_feature_select_strategy=bb.select_strategy, projector_hidden_act=bb.projector_act,
            image_seq_length=bb.tokens_per_crop,
        )
        model = InternVLForConditionalGeneration(cfg)
        with torch.no_grad():  # transformers starts the class token and position embeddings at zero; break symmetry
            emb = model.model.vision_tower.embeddings
            emb.position_embeddings.normal_(0, 0.02)
            emb.cls_token.normal_(0, 0.02)
        return model

    def mllm_crop_tokens(self, mllm, crops, grids=None):
        return mllm.model.get_image_features(pixel_values=crops).pooler_output

    def mllm_pack(self, mllm, tokens, image_size):
        return tokens.reshape(-1, tokens.shape[-1])

    def pack(self, bb: Backbone, tokens, image_size, newline=None) -> np.ndarray:
        """InternVL puts an image's tiles' tokens at its <IMG_CONTEXT> positions in tile order (the thumbnail
        last), nothing between them: [n_tiles * tokens_per_crop, D_llm]."""
        t = tokens.detach().float().cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens, np.float32)
        return t.reshape(-1, t.shape[-1])
