"""Backbone registry: what each supported MLLM vision side looks like, as data, plus the adapter interface.

An entry says what an MLLM's config.json says (tower, feature layer, projector, tiling of an image into crops)
and what a snapshot does not (expert depth k, the domain set). A new MLLM family is one module in families/
(its `Adapter`: config parsing, layers, projector, image processor, packing) and one entry here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
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
    grid_pinpoints: tuple = ()  # anyres grid resolutions (h, w) (LLaVA-OV)
    max_grid_crops: int = 9  # LLaVA-OV anyres_max_9: at most 9 grid crops, plus the base image; InternVL: max tiles
    cls_token: bool = False  # the tower prepends a class token (InternViT); SigLIP has none
    downsample_ratio: float = 1.0  # pixel shuffle before the projector (InternVL 0.5: 4 tokens -> 1, width x4)
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)
    expert_layers: int = 2  # k: the last k layers in use become per-domain experts (paper: 2)
    # The snapshot's own image-processor config (preprocessor_config.json, as transformers saved it): when set, it
    # alone defines preprocessing (size, grid, resampling, mean/std); None (registry entries, --random-init): the
    # processor is built from the fields above.
    processor: dict | None = None
    # The entry's experts besides versatile (the router's width follows); () = model.DOMAINS, the paper's five.
    domains: tuple = ()
    # Dynamic-resolution families (Qwen2-VL): (min_pixels, max_pixels) an image is resized into; () for crops.
    pixels: tuple = ()

    @property
    def hidden_size(self) -> int:
        """The tower's width (Qwen2-VL names it embed_dim; its vision hidden_size is the merger's output)."""
        return int(self.vision.get("embed_dim") or self.vision["hidden_size"])

    @property
    def crop_size(self) -> int:
        return int(self.vision["image_size"])

    @property
    def hidden_tokens(self) -> int:
        """Tokens a crop has inside the tower (the trunk's output): its patches, plus the class token if any."""
        return (self.crop_size // int(self.vision["patch_size"])) ** 2 + int(self.cls_token)

    @property
    def tokens_per_crop(self) -> int:
        """Tokens a crop gives the LLM: strategy "default" drops the first token, pixel shuffle merges r x r."""
        n = self.hidden_tokens - (1 if self.select_strategy == "default" else 0)
        return int(round(n * self.downsample_ratio ** 2))

    @property
    def projector_in(self) -> int:
        """The projector's input width: the tower's, times the tokens a pixel shuffle merges."""
        return int(round(self.hidden_size / self.downsample_ratio ** 2))

    @property
    def tower_layers(self) -> int:
        return int(self.vision.get("num_hidden_layers") or self.vision["depth"])  # Qwen2-VL: depth

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
        """Rows of one image at most: the grid crops plus the base image; for dynamic resolution, the patches
        of an image resized to max_pixels."""
        if self.pixels:
            return int(self.pixels[1]) // int(self.vision["patch_size"]) ** 2
        return self.max_grid_crops + 1

    def replace(self, **changes) -> "Backbone":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["grid_pinpoints"] = [list(p) for p in self.grid_pinpoints]
        d["image_mean"], d["image_std"] = list(self.image_mean), list(self.image_std)
        d["domains"], d["pixels"] = list(self.domains), list(self.pixels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Backbone":
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["grid_pinpoints"] = tuple(tuple(p) for p in d.get("grid_pinpoints", ()))
        for key in ("image_mean", "image_std", "domains", "pixels"):
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

# transformers' InternVLVisionConfig names for InternViT-300M-448px (InternVL2-8B's tower, the -hf layout).
_INTERNVIT_300M = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=448,
    patch_size=14, num_channels=3, hidden_act="gelu", layer_norm_eps=1e-6, attention_bias=True,
    norm_type="layer_norm", use_qk_norm=False, layer_scale_init_value=0.1, use_mean_pooling=True,
)
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_CLIP_MEAN, _CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
# transformers' Qwen2VLVisionConfig names for Qwen2-VL-7B's ViT (its hidden_size is the merger's output, the LLM's).
_QWEN2_VIT = dict(depth=32, embed_dim=1280, hidden_size=3584, hidden_act="quick_gelu", mlp_ratio=4, num_heads=16,
                  in_channels=3, patch_size=14, temporal_patch_size=2, spatial_merge_size=2)
# transformers' Qwen2_5_VLVisionConfig names for Qwen2.5-VL-7B's ViT (published vision_config: hidden_size is the
# tower's width here, out_hidden_size the merger's output; windows of 112 px; full attention in 4 of 32 blocks).
_QWEN25_VIT = dict(depth=32, hidden_size=1280, intermediate_size=3420, hidden_act="silu", num_heads=16, in_channels=3,
                   patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=112,
                   fullatt_block_indexes=[7, 15, 23, 31], out_hidden_size=3584)
# transformers' Qwen3VLVisionConfig names for Qwen3-VL-8B's ViT: 27 blocks of width 1152 (SigLIP-2 so400m shapes),
# 16 px patches, a 48 x 48 learned position table, DeepStack mergers after blocks 8, 16, 24, merger into Qwen3-8B's 4096.
_QWEN3_VIT = dict(depth=27, hidden_size=1152, intermediate_size=4304, hidden_act="gelu_pytorch_tanh", num_heads=16,
                  in_channels=3, patch_size=16, temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=4096,
                  num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24])
_TABLE8_DOMAINS = ("chart", "doc", "general")
# What the 8B InternVL entries share (their tower, feature selection, pixel shuffle, tiles, normalisation, experts):
# InternVL2, 3 and 3.5 differ only in the LLM the projector feeds (llm_hidden_size).
_INTERNVL_8B = dict(family="internvit", vision=_INTERNVIT_300M, select_strategy="default", cls_token=True,
                    downsample_ratio=0.5, max_grid_crops=12, image_mean=_IMAGENET_MEAN, image_std=_IMAGENET_STD,
                    domains=_TABLE8_DOMAINS)
# What the 7B Qwen-VL entries share besides their tower: Qwen2-7B / Qwen2.5-7B's width, the processor's defaults.
_QWEN_VL_7B = dict(llm_hidden_size=3584, max_grid_crops=1, image_mean=_CLIP_MEAN, image_std=_CLIP_STD,
                   domains=_TABLE8_DOMAINS, pixels=(56 * 56, 28 * 28 * 1280))

REGISTRY: dict[str, Backbone] = {
    "llava-ov-7b": Backbone(
        name="llava-ov-7b", family="siglip", vision=_SO400M_26, llm_hidden_size=3584,
        grid_pinpoints=_grid(384, 6),
    ),
    # A SigLIP-style tower of about 2.8M parameters: same code path, 16 tokens a crop (16 px patches of 64 px crops),
    # so the demo trains an MLLM from scratch, five experts and their probes in minutes on 2 CPU cores.
    "tiny": Backbone(
        name="tiny", family="siglip",
        vision=dict(
            hidden_size=192, intermediate_size=768, num_hidden_layers=6, num_attention_heads=6,
            image_size=64, patch_size=16, num_channels=3, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
            vision_use_head=False,
        ),
        llm_hidden_size=256, grid_pinpoints=_grid(64, 3),
    ),
    # InternVL2-8B (paper Table 8): InternViT-300M-448px (24 layers, width 1024, CLS token dropped before the
    # projector), pixel shuffle 0.5 (1024 patch tokens -> 256 of width 4096), LayerNorm-MLP projector into
    # InternLM2.5-7B's 4096; dynamic 448 px tiles (1..12, plus a thumbnail when more than one); ImageNet mean/std;
    # the paper's four experts for this family: chart, doc, general + versatile.
    "internvl2-8b": Backbone(name="internvl2-8b", llm_hidden_size=4096, **_INTERNVL_8B),
    # InternVL3-8B and InternVL3.5-8B: the same vision side as InternVL2-8B by their configs (InternViT-300M-448px-V2.5:
    # 24 layers, width 1024, q/k/v bias, LayerNorm, no q/k norm, layer scale; select_layer -1, pixel shuffle 0.5 (ps v2),
    # gelu LayerNorm-MLP projector; GotOcr2 448 px tiles, 1..12, ImageNet mean/std); what differs is the LLM the
    # projector feeds: Qwen2.5-7B (3584) for InternVL3, Qwen3-8B (4096) for InternVL3.5. Experts as for InternVL2.
    "internvl3-8b": Backbone(name="internvl3-8b", llm_hidden_size=3584, **_INTERNVL_8B),
    "internvl3.5-8b": Backbone(name="internvl3.5-8b", llm_hidden_size=4096, **_INTERNVL_8B),
    # The same code path at a few MB: 8x8 patches of 64 px tiles, 64 patch tokens -> 16 after pixel shuffle. It stands
    # for InternVL2, 3 and 3.5 alike (their vision sides differ only in width); tests run its snapshot with each
    # generation's LLM (Qwen2 for InternVL3, Qwen3 for InternVL3.5).
    "tiny-internvl": Backbone(
        name="tiny-internvl", family="internvit",
        vision=dict(
            hidden_size=96, intermediate_size=384, num_hidden_layers=6, num_attention_heads=4, image_size=64,
            patch_size=8, num_channels=3, hidden_act="gelu", layer_norm_eps=1e-6, attention_bias=True,
            norm_type="layer_norm", use_qk_norm=False, layer_scale_init_value=0.1, use_mean_pooling=True,
        ),
        llm_hidden_size=128, select_strategy="default", cls_token=True, downsample_ratio=0.5, max_grid_crops=6,
        image_mean=_IMAGENET_MEAN, image_std=_IMAGENET_STD, domains=_TABLE8_DOMAINS,
    ),
    # Qwen2-VL-7B (paper Table 8): a 32-block ViT of width 1280 (2D rotary positions, quick-GELU), native dynamic
    # resolution (sides multiples of 28, 56x56 to 28x28x1280 pixels: transformers' Qwen2-VL processor defaults),
    # patch merger (2x2 patches -> one token) into Qwen2-7B's 3584; experts chart, doc, general + versatile.
    "qwen2-vl-7b": Backbone(name="qwen2-vl-7b", family="qwen2vit", vision=_QWEN2_VIT, **_QWEN_VL_7B),
    # The same code path at a few MB: 8 px patches, sides multiples of 16, 256 to 16384 pixels (4 to 256 patches).
    "tiny-qwen2-vl": Backbone(
        name="tiny-qwen2-vl", family="qwen2vit",
        vision=dict(depth=6, embed_dim=96, hidden_size=128, hidden_act="quick_gelu", mlp_ratio=4, num_heads=4,
                    in_channels=3, patch_size=8, temporal_patch_size=2, spatial_merge_size=2),
        llm_hidden_size=128, max_grid_crops=1, image_mean=_CLIP_MEAN, image_std=_CLIP_STD, domains=_TABLE8_DOMAINS,
        pixels=(16 * 16, 128 * 128),
    ),
    # Qwen2.5-VL-7B: Qwen2-VL's rows (14 px patches, 2x2 merge, the same processor and pixel bounds) through 32
    # RMSNorm + SwiGLU blocks attending within 112 px windows, within the image at blocks 7, 15, 23, 31; merger into
    # Qwen2.5-7B's 3584. Domains as for Qwen2-VL. k = 2: the experts own block 30 (windowed) and 31 (full).
    "qwen2.5-vl-7b": Backbone(name="qwen2.5-vl-7b", family="qwen25vit", vision=_QWEN25_VIT, **_QWEN_VL_7B),
    # The same code path at a few MB: 8 px patches, 32 px windows (2x2 merge units), full attention at blocks 1 and 5,
    # so k = 2 gives each expert a windowed and a full block and the trunk both kinds.
    "tiny-qwen2.5-vl": Backbone(
        name="tiny-qwen2.5-vl", family="qwen25vit",
        vision=dict(depth=6, hidden_size=96, intermediate_size=160, hidden_act="silu", num_heads=4, in_channels=3,
                    patch_size=8, temporal_patch_size=2, spatial_merge_size=2, window_size=32,
                    fullatt_block_indexes=[1, 5], out_hidden_size=128),
        llm_hidden_size=128, max_grid_crops=1, image_mean=_CLIP_MEAN, image_std=_CLIP_STD, domains=_TABLE8_DOMAINS,
        pixels=(16 * 16, 128 * 128),
    ),
    # Qwen3-VL-8B: Qwen2-VL's rows (32 px merge windows here), the processor's bounds of 256 to 65536 patches and mean /
    # std 0.5; DeepStack's three mergers are the trunk's at k = 2 (their blocks are shared: families/qwen3_vl.py).
    "qwen3-vl-8b": Backbone(
        name="qwen3-vl-8b", family="qwen3vit", vision=_QWEN3_VIT, llm_hidden_size=4096, max_grid_crops=1,
        image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5), domains=_TABLE8_DOMAINS, pixels=(65536, 16777216),
    ),
    # The same code path at a few MB: 8 px patches, an 8 x 8 position table, taps after blocks 1, 3, 4 of 6, so at
    # k = 2 the trunk runs two DeepStack mergers and each expert one.
    "tiny-qwen3-vl": Backbone(
        name="tiny-qwen3-vl", family="qwen3vit",
        vision=dict(depth=6, hidden_size=96, intermediate_size=192, hidden_act="gelu_pytorch_tanh", num_heads=4,
                    in_channels=3, patch_size=8, temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=128,
                    num_position_embeddings=64, deepstack_visual_indexes=[1, 3, 4]),
        llm_hidden_size=128, max_grid_crops=1, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5),
        domains=_TABLE8_DOMAINS, pixels=(16 * 16, 128 * 128),
    ),
}


