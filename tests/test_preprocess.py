"""The fast anyres preprocessor against transformers' own LlavaOnevisionImageProcessorPil: identical float32 pixels
(bit for bit, tolerance 0) over a corpus of sizes, aspect ratios, modes, file formats and resampling filters, on the
tiny grid and on LLaVA-OV-7B's real 384-pixel 6x6 grid."""

import io

import numpy as np
import pytest
from PIL import Image

from mixpert_train.backbones import get_backbone
from mixpert_train.preprocess import Preprocessor, load_image

SIZES = [(1, 1), (33, 47), (64, 64), (200, 90), (90, 200), (300, 170), (640, 480), (1024, 768), (3000, 200)]


def encoded(w, h, mode, fmt, seed):
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    rgb[: h // 2] = np.linspace(0, 255, w, dtype=np.uint8)[None, :, None]  # smooth half: resampling shows
    img = Image.fromarray(rgb)
    if mode == "L":
        img = img.convert("L")
    elif mode == "RGBA":
        img = img.convert("RGBA")
        img.putalpha(Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)))
    elif mode == "P":
        img = img.convert("P", palette=Image.Palette.ADAPTIVE)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("backbone", ["tiny", "llava-ov-7b"])
@pytest.mark.parametrize("resample", [None, Image.Resampling.BILINEAR, Image.Resampling.LANCZOS])
def test_fast_path_is_bit_identical_to_transformers(backbone, resample):
    bb = get_backbone(backbone)
    fast = Preprocessor(bb)
    if resample is not None:  # a snapshot's processor config with another filter
        cfg = fast.processor.to_dict() | {"resample": int(resample)}
        fast = Preprocessor(bb.replace(processor=cfg))
    slow = Preprocessor(fast.backbone, fast=False)
    assert fast.lut is not None and slow.lut is None
    sizes = SIZES if backbone == "tiny" else [(768, 1024), (1920, 1080), (2000, 1500), (300, 170)]
    cases = [(w, h, mode, fmt) for (w, h) in sizes for mode, fmt in (("RGB", "JPEG"), ("RGB", "PNG"))]
    cases += [(200, 90, "L", "PNG"), (90, 200, "RGBA", "PNG"), (300, 170, "P", "PNG")]
    for i, (w, h, mode, fmt) in enumerate(cases):
        img = load_image(encoded(w, h, mode, fmt, i))
        want = slow.crops(img)
        got = fast.crops(img)
        assert got.dtype == np.float32 and got.shape == want.shape, (w, h, mode, fmt)
        assert np.array_equal(got, want), (w, h, mode, fmt, float(np.abs(got - want).max()))


def test_configs_the_fast_path_does_not_reproduce_fall_back_to_transformers():
    bb = get_backbone("tiny")
    cfg = Preprocessor(bb).processor.to_dict() | {"do_normalize": False}
    pre = Preprocessor(bb.replace(processor=cfg))
    assert pre.lut is None
    px = pre(encoded(50, 30, "RGB", "PNG", 0))
    assert px.min() >= 0 and px.max() <= 1  # rescaled only, as transformers does with do_normalize off
