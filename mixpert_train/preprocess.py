"""Image -> rows (the engines' uint8 bytes: crops [n_crops, S, S, 3], or Qwen2-VL's patches; and transformers'
float32 pixel_values from them), exactly as the family's own transformers PIL processor makes them (offline, no torchvision), with a bit-identical fast path for every family; and image loading
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
    except (OSError, SyntaxError, ValueError) as e:  # cut off inside its header: PIL raises while reading it
        raise ImageError(f"{_describe(src)}: corrupt or truncated image data ({e})") from None


IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def image_paths(args: list[str]) -> list[str]:
    """Files as given (a missing one becomes that image's error record); a directory: its image files, sorted; a
    glob pattern (quoted, so the shell leaves it): its matches, sorted."""
    import glob

    out = []
    for a in args:
        if Path(a).is_dir():
            found = sorted(str(p) for p in Path(a).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise MixpertError(f"{a}: a directory with no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
            out += found
        elif glob.has_magic(a) and not Path(a).exists():
            found = sorted(glob.glob(a, recursive=True))
            if not found:
                raise MixpertError(f"{a}: the pattern matches no file")
            out += found
        else:
            out.append(a)
    return out


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
    host: PIL's resize with the processor's filter (or `resize`, e.g. torch's uint8 kernels), numpy for the rest."""

    def __init__(self, image: Image.Image, resample, resize=None):
        self.image, self.resample, self._resize = image, resample, resize

    def resize(self, w: int, h: int) -> np.ndarray:
        """[h, w, 3] uint8."""
        return self._resize(w, h) if self._resize is not None else np.asarray(self.image.resize((w, h), self.resample))

    def zeros(self, h: int, w: int) -> np.ndarray:
        return np.zeros((h, w, 3), np.uint8)

    stack = staticmethod(np.stack)

    @staticmethod
    def permute(x: np.ndarray, axes) -> np.ndarray:
        return x.transpose(axes)


def _size(image) -> tuple[int, int]:
    """(height, width) of a PIL image or of a [3, H, W] tensor decoded on a device."""
    return (image.height, image.width) if isinstance(image, Image.Image) else tuple(int(v) for v in image.shape[-2:])


def lookup_table(p) -> np.ndarray | None:
    """[3, 256] float32: byte value -> normalised value per channel, transformers' own arithmetic (float64 rescale,
    float32 cast, float32 (x - mean) / std); None when the config skips rescaling or normalising (arithmetic this
    table does not reproduce)."""
    if not (p.do_rescale and p.do_normalize and np.size(p.image_mean) == np.size(p.image_std) == 3):
        return None
    v = (np.arange(256, dtype=np.uint8).astype(np.float64) * p.rescale_factor).astype(np.float32)
    mean, std = np.asarray(p.image_mean, np.float32), np.asarray(p.image_std, np.float32)
    lut = ((v[None, :] - mean[:, None]) / std[:, None]).astype(np.float32)
    return lut if np.isfinite(lut).all() else None  # finite table: every crop it makes is finite


class Preprocessor:
    """Image -> rows: the uint8 bytes the engines take, channels last as decoded (crops [n_crops, S, S, 3], or
    Qwen2-VL's patches [n_patches, p*p*3]), which the parts' graphs normalise and lay out themselves (model.PixelInput: each byte through its
    channel's 256-entry table); and, for training and references, the float32 pixel_values the family's
    transformers PIL processor makes (LlavaOnevisionImageProcessorPil, GotOcr2ImageProcessorPil,
    Qwen2VLImageProcessorPil): from the snapshot's own config where the backbone carries one (what
    from_pretrained(snapshot) builds), else from the backbone's fields.

    Fast path (`fast=True`, whenever the family's fast_rows reproduces the config; otherwise transformers'
    processor itself runs and its output is mapped back to bytes through the inverse table): the family's
    geometry on uint8 (PIL resizes with the processor's filter, crops and patches by slicing). The table holds
    transformers' own arithmetic for each of the 256 byte values, so table[rows] is the processor's float32
    output bit for bit (tests/test_preprocess.py, every family); the host never normalises on the engines' path.

    `device` ("cpu", "cuda"): the same geometry with torch's antialiased resize on that device
    (preprocess_device.py); on a GPU, JPEG files are also decoded there (nvJPEG, where torchvision has it). Not
    bit-identical (tests/test_preprocess_device.py states and checks the tolerance); on a GPU the rows come back
    as a uint8 tensor on it."""

    def __init__(self, backbone: Backbone, fast: bool = True, device: str | None = None, exact_uint8: bool | None = None):
        from .families import adapter_for

        self.backbone = backbone
        self.adapter = adapter_for(backbone)
        self.processor = self.adapter.image_processor(backbone)  # transformers' own, from the snapshot
        self.table = lookup_table(self.processor)  # None: the config has a step no per-byte table holds
        p = self.processor
        plain = p.do_resize and not getattr(p, "do_center_crop", False)  # the geometry every fast_rows assumes
        self.lut = self.table if fast and plain and self.adapter.fast_preprocessing(p) else None
        self.resizer = self.decoder = None
        if device is not None:  # resize (and on a GPU decode) with torch on `device`
            from .preprocess_device import DeviceDecoder, DeviceResizer

            if self.lut is None:
                raise MixpertError("this processor config has steps only transformers' processor reproduces; "
                                   "preprocess on the host (drop --preprocess-device)")
            self.resizer = DeviceResizer(device, self.processor.resample, exact_uint8)
            self.decoder = DeviceDecoder.for_device(self.resizer.device, load_image, MAX_PIXELS)

    def pixels(self, image):
        """The uint8 operations the family's fast path runs on: PIL on the host, or torch (preprocess_device).
        `image`: a PIL image, or a [3, H, W] uint8 tensor decoded on the device."""
        if self.resizer is None:
            return HostPixels(image, self.processor.resample)
        from .preprocess_device import DevicePixels

        if not self.resizer.uint8:  # float interpolation: all of it on the device
            return DevicePixels(self.resizer, image)
        src = self.resizer.image(image)  # torch's uint8 kernels on the CPU in place of PIL's resize
        return HostPixels(image, None, lambda w, h: self.resizer.resize(src, h, w).permute(1, 2, 0).numpy())

    def require_table(self):
        if self.table is None:
            p = self.processor
            raise MixpertError(f"image processor {type(p).__name__} (do_rescale={p.do_rescale}, do_normalize="
                               f"{p.do_normalize}, do_center_crop={getattr(p, 'do_center_crop', False)}) has no "
                               "per-byte table, which the engines' uint8 input needs; use a processor config with "
                               "resize, rescale and normalize (as the family's published snapshots have)")

    def rows(self, image) -> tuple:
        """(the image's uint8 rows as the engines take them: crops, or patches; its grid (t, h, w) in patches for
        patch families, else None). numpy, or a torch tensor on the preprocessing device."""
        size = _size(image)
        try:
            if self.lut is not None:
                if isinstance(image, Image.Image) and image.mode != "RGB":
                    image = image.convert("RGB")
                return self.adapter.fast_rows(self.processor, size, self.pixels(image))
        except ValueError as e:  # e.g. Qwen2-VL's "absolute aspect ratio must be smaller than 200"
            raise ImageError(f"{size[1]}x{size[0]} px: {str(e).splitlines()[0]}") from None
        self.require_table()
        px, grid = self._processor_output(image)
        return self.to_bytes(px), grid

    def _processor_output(self, image) -> tuple:
        try:
            out = self.processor(images=[image], return_tensors="np")
        except ValueError as e:
            raise ImageError(f"{image.width}x{image.height} px: {str(e).splitlines()[0]}") from None
        px = np.asarray(out["pixel_values"], dtype=np.float32)
        px = px[0] if px.ndim == 5 else px  # anyres: [1, n, 3, S, S]; dynamic tiles (GotOcr2): [n, 3, S, S]
        if not np.isfinite(px).all():
            raise ImageError("preprocessing produced NaN or infinite values")
        grid = out.get("image_grid_thw")
        return px, (tuple(int(v) for v in np.asarray(grid)[0]) if grid is not None else None)

    def pixel_values(self, image) -> tuple:
        """(float32 pixel_values exactly as the family's transformers processor gives them for this image, its
        grid or None): what training and the torch reference take. numpy, or a tensor on the preprocessing device."""
        if self.lut is not None:
            rows, grid = self.rows(image)
            return self.normalize(rows), grid
        return self._processor_output(image)

    def normalize(self, rows):
        """uint8 rows -> the processor's float32 pixel_values: each byte through its channel's table, then the
        family's layout (unpack_pixels); on the rows' host or device. The engines do this inside their graph."""
        self.require_table()
        bb, ad = self.backbone, self.adapter
        channels = ad.pixel_channels(bb)
        if isinstance(rows, np.ndarray):
            flat = self.table.reshape(-1)
            return ad.unpack_pixels(bb, np.take(flat, rows.astype(np.intp) + channels * 256))
        import torch

        flat = torch.as_tensor(self.table.reshape(-1), device=rows.device)
        return ad.unpack_pixels(bb, flat[rows.long() + torch.as_tensor(channels * 256, device=rows.device)].contiguous())

    def to_bytes(self, px: np.ndarray) -> np.ndarray:
        """The processor's float32 pixel_values -> the uint8 rows whose table values they are (the inverse table:
        every value the processor makes is one of its channel's 256 entries). Refuses values that are not."""
        self.require_table()
        bb, ad = self.backbone, self.adapter
        x = ad.pack_pixels(bb, px)
        ch = np.broadcast_to(ad.pixel_channels(bb), x.shape[1:])
        out = np.empty(x.shape, np.uint8)
        for c in range(self.table.shape[0]):
            order = np.argsort(self.table[c], kind="stable")
            ordered = self.table[c][order]
            sel = np.broadcast_to(ch == c, x.shape)
            v = x[sel]
            i = np.clip(np.searchsorted(ordered, v), 0, 255)
            if not np.array_equal(ordered[i], v):
                raise MixpertError(f"image processor {type(self.processor).__name__}: its output is not a per-byte "
                                   "table of the image's pixels (a step between resizing and normalising mixes "
                                   "values); the engines' uint8 input cannot hold it")
            out[sel] = order[i].astype(np.uint8)
        return out

    def prepare(self, src) -> tuple:
        """(uint8 rows, (height, width) of the decoded image, grid or None): what the engines, packing and the
        per-row inputs need. With a device decoder, JPEG files are decoded on the device."""
        image = self.decoder.load(src) if self.decoder is not None else load_image(src)
        size = _size(image)
        try:
            px, grid = self.rows(image)
        except ImageError as e:
            raise ImageError(f"{_describe(src)}: {e}") from None
        return px, size, grid

    def describe(self) -> dict:
        """Which path makes the rows, for reports."""
        if self.resizer is not None:
            return {"path": f"torch {'uint8' if self.resizer.uint8 else 'float32'} resize", "device": str(self.resizer.device),
                    "decode": self.decoder.describe() if self.decoder is not None else "host (PIL)"}
        return {"path": "fast PIL (bit-identical)" if self.lut is not None else "transformers processor + inverse table",
                "device": "cpu", "decode": "host (PIL)"}


def concat_crops(crops: list):
    """One batch from several images' crops: numpy stays numpy; device tensors are joined on their device."""
    if all(isinstance(c, np.ndarray) for c in crops):
        return np.concatenate(crops)
    import torch

    return torch.cat([torch.as_tensor(c) for c in crops])
