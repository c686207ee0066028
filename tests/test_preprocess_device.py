"""Resize (and on a GPU decode) with torch (preprocess_device.py) against the PIL path, which is bit-identical to
transformers' processor (tests/test_preprocess.py), for every family's geometry (Adapter.fast_rows).

Stated tolerance per family, from the corpus below (sizes up to 2000x1500, JPEG and PNG, smooth halves and noise
halves), in byte levels of the uint8 rows the engines take (1 level = 1 / 255 / std after their in-graph normalisation); the same for torch's
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
TOLERANCE["qwen25vit"] = TOLERANCE["qwen3vit"] = TOLERANCE["qwen2vit"]  # the same processor and geometry
TINY = ("tiny", "tiny-internvl", "tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-qwen3-vl")


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
    for img in images:
        want, want_grid = host.rows(img)
        got, grid = dev.rows(img)
        got = got.cpu().numpy() if isinstance(got, torch.Tensor) else got
        assert got.dtype == np.uint8 and got.shape == want.shape and grid == want_grid, img.size
        diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
        assert diff.max() <= levels + 1e-3, (img.size, float(diff.max()))
        assert (diff > 0.5).mean() <= share, (img.size, float((diff > 0.5).mean()))
        assert (diff > 2.5).mean() <= share_over_2, (img.size, float((diff > 2.5).mean()))
        worst = max(worst, float(diff.max()))
    return worst


@pytest.mark.parametrize("backbone", [*TINY, "llava-ov-7b", "internvl2-8b", "qwen2-vl-7b", "qwen2.5-vl-7b", "qwen3-vl-8b"])
@pytest.mark.parametrize("resample", [None, Image.Resampling.BILINEAR])
@pytest.mark.parametrize("exact_uint8", [True, False], ids=["uint8-cpu", "float32-as-on-cuda"])
def test_torch_resize_is_within_the_stated_tolerance_of_the_pil_path(backbone, resample, exact_uint8):
    host = with_resample(get_backbone(backbone), resample)
    dev = Preprocessor(host.backbone, device="cpu", exact_uint8=exact_uint8)
    assert dev.describe()["path"].startswith("torch")
    worst = within_tolerance(host, dev, corpus(backbone))
    assert worst >= 0.5  # not silently the PIL path itself


def test_float_path_returns_a_uint8_tensor_on_its_device_and_numpy_on_the_uint8_path():
    bb = get_backbone("tiny")
    img = corpus("tiny")[5]
    rows = Preprocessor(bb, device="cpu").rows(img)[0]
    assert isinstance(rows, np.ndarray) and rows.dtype == np.uint8
    t = Preprocessor(bb, device="cpu", exact_uint8=False).rows(img)[0]
    assert isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.device.type == "cpu"
    pre = Preprocessor(bb)  # the table on the device's tensor: the same values as on the host
    assert np.array_equal(pre.normalize(t).numpy(), pre.normalize(t.numpy()))


def _decoder(calls):
    """A DeviceDecoder on the CPU whose 'GPU' decode is PIL's (recording the calls): the routing logic alone."""
    from mixpert_train.preprocess_device import DeviceDecoder

    def decode(data):
        calls.append(len(data))
        return torch.from_numpy(np.array(load_image(data))).permute(2, 0, 1).contiguous()

    return DeviceDecoder("cpu", decode, load_image, 64_000_000)


