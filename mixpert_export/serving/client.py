"""A small gRPC client for the `mixpert` model (PyTriton serve or the model repository's Python model):
one encoded image in, tokens / expert / scores out; every failure is one MixpertError line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mixpert_train.errors import MixpertError

from .serve import INPUT, MODEL, OUTPUTS, PACKED_OUTPUTS


@dataclass
class Encoded:
    tokens: np.ndarray | None  # [n_crops, T, D_llm]; None from a `serve --packed` server
    expert: str
    scores: np.ndarray  # [n_domains]
    crops: int
    embeddings: np.ndarray | None = None  # [L, D_llm] from a `serve --packed` server
    deepstack: np.ndarray | None = None  # [taps, L, D_llm]: Qwen3-VL's DeepStack features


class MixpertClient:
    def __init__(self, url: str = "127.0.0.1:8001", model: str = MODEL, timeout_s: float = 60.0):
        import tritonclient.grpc as grpcclient

        self._grpc = grpcclient
        self.url, self.model, self.timeout_s = url, model, timeout_s
        self.client = grpcclient.InferenceServerClient(url)
        self._outputs = None  # the model's output names, read once from its metadata

    def outputs(self) -> tuple:
        if self._outputs is None:
            names = {o.name for o in self.client.get_model_metadata(self.model).outputs}
            self._outputs = (PACKED_OUTPUTS if "embeddings" in names else OUTPUTS) + \
                (("deepstack",) if "deepstack" in names else ())
        return self._outputs

    def ready(self) -> bool:
        try:
            return self.client.is_server_ready() and self.client.is_model_ready(self.model)
        except Exception:  # unreachable is "not ready"
            return False

    def infer(self, image) -> Encoded:
        """image: encoded bytes (PNG, JPEG, ...) or a path."""
        from tritonclient.utils import InferenceServerException

        data = Path(image).read_bytes() if isinstance(image, (str, Path)) else bytes(image)
        x = self._grpc.InferInput(INPUT, [1, 1], "BYTES")
        x.set_data_from_numpy(np.array([[data]], dtype=object))
        try:
            r = self.client.infer(self.model, [x], outputs=[self._grpc.InferRequestedOutput(n) for n in self.outputs()],
                                  client_timeout=self.timeout_s)
        except InferenceServerException as e:
            status = e.status() or ""
            if "UNAVAILABLE" in status or "DEADLINE" in status:
                raise MixpertError(f"{self.url}: Triton server unreachable ({status}); is `python -m mixpert_export "
                                   f"serve` running there?") from None
            raise MixpertError(f"{self.url}: {(e.message() or str(e)).splitlines()[0]}") from None
        error = r.as_numpy("error")
        if error is not None and error.reshape(-1)[0]:
            raise MixpertError(error.reshape(-1)[0].decode())
        packed = "embeddings" in self.outputs()
        first = r.as_numpy("embeddings" if packed else "tokens")[0]
        return Encoded(tokens=None if packed else first, expert=r.as_numpy("expert").reshape(-1)[0].decode(),
                       scores=r.as_numpy("scores")[0], crops=int(r.as_numpy("crops").reshape(-1)[0]),
                       embeddings=first if packed else None,
                       deepstack=r.as_numpy("deepstack")[0] if "deepstack" in self.outputs() else None)

    def close(self):
        self.client.close()
