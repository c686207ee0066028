"""Image -> rows (crops [n_crops, 3, S, S], or Qwen2-VL's patches), exactly as the family's own transformers PIL
processor makes them (offline, no torchvision), with a bit-identical fast path for every family; and image loading
that turns every bad input into a one-line ImageError for that image alone."""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from .backbones import Backbone
from .errors import MixpertError

MAX_PIXELS = 64_000_000  # 8000 x 8000: beyond that anyres throws away nearly everything; refuse, do not OOM


class ImageError(MixpertError):
    """This image cannot be processed; the other images of the call are unaffected."""


def _describe(src) -> str:
    return str(src) if isinstance(src, (str, Path)) else f"<{type(src).__name__}>"


def _open(src) -> Image.Image:
    if isinstance(src, Image.Image):
        return src
    if isinstance(src, np.ndarray):
        return Image.fromarray(src)
    if isinstance(src, (bytes, bytearray)):
        data = bytes(src)
    else:
        path = Path(src)
        if not path.is_file():
            raise ImageError(f"{path}: no such file")
        data = path.read_bytes()
    if not data:
        raise ImageError(f"{_describe(src)}: empty file (0 bytes)")
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        px = int(re.search(r"\((\d+) pixels\)", str(e)).group(1)) if re.search(r"\((\d+) pixels\)", str(e)) else 0
        raise ImageError(f"{_describe(src)}: {px / 1e6:.0f} Mpx, above the {MAX_PIXELS / 1e6:.0f} Mpx limit; downscale it") from None
    except UnidentifiedImageError:
        raise ImageError(f"{_describe(src)}: not an image PIL can read (is it really a {Path(str(src)).suffix or 'picture'}?)") from None


def load_image(src) -> Image.Image:
    """An RGB PIL image, or ImageError naming the file and what is wrong with it."""
    name = _describe(src)
    img = _open(src)
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise ImageError(f"{name}: {w}x{h} is {w * h / 1e6:.0f} Mpx, above the {MAX_PIXELS / 1e6:.0f} Mpx limit; downscale it")
    if w < 1 or h < 1:
        raise ImageError(f"{name}: empty image ({w}x{h})")
    try:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{name}: corrupt or truncated image data ({e})") from None
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if not np.isfinite(arr).all():
            raise ImageError(f"{name}: pixel values are NaN or infinite")
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0 if top != 255.0 else arr, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # composite on white, as documents are
        img = Image.alpha_composite(bg, rgba)
    return img.convert("RGB")


