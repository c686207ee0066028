"""Each family's fast preprocessor against transformers' own processor for it (LlavaOnevisionImageProcessorPil,
GotOcr2ImageProcessorPil as InternVL calls it, Qwen2VLImageProcessorPil): its uint8 rows through the per-byte table
give the processor's float32 pixel_values and the same grid
(bit for bit, tolerance 0) over a corpus of sizes, aspect ratios, modes, file formats, resampling filters and
processor configs, on the tiny backbones and at real scale (LLaVA-OV-7B's 384-pixel 6x6 grid, InternVL2-8B's 448 px
tiles up to 12 + thumbnail, Qwen2-VL-7B's 14 px patches within 56x56 .. 28x28x1280 pixels)."""

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


# processor configs a snapshot may carry besides the registry's: other filters, and each family's own knobs
CONFIGS = {
    "siglip": [{}, {"resample": int(Image.Resampling.BILINEAR)}, {"resample": int(Image.Resampling.LANCZOS)},
               {"image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}],
    "internvit": [{}, {"resample": int(Image.Resampling.BILINEAR)}, {"min_patches": 2, "max_patches": 6},
                  {"crop_to_patches": False}, {"max_patches": 1}],
    "qwen2vit": [{}, {"resample": int(Image.Resampling.BILINEAR)}, {"resample": int(Image.Resampling.LANCZOS)},
                 {"size": {"shortest_edge": 4 * 28 * 28, "longest_edge": 300 * 28 * 28}, "image_mean": [0.5] * 3}],
}
CONFIGS["qwen25vit"] = CONFIGS["qwen3vit"] = CONFIGS["qwen2vit"]  # Qwen2.5-VL, Qwen3-VL: the same processor
TINY = ["tiny", "tiny-internvl", "tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-qwen3-vl"]


def compare(fast: Preprocessor, slow: Preprocessor, cases):
    """The fast path's uint8 rows (what the engines take), through the table, against transformers' processor's
    float32 pixel_values: bit for bit; and the processor's output mapped back to bytes gives the same rows."""
    for i, (w, h, mode, fmt) in enumerate(cases):
        img = load_image(encoded(w, h, mode, fmt, i))
        want, want_grid = slow.pixel_values(img)  # transformers' processor itself
        rows, grid = fast.rows(img)
        assert rows.dtype == np.uint8 and grid == want_grid, (w, h, mode, fmt)
        got = fast.normalize(rows)
        assert got.dtype == np.float32 and got.shape == want.shape, (w, h, mode, fmt)
        assert np.array_equal(got, want), (w, h, mode, fmt, float(np.abs(got - want).max()))
        assert np.array_equal(slow.rows(img)[0], rows), (w, h, mode, fmt)


@pytest.mark.parametrize("backbone", TINY + ["llava-ov-7b", "internvl2-8b", "qwen2-vl-7b", "qwen2.5-vl-7b", "qwen3-vl-8b"])
def test_fast_path_is_bit_identical_to_transformers(backbone):
    bb = get_backbone(backbone)
    for changes in CONFIGS[bb.family]:  # a snapshot's processor config with another filter, tiling or bounds
        fast = Preprocessor(bb)
        if changes:
            fast = Preprocessor(bb.replace(processor=fast.processor.to_dict() | changes))
        slow = Preprocessor(fast.backbone, fast=False)
        assert fast.lut is not None and slow.lut is None, changes
        sizes = SIZES if backbone in TINY else [(768, 1024), (1920, 1080), (2000, 1500), (300, 170)]
        cases = [(w, h, mode, fmt) for (w, h) in sizes for mode, fmt in (("RGB", "JPEG"), ("RGB", "PNG"))]
        cases += [(200, 90, "L", "PNG"), (90, 200, "RGBA", "PNG"), (300, 170, "P", "PNG")]
        compare(fast, slow, cases if not changes else cases[::3])


def test_an_image_the_processor_refuses_is_a_one_line_error_on_the_fast_path_too():
    from mixpert_train.preprocess import ImageError

    for fast in (True, False):
        pre = Preprocessor(get_backbone("tiny-qwen2-vl"), fast=fast)
        with pytest.raises(ImageError) as e:
            pre.prepare(encoded(4020, 20, "RGB", "PNG", 0))  # Qwen2-VL's processor: aspect ratio above 200
        assert "aspect ratio" in str(e.value) and "\n" not in str(e.value)


def test_configs_the_fast_path_does_not_reproduce_fall_back_to_transformers():
    """do_normalize off: no table, so training still gets transformers' own pixel_values, and the engines' uint8
    input is refused in one line naming the setting."""
    from mixpert_train.errors import MixpertError

    bb = get_backbone("tiny")
    cfg = Preprocessor(bb).processor.to_dict() | {"do_normalize": False}
    pre = Preprocessor(bb.replace(processor=cfg))
    assert pre.lut is None and pre.table is None
    px = pre.pixel_values(load_image(encoded(50, 30, "RGB", "PNG", 0)))[0]
    assert px.min() >= 0 and px.max() <= 1  # rescaled only, as transformers does with do_normalize off
    with pytest.raises(MixpertError) as e:
        pre.prepare(encoded(50, 30, "RGB", "PNG", 0))
    assert "do_normalize=False" in str(e.value) and "\n" not in str(e.value)


def test_a_config_only_the_processor_reproduces_still_gives_the_engines_bytes():
    """Centre crop (no fast geometry): transformers' processor runs, and its output maps back to the bytes whose
    table values it is, exactly; values that are not table entries are refused rather than rounded."""
    from mixpert_train.errors import MixpertError

    bb = get_backbone("tiny-internvl")
    base = Preprocessor(bb)
    pre = Preprocessor(bb.replace(processor=base.processor.to_dict() | {"do_center_crop": True, "crop_size": {"height": 48, "width": 48}}))
    assert pre.lut is None and pre.table is not None
    img = load_image(encoded(90, 70, "RGB", "PNG", 3))
    want, _ = pre.pixel_values(img)
    rows, _ = pre.rows(img)
    assert rows.dtype == np.uint8 and np.array_equal(pre.normalize(rows), want)
    with pytest.raises(MixpertError, match="not a per-byte table"):
        pre.to_bytes(want + np.float32(1e-3))


def test_patch_rows_carry_one_frame_and_the_table_repeats_it_in_time():
    """Qwen2-VL: the engines take [P, p*p*C] bytes (a still image once, channels last); the processor's [P, C*t*p*p]
    is that frame, channels first, repeated t times, which normalize() (and the graph) reproduces."""
    bb = get_backbone("tiny-qwen2-vl")
    pre = Preprocessor(bb)
    rows, grid = pre.rows(load_image(encoded(70, 50, "RGB", "PNG", 1)))
    p, t = bb.vision["patch_size"], bb.vision["temporal_patch_size"]
    assert rows.shape == (grid[1] * grid[2], 3 * p * p) and rows.dtype == np.uint8
    px = pre.normalize(rows)
    assert px.shape == (len(rows), 3 * t * p * p)
    frames = px.reshape(len(rows), 3, t, p * p)
    assert np.array_equal(frames[:, :, 0], frames[:, :, 1])
