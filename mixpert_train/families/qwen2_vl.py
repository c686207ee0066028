"""Qwen2-VL's vision side (transformers' Qwen2VLForConditionalGeneration): native dynamic resolution.

An image is no set of fixed crops: the processor resizes it so both sides are multiples of 28 within its pixel
bounds and flattens it into 14x14 patches ([n_patches, 3 x 2 x 14 x 14], the four patches of each 2x2 merge window
consecutive), and the tower runs all patches of a call as one sequence whose attention stays inside each image,
with 2D rotary positions from each image's grid; the merger turns every 4 consecutive patches into one LLM token.

So the rows of this family's parts are patches, not crops, and every part takes two per-row inputs the host
computes from the grids (`row_inputs`): `position_ids` [P, 2] (transformers' own get_vision_position_ids) and
`segment_ids` [P] (which image of the call a patch belongs to). Inside the graph they become the rotary cos/sin and
the block-diagonal attention mask, so a group of patches gathered for one expert carries its own structure.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig
from transformers.models.qwen2_vl.modeling_qwen2_vl import (
    PatchEmbed, PatchMerger, Qwen2VLVisionBlock, Qwen2VLVisionRotaryEmbedding, apply_rotary_pos_emb_vision,
)

from ..backbones import Adapter, Backbone
from ..errors import MixpertError

# Qwen2VLVisionConfig fields that shape the tower's weights or arithmetic (transformers' names; its hidden_size is
# the merger's output width, the LLM's; the tower's own width is embed_dim).
_VISION_KEYS = ("depth", "embed_dim", "hidden_size", "hidden_act", "mlp_ratio", "num_heads", "in_channels",
                "patch_size", "temporal_patch_size", "spatial_merge_size")


def backbone_from_qwen_config(ad: "Qwen2VitAdapter", config: dict, name: str, base: Backbone | None = None,
                              source: str = "config.json", processor: dict | None = None,
                              processor_source: str = "preprocessor_config.json") -> Backbone:
    """The architecture a config.json of one of the Qwen-VL generations `ad` reads describes (its vision config
    class, keys and merger width); `base` adds k and the domain set; `processor`: the snapshot's Qwen2-VL
    image-processor config, then the source of truth for resizing and normalisation."""
    kind = ad.config_types[0]
    if config.get("model_type") != kind or "vision_config" not in config:
        raise MixpertError(f"{source}: not a {kind} config (model_type={config.get('model_type')!r}); "
                           f"pass --weights a {kind} snapshot directory")
    vision_in = dict(config["vision_config"])
    for old, new in (("in_chans", "in_channels"),):  # the names published Qwen2.5-VL snapshots still carry
        if old in vision_in and new not in vision_in:
            vision_in[new] = vision_in.pop(old)
    full = ad.vision_config_class()(**{k: vision_in[k] for k in ad.vision_keys if k in vision_in})
    vision = {k: getattr(full, k) for k in ad.vision_keys}
    for k in ("patch_size", "temporal_patch_size"):
        v = vision[k]
        if isinstance(v, (list, tuple)):
            if len(set(v)) != 1:
                raise MixpertError(f"{source}: non-square {k} {v} is not supported")
            vision[k] = int(v[0])
    vision = ad.normalise_vision(vision, source)
    out = int(vision[ad.out_key])
    text = config.get("text_config") or {}
    llm = int(text.get("hidden_size", config.get("hidden_size", out)))
    if llm != out:
        raise MixpertError(f"{source}: the merger's output width vision_config.{ad.out_key} {out} "
                           f"differs from the language model's {llm}; the snapshot is inconsistent")
    norm = {}
    if processor is not None:
        if int(processor.get("patch_size", vision["patch_size"])) != vision["patch_size"] or \
                int(processor.get("merge_size", vision["spatial_merge_size"])) != vision["spatial_merge_size"] or \
                int(processor.get("temporal_patch_size", vision["temporal_patch_size"])) != vision["temporal_patch_size"]:
            raise MixpertError(f"{processor_source}: patch_size / merge_size / temporal_patch_size differ from the "
                               f"vision tower's in {source}; the snapshot is inconsistent, fix one of the two")
        norm = {k: tuple(processor[k]) for k in ("image_mean", "image_std") if k in processor}
        size = processor.get("size") or {}
        lo = processor.get("min_pixels", size.get("shortest_edge"))
        hi = processor.get("max_pixels", size.get("longest_edge"))
        if lo is not None and hi is not None:
            norm["pixels"] = (int(lo), int(hi))
    defaults = {f.name: f.default for f in dataclasses.fields(Backbone) if f.default is not dataclasses.MISSING}
    return Backbone(
        name=name, family=ad.family, vision=vision, llm_hidden_size=llm, feature_layer=-1, select_strategy="full",
        projector_act="gelu", grid_pinpoints=(), max_grid_crops=1,
        expert_layers=base.expert_layers if base else defaults["expert_layers"],
        domains=base.domains if base else ("chart", "doc", "general"), processor=processor,
        **({"image_mean": base.image_mean, "image_std": base.image_std} if base else
           dict(zip(("image_mean", "image_std"), ad.default_norm)))
        | {"pixels": base.pixels if base else ad.default_pixels} | norm,
    )


PIXELS = (56 * 56, 28 * 28 * 1280)  # transformers' Qwen2VLImageProcessor size (shortest_edge, longest_edge)
CLIP = {"image_mean": (0.48145466, 0.4578275, 0.40821073), "image_std": (0.26862954, 0.26130258, 0.27577711)}


class RowContext(nn.Module):
    """(position_ids [P, 2], segment_ids [P]) -> what every block takes: rotary (cos, sin) [P, head_dim] as
    transformers' vision rotary embedding computes them, and the attention mask [P, P] (True: same image).
    `window` (Qwen2.5-VL: merge size, merge units a window side): a second mask, True within the same window of
    the same image, which windowed blocks take instead (see attention_masks).
    No parameters or buffers: the inverse frequencies are recomputed as transformers does (a graph constant)."""

    def __init__(self, cfg, rotary=Qwen2VLVisionRotaryEmbedding, window: tuple[int, int] | None = None):
        super().__init__()
        self.cfg, self.rotary, self.window = cfg, rotary, window

    def forward(self, position_ids, segment_ids):
        inv_freq, scaling = self.rotary.compute_axial_rope_parameters(self.cfg)
        freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device)
        cos, sin = freqs.cos() * scaling, freqs.sin() * scaling

        def recompose(f):  # transformers' recomposition_frequencies: [P, 2, d/4] -> [P, d]
            hw = torch.cat([f[:, 0], f[:, 1]], dim=-1)
            return torch.cat([hw, hw], dim=-1)

        return (recompose(cos), recompose(sin)) + attention_masks(position_ids, segment_ids, self.window)


def attention_masks(position_ids, segment_ids, window: tuple[int, int] | None = None) -> tuple:
    """The block-diagonal attention masks [P, P] of a call: same image; with `window` (merge, units) also same
    window: transformers' get_vision_window_index tiles each image's grid of merge units into windows of units x
    units from the top-left (the last row and column of windows cut short), so a patch at (h, w) is in window
    (h // merge // units, w // merge // units) of its image. Masking in place of transformers' reordering of the
    patches by window (and its restoring after the merger) gives the same attention for every patch: a patch
    attends to the same set, and the merger takes the same merge units."""
    same = segment_ids[:, None] == segment_ids[None, :]
    if window is None:
        return (same,)
    merge, units = window
    w = torch.div(position_ids, merge * units, rounding_mode="floor")  # (h // m) // u == h // (m u)
    return same, same & (w[:, None, 0] == w[None, :, 0]) & (w[:, None, 1] == w[None, :, 1])


def attend(attn, x, cos, sin, mask):
    """transformers' Qwen-VL vision attention (its qkv and proj) over the whole call with a mask in place of its
    per-sequence split over cu_seqlens (which needs the lengths as Python ints and cannot export with a dynamic
    patch axis): the same arithmetic per image (or window)."""
    n = x.shape[0]
    q, k, v = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling)
    return attn.proj(o.squeeze(0).transpose(0, 1).reshape(n, -1))


class _Block(Qwen2VLVisionBlock):
    """transformers' Qwen2VLVisionBlock (same tensor names) called as block(hidden, cos, sin, mask): attention
    over the whole call with the block-diagonal mask (attend). Same arithmetic per image."""

    def forward(self, hidden, cos, sin, mask):
        hidden = hidden + attend(self.attn, self.norm1(hidden), cos, sin, mask)
        return hidden + self.mlp(self.norm2(hidden))


class _PatchEmbed(PatchEmbed):
    """transformers' PatchEmbed (same tensor names): flattened patches [P, C x t x p x p] -> [P, embed_dim]; the
    per-row inputs the trunk passes every family's embeddings are not its concern."""

    def forward(self, x, *rows):
        return super().forward(x)


@dataclass(frozen=True)
class Qwen2VitAdapter(Adapter):
    family: str = "qwen2vit"
    rows: str = "patches"
    # the merger lives inside the tower's module (model.visual.merger.*): it is the projector
    tower_prefixes: tuple = ("model.visual.", "visual.")
    projector_prefixes: tuple = ("model.visual.merger.", "visual.merger.")
    embeddings_prefix: str = "patch_embed."
    layer_prefix: str = "blocks."
    config_types: tuple = ("qwen2_vl",)
    processor_types: tuple = ("Qwen2VLImageProcessor",)
    # what differs between the Qwen-VL generations this class and its subclasses read (qwen2_5_vl.py)
    vision_keys: tuple = _VISION_KEYS  # the vision config's fields a Backbone keeps
    out_key: str = "hidden_size"  # the vision config's field that is the merger's output width (the LLM's)
    default_pixels: tuple = PIXELS  # the processor's pixel bounds and mean / std when a snapshot has none
    default_norm: tuple = (CLIP["image_mean"], CLIP["image_std"])

    def vision_config_class(self):
        return Qwen2VLVisionConfig

    def normalise_vision(self, vision: dict, source: str) -> dict:
        return vision

    def mllm_classes(self):
        """transformers' (config class, MLLM class, text model_type, vision model_type) of this generation."""
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        return Qwen2VLConfig, Qwen2VLForConditionalGeneration, "qwen2_vl_text", "qwen2_vl_vision"

    def backbone_from_config(self, config, name, base, source, processor, processor_source):
        return backbone_from_qwen_config(self, config, name, base, source, processor,
                                         processor_source or "preprocessor_config.json")

    def config(self, bb: Backbone):
        cfg = self.vision_config_class()(**bb.vision)
        cfg._attn_implementation = "sdpa"
        return cfg

    def embeddings(self, bb: Backbone) -> nn.Module:
        v = bb.vision
        return _PatchEmbed(v["patch_size"], v["temporal_patch_size"], v["in_channels"], v["embed_dim"])

    def layer(self, bb: Backbone, index: int) -> nn.Module:
        return _Block(self.config(bb))

    def context(self, bb: Backbone) -> nn.Module:
        return RowContext(self.config(bb))

    def projector(self, bb: Backbone) -> nn.Module:
        v = bb.vision
        return PatchMerger(dim=bb.llm_hidden_size, context_dim=v["embed_dim"], spatial_merge_size=v["spatial_merge_size"])

    def io(self, bb: Backbone) -> dict:
        v = bb.vision
        return {"pixels": (("patches", v["patch_size"] ** 2 * v["in_channels"]), "uint8"),  # one frame [p, p, C]
                "rows": (("position_ids", ("patches", 2), "int64"), ("segment_ids", ("patches",), "int64")),
                "hidden": ("patches", bb.hidden_size), "tokens": ("merged", bb.llm_hidden_size),
                "merge": int(v["spatial_merge_size"]) ** 2}

    def call_rows(self, bb: Backbone) -> int:
        """Images share a call while its patches stay under 0.6 x the width (768 at 7B, 56 for the tiny ViT):
        attending over P patches of several images costs 4 P^2 d a block against 24 P d^2 of weights, so the
        cross-image scores the mask throws away stay under ~10% of the call's FLOPs; a larger image runs alone.
        Measured (benchmarks/attention_form.py, ONNX Runtime CPU, 2 cores): 4 images of 3228 patches at 7B took
        0.534x the one-call time in the budget's calls and 0.506x one call an image (tiny: 0.627x, 0.672x); the budget
        keeps small images batched for the devices where launches cost."""
        m = int(bb.vision["spatial_merge_size"]) ** 2
        return max(m, int(0.6 * bb.hidden_size) // m * m)

    def example_grids(self, bb: Backbone) -> list:
        m = int(bb.vision["spatial_merge_size"])
        return [(1, 2 * m, m), (1, m, 3 * m)]

    def row_inputs(self, bb: Backbone, grids) -> dict:
        """The per-patch inputs of one call from its images' grids (t, h, w), in input order."""
        from transformers.vision_utils import get_vision_position_ids

        g = torch.as_tensor(np.asarray(grids, dtype=np.int64).reshape(-1, 3))
        pos = get_vision_position_ids(g, int(bb.vision["spatial_merge_size"])).numpy().astype(np.int64)
        seg = np.repeat(np.arange(len(g), dtype=np.int64), (g[:, 0] * g[:, 1] * g[:, 2]).numpy())
        return {"position_ids": pos, "segment_ids": seg}

    def image_processor(self, bb: Backbone):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        if bb.processor is not None:
            return Qwen2VLImageProcessorPil.from_dict(dict(bb.processor))
        v = bb.vision
        lo, hi = bb.pixels or self.default_pixels
        return Qwen2VLImageProcessorPil(size={"shortest_edge": int(lo), "longest_edge": int(hi)},
                                        patch_size=v["patch_size"], temporal_patch_size=v["temporal_patch_size"],
                                        merge_size=v["spatial_merge_size"], image_mean=list(bb.image_mean),
                                        image_std=list(bb.image_std))

    def fast_preprocessing(self, p) -> bool:
        return bool(p.size.shortest_edge and p.size.longest_edge)

    def fast_rows(self, p, image_size, px):
        """smart_resize (sides multiples of patch x merge within the pixel bounds), then the flattened patches in
        the merger's order: merge windows row by row, the merge x merge patches of a window consecutive, each patch
        [p, p, C] uint8 (as decoded: the host copies runs of p pixels), one frame; unpack_pixels puts channels
        first and repeats the still image in time, as the processor lays it out."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        ps, m = p.patch_size, p.merge_size
        h, w = smart_resize(*image_size, factor=ps * m, min_pixels=p.size.shortest_edge, max_pixels=p.size.longest_edge)
        gh, gw = h // ps, w // ps
        x = px.resize(w, h).reshape(gh // m, m, ps, gw // m, m, ps, 3)
        return px.permute(x, (0, 3, 1, 4, 2, 5, 6)).reshape(gh * gw, -1), (1, gh, gw)

    def pixel_channels(self, bb: Backbone) -> np.ndarray:
        c, p = int(bb.vision["in_channels"]), int(bb.vision["patch_size"])
        return np.tile(np.arange(c, dtype=np.int64), p * p)  # [p, p, C] flattened: channel fastest

    def unpack_pixels(self, bb: Backbone, x):
        """[P, p*p*C] -> [P, C*t*p*p]: channels first, the frame repeated temporal_patch_size times (a still
        image), as Qwen2VLImageProcessor lays it out; a Transpose and an Expand inside the graph."""
        v = bb.vision
        c, t, p = int(v["in_channels"]), int(v["temporal_patch_size"]), int(v["patch_size"])
        n = x.shape[0]
        if isinstance(x, np.ndarray):
            y = x.reshape(n, p * p, c).transpose(0, 2, 1).reshape(n, c, 1, p * p)
            return np.ascontiguousarray(np.repeat(y, t, axis=2)).reshape(n, c * t * p * p)
        y = x.reshape(n, p * p, c).permute(0, 2, 1).reshape(n, c, 1, p * p)
        return y.expand(n, c, t, p * p).reshape(n, c * t * p * p)

    def pack_pixels(self, bb: Backbone, x: np.ndarray) -> np.ndarray:
        v = bb.vision
        c, t, pp = int(v["in_channels"]), int(v["temporal_patch_size"]), int(v["patch_size"]) ** 2
        y = x.reshape(len(x), c, t, pp)
        if not (y == y[:, :, :1]).all():
            raise MixpertError("pixel_values: the temporal frames of a patch differ (a video); the engines take still images")
        return np.ascontiguousarray(y[:, :, 0].transpose(0, 2, 1)).reshape(len(x), pp * c)

    def pack(self, bb: Backbone, tokens, image_size, newline=None) -> np.ndarray:
        """Qwen2-VL puts an image's merged tokens at its <|image_pad|> positions as they are: [n_patches / 4, D]."""
        t = tokens.detach().float().cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens, np.float32)
        return t.reshape(-1, t.shape[-1])

    def image_prompt(self, config: dict, tokenizer) -> tuple[str, int, list, list]:
        """Qwen2VLProcessor: each <|image_pad|> of the prompt (the chat template wraps it in <|vision_start|> ...
        <|vision_end|>) becomes one pad token a merged token; the model fills the pads."""
        return getattr(tokenizer, "image_token", None) or "<|image_pad|>", int(config.get("image_token_id", 151655)), [], []

    def language_model(self, config: dict):
        """Qwen2-VL's LLM places text and image tokens with M-RoPE (3D positions from the image's grid), which only
        the MLLM class computes: the language side is Qwen2VLForConditionalGeneration itself with its ViT left out
        (the engines give the image embeddings)."""
        config_cls, model_cls, _, _ = self.mllm_classes()
        with torch.device("meta"):
            model = model_cls(config_cls.from_dict(config))
        model.model.visual = None  # never called: no pixel_values reach this model
        # snapshot layouts: model.language_model.* (the module's own names), model.* (published, and what
        # save_pretrained writes back); the ViT's keys map to no tensor of the LLM and are never read
        return model, (("model.language_model.", "model.language_model."), ("model.", "model.language_model."),
                       ("lm_head.", "lm_head."))

    def generate_inputs(self, input_ids, grid, image_token_id: int, features=None) -> dict:
        """The prompt's ids, the image's grid and token types (1 at image positions), from which the model's own
        generate() computes the M-RoPE positions (get_rope_index), as it does after its processor."""
        return {"input_ids": input_ids, "image_grid_thw": torch.tensor([list(grid)], device=input_ids.device),
                "mm_token_type_ids": (input_ids == image_token_id).int()}

    def tiny_mllm(self, bb: Backbone, vocab_size: int, image_token_id: int):
        """A tiny Qwen2-VL: the backbone's ViT + merger and a 2-layer language model with M-RoPE."""
        config_cls, model_cls, text_type, vision_type = self.mllm_classes()
        heads = 4
        half = bb.llm_hidden_size // heads // 2  # M-RoPE sections (t, h, w) split half the head dim
        cfg = config_cls(
            vision_config=dict(bb.vision, model_type=vision_type),
            text_config=dict(model_type=text_type, hidden_size=bb.llm_hidden_size,
                             intermediate_size=2 * bb.llm_hidden_size, num_hidden_layers=2, num_attention_heads=heads,
                             num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=4096,
                             tie_word_embeddings=False,
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                              "mrope_section": [half - 2 * (half // 3), half // 3, half // 3]}),
            image_token_id=image_token_id, video_token_id=image_token_id, vision_start_token_id=image_token_id,
        )
        return model_cls(cfg)

    def mllm_crop_tokens(self, mllm, crops, grids=None):
        if grids is None:
            raise MixpertError("qwen2vit: the MLLM's vision path needs each image's grid")
        g = torch.as_tensor(np.asarray(grids, dtype=np.int64).reshape(-1, 3))
        return torch.cat(mllm.model.get_image_features(pixel_values=crops, image_grid_thw=g).pooler_output)

    def mllm_pack(self, mllm, tokens, image_size):
        return tokens.reshape(-1, tokens.shape[-1])

    def mllm_positions(self, mllm, grids, lengths, visual):
        """The model's own M-RoPE positions: image tokens by their (t, h, w) in the merged grid, text after them."""
        b, n = len(lengths), max(lengths)
        types = torch.zeros(b, n, dtype=torch.int)
        mask = torch.zeros(b, n, dtype=torch.long)
        for i, (length, v) in enumerate(zip(lengths, visual)):
            types[i, :v], mask[i, :length] = 1, 1
        grid = torch.as_tensor(np.asarray(grids, dtype=np.int64).reshape(-1, 3))
        pos, _ = mllm.model.get_rope_index(torch.zeros(b, n, dtype=torch.long), types, image_grid_thw=grid,
                                           attention_mask=mask)
        return pos
