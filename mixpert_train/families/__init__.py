"""Tower families: one module each (llava_ov: SigLIP + LLaVA's projector config), and the adapter registry the
split (model.py) and the weight loader (weights.py) look a backbone's family up in.

Never imports mixpert_export, a runtime library (onnx, onnxruntime, TensorRT) or a training stage; a family
module imports only backbones.py and errors.py.
"""

from __future__ import annotations

from ..backbones import Adapter, Backbone
from ..errors import MixpertError
from .llava_ov import SiglipAdapter

ADAPTERS: dict[str, Adapter] = {"siglip": SiglipAdapter()}


def adapter_for(bb: Backbone) -> Adapter:
    try:
        return ADAPTERS[bb.family]
    except KeyError:
        raise MixpertError(f"backbone {bb.name}: no adapter for family {bb.family!r}") from None