def get_backbone(name: str) -> Backbone:
    try:
        return REGISTRY[name]
    except KeyError:
        raise MixpertError(f"unknown backbone {name!r}: choose one of {', '.join(sorted(REGISTRY))}") from None


def stacked_tiles(px, tiles: list):
    """[h, w, 3] uint8 tiles (crops of one image) -> [n, h, w, 3] uint8, on px's host or device (Adapter.fast_rows):
    channels last, as decoded; the parts' graphs put channels first (unpack_pixels), so the host only copies rows."""
    return px.stack(tiles)


# ---------------------------------------------------------------------------------------------
# The adapter seam: how to build one family's embeddings and layers, and where its tensors live.
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Adapter:
    """One MLLM family's vision side. model.py builds the split from `embeddings`, `layer` and `projector`;
    weights.py maps snapshot keys with the prefixes; preprocess.py tiles images with `image_processor`; the runtime
    hands the LLM `pack`'s output. Nothing outside families/ knows a family's details."""

    family: str
    # Snapshot key prefixes of the tower, newest layouts first; the canonical names below them are
    # `embeddings.*` and `<layer_prefix><i>.*`, as transformers' vision model names them.
    tower_prefixes: tuple = field(default=())
    projector_prefixes: tuple = field(default=())
    packing_keys: tuple = field(default=())  # snapshot keys of model.Packing's image_newline, if the family has one
    layer_prefix: str = "encoder.layers."  # transformers' name of the tower's layer list (InternViT: encoder.layer.)
    embeddings_prefix: str = "embeddings."  # transformers' name of the tower's embeddings (Qwen2-VL: patch_embed.)
    # What one row of the parts' leading axis is: a fixed-size crop (every part's I/O [crops, ...]), or a patch of a
    # variable-size image (Qwen2-VL: [patches, ...], with per-row inputs the host computes, see `io`).
    rows: str = "crops"
    config_types: tuple = field(default=())  # config.json model_type values of the MLLMs this family reads
    processor_types: tuple = field(default=())  # image_processor_type prefixes its snapshots may carry

    def rename(self, key: str) -> list[tuple[str, tuple | None]]:
        """A snapshot key in one of the family's older layouts -> [(the key as transformers' current layout
        names it, the slice of the tensor it is: None for all, (part, parts) for a fused tensor split along
        dim 0)]. Keys already in transformers' layout come back unchanged."""
        return [(key, None)]

    def reads_processor_file(self, config: dict) -> bool:
        """Whether the snapshot's preprocessor_config.json defines this config's preprocessing (False where a
        layout keeps its tiling in config.json and its processor file is unused, e.g. original InternVL)."""
        return True

    def backbone_from_config(self, config: dict, name: str, base: Backbone | None, source: str,
                             processor: dict | None, processor_source: str | None) -> Backbone:
        """The architecture an MLLM config.json of this family describes; `base` (a registry entry) adds k and
        the domain set; `processor`: the snapshot's own image-processor config."""
        raise NotImplementedError

    def image_processor(self, bb: Backbone):
        """transformers' own PIL image processor for this backbone: from bb.processor when the snapshot has one,
        else from the backbone's fields. Its output for one image: pixel_values [n_crops, 3, S, S]."""
        raise NotImplementedError

    def fast_preprocessing(self, processor) -> bool:
        """Whether fast_rows reproduces this processor config (False: the processor itself runs). Beyond what
        preprocess.lookup_table checks (resize, rescale, normalise, no centre crop)."""
        return False

    def fast_rows(self, processor, image_size: tuple[int, int], px) -> tuple:
        """The processor's geometry on uint8 pixels: (the image's uint8 rows in io()["pixels"]' layout, the grid or
        None). `px` (preprocess.HostPixels, or preprocess_device.DevicePixels) holds the decoded RGB image of
        image_size (height, width): resize(w, h) -> [h, w, 3] uint8 with the processor's filter, zeros(h, w),
        stack, permute. The rows' bytes, each through its channel's table (pixel_channels) and then
        unpack_pixels, are the same bits as the processor's output on the PIL path."""
        raise NotImplementedError

    def pixel_channels(self, bb: Backbone) -> np.ndarray:
        """The channel of every byte of one row of io()["pixels"] (the row's shape without its leading axis, or
        one that broadcasts to it): which of the processor's per-channel tables turns that byte into its value."""
        return np.arange(int(bb.vision.get("num_channels", 3)), dtype=np.int64)  # crops [S, S, C]: the last axis

    def unpack_pixels(self, bb: Backbone, x):
        """Normalised rows in io()["pixels"]' layout (numpy, or torch inside a part's graph) -> the tower's input,
        as transformers' processor lays out its pixel_values. Crops: [n, S, S, C] -> [n, C, S, S] (a Transpose)."""
        if isinstance(x, np.ndarray):
            return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        return x.permute(0, 3, 1, 2).contiguous()  # a permuted view is channels_last: torch's conv would pick another kernel

    def pack_pixels(self, bb: Backbone, x: np.ndarray) -> np.ndarray:
        """unpack_pixels' inverse on the processor's pixel_values (numpy): the rows' layout."""
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1))

    def projector(self, bb: Backbone) -> nn.Module:
        """tokens [N, T, D] (after feature selection) -> [N, tokens_per_crop, D_llm]; tensor names as the
        snapshot's projector below its prefix."""
        raise NotImplementedError

    def embeddings(self, bb: Backbone) -> nn.Module:
        raise NotImplementedError

    def taps(self, bb: Backbone) -> tuple:
        """Tower layers whose output also leaves the tower through a merger of its own (Qwen3-VL's DeepStack), in
        order; model.py puts each merger in the part that computes its layer. () for most families."""
        return ()

    def tap_projector(self, bb: Backbone) -> nn.Module:
        """The merger of one tap: [P, D] -> [P / merge, D_llm]."""
        raise NotImplementedError

    def tower_target(self, rest: str, cfg) -> tuple[str, str] | None:
        """Where a tower tensor that is neither the embeddings' nor a layer's goes (`rest`: its name below the
        tower prefix): ("trunk" or "expert", its name inside that part; weights.py puts an expert's in the
        versatile expert), or None: unused (a deleted layer's, a pooling head's)."""
        return None

    def context(self, bb: Backbone) -> nn.Module | None:
        """A parameter-free module: the per-row inputs (io()["rows"]) -> the extra arguments every layer takes
        (Qwen2-VL: rotary cos/sin and the attention mask). None: layers take the hidden states alone."""
        return None

    def io(self, bb: Backbone) -> dict:
        """The parts' tensors, shapes with named axes: pixels in (the resized image's bytes, uint8, channels last:
        the graph normalises them and puts channels first, see model.PixelInput), per-row inputs, hidden, tokens out, and `merge`: input rows per
        output row of an expert (1: a crop gives a crop's tokens)."""
        c, s = int(bb.vision.get("num_channels", 3)), bb.crop_size
        return {"pixels": (("crops", s, s, c), "uint8"), "rows": (),  # channels last, as decoded
                "hidden": ("crops", bb.hidden_tokens, bb.hidden_size),
                "tokens": ("crops", bb.tokens_per_crop, bb.llm_hidden_size), "merge": 1}

    def call_rows(self, bb: Backbone) -> int | None:
        """The rows a pipeline call holds by default (None: the bundle's max). Patch families attend over the whole
        call, so a call stops where the block-diagonal mask's wasted attention would start to cost."""
        return None

    def example_grids(self, bb: Backbone) -> list:
        """Grids of two small images of different shapes (patch families), for tracing and validation."""
        raise NotImplementedError

    def row_inputs(self, bb: Backbone, grids) -> dict:
        """The per-row inputs of one call (name -> array with a row per input row), from each image's grid as
        the preprocessor reports it; {} for crop families."""
        return {}

    def language_model(self, config: dict):
        """The MLLM's language side for answers, where its plain causal LM cannot stand in for it: (a model on the
        meta device whose forward takes inputs_embeds, [(snapshot key prefix, the model's prefix)]). None: the text
        config's AutoModelForCausalLM does (LLaVA-OV, InternVL)."""
        return None

    def generate_inputs(self, input_ids, grid, image_token_id: int, features=None) -> dict:
        """Extra keyword arguments the language model's generate() needs for one image's prompt besides
        inputs_embeds (Qwen2-VL: the ids, grid and token types its M-RoPE positions come from); {} for most.
        `features`: (the image's embeddings, its DeepStack features) for families whose LLM takes the vision
        side's output itself (Qwen3-VL: then the result holds mm_encoder_outputs and no inputs_embeds are given)."""
        return {}

    def image_prompt(self, config: dict, tokenizer) -> tuple[str, int, list, list]:
        """How the family's processor turns one image placeholder of a rendered prompt into token ids: (the
        placeholder, the id of each image position, ids before the positions, ids after them)."""
        raise NotImplementedError(f"{self.family}: no prompt format for answers yet")

    # The training side: a tiny transformers MLLM of this family and its own vision path and packing, in torch
    # (differentiable), which the joint stage trains and every stage's loss goes through.
    def tiny_mllm(self, bb: Backbone, vocab_size: int, image_token_id: int):
        raise NotImplementedError(f"{self.family}: no tiny MLLM for training yet")

    def mllm_crop_tokens(self, mllm, crops, grids=None):
        """transformers' own tower -> feature selection -> projector for crops [N, 3, S, S] -> [N, T, D_llm];
        patch families: several images' patches and their grids -> [P / merge, D_llm]."""
        raise NotImplementedError

    def mllm_positions(self, mllm, grids, lengths, visual):
        """Position ids the MLLM's LLM takes for a right-padded batch of [visual tokens, text] sequences (lengths,
        visual: per sequence), or None for its default 1D positions. Qwen2-VL: its 3D M-RoPE (get_rope_index)."""
        return None

    def mllm_pack(self, mllm, tokens, image_size):
        """The MLLM's own packing of one image's crop tokens [n, T, D] (torch) -> [L, D], image_size (h, w)."""
        raise NotImplementedError

    def pack(self, bb: Backbone, tokens, image_size: tuple[int, int], newline):
        """One image's per-crop tokens [n_crops, T, D_llm] -> the embeddings [L, D_llm] the family's MLLM puts at
        its image-token positions, in order. image_size: the original (height, width)."""
        raise NotImplementedError(f"{self.family}: no packing of visual tokens for the LLM yet")

    def layer(self, bb: Backbone, index: int) -> nn.Module:
        """Layer `index` of the tower (0 first), as transformers builds it; the index matters where layers differ
        (Qwen2.5-VL: windowed attention except at fullatt_block_indexes)."""
        raise NotImplementedError
