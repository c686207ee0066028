"""LLaVA-OneVision's vision side: the SigLIP tower adapter, how a LLaVA-OV config.json maps to a Backbone, its
2-layer projector, its anyres image processor and its packing (image_newline)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers import SiglipVisionConfig
from transformers.activations import ACT2FN
from transformers.models.siglip.modeling_siglip import SiglipEncoderLayer, SiglipVisionEmbeddings

from ..backbones import Adapter, Backbone, stacked_tiles
from ..errors import MixpertError


def backbone_from_llava_config(config: dict, name: str, base: Backbone | None = None, source: str = "config.json",
                               processor: dict | None = None, processor_source: str = "preprocessor_config.json") -> Backbone:
    """The architecture a LLaVA-OV config.json describes; `base` adds what a snapshot does not say (k).
    `processor`: the snapshot's image-processor config, then the source of truth for preprocessing."""
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
    norm = {}
    if processor is not None:
        size = processor.get("size") or {}
        crop = (size.get("height"), size.get("width"))
        if crop != (vision["image_size"], vision["image_size"]):
            raise MixpertError(f"{processor_source}: size {size} differs from the vision tower's image_size "
                               f"{vision['image_size']} in {source}; the snapshot is inconsistent, fix one of the two")
        norm = {k: tuple(processor[k]) for k in ("image_mean", "image_std") if k in processor}
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
        domains=base.domains if base else (), processor=processor, **norm,
    )


class Projector(nn.Module):
    """LLaVA's 2-layer projector; tensor names as transformers' LlavaOnevisionMultiModalProjector."""

    def __init__(self, bb: Backbone):
        super().__init__()
        self.linear_1 = nn.Linear(bb.projector_in, bb.llm_hidden_size, bias=bb.projector_bias)
        self.act = ACT2FN[bb.projector_act]
        self.linear_2 = nn.Linear(bb.llm_hidden_size, bb.llm_hidden_size, bias=bb.projector_bias)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


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
    packing_keys: tuple = ("model.image_newline", "image_newline")  # the LLM input's row separator
    config_types: tuple = ("llava_onevision",)
    processor_types: tuple = ("LlavaOnevisionImageProcessor",)

    def backbone_from_config(self, config, name, base, source, processor, processor_source):
        return backbone_from_llava_config(config, name, base, source, processor, processor_source or "preprocessor_config.json")

    def image_processor(self, bb: Backbone):
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )

        if bb.processor is not None:
            return LlavaOnevisionImageProcessorPil.from_dict(dict(bb.processor))
        s = bb.crop_size
        return LlavaOnevisionImageProcessorPil(
            size={"height": s, "width": s}, image_grid_pinpoints=[list(p) for p in bb.grid_pinpoints],
            image_mean=list(bb.image_mean), image_std=list(bb.image_std), do_convert_rgb=True,
        )

    def fast_preprocessing(self, p) -> bool:
        return bool(p.size.height) and p.size.height == p.size.width and bool(getattr(p, "image_grid_pinpoints", None))

    def fast_rows(self, p, image_size, px):
        """Anyres: the base image resized to S x S first, then the best-fit canvas (the image resized inside it,
        centred, zero padding) cut into S x S crops row by row."""
        from transformers.image_processing_utils import get_patch_output_size, select_best_resolution

        S, (h, w) = p.size.height, image_size
        bh, bw = select_best_resolution((h, w), p.image_grid_pinpoints)
        nh, nw = get_patch_output_size(np.broadcast_to(np.uint8(0), (3, h, w)), (bh, bw), "channels_first")
        canvas = px.zeros(bh, bw)
        y, x = (bh - nh) // 2, (bw - nw) // 2
        canvas[y:y + nh, x:x + nw] = px.resize(nw, nh)
        tiles = [px.resize(S, S)] + [canvas[i:i + S, j:j + S] for i in range(0, bh, S) for j in range(0, bw, S)]
        return stacked_tiles(px, tiles), None

    def projector(self, bb: Backbone) -> nn.Module:
        return Projector(bb)

    def config(self, bb: Backbone):
        cfg = SiglipVisionConfig(**bb.vision)
        cfg._attn_implementation = "sdpa"  # exports to ONNX Attention at opset >= 23
        return cfg

    def embeddings(self, bb: Backbone) -> nn.Module:
        return SiglipVisionEmbeddings(self.config(bb))

    def layer(self, bb: Backbone, index: int) -> nn.Module:
        return _SiglipLayer(self.config(bb))

    def pack(self, bb: Backbone, tokens, image_size: tuple[int, int], newline):
        return pack_anyres(bb, tokens, image_size, newline)

    def image_prompt(self, config: dict, tokenizer) -> tuple[str, int, list, list]:
        # LlavaOnevisionProcessor: "<image>" becomes as many image tokens as the packed features, nothing around them
        return "<image>", int(config.get("image_token_index", config.get("image_token_id", -1))), [], []

    def tiny_mllm(self, bb: Backbone, vocab_size: int, image_token_id: int):
        """A tiny LLaVA-OneVision: the backbone's tower + projector and a 2-layer Qwen2 language model."""
        from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

        cfg = LlavaOnevisionConfig(
            vision_config=dict(model_type="siglip_vision_model", **bb.vision),
            text_config=dict(model_type="qwen2", hidden_size=bb.llm_hidden_size, intermediate_size=2 * bb.llm_hidden_size,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
                             max_position_embeddings=4096, tie_word_embeddings=False),
            image_grid_pinpoints=[list(p) for p in bb.grid_pinpoints], vision_feature_layer=bb.feature_layer,
            vision_feature_select_strategy=bb.select_strategy, projector_hidden_act=bb.projector_act,
            image_token_index=image_token_id, video_token_index=image_token_id,
        )
        return LlavaOnevisionForConditionalGeneration(cfg)

    def mllm_crop_tokens(self, mllm, crops, grids=None):
        cfg = mllm.config
        hs = mllm.model.vision_tower(crops, output_hidden_states=True).hidden_states[cfg.vision_feature_layer]
        if cfg.vision_feature_select_strategy == "default":
            hs = hs[:, 1:]
        return mllm.model.multi_modal_projector(hs)

    def mllm_pack(self, mllm, tokens, image_size):
        return mllm.model.pack_image_features([tokens], torch.tensor([list(image_size)]),
                                              image_newline=mllm.model.image_newline)[0][0]


