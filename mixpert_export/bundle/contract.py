"""The bundle's contract: what every part takes and gives (names, dtypes, shapes with named dynamic axes), as data.

The exporter (onnx_export.py) writes graphs that follow it, validation feeds them by it, the manifest records it
per part, and every runtime (backends, the static CUDA path, Triton's configs) reads it; none of them defines it
again. Pixels are uint8 bytes (the graph normalises them, model.PixelInput); hidden and tokens are in the bundle's
precision; the router's pool and scores are float32; patch families add their per-row int64 inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

from mixpert_train.model import MixpertConfig

ONNX_DTYPE = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # hidden and tokens per precision


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple  # ints, or axis names for dynamic axes ("crops", "images")
    dtype: str  # numpy-style name: uint8 (pixels), int64 (per-row inputs), float32, float16, bfloat16

    def to_dict(self):
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class PartSpec:
    name: str  # trunk | router | expert_<name> | single_encoder
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"


def part_specs(cfg: MixpertConfig, precision: str, with_baseline: bool = True) -> list[PartSpec]:
    """The I/O contract of every part, from the family's io(): pixels (uint8 bytes, normalised in the graph),
    router I/O and per-row inputs (patch families' positions and image ids) as they are, hidden and tokens in
    `precision`. The leading axis is 'crops'
    (fixed-size crops) or 'patches' (Qwen2-VL's dynamic resolution, whose experts give 'merged' rows). A part that
    runs DeepStack taps (Qwen3-VL) gives `deepstack` [merged, its taps, D_llm] after its main output."""
    from mixpert_train.families import adapter_for

    bb, dt = cfg.backbone, ONNX_DTYPE[precision]
    ad = adapter_for(bb)
    io = ad.io(bb)
    pixels = TensorSpec("pixel_values", *io["pixels"])
    rows = tuple(TensorSpec(*r) for r in io["rows"])
    hidden = TensorSpec("hidden", io["hidden"], dt)
    tokens = TensorSpec("tokens", io["tokens"], dt)
    unit = io["hidden"][0]
    taps = ad.taps(bb)  # DeepStack (Qwen3-VL): each tap's merger output, from the part that runs its layer

    def deepstack(layers) -> tuple:
        n = sum(t in layers for t in taps)
        return (TensorSpec("deepstack", (io["tokens"][0], n, bb.llm_hidden_size), dt),) if n else ()

    specs = [
        PartSpec("trunk", (pixels,) + rows, (hidden,) + deepstack(cfg.trunk_layers)),
        PartSpec("router", (hidden, TensorSpec("pool", ("images", unit), "float32")),
                 (TensorSpec("scores", ("images", len(cfg.domains)), "float32"),)),
    ]
    specs += [PartSpec(f"expert_{e}", (hidden,) + rows, (tokens,) + deepstack(cfg.expert_layer_range)) for e in cfg.experts]
    if with_baseline:
        specs.append(PartSpec("single_encoder", (pixels,) + rows, (tokens,) + deepstack(range(bb.layers_in_use))))
    return specs