def test_device_decoder_takes_jpeg_and_sends_everything_else_to_the_host(tmp_path):
    from mixpert_train.preprocess import ImageError

    calls = []
    dec = _decoder(calls)
    jpeg, png = encoded(40, 30, "RGB", "JPEG", 0), encoded(40, 30, "RGB", "PNG", 0)
    x = dec.load(jpeg)
    assert isinstance(x, torch.Tensor) and tuple(x.shape) == (3, 30, 40) and calls == [len(jpeg)]
    (tmp_path / "a.jpg").write_bytes(jpeg)
    assert isinstance(dec.load(tmp_path / "a.jpg"), torch.Tensor)
    assert isinstance(dec.load(png), Image.Image)  # another format: PIL on the host
    cmyk = Image.new("CMYK", (20, 10), (0, 50, 100, 0))
    import io

    buf = io.BytesIO()
    cmyk.save(buf, "JPEG")
    assert isinstance(dec.load(buf.getvalue()), Image.Image)  # CMYK JPEG: the host's conversion
    with pytest.raises(ImageError, match="corrupt or truncated"):
        dec.load(jpeg[: len(jpeg) // 2])  # truncated: never handed to the GPU decoder, refused in one line
    assert len(calls) == 2 and dec.counts == {"device": 2, "host": 3}


def test_what_the_device_decoder_refuses_is_decoded_on_the_host():
    from mixpert_train.preprocess_device import DeviceDecoder

    def refuse(data):
        raise RuntimeError("nvjpeg: unsupported")

    dec = DeviceDecoder("cpu", refuse, load_image, 64_000_000)
    assert isinstance(dec.load(encoded(40, 30, "RGB", "JPEG", 0)), Image.Image)
    assert DeviceDecoder.for_device("cpu", load_image, 1) is None  # the CPU decodes with PIL: no device decoder at all


def test_rows_from_a_device_decoded_tensor_match_rows_from_the_same_pixels_on_pil():
    """The resize path takes a decoded [3, H, W] tensor as it takes a PIL image: same pixels, same rows."""
    bb = get_backbone("tiny-internvl")
    dev = Preprocessor(bb, device="cpu", exact_uint8=False)
    img = corpus("tiny-internvl")[4]
    t = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()
    a, b = dev.rows(img), dev.rows(t)
    assert a[1] == b[1] and torch.equal(a[0], b[0])


def test_filters_torch_has_no_antialiased_kernel_for_are_refused_in_one_line():
    bb = with_resample(get_backbone("tiny"), Image.Resampling.LANCZOS).backbone
    with pytest.raises(MixpertError) as e:
        Preprocessor(bb, device="cpu")
    assert "resample" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.gpu
@pytest.mark.parametrize("backbone", [*TINY, "llava-ov-7b", "internvl2-8b", "qwen2-vl-7b", "qwen2.5-vl-7b", "qwen3-vl-8b"])
def test_cuda_preprocessing_is_within_the_stated_tolerance(backbone):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (none visible on this machine)")
    host = Preprocessor(get_backbone(backbone))
    dev = Preprocessor(host.backbone, device="cuda")
    assert dev.rows(corpus(backbone)[0])[0].device.type == "cuda"
    within_tolerance(host, dev, corpus(backbone))


# nvJPEG against libjpeg (PIL) on the same JPEG file: IDCT and chroma upsampling differ; stated tolerance on the
# decoded pixels: at most 8 levels, mean under 1 level (quality-90 photographs-like content, 4:2:0)
NVJPEG_LEVELS, NVJPEG_MEAN = 8, 1.0


@pytest.mark.gpu
def test_jpeg_decoded_on_the_gpu_is_within_the_stated_tolerance_of_pil():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (none visible on this machine)")
    from mixpert_train.preprocess_device import DeviceDecoder

    dec = DeviceDecoder.for_device("cuda", load_image, 64_000_000)
    if dec.decode is None:
        pytest.skip(f"no GPU JPEG decoder in this environment (torchvision with CUDA is needed): {dec.why}")
    for i, (w, h) in enumerate([(64, 64), (640, 480), (1920, 1080)]):
        data = encoded(w, h, "RGB", "JPEG", i)
        x = dec.load(data)
        assert isinstance(x, torch.Tensor) and x.device.type == "cuda" and tuple(x.shape) == (3, h, w)
        want = np.asarray(load_image(data)).transpose(2, 0, 1).astype(np.int16)
        diff = np.abs(x.cpu().numpy().astype(np.int16) - want)
        assert diff.max() <= NVJPEG_LEVELS and diff.mean() <= NVJPEG_MEAN, (w, h, int(diff.max()), float(diff.mean()))
