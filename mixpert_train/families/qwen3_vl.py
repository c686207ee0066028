"""Qwen3-VL's vision side (transformers' Qwen3VLForConditionalGeneration): Qwen2-VL's rows (flattened patches in
merge order, all images of a call one sequence, 2D rotary positions, a block-diagonal mask), with 16 px patches, a
learned position table bilinearly resampled to each image's grid, LayerNorm + GELU blocks, and DeepStack.

Positions: transformers resamples its square table (num_position_embeddings) to each grid as per-patch gather
indices and weights (vision_utils.get_vision_interpolation_indices_and_weights); the host computes the same two
arrays from the grids beside position_ids and segment_ids (row_inputs), and the trunk's embeddings gather and weigh
the table in the graph, so the exported parts keep a dynamic patch axis and no resize.

DeepStack: the outputs of the blocks at deepstack_visual_indexes, each through its own merger (a LayerNorm over the
merge unit, then an MLP into the LLM's width), are added to the hidden states of the first LLM layers at the image's
positions. Which part owns a DeepStack merger follows the paper's logic for the projector: a merger belongs to the
part that computes its input. The projector is an expert's because its input, the last k layers' output, differs by
expert; a DeepStack merger whose block lies in the frozen, shared trunk reads the same features whatever the expert
(in the paper's disentangled stage nothing outside the experts changes), so it is computed once in the trunk, not
copied per domain; one whose block lies among the last k is an expert's, copied and trained with it. At 8B (27
blocks, taps 8, 16, 24) with k = 2 all three are the trunk's: the mixture adds nothing to DeepStack's cost.
A part with DeepStack mergers gives a second output, `deepstack` [merged, taps of that part, D_llm], in tower order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
from transformers.models.qwen3_vl.modeling_qwen3_vl import (
    Qwen3VLVisionBlock, Qwen3VLVisionPatchMerger, Qwen3VLVisionRotaryEmbedding,
)

from ..backbones import Backbone
from ..errors import MixpertError
from .qwen2_vl import Qwen2VitAdapter, RowContext, attend

# Qwen3VLVisionConfig fields that shape the tower's weights or arithmetic (transformers' names).
_VISION_KEYS = ("depth", "hidden_size", "intermediate_size", "hidden_act", "num_heads", "in_channels", "patch_size",
                "temporal_patch_size", "spatial_merge_size", "out_hidden_size", "num_position_embeddings",
                "deepstack_visual_indexes")
HALF = {"image_mean": (0.5, 0.5, 0.5), "image_std": (0.5, 0.5, 0.5)}  # Qwen3-VL's processor
PIXELS = (65536, 16777216)  # Qwen3-VL's processor size (shortest_edge, longest_edge): 256 to 65536 patches of 16 px


class _Embeddings(nn.Module):
    """transformers' Qwen3VLVisionPatchEmbed (its Conv3d, with bias, as `proj`) plus the learned position table
    (`pos_embed`) gathered at each patch's four bilinear taps and weighed, as Qwen3VLVisionModel.forward adds it."""

    def __init__(self, cfg: Qwen3VLVisionConfig):
        super().__init__()
        self.c, self.t, self.p = int(cfg.in_channels), int(cfg.temporal_patch_size), int(cfg.patch_size)
        k = (self.t, self.p, self.p)
        self.proj = nn.Conv3d(self.c, cfg.hidden_size, kernel_size=k, stride=k, bias=True)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)

    def forward(self, x, position_ids, segment_ids, pos_index, pos_weight):
        h = self.proj(x.view(-1, self.c, self.t, self.p, self.p).to(self.proj.weight.dtype)).view(x.shape[0], -1)
        pos = (self.pos_embed(pos_index) * pos_weight[:, :, None].to(h.dtype)).sum(1)
        return h + pos


class _Block(Qwen3VLVisionBlock):
    """transformers' Qwen3VLVisionBlock (same tensor names) called as block(hidden, cos, sin, mask)."""

    def forward(self, hidden, cos, sin, mask):
        hidden = hidden + attend(self.attn, self.norm1(hidden), cos, sin, mask)
        return hidden + self.mlp(self.norm2(hidden))


class _Context(RowContext):
    """Rotary cos/sin and the same-image mask from positions and image ids; the position-table inputs are the
    embeddings' alone."""

    def forward(self, position_ids, segment_ids, *_):
        return super().forward(position_ids, segment_ids)


