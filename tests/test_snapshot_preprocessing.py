"""The snapshot's own image processor is the source of truth: a LLaVA-OV snapshot whose preprocessor_config.json
differs from the registry (CLIP mean/std, its own anyres grid, another resampling) gives, through `build --weights`
and `run`, the tokens transformers' model gives on the pixels of transformers' processor loaded from that snapshot;
and the config travels in checkpoint and manifest, so `run` needs no snapshot."""

import shutil

import numpy as np
import pytest

from PIL import Image

from conftest import make_reference, reference_crop_features
from mixpert_export.__main__ import main as export_main
from mixpert_export.bundle import manifest as mf
from mixpert_train.checkpoint import load_checkpoint, save_checkpoint
from mixpert_train.preprocess import Preprocessor, load_image
from mixpert_train.weights import model_from_snapshot

PINPOINTS = [[64, 64], [64, 128], [128, 64], [128, 128], [64, 192], [192, 64], [128, 192]]  # not the registry's 3x3
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
SIZES = [(64, 64), (200, 90), (90, 200), (300, 170), (33, 47), (640, 480)]  # (w, h): square, wide, tall, odd, tiny, big


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    model = make_reference(seed=4, image_grid_pinpoints=PINPOINTS)
    d = tmp_path_factory.mktemp("clip_snapshot")
    model.save_pretrained(d, max_shard_size="1MB")
    LlavaOnevisionImageProcessorPil(size={"height": 64, "width": 64}, image_grid_pinpoints=PINPOINTS,
                                    image_mean=CLIP_MEAN, image_std=CLIP_STD,
                                    resample=Image.Resampling.BILINEAR).save_pretrained(d)
    return d, model


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate(SIZES):
        p = d / f"{i}_{w}x{h}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def transformers_tokens(snapshot_dir, model, paths):
    """transformers' own processor from the snapshot, then its own model: per image [n_crops, T, D_llm]."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    proc = LlavaOnevisionImageProcessorPil.from_pretrained(snapshot_dir)
    out = []
    for p in paths:
        enc = proc(images=[Image.open(p).convert("RGB")], return_tensors="pt")
        out.append(reference_crop_features(model, enc["pixel_values"], enc["image_sizes"]).numpy())
    return out


def test_preprocessor_pixels_equal_the_snapshots_processor_bit_for_bit(snapshot, images):
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    d, _ = snapshot
    ours = Preprocessor(model_from_snapshot(d).cfg.backbone)
    theirs = LlavaOnevisionImageProcessorPil.from_pretrained(d)
    for p in images:
        want = theirs(images=[Image.open(p).convert("RGB")], return_tensors="np")["pixel_values"][0]
        got = ours.normalize(ours.prepare(p)[0])  # the engines' bytes, normalised as their graph does
        assert got.shape == want.shape and np.array_equal(got, want.astype(np.float32)), p
    # and the registry's defaults would not have been (the defect this guards against)
    from mixpert_train.backbones import get_backbone

    registry = Preprocessor(get_backbone("tiny"))
    assert not np.allclose(registry.pixel_values(load_image(images[0]))[0], ours.pixel_values(load_image(images[0]))[0], atol=1e-2)


def test_build_and_run_give_transformers_tokens_without_the_snapshot(snapshot, images, tmp_path, capsys):
    d, model = snapshot
    snap = tmp_path / "snap"
    shutil.copytree(d, snap)
    bundle = tmp_path / "bundle"
    assert export_main(["build", "--weights", str(snap), "--backbone", "tiny", "--out", str(bundle),
                        "--runtime", "onnxruntime", "--quiet"]) == 0
    proc = mf.bundle_config(mf.read_manifest(bundle)).backbone.processor
    assert proc["image_mean"] == CLIP_MEAN and proc["image_grid_pinpoints"] == PINPOINTS
    shutil.rmtree(snap)  # the manifest carries the processor: run needs no snapshot
    feats = tmp_path / "f.npz"
    assert export_main(["run", "--engines", str(bundle), *map(str, images), "--runtime", "onnxruntime",
                        "--save-features", str(feats)]) == 0
    got = np.load(feats)
    want = transformers_tokens(d, model, images)
    for i, w in enumerate(want):
        assert got[str(i)].shape == w.shape
        assert np.abs(got[str(i)] - w).max() <= 1e-4  # ONNX Runtime fp32 vs transformers fp32 (torch)


def test_torch_runtime_and_checkpoints_carry_the_processor(snapshot, images, tmp_path):
    from mixpert_export.runtime.pipeline import MixpertPipeline

    d, model = snapshot
    ck = save_checkpoint(model_from_snapshot(d), tmp_path / "ck")
    back = load_checkpoint(ck)
    assert back.cfg.backbone.processor["image_std"] == CLIP_STD
    bundle = tmp_path / "b"
    assert export_main(["build", "--checkpoint", str(ck), "--out", str(bundle), "--runtime", "onnxruntime", "--quiet"]) == 0
    pipe = MixpertPipeline.from_engines(bundle, runtime="torch")
    results = pipe(images[:3])
    want = transformers_tokens(d, model, images[:3])
    for r, w in zip(results, want):
        assert r.ok and np.abs(np.asarray(r.tokens) - w).max() <= 1e-5  # torch vs transformers, both fp32 on CPU


def test_snapshot_without_a_processor_config_uses_the_registry_and_says_so(tiny_snapshot):
    model = model_from_snapshot(tiny_snapshot, "tiny")
    assert model.cfg.backbone.processor is None  # conftest's snapshot has no preprocessor_config.json
    assert np.isfinite(Preprocessor(model.cfg.backbone).pixel_values(load_image(np.zeros((20, 30, 3), np.uint8)))[0]).all()

