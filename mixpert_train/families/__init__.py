"""MLLM families: one module each (llava_ov: SigLIP + LLaVA's projector and anyres; internvl: InternViT + pixel
shuffle + its MLP projector and dynamic tiles; qwen2_vl: Qwen2-VL's ViT over patches of any resolution + its patch
merger; qwen2_5_vl: Qwen2.5-VL's, the same rows with windowed attention; qwen3_vl: Qwen3-VL's, learned positions
and DeepStack), and the registry the split (model.py), the weight loader
(weights.py) and preprocessing look a backbone's family up in.

Never imports mixpert_export, a runtime library (onnx, onnxruntime, TensorRT) or a training stage; a family
module imports only backbones.py and errors.py.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..backbones import Adapter, Backbone
from ..errors import MixpertError
from .internvl import InternVitAdapter
from .llava_ov import SiglipAdapter
from .qwen2_5_vl import Qwen25VitAdapter
from .qwen2_vl import Qwen2VitAdapter
from .qwen3_vl import Qwen3VitAdapter

ADAPTERS: dict[str, Adapter] = {"siglip": SiglipAdapter(), "internvit": InternVitAdapter(), "qwen2vit": Qwen2VitAdapter(),
                                "qwen25vit": Qwen25VitAdapter(), "qwen3vit": Qwen3VitAdapter()}
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")  # what transformers' from_pretrained reads


def adapter_for(bb: Backbone) -> Adapter:
    try:
        return ADAPTERS[bb.family]
    except KeyError:
        raise MixpertError(f"backbone {bb.name}: no adapter for family {bb.family!r}") from None


def adapter_for_config(config: dict, source: str) -> Adapter:
    """The family whose MLLMs have this config.json's model_type, or a one-line refusal naming what is supported."""
    kind = config.get("model_type")
    for ad in ADAPTERS.values():
        if kind in ad.config_types:
            return ad
    known = sorted(t for ad in ADAPTERS.values() for t in ad.config_types)
    raise MixpertError(f"{source}: model_type {kind!r} is not a supported MLLM (supported: {', '.join(known)}); "
                       "pass --weights a snapshot of one of those")


def processor_from_snapshot(snapshot: str | Path, ad: Adapter) -> tuple[dict | None, str | None]:
    """(the snapshot's image-processor config as transformers saved it, its file), or (None, None) when the
    snapshot has none. Refuses one of another family or one that cannot be parsed, naming the file."""
    for fname in PROCESSOR_FILES:
        f = Path(snapshot) / fname
        if not f.is_file():
            continue
        try:
            d = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise MixpertError(f"{f}: not valid JSON ({e}); re-save the snapshot's processor") from None
        if fname == "processor_config.json":  # a whole processor: the image part is nested
            d = d.get("image_processor")
            if not isinstance(d, dict):
                continue
        kind = str(d.get("image_processor_type", ad.processor_types[0]))
        if not kind.startswith(ad.processor_types):
            raise MixpertError(f"{f}: image processor {kind!r} is not one of {ad.family}'s "
                               f"({', '.join(ad.processor_types)}); this snapshot is another family")
        return d, str(f)
    return None, None