@dataclass(frozen=True)
class Qwen3VitAdapter(Qwen2VitAdapter):
    family: str = "qwen3vit"
    config_types: tuple = ("qwen3_vl",)
    vision_keys: tuple = _VISION_KEYS
    out_key: str = "out_hidden_size"
    default_pixels: tuple = PIXELS
    default_norm: tuple = (HALF["image_mean"], HALF["image_std"])

    def vision_config_class(self):
        return Qwen3VLVisionConfig

    def normalise_vision(self, vision: dict, source: str) -> dict:
        vision["deepstack_visual_indexes"] = [int(i) for i in vision["deepstack_visual_indexes"]]
        side = int(round(int(vision["num_position_embeddings"]) ** 0.5))
        if side * side != int(vision["num_position_embeddings"]):
            raise MixpertError(f"{source}: num_position_embeddings {vision['num_position_embeddings']} is not a square "
                               "grid; not supported")
        bad = [i for i in vision["deepstack_visual_indexes"] if not 0 <= i < int(vision["depth"])]
        if bad:
            raise MixpertError(f"{source}: deepstack_visual_indexes {bad} outside the {vision['depth']} blocks")
        return vision

    def mllm_classes(self):
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

        return Qwen3VLConfig, Qwen3VLForConditionalGeneration, "qwen3_vl_text", "qwen3_vl_vision"

    def embeddings(self, bb: Backbone) -> nn.Module:
        return _Embeddings(self.config(bb))

    def layer(self, bb: Backbone, index: int) -> nn.Module:
        return _Block(self.config(bb))

    def context(self, bb: Backbone) -> nn.Module:
        return _Context(self.config(bb), Qwen3VLVisionRotaryEmbedding)

    def projector(self, bb: Backbone) -> nn.Module:
        return Qwen3VLVisionPatchMerger(self.config(bb), use_postshuffle_norm=False)

    def taps(self, bb: Backbone) -> tuple:
        return tuple(int(i) for i in bb.vision["deepstack_visual_indexes"])

    def tap_projector(self, bb: Backbone) -> nn.Module:
        return Qwen3VLVisionPatchMerger(self.config(bb), use_postshuffle_norm=True)

    def tower_target(self, rest: str, cfg) -> tuple[str, str] | None:
        """The position table (the trunk's embeddings) and each DeepStack merger (its part: see the module doc)."""
        if rest.startswith("pos_embed."):
            return "trunk", "embeddings." + rest
        if rest.startswith("deepstack_merger_list."):
            j, tail = rest[len("deepstack_merger_list."):].split(".", 1)
            tap = self.taps(cfg.backbone)[int(j)]
            for part, layers in (("trunk", cfg.trunk_layers), ("expert", cfg.expert_layer_range)):
                mine = [t for t in self.taps(cfg.backbone) if t in layers]
                if tap in mine:
                    return part, f"deepstack.{mine.index(tap)}.{tail}"
        return None

    def io(self, bb: Backbone) -> dict:
        io = super().io(bb)
        io["rows"] = io["rows"] + (("pos_index", ("patches", 4), "int64"), ("pos_weight", ("patches", 4), "float32"))
        return io

    def row_inputs(self, bb: Backbone, grids) -> dict:
        """Qwen2-VL's positions and image ids, and the position table's bilinear taps and weights per patch
        (transformers' own get_vision_interpolation_indices_and_weights, align_corners as Qwen3VLVisionModel)."""
        from transformers.vision_utils import get_vision_interpolation_indices_and_weights

        rows = super().row_inputs(bb, grids)
        g = torch.as_tensor(np.asarray(grids, dtype=np.int64).reshape(-1, 3))
        side = int(round(int(bb.vision["num_position_embeddings"]) ** 0.5))
        idx, w = get_vision_interpolation_indices_and_weights(g, num_grid_per_side=side, mode="bilinear",
                                                              align_corners=True,
                                                              spatial_merge_size=int(bb.vision["spatial_merge_size"]))
        return rows | {"pos_index": idx.numpy().astype(np.int64), "pos_weight": w.numpy().astype(np.float32)}

    def generate_inputs(self, input_ids, grid, image_token_id: int, features=None) -> dict:
        """Qwen3-VL's LLM adds the DeepStack features to its first layers' hidden states at the image positions,
        which only the MLLM's own forward does: generate() takes the ids with the image's pad tokens, its grid and
        token types, and the vision side's output as transformers' pre-encoded features (mm_encoder_outputs:
        pooler_output the image's tokens, deepstack_features one tensor a tap), as if its ViT had run."""
        from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

        out = super().generate_inputs(input_ids, grid, image_token_id)
        if features is not None:
            tokens, deepstack = features
            dev = input_ids.device
            as_t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float32), device=dev)  # noqa: E731
            out["mm_encoder_outputs"] = {"image": BaseModelOutputWithDeepstackFeatures(
                pooler_output=(as_t(tokens),), deepstack_features=[(as_t(d),) for d in deepstack])}
        return out

    # The training side: every stage goes through one of these two (a new tiny MLLM, or the vision path of a
    # snapshot's MLLM), and the stages' loss (mllm.answer_scores) feeds the LLM embeddings only, not DeepStack:
    # refused here rather than trained on a model that is not Qwen3-VL's arithmetic.
    def tiny_mllm(self, bb: Backbone, vocab_size: int, image_token_id: int):
        raise MixpertError(f"{bb.name}: {_NO_TRAINING}")

    def mllm_crop_tokens(self, mllm, crops, grids=None):
        raise MixpertError(f"{type(mllm).__name__}: {_NO_TRAINING}")


_NO_TRAINING = ("the training stages do not support Qwen3-VL yet (DeepStack features enter the LLM's first layers, "
                "which the stages' loss does not feed); build and run from a snapshot")
