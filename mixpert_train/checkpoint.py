"""The Mixpert checkpoint directory: mixpert.json + trunk / router / expert_<name> safetensors.

What mixpert_train writes and mixpert_export reads. Written to a temporary sibling, then renamed, so a
crash never leaves a directory that loads.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import __version__
from .errors import MixpertError
from .model import MixpertConfig, MixpertVision, build_model
from .staging import Output, staged_dir

FORMAT = "mixpert-checkpoint"
FORMAT_VERSION = 1
META = "mixpert.json"
CHECKPOINT = Output("Mixpert checkpoint", META, FORMAT)


def part_files(cfg: MixpertConfig) -> dict[str, str]:
    """part name -> file name: 'trunk', 'router', 'expert_<name>' for every expert, then 'packing'."""
    files = {"trunk": "trunk.safetensors", "router": "router.safetensors"}
    files |= {f"expert_{e}": f"expert_{e}.safetensors" for e in cfg.experts}
    return files | {"packing": "packing.safetensors"}  # image_newline: what the LLM side adds (model.Packing)


def _module(model: MixpertVision, part: str) -> torch.nn.Module:
    if part.startswith("expert_"):
        return model.experts[part[len("expert_"):]]
    return getattr(model, part)


def tool_versions() -> dict:
    import transformers

    return {"mixpert": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def save_checkpoint(model: MixpertVision, out: str | Path, extra: dict | None = None) -> Path:
    out = Path(out)
    cfg = model.cfg
    with staged_dir(out, CHECKPOINT) as tmp:
        files = part_files(cfg)
        for part, fname in files.items():
            sd = {k: v.detach().contiguous().cpu() for k, v in _module(model, part).state_dict().items()}
            save_file(sd, str(tmp / fname), metadata={"format": "pt", "part": part})
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **cfg.to_dict(), "parts": files,
                "versions": tool_versions(), **({"extra": extra} if extra else {})}
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def read_versioned_json(path: Path, fmt: str, version: int, missing: str, fix) -> dict:
    """A JSON file carrying {"format", "format_version"}; every failure a one-line error naming the file.
    `missing` says what the directory should have been; `fix(data)` says how to rewrite the file."""
    if not path.is_file():
        raise MixpertError(f"{path}: missing; {missing}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MixpertError(f"{path}: not valid JSON ({e}); {fix({})}") from None
    if data.get("format") != fmt or data.get("format_version") != version:
        raise MixpertError(f"{path}: format {data.get('format')!r} version {data.get('format_version')!r} is not "
                           f"{fmt!r} version {version}; {fix(data)}")
    return data


def read_checkpoint_meta(path: str | Path) -> dict:
    return read_versioned_json(Path(path) / META, FORMAT, FORMAT_VERSION,
                               "--checkpoint must be a directory written by mixpert_train",
                               lambda _: f"re-save it with this mixpert_train ({__version__})")


def _packing_from_joint(model: MixpertVision, path: Path, meta: dict) -> None:
    """image_newline for a checkpoint from before it carried one: from the joint snapshot it was trained from."""
    from .weights import _open, _shard_map

    joint = meta.get("extra", {}).get("joint")
    keys = ("model.image_newline", "image_newline")
    if joint and Path(joint).is_dir():
        for key, shard in _shard_map(Path(joint)).items():
            if key in keys:
                with _open(shard) as f:
                    model.packing.image_newline.data.copy_(f.get_tensor(key))
                return
    raise MixpertError(f"{path / META}: no packing part (image_newline) and no joint snapshot that has one; "
                       "re-run the stage that wrote this checkpoint")


def load_checkpoint(path: str | Path, device: str = "cpu") -> MixpertVision:
    path = Path(path)
    meta = read_checkpoint_meta(path)
    try:
        cfg = MixpertConfig.from_dict(meta)
    except (KeyError, TypeError, ValueError) as e:
        raise MixpertError(f"{path / META}: incomplete model description ({e}); re-save the checkpoint") from None
    except MixpertError as e:
        raise MixpertError(f"{path / META}: invalid model description ({e}); re-save the checkpoint") from None
    model = build_model(cfg, device=device)
    for part, fname in part_files(cfg).items():
        f = path / fname
        if part == "packing" and not f.is_file() and "packing" not in meta.get("parts", {}):
            _packing_from_joint(model, path, meta)  # a checkpoint written before packing was part of it
            continue
        if not f.is_file():
            raise MixpertError(f"{f}: missing part {part!r}; the checkpoint is incomplete, re-run the stage that wrote it")
        try:
            sd = load_file(str(f), device=str(device))
        except (SafetensorError, OSError, ValueError) as e:
            raise MixpertError(f"{f}: corrupt safetensors ({e}); re-run the stage that wrote it") from None
        try:
            _module(model, part).load_state_dict(sd, strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise MixpertError(f"{f}: does not fit {part} of {cfg.backbone.name} k={cfg.expert_layers} "
                               f"({first[1].strip() if len(first) > 1 else first[0]})") from None
    return model.eval()
