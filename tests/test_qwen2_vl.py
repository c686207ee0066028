"""The Qwen2-VL family (issue 16) against transformers' own Qwen2VLForConditionalGeneration and the Qwen2-VL image
processor of a tiny snapshot saved by save_pretrained (the independent reference): native dynamic resolution, a
variable number of patches an image, all images of a call one packed sequence."""

import numpy as np
import pytest
import torch
from PIL import Image

from mixpert_train.backbones import get_backbone
from mixpert_train.errors import MixpertError
from mixpert_train.model import VERSATILE
from mixpert_train.weights import backbone_from_snapshot, model_from_snapshot

# (w, h): 4 to 256 patches at 8 px, tiny ones resized up (min_pixels), large ones down (max_pixels), extreme aspects
SIZES = [(64, 64), (100, 300), (300, 100), (257, 129), (500, 380), (9, 5), (40, 170)]
MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)


def make_qwen2_vl(seed=0, image_token_id=5):
    """A tiny transformers Qwen2-VL (tiny-qwen2-vl's ViT, a 2-layer LLM), every weight random and away from init."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    bb = get_backbone("tiny-qwen2-vl")
    cfg = Qwen2VLConfig(
        vision_config=dict(bb.vision, model_type="qwen2_vl_vision"),
        text_config=dict(model_type="qwen2_vl_text", hidden_size=bb.llm_hidden_size, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                         max_position_embeddings=4096, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                        "mrope_section": [4, 6, 6]}),
        image_token_id=image_token_id, video_token_id=image_token_id + 1, vision_start_token_id=image_token_id + 2,
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ("norm" in name or "ln_q" in name) and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    return model


def save_snapshot(model, path, mean=MEAN, std=STD, pixels=(16 * 16, 128 * 128)):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    model.save_pretrained(path, max_shard_size="200KB")  # sharded: the loader opens only the vision shards
    Qwen2VLImageProcessorPil(size={"shortest_edge": pixels[0], "longest_edge": pixels[1]}, patch_size=8,
                             temporal_patch_size=2, merge_size=2, image_mean=list(mean),
                             image_std=list(std)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    model = make_qwen2_vl()
    return model, save_snapshot(model, tmp_path_factory.mktemp("qwen2vl"))


def _images(sizes=SIZES, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def reference(model, snap, images):
    """transformers' processor from the snapshot and the model's own image features, one tensor an image."""
    from transformers import AutoImageProcessor

    proc = AutoImageProcessor.from_pretrained(snap)
    inputs = proc(images=images, return_tensors="pt")
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                               image_grid_thw=inputs["image_grid_thw"]).pooler_output
    return inputs, [f.numpy() for f in feats]


def test_preprocessing_is_transformers_processor_from_the_snapshot(qwen):
    """Patches and grids from the snapshot's own processor config (non-default mean/std, pixel bounds): equal to
    transformers' processor from_pretrained(snapshot), bit for bit, image by image."""
    from transformers import AutoImageProcessor

    from mixpert_train.preprocess import Preprocessor

    _, snap = qwen
    bb = backbone_from_snapshot(snap, "tiny-qwen2-vl")
    assert bb.image_mean == MEAN and bb.image_std == STD and bb.pixels == (256, 16384)
    pre, proc = Preprocessor(bb), AutoImageProcessor.from_pretrained(snap)
    grids = set()
    for img in _images():
        px, size, grid = pre.prepare(img)
        ref = proc(images=[img], return_tensors="np")
        assert px.dtype == np.float32 and np.array_equal(px, ref["pixel_values"]), img.size
        assert tuple(grid) == tuple(ref["image_grid_thw"][0]) and size == (img.height, img.width)
        grids.add(tuple(grid))
    assert len(grids) == len(SIZES)  # every size its own grid: a variable patch count


@pytest.mark.parametrize("k", [0, 2, 6])
def test_golden_versatile_equals_transformers_image_features(qwen, k):
    """Everything routed to versatile: trunk + versatile expert on the packed patches of several images of
    different sizes in one call == the model's get_image_features, image by image, <= 1e-5 (torch)."""
    from mixpert_train.families import adapter_for

    model, snap = qwen
    mix = model_from_snapshot(snap, "tiny-qwen2-vl", expert_layers=k)
    inputs, want = reference(model, snap, _images())
    rows = adapter_for(mix.cfg.backbone).row_inputs(mix.cfg.backbone, inputs["image_grid_thw"].numpy())
    rows = [torch.from_numpy(rows[n]) for n in ("position_ids", "segment_ids")]
    with torch.no_grad():
        tokens = mix.experts[VERSATILE](mix.trunk(inputs["pixel_values"], *rows), *rows).numpy()
    sizes = [len(w) for w in want]
    got = np.split(tokens, np.cumsum(sizes)[:-1])
    for g, w in zip(got, want):
        assert g.shape == w.shape and np.abs(g - w).max() <= 1e-5, (k, g.shape, np.abs(g - w).max())


def test_refusals(qwen, tmp_path):
    """A Qwen2-VL snapshot with another family's --backbone, and the reverse, are refused in one line."""
    _, snap = qwen
    with pytest.raises(MixpertError, match="qwen2_vl.*--backbone tiny-internvl") as e:
        backbone_from_snapshot(snap, "tiny-internvl")
    assert "\n" not in str(e.value)
