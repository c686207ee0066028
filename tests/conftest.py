"""Shared fixtures: tiny LLaVA-OneVision snapshots written by transformers itself (the independent reference)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mixpert_train.backbones import get_backbone

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def llava_config(bb, **overrides):
    from transformers import LlavaOnevisionConfig

    kw = dict(
        vision_config=dict(model_type="siglip_vision_model", **bb.vision),
        text_config=dict(model_type="qwen2", hidden_size=bb.llm_hidden_size, intermediate_size=512,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=1000,
                         max_position_embeddings=512),
        image_grid_pinpoints=[list(p) for p in bb.grid_pinpoints], vision_feature_layer=bb.feature_layer,
        vision_feature_select_strategy=bb.select_strategy, image_token_index=999, video_token_index=998,
    )
    kw.update(overrides)
    return LlavaOnevisionConfig(**kw)


def make_reference(seed=0, **overrides):
    """A tiny transformers LlavaOnevisionForConditionalGeneration with non-trivial random weights."""
    from transformers import LlavaOnevisionForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(llava_config(get_backbone("tiny"), **overrides)).eval()
    with torch.no_grad():  # default init leaves norms at 1 and biases at 0: perturb so a swapped tensor shows
        for name, p in model.named_parameters():
            if "vision_tower" in name or "multi_modal_projector" in name:
                p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.fixture(scope="session")
def reference_model():
    return make_reference()


@pytest.fixture(scope="session")
def tiny_snapshot(tmp_path_factory, reference_model) -> Path:
    """The reference model saved by transformers in small shards (newer key layout)."""
    d = tmp_path_factory.mktemp("snapshot_new")
    reference_model.save_pretrained(d, max_shard_size="1MB")
    return d


def rewrite_snapshot(src: Path, dst: Path, rename=lambda k: k, drop=()):
    """Copy a sharded snapshot, renaming or dropping tensors (shards and index kept consistent)."""
    dst.mkdir(parents=True, exist_ok=True)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    new_map = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors = {rename(k): v for k, v in load_file(str(src / shard)).items() if k not in drop}
        save_file(tensors, str(dst / shard), metadata={"format": "pt"})
        new_map |= {k: shard for k in tensors}
    index["weight_map"] = new_map
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    (dst / "config.json").write_text((src / "config.json").read_text())
    return dst


def published_layout(key: str) -> str:
    """The key layout of published LLaVA-OV snapshots (llava-hf, transformers 4.x)."""
    if key.startswith("vision_tower."):
        return "vision_tower.vision_model." + key[len("vision_tower."):]
    return key


@pytest.fixture(scope="session")
def tiny_snapshot_published(tmp_path_factory, tiny_snapshot) -> Path:
    return rewrite_snapshot(tiny_snapshot, tmp_path_factory.mktemp("snapshot_old"), rename=published_layout)


def reference_crop_features(model, pixel_values, image_sizes):
    """What transformers' LLaVA-OV feeds the LLM for these crops, before anyres packing: the projector's
    output [N_crops, T, D_llm], captured by a hook inside its own get_image_features."""
    captured = []
    h = model.model.multi_modal_projector.register_forward_hook(lambda m, i, o: captured.append(o.detach()))
    try:
        with torch.no_grad():
            model.model.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes,
                                           vision_feature_layer=model.config.vision_feature_layer,
                                           vision_feature_select_strategy=model.config.vision_feature_select_strategy)
    finally:
        h.remove()
    return captured[0]


def assert_uint8_path_equals_float_path(bundle, images, ort_tol: float = 1e-5) -> dict:
    """The engines' uint8 input against the float input they took before (issue 28): transformers' own processor's
    float32 pixel_values (Preprocessor(fast=False)) through the bundle's model in torch, trunk then versatile, call
    by call as the pipeline groups the images. torch: equal (0.0); ONNX Runtime: within ort_tol. Returns the worst
    difference per runtime."""
    import numpy as np

    from mixpert_export.bundle import manifest as mf
    from mixpert_export.bundle.sources import model_from_source
    from mixpert_export.runtime.pipeline import MixpertPipeline
    from mixpert_train.families import adapter_for
    from mixpert_train.model import VERSATILE
    from mixpert_train.preprocess import Preprocessor

    bundle = Path(bundle)
    manifest = mf.read_manifest(bundle)
    cfg = mf.bundle_config(manifest)
    model = model_from_source(manifest["source"], cfg, bundle / mf.NAME)
    ad, ref = adapter_for(cfg.backbone), Preprocessor(cfg.backbone, fast=False)  # transformers' processor itself
    floats = [ref.pixel_values(im) for im in images]
    worst = {}
    for runtime, tol in (("torch", 0.0), ("onnxruntime", ort_tol)):
        pipe = MixpertPipeline.from_engines(bundle, runtime=runtime, tau=1.0)  # every image to versatile
        results = pipe(images)
        assert all(r.ok and r.expert == VERSATILE for r in results), [r.error for r in results]
        worst[runtime] = 0.0
        for call in pipe.calls([r.crops for r in results]):
            px = torch.from_numpy(np.concatenate([floats[i][0] for i in call]))
            rows = [torch.from_numpy(v) for v in ad.row_inputs(cfg.backbone, [floats[i][1] for i in call]).values()]
            with torch.no_grad():
                want = model.experts[VERSATILE](model.trunk(px, *rows), *rows).numpy()
            got = np.concatenate([results[i].tokens for i in call])
            assert got.shape == want.shape
            worst[runtime] = max(worst[runtime], float(np.abs(got - want).max()))
        assert worst[runtime] <= tol, (runtime, worst[runtime])
    return worst
