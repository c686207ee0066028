"""The one interface every runtime implements: load a bundle, infer one part, describe itself.

Arrays stay in the backend's own type (numpy on CPU, torch CUDA tensors on a GPU) between parts; the
pipeline only indexes them and asks for the router scores on the host.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np


class Backend(ABC):
    name: str = "?"

    @property
    def serial(self) -> bool:
        """True when calls share preallocated buffers (the static / CUDA-graph path): the pipeline then runs
        one call at a time."""
        return getattr(self, "static", None) is not None

    @abstractmethod
    def load(self, bundle: Path, manifest: dict) -> "Backend":
        """Open every part of the bundle; raise MixpertError naming the file when it cannot."""

    @abstractmethod
    def infer(self, part: str, feeds: dict) -> dict:
        """Run one part ('trunk', 'router', 'expert_<name>', 'single_encoder') on named inputs."""

    @abstractmethod
    def describe(self) -> dict:
        """Runtime, version, device and precision, for reports."""

    def from_host(self, x):
        """Crops as this backend's input type: a host array stays one (identity on CPU); a torch tensor from
        device preprocessing (preprocess_device.py) is brought to the host here, or kept on the device by
        backends that take device tensors."""
        return x if isinstance(x, np.ndarray) else x.detach().cpu().numpy()

    def to_host(self, x) -> np.ndarray:
        return np.asarray(x)

    def take(self, x, index: np.ndarray):
        """Rows `index` of x (an expert's group of crops), without leaving the device."""
        return x[index]

    def run_experts(self, hidden, groups: list, n: int, rows: dict | None = None, merge: int = 1) -> np.ndarray:
        """Each (part, row indices) group through its expert, once; tokens [n / merge, ...] on the host in row order.
        `rows`: per-row inputs (patch families), gathered with the group; `merge`: input rows an output row takes
        (an image's rows are contiguous and a multiple of it). This default gathers, infers and scatters group
        after group; a backend may do all of it on the device."""
        return self.run_expert_outputs(hidden, groups, n, rows, merge)["tokens"]

    def run_expert_outputs(self, hidden, groups: list, n: int, rows: dict | None = None, merge: int = 1) -> dict:
        """run_experts for every output of the experts (tokens, and Qwen3-VL's deepstack where the experts run
        DeepStack taps): {name: [n / merge, ...] on the host, in row order}."""
        out: dict = {}
        for part, idx in groups:
            feeds = {"hidden": self.take(hidden, idx)} | {k: self.take(v, idx) for k, v in (rows or {}).items()}
            for name, value in self.infer(part, feeds).items():
                group = self.to_host(value)
                if name not in out:
                    out[name] = np.empty((n // merge,) + group.shape[1:], dtype=group.dtype)
                out[name][idx[::merge] // merge] = group
        return out

    def synchronize(self) -> None:
        """Wait for queued device work (timing); nothing to wait for on CPU."""

