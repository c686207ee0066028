"""Qwen2.5-VL's vision side (transformers' Qwen2_5_VLForConditionalGeneration): Qwen2-VL's native dynamic
resolution and patch merger (the same processor, rows, per-row inputs and packing: Qwen2VitAdapter), with
RMSNorm + SwiGLU blocks and windowed attention.

transformers reorders an image's patches by window (windows of window_size px, whole merge units) before the
blocks, attends within each window except in the blocks at fullatt_block_indexes (within each image there), and
restores the order after the merger. Here the rows keep the processor's order and each block takes the mask of its
kind (qwen2_vl.attention_masks): windowed blocks the same-window mask, full blocks the same-image mask; both are
computed inside the graph from the per-row positions and image ids the host already sends, so a group of patches
gathered for one expert carries its windows with it and the host computes nothing new. An expert's last k blocks
are windowed or full by their index in the tower (7B: blocks 30 windowed, 31 full).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionPatchEmbed, Qwen2_5_VLPatchMerger, Qwen2_5_VLVisionBlock, Qwen2_5_VLVisionRotaryEmbedding,
)

from ..backbones import Backbone
from ..errors import MixpertError
from .qwen2_vl import Qwen2VitAdapter, RowContext, attend

# Qwen2_5_VLVisionConfig fields that shape the tower's weights or arithmetic (transformers' names: hidden_size is
# the tower's width here, out_hidden_size the merger's output, the LLM's).
_VISION_KEYS = ("depth", "hidden_size", "intermediate_size", "hidden_act", "num_heads", "in_channels", "patch_size",
                "temporal_patch_size", "spatial_merge_size", "window_size", "fullatt_block_indexes", "out_hidden_size")


class _PatchEmbed(Qwen2_5_VisionPatchEmbed):
    """transformers' patch embedding (same tensor names); the per-row inputs are not its concern."""

    def forward(self, x, *rows):
        return super().forward(x)


class _Block(Qwen2_5_VLVisionBlock):
    """transformers' Qwen2_5_VLVisionBlock (same tensor names) called as block(hidden, cos, sin, image_mask,
    window_mask): a full-attention block (its index in fullatt_block_indexes) attends within each image, the
    others within each window."""

    def __init__(self, cfg, full: bool):
        super().__init__(cfg)
        self.full = full

    def forward(self, hidden, cos, sin, image_mask, window_mask):
        hidden = hidden + attend(self.attn, self.norm1(hidden), cos, sin, image_mask if self.full else window_mask)
        return hidden + self.mlp(self.norm2(hidden))

    def extra_repr(self) -> str:
        return "full attention" if self.full else "windowed attention"


@dataclass(frozen=True)
class Qwen25VitAdapter(Qwen2VitAdapter):
    family: str = "qwen25vit"
    config_types: tuple = ("qwen2_5_vl",)
    vision_keys: tuple = _VISION_KEYS
    out_key: str = "out_hidden_size"

    def vision_config_class(self):
        return Qwen2_5_VLVisionConfig

    def normalise_vision(self, vision: dict, source: str) -> dict:
        vision["fullatt_block_indexes"] = [int(i) for i in vision["fullatt_block_indexes"]]
        wm = self.window_units(vision)
        if wm < 1 or vision["window_size"] != wm * vision["spatial_merge_size"] * vision["patch_size"]:
            raise MixpertError(f"{source}: window_size {vision['window_size']} is not a whole number of merge units "
                               f"({vision['spatial_merge_size']} x {vision['patch_size']} px); not supported")
        return vision

    @staticmethod
    def window_units(vision: dict) -> int:
        """Merge units a window side (transformers' vit_merger_window_size)."""
        return int(vision["window_size"]) // int(vision["spatial_merge_size"]) // int(vision["patch_size"])

    def mllm_classes(self):
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        return Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, "qwen2_5_vl_text", "qwen2_5_vl_vision"

    def embeddings(self, bb: Backbone) -> nn.Module:
        v = bb.vision
        return _PatchEmbed(v["patch_size"], v["temporal_patch_size"], v["in_channels"], v["hidden_size"])

    def layer(self, bb: Backbone, index: int) -> nn.Module:
        return _Block(self.config(bb), full=index in bb.vision["fullatt_block_indexes"])

    def context(self, bb: Backbone) -> nn.Module:
        v = bb.vision
        return RowContext(self.config(bb), Qwen2_5_VLVisionRotaryEmbedding,
                          window=(int(v["spatial_merge_size"]), self.window_units(v)))

    def projector(self, bb: Backbone) -> nn.Module:
        v = bb.vision
        return Qwen2_5_VLPatchMerger(dim=bb.llm_hidden_size, context_dim=v["hidden_size"],
                                     spatial_merge_size=v["spatial_merge_size"])