def pack_anyres(bb: Backbone, tokens, image_size: tuple[int, int], newline) -> np.ndarray:
    """LLaVA-OneVision's anyres packing of one image (its pack_image_features, vision_aspect_ratio anyres_max_N):
    the base crop's tokens first; then the grid crops' tokens laid out as one feature map of the padded canvas,
    the padding removed to the image's aspect ratio, shrunk bilinearly when it holds more than N crops' worth
    (ratio > 1.1), and `newline` appended after every row. One crop: its tokens and one newline.
    tokens [n_crops, T, D] (numpy or torch), newline [D] -> float32 numpy [L, D]."""
    from transformers.image_processing_utils import select_best_resolution

    t = torch.as_tensor(np.asarray(tokens, np.float32) if not isinstance(tokens, torch.Tensor) else tokens.float())
    nl = torch.as_tensor(np.asarray(newline, np.float32)).to(t.device)
    if len(t) == 1:
        return torch.cat([t[0], nl[None]]).cpu().numpy()
    side = bb.crop_size // int(bb.vision["patch_size"])  # tokens along one side of a crop
    if side * side != t.shape[1]:
        raise MixpertError(f"packing: {t.shape[1]} tokens a crop, expected {side}x{side} ({bb.name})")
    h, w = int(image_size[0]), int(image_size[1])
    grid_h, grid_w = select_best_resolution((h, w), [list(p) for p in bb.grid_pinpoints])
    gh, gw = grid_h // bb.crop_size, grid_w // bb.crop_size
    if gh * gw != len(t) - 1:
        raise MixpertError(f"packing: {len(t) - 1} grid crops for a {w}x{h} image, its grid is {gw}x{gh}")
    f = t[1:].reshape(gh, gw, side, side, -1).permute(4, 0, 2, 1, 3).reshape(t.shape[-1], gh * side, gw * side)
    ch, cw = f.shape[1:]
    if w / h > cw / ch:  # wider than the canvas: padding above and below
        pad = (ch - int(round(h * (cw / w), 7))) // 2
        f = f[:, pad:ch - pad]
    else:
        pad = (cw - int(round(w * (ch / h), 7))) // 2
        f = f[:, :, pad:cw - pad]
    ch, cw = f.shape[1:]
    ratio = math.sqrt(ch * cw / (bb.max_grid_crops * side * side))
    if ratio > 1.1:
        f = torch.nn.functional.interpolate(f[None], [int(ch // ratio), int(cw // ratio)], mode="bilinear")[0]
    f = torch.cat([f, nl[:, None, None].expand(f.shape[0], f.shape[1], 1)], dim=-1)
    return torch.cat([t[0], f.flatten(1, 2).transpose(0, 1)]).cpu().numpy()
