"""Decoding and resizing on a torch device: each family's fast geometry (Adapter.fast_rows) with torch's
antialiased interpolation in place of PIL's resize; the rows stay uint8 (the engines normalise them in-graph).

- CPU: torch's uint8 antialiased kernels (vectorised, Pillow's separable filters with the same a=-0.5 cubic),
  several times faster than PIL's resize per core. Decoding stays with PIL.
- CUDA (or `exact_uint8=False`): float32 interpolation of the uint8 image, rounded and clamped back to bytes as
  PIL's output is; rows come back as a uint8 device tensor so the backend never copies them through the host.
  JPEG files are decoded on the GPU too (DeviceDecoder: torchvision's decode_jpeg, nvJPEG), everything else and
  whatever nvJPEG refuses on the host. nvJPEG's IDCT and chroma upsampling are not libjpeg's: its pixels differ
  from PIL's by a few levels (tests marked gpu state the tolerance).

Not bit-identical to PIL: PIL rounds to bytes between its horizontal and vertical passes and uses 22-bit fixed
point weights; torch does neither the same way. The stated tolerance (tests/test_preprocess_device.py) is at most
2 byte levels on a resized pixel, so at most 2 / 255 / std after normalisation, on well under 1% of pixels.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .errors import MixpertError

MODES = {Image.Resampling.BILINEAR: "bilinear", Image.Resampling.BICUBIC: "bicubic"}  # torch's antialiased modes


class DeviceResizer:
    """image (PIL RGB) -> its resized copies on `device`, antialiased as PIL's resize."""

    def __init__(self, device: str | torch.device, resample: int, exact_uint8: bool | None = None):
        from .errors import require_device

        require_device("--preprocess-device", device, "drop --preprocess-device (PIL on the host) or use cpu")
        self.device = torch.device(device)
        if int(resample) not in [int(m) for m in MODES]:
            raise MixpertError(f"device preprocessing supports the processor's resample = bilinear (2) or bicubic (3), "
                               f"not {int(resample)}; preprocess on the host (drop --preprocess-device)")
        self.mode = MODES[Image.Resampling(int(resample))]
        # torch's uint8 antialiased kernels exist on CPU only; elsewhere interpolate in float32 and round
        self.uint8 = (self.device.type == "cpu") if exact_uint8 is None else bool(exact_uint8)
        if self.uint8 and self.device.type != "cpu":
            raise MixpertError("uint8 interpolation runs on the CPU only")

    def image(self, image) -> torch.Tensor:
        """[1, 3, H, W] uint8 on the device, channels-last in memory (what the uint8 kernels vectorise). `image`: a
        PIL image, or a [3, H, W] uint8 tensor already decoded on the device."""
        if isinstance(image, torch.Tensor):
            return image.to(self.device)[None]
        x = torch.from_numpy(np.array(image))  # HWC uint8, decoded on the host (a writable copy: torch asks for one)
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        return x.permute(2, 0, 1)[None]

    def resize(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """[1, 3, H, W] uint8 -> [3, height, width] uint8, antialiased as PIL's resize is."""
        # PIL resizes one axis, rounds and clamps to bytes, then resizes the other; one axis a call here reproduces
        # that rounding. Which axis goes first changes the result where the rounded intermediate clips. Pillow 13
        # picks the order by a rule we could not recover from its source here; this one (vertical first when the
        # height shrinks more than the width) matched it on 85-96% of random size pairs (the rest differ only
        # where a pass overshoots, by at most about 20 levels on noise, far less on photographs).
        H, W = x.shape[-2:]
        if self.uint8 and not (height < H and height / H < width / W):
            return self._pass(x, height, width)[0]  # torch's uint8 kernels: horizontal, bytes, vertical, in one call
        if height < H and height / H < width / W:
            x = self._pass(x, height, W)
        if x.shape[-1] != width:
            x = self._pass(x, x.shape[-2], width)
        if x.shape[-2] != height:
            x = self._pass(x, height, width)
        return x[0]

    def _pass(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        f = torch.nn.functional.interpolate
        if self.uint8:  # channels-last in and out: torch's vectorised uint8 path (NCHW input takes a slow one)
            x = x.contiguous(memory_format=torch.channels_last)
            return f(x, size=(height, width), mode=self.mode, antialias=True).contiguous(memory_format=torch.channels_last)
        return f(x.float(), size=(height, width), mode=self.mode, antialias=True).round_().clamp_(0, 255).to(torch.uint8)


class DevicePixels:
    """preprocess.HostPixels' operations on a torch device (float interpolation, rounded to bytes as PIL's output
    is): the image is copied to the device once (or was decoded there), every resize and crop runs there, and a
    family's fast_rows returns a uint8 tensor on the device."""

    def __init__(self, resizer: DeviceResizer, image):
        self.resizer, self.device = resizer, resizer.device
        self.src = resizer.image(image)

    def resize(self, w: int, h: int) -> torch.Tensor:
        return self.resizer.resize(self.src, h, w).permute(1, 2, 0)

    def zeros(self, h: int, w: int) -> torch.Tensor:
        return torch.zeros((h, w, 3), dtype=torch.uint8, device=self.device)

    @staticmethod
    def stack(xs) -> torch.Tensor:
        return torch.stack(list(xs))

    @staticmethod
    def permute(x: torch.Tensor, axes) -> torch.Tensor:
        return x.permute(*axes)


JPEG_START, JPEG_END = b"\xff\xd8", b"\xff\xd9"


class DeviceDecoder:
    """Image files -> [3, H, W] uint8 tensors decoded on a CUDA device where the GPU decoder takes them (JPEG:
    `decode` is torchvision.io.decode_jpeg on the device, nvJPEG), else `host(src)`'s PIL image (preprocess.load_image:
    the host path, with its one-line errors; `max_pixels` its size limit). The host reads only the header (size limit, colour mode) and the last
    bytes (a truncated file goes to the host, which refuses it as it refuses every corrupt image)."""

    def __init__(self, device, decode, host, max_pixels: int, why: str = ""):
        self.device, self.decode, self.host, self.max_pixels, self.why = torch.device(device), decode, host, max_pixels, why
        self.counts = {"device": 0, "host": 0}

    @classmethod
    def for_device(cls, device, host, max_pixels: int) -> "DeviceDecoder | None":
        """The decoder for `device`: None on the CPU (PIL decodes there); on CUDA torchvision's nvJPEG decode_jpeg
        where it imports, else a decoder that sends every file to the host and says why."""
        device = torch.device(device)
        if device.type != "cuda":
            return None
        try:
            from torchvision.io import ImageReadMode, decode_jpeg
        except Exception as e:  # noqa: BLE001 - not installed, or a build that does not match torch
            return cls(device, None, host, max_pixels, f"torchvision.io.decode_jpeg unavailable ({type(e).__name__}): host decode")

        def decode(data: bytes) -> torch.Tensor:
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                               device=device)

        return cls(device, decode, host, max_pixels)

    def load(self, src):
        data = None
        if self.decode is not None and isinstance(src, (bytes, bytearray)):
            data = bytes(src)
        elif self.decode is not None and isinstance(src, (str, Path)) and Path(src).is_file():
            data = Path(src).read_bytes()
        x = self._on_device(data) if data is not None else None
        if x is None:
            self.counts["host"] += 1
            return self.host(src)
        self.counts["device"] += 1
        return x

    def _on_device(self, data: bytes):
        if not (data.startswith(JPEG_START) and data.rstrip(b"\x00").endswith(JPEG_END)):
            return None  # another format, or a truncated JPEG: the host decodes it (or refuses it in one line)
        try:
            with Image.open(io.BytesIO(data)) as head:  # the header only
                (w, h), mode = head.size, head.mode
        except Exception:  # noqa: BLE001 - PIL cannot read it: the host path names the problem
            return None
        if mode not in ("RGB", "L") or not 0 < w * h <= self.max_pixels:
            return None  # CMYK / YCCK and oversized images: the host's conversion and limits
        try:
            x = self.decode(data)
        except Exception:  # noqa: BLE001 - what nvJPEG refuses (progressive variants, odd subsampling)
            return None
        return x if tuple(x.shape) == (3, h, w) else None

    def describe(self) -> str:
        if self.decode is None:
            return self.why or "host (PIL)"
        return f"{self.device} (nvJPEG) for JPEG, host (PIL) otherwise; so far {self.counts}"
