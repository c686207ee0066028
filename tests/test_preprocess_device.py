"""Resize and normalise with torch (preprocess_device.py) against the PIL path, which is bit-identical to
transformers' processor (tests/test_preprocess.py), for every family's geometry (Adapter.fast_rows).

Stated tolerance per family, from the corpus below (sizes up to 2000x1500, JPEG and PNG, smooth halves and noise
halves), in byte levels of a resized pixel (1 level = 1 / 255 / std after normalisation); the same for torch's
uint8 CPU kernels and for the float32 arithmetic the CUDA path runs (checked here on the CPU):
- LLaVA-OV: at most 4 levels, on at most 5% of the values (measured 2026-11-25 and 2026-12-03: 1 level on the tiny
  grid, 4 on the 7B grid with bicubic, at most 3.1% of values differing, at most 0.001% by more than 2 levels).
- InternVL, Qwen2-VL: 1-2 levels on at most 15% of the values (measured 2026-12-03: up to 13.5% at 1920x1080 with
  its noise half, under 1.5% on the other sizes), and on at most 1% of the values more (up to 26 levels measured,
  0.62% of values): Pillow resamples one axis, rounds and clips to bytes, then the other, and on the near-equal
  scale factors these families' resizes have (1920x1080 -> 1792x896 tiles, -> 1316x728 patches) torch's pass
  order differs from Pillow's, so where a bicubic pass overshoots on noise the clipping lands differently."""

import numpy as np
import pytest
import torch
from PIL import Image

from test_preprocess import SIZES, encoded
from mixpert_train.backbones import get_backbone
from mixpert_train.errors import MixpertError
from mixpert_train.preprocess import Preprocessor, load_image

# family -> (most levels, share of values differing at all, share differing by more than 2 levels)
TOLERANCE = {"siglip": (4, 0.05, 1e-5), "internvit": (26, 0.15, 0.01), "qwen2vit": (26, 0.15, 0.01)}
TINY = ("tiny", "tiny-internvl", "tiny-qwen2-vl")


def corpus(backbone: str):
    sizes = SIZES if backbone in TINY else [(768, 1024), (1920, 1080), (2000, 1500), (300, 170)]
    return [load_image(encoded(w, h, "RGB", fmt, i)) for i, (w, h) in enumerate(sizes) for fmt in ("JPEG", "PNG")]


def with_resample(bb, resample):
    pre = Preprocessor(bb)
    return pre if resample is None else Preprocessor(bb.replace(processor=pre.processor.to_dict() | {"resample": int(resample)}))


def within_tolerance(host: Preprocessor, dev: Preprocessor, images) -> float:
    """Asserts the stated tolerance image by image; returns the largest difference in byte levels."""
    worst = 0.0
    levels, share, share_over_2 = TOLERANCE[host.backbone.family]
    level = 1.0 / 255.0 / min(host.processor.image_std)  # one byte level after normalisation
    for img in images:
        want, want_grid = host.rows(img)
        got, grid = dev.rows(img)
        got = got.cpu().numpy() if isinstance(got, torch.Tensor) else got
        assert got.dtype == np.float32 and got.shape == want.shape and grid == want_grid, img.size
        diff = np.abs(got - want) / level
        assert diff.max() <= levels + 1e-3, (img.size, float(diff.max()))
        assert (diff > 0.5).mean() <= share, (img.size, float((diff > 0.5).mean()))
        assert (diff > 2.5).mean() <= share_over_2, (img.size, float((diff > 2.5).mean()))
        worst = max(worst, float(diff.max()))
    return worst


@pytest.mark.parametrize("backbone", [*TINY, "llava-ov-7b", "internvl2-8b", "qwen2-vl-7b"])
@pytest.mark.parametrize("resample", [None, Image.Resampling.BILINEAR])
@pytest.mark.parametrize("exact_uint8", [True, False], ids=["uint8-cpu", "float32-as-on-cuda"])
def test_torch_resize_is_within_the_stated_tolerance_of_the_pil_path(backbone, resample, exact_uint8):
    host = with_resample(get_backbone(backbone), resample)
    dev = Preprocessor(host.backbone, device="cpu", exact_uint8=exact_uint8)
    assert dev.describe()["path"].startswith("torch")
    worst = within_tolerance(host, dev, corpus(backbone))
    assert worst >= 0.5  # not silently the PIL path itself


def test_float_path_returns_a_tensor_on_its_device_and_numpy_on_the_uint8_path():
    bb = get_backbone("tiny")
    img = corpus("tiny")[5]
    assert isinstance(Preprocessor(bb, device="cpu").crops(img), np.ndarray)
    t = Preprocessor(bb, device="cpu", exact_uint8=False).crops(img)
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device.type == "cpu"


def test_filters_torch_has_no_antialiased_kernel_for_are_refused_in_one_line():
    bb = with_resample(get_backbone("tiny"), Image.Resampling.LANCZOS).backbone
    with pytest.raises(MixpertError) as e:
        Preprocessor(bb, device="cpu")
    assert "resample" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.gpu
@pytest.mark.parametrize("backbone", [*TINY, "llava-ov-7b", "internvl2-8b", "qwen2-vl-7b"])
def test_cuda_preprocessing_is_within_the_stated_tolerance(backbone):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (none visible on this machine)")
    host = Preprocessor(get_backbone(backbone))
    dev = Preprocessor(host.backbone, device="cuda")
    assert dev.crops(corpus(backbone)[0]).device.type == "cuda"
    within_tolerance(host, dev, corpus(backbone))