class HostPixels:
    """A decoded RGB image and the uint8 operations a family's fast path (Adapter.fast_rows) is written in, on the
    host: PIL's resize with the processor's filter (or `resize`, e.g. torch's uint8 kernels), numpy for the rest,
    and the lookup table for rescale + normalise."""

    def __init__(self, image: Image.Image, resample, lut: np.ndarray, resize=None):
        self.image, self.resample, self.lut, self._resize = image, resample, lut, resize

    def resize(self, w: int, h: int) -> np.ndarray:
        """[h, w, 3] uint8."""
        return self._resize(w, h) if self._resize is not None else np.asarray(self.image.resize((w, h), self.resample))

    def zeros(self, h: int, w: int) -> np.ndarray:
        return np.zeros((h, w, 3), np.uint8)

    stack = staticmethod(np.stack)

    @staticmethod
    def permute(x: np.ndarray, axes) -> np.ndarray:
        return x.transpose(axes)

    @staticmethod
    def repeat(x: np.ndarray, n: int, axis: int) -> np.ndarray:
        return np.repeat(x, n, axis=axis)

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """uint8 with channels on axis 1 -> float32, contiguous, each byte through its channel's table."""
        out = np.empty(x.shape, np.float32)
        # a block of rows at a time (about 128k values a channel, one 384 px crop), so its bytes and floats stay in
        # cache; bytes index a 256-entry table, so "clip" never clips, and it spares take's buffered copy
        step = max(1, (1 << 17) // max(1, int(np.prod(x.shape[2:]))))
        for k in range(0, len(x), step):
            for c in range(x.shape[1]):
                np.take(self.lut[c], x[k:k + step, c], out=out[k:k + step, c], mode="clip")
        return out


def lookup_table(p) -> np.ndarray | None:
    """[3, 256] float32: byte value -> normalised value per channel, transformers' own arithmetic (float64 rescale,
    float32 cast, float32 (x - mean) / std); None when the config has a step a table cannot hold."""
    plain = p.do_resize and p.do_rescale and p.do_normalize and not getattr(p, "do_center_crop", False)
    if not (plain and np.size(p.image_mean) == np.size(p.image_std) == 3):
        return None
    v = (np.arange(256, dtype=np.uint8).astype(np.float64) * p.rescale_factor).astype(np.float32)
    mean, std = np.asarray(p.image_mean, np.float32), np.asarray(p.image_std, np.float32)
    lut = ((v[None, :] - mean[:, None]) / std[:, None]).astype(np.float32)
    return lut if np.isfinite(lut).all() else None  # finite table: every crop it makes is finite


class Preprocessor:
    """Image -> rows (crops [n_crops, 3, S, S], or patches for Qwen2-VL) float32, as the family's transformers PIL
    processor computes them (LlavaOnevisionImageProcessorPil, GotOcr2ImageProcessorPil, Qwen2VLImageProcessorPil):
    from the snapshot's own config where the backbone carries one (what from_pretrained(snapshot) builds), else
    from the backbone's fields.

    Fast path (`fast=True`, whenever the family's fast_rows reproduces the config; otherwise transformers'
    processor itself runs): the family's geometry on uint8 (PIL resizes with the processor's filter, crops and
    patches by slicing), then one table lookup per channel that holds transformers' own arithmetic for each of the
    256 byte values: the same float32 bits, without its float64 image copies and numpy <-> PIL round trips.
    tests/test_preprocess.py checks every family bit for bit against its processor.

    `device` ("cpu", "cuda"): the same geometry and table with torch's antialiased resize on that device
    (preprocess_device.py); decoding stays on the host. Not bit-identical (tests/test_preprocess_device.py states
    and checks the tolerance); on a GPU the rows come back as a tensor on it."""

    def __init__(self, backbone: Backbone, fast: bool = True, device: str | None = None, exact_uint8: bool | None = None):
        from .families import adapter_for

        self.backbone = backbone
        self.adapter = adapter_for(backbone)
        self.processor = self.adapter.image_processor(backbone)  # transformers' own, from the snapshot
        self.lut = (lookup_table(self.processor) if fast and self.adapter.fast_preprocessing(self.processor)
                    else None)
        self.resizer = None
        if device is not None:  # resize (and on a GPU normalise) with torch on `device`; decode stays here
            from .preprocess_device import DeviceResizer

            if self.lut is None:
                raise MixpertError("this processor config has steps only transformers' processor reproduces; "
                                   "preprocess on the host (drop --preprocess-device)")
            self.resizer = DeviceResizer(device, self.processor.resample, exact_uint8)

    def pixels(self, image: Image.Image):
        """The uint8 operations the family's fast path runs on: PIL on the host, or torch (preprocess_device)."""
        if self.resizer is None:
            return HostPixels(image, self.processor.resample, self.lut)
        from .preprocess_device import DevicePixels

        if not self.resizer.uint8:  # float interpolation: all of it on the device
            return DevicePixels(self.resizer, image, self.lut)
        src = self.resizer.image(image)  # torch's uint8 kernels on the CPU in place of PIL's resize
        return HostPixels(image, None, self.lut, lambda w, h: self.resizer.resize(src, h, w).permute(1, 2, 0).numpy())

    def crops(self, image: Image.Image):
        """[n_crops, 3, S, S] float32: numpy, or a torch tensor on the preprocessing device when that is not the CPU.
        Patch families (Qwen2-VL): the flattened patches [n_patches, C*t*p*p]."""
        return self.rows(image)[0]

    def rows(self, image: Image.Image) -> tuple:
        """(the image's rows: crops, or patches; its grid (t, h, w) in patches for patch families, else None)."""
        try:
            if self.lut is not None:
                image = image.convert("RGB") if image.mode != "RGB" else image
                return self.adapter.fast_rows(self.processor, (image.height, image.width), self.pixels(image))
            out = self.processor(images=[image], return_tensors="np")
        except ValueError as e:  # e.g. Qwen2-VL's "absolute aspect ratio must be smaller than 200"
            raise ImageError(f"{image.width}x{image.height} px: {str(e).splitlines()[0]}") from None
        px = np.asarray(out["pixel_values"], dtype=np.float32)
        px = px[0] if px.ndim == 5 else px  # anyres: [1, n, 3, S, S]; dynamic tiles (GotOcr2): [n, 3, S, S]
        if not np.isfinite(px).all():
            raise ImageError("preprocessing produced NaN or infinite values")
        grid = out.get("image_grid_thw")
        return px, (tuple(int(v) for v in np.asarray(grid)[0]) if grid is not None else None)

    def __call__(self, src):
        return self.crops(load_image(src))

    def prepare(self, src) -> tuple:
        """(rows, (height, width) of the decoded image, grid or None): what packing and the per-row inputs need
        besides the pixels."""
        image = load_image(src)
        try:
            px, grid = self.rows(image)
        except ImageError as e:
            raise ImageError(f"{_describe(src)}: {e}") from None
        return px, (image.height, image.width), grid

    def describe(self) -> dict:
        """Which path makes the crops, for reports."""
        if self.resizer is not None:
            return {"path": f"torch {'uint8' if self.resizer.uint8 else 'float32'} resize",
                    "device": str(self.resizer.device)}
        return {"path": "fast PIL + table (bit-identical)" if self.lut is not None else "transformers processor",
                "device": "cpu"}


def concat_crops(crops: list):
    """One batch from several images' crops: numpy stays numpy; device tensors are joined on their device."""
    if all(isinstance(c, np.ndarray) for c in crops):
        return np.concatenate(crops)
    import torch

    return torch.cat([torch.as_tensor(c) for c in crops])
