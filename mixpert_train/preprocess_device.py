"""Resizing and normalising on a torch device: each family's fast geometry (Adapter.fast_rows) with torch's
antialiased interpolation in place of PIL's resize; decoding stays on the host.

- CPU: torch's uint8 antialiased kernels (vectorised, Pillow's separable filters with the same a=-0.5 cubic),
  several times faster than PIL's resize per core; the crops are then normalised by Preprocessor's own lookup
  table, as on the PIL path.
- CUDA (or `exact_uint8=False`): float32 interpolation of the uint8 image, rounded and clamped back to bytes as
  PIL's output is, then the same lookup table as a gather on the device; crops come back as a device tensor so
  the backend never copies them through the host.

Not bit-identical to PIL: PIL rounds to bytes between its horizontal and vertical passes and uses 22-bit fixed
point weights; torch does neither the same way. The stated tolerance (tests/test_preprocess_device.py) is at most
2 byte levels on a resized pixel, so at most 2 / 255 / std after normalisation, on well under 1% of pixels.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .errors import MixpertError

MODES = {Image.Resampling.BILINEAR: "bilinear", Image.Resampling.BICUBIC: "bicubic"}  # torch's antialiased modes


class DeviceResizer:
    """image (PIL RGB) -> its resized copies on `device`, antialiased as PIL's resize."""

    def __init__(self, device: str | torch.device, resample: int, exact_uint8: bool | None = None):
        self.device = torch.device(device)
        if int(resample) not in [int(m) for m in MODES]:
            raise MixpertError(f"device preprocessing supports the processor's resample = bilinear (2) or bicubic (3), "
                               f"not {int(resample)}; preprocess on the host (drop --preprocess-device)")
        self.mode = MODES[Image.Resampling(int(resample))]
        # torch's uint8 antialiased kernels exist on CPU only; elsewhere interpolate in float32 and round
        self.uint8 = (self.device.type == "cpu") if exact_uint8 is None else bool(exact_uint8)
        if self.uint8 and self.device.type != "cpu":
            raise MixpertError("uint8 interpolation runs on the CPU only")

    def image(self, image: Image.Image) -> torch.Tensor:
        """[1, 3, H, W] uint8 on the device, channels-last in memory (what the uint8 kernels vectorise)."""
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
    is): the image is copied to the device once, every resize, crop and the table lookup run there, and a family's
    fast_rows returns a tensor on the device."""

    def __init__(self, resizer: DeviceResizer, image: Image.Image, lut: np.ndarray):
        self.resizer, self.device = resizer, resizer.device
        self.src = resizer.image(image)
        self.table = torch.as_tensor(lut, device=self.device)

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

    @staticmethod
    def repeat(x: torch.Tensor, n: int, axis: int) -> torch.Tensor:
        return x.repeat_interleave(n, dim=axis)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 with channels on axis 1 -> float32 through the table, as one gather on the device."""
        c = x.shape[1]
        offsets = (torch.arange(c, device=self.device) * self.table.shape[1]).view(1, c, *[1] * (x.dim() - 2))
        return self.table.view(-1)[x.long() + offsets].contiguous()
