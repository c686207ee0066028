"""ONNX export of each Mixpert part: what a part looks like (PartSpec, data) and how it is exported (one function).

Precision is decided here, in the graph: fp16/bf16 graphs keep LayerNorm in fp32 through explicit casts and
the router entirely in fp32, so strongly typed TensorRT networks take their precision from the ONNX types.
Whether an export is right is a separate step (validate.py).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn
from torch.nn import functional as F

from mixpert_train.errors import MixpertError
from mixpert_train.model import MixpertConfig, MixpertVision, PixelInput

from .contract import PartSpec  # the contract every exported part follows

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# fp32: TensorRT has no fp32 kernel for ONNX Attention (FACTS), so attention stays MatMul/Softmax (opset 18).
# fp16/bf16: opset 23 emits ONNX Attention and Gelu, fused by ONNX Runtime CUDA and TensorRT.
OPSET = {"fp32": 18, "fp16": 23, "bf16": 23}
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf's hard limit is 2 GiB; stay clear of it


# ---------------------------------------------------------------------------------------------
# Export wrappers: each takes exactly the spec's inputs, in order.
# ---------------------------------------------------------------------------------------------

class _FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 whatever the tensor's dtype (SigLIP loses accuracy in fp16 LayerNorm)."""

    def forward(self, x):
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class _PixelsIn(nn.Module):
    """uint8 pixels in, normalised inside the graph (model.PixelInput, fp32 values of transformers' processor),
    then cast to the part's precision."""

    def __init__(self, body: nn.Module, dtype, cfg: MixpertConfig):
        super().__init__()
        self.body, self.dtype = body, dtype
        self.pixels = PixelInput(cfg).to(next(body.parameters()).device)

    def forward(self, pixel_values, *rows):
        return self.body(self.pixels(pixel_values).to(self.dtype), *rows)


def lowered(model: MixpertVision, precision: str) -> MixpertVision:
    """A copy of the model in `precision` with LayerNorm and the router in fp32."""
    if precision == "fp32":
        return model
    m = copy.deepcopy(model).to(PRECISIONS[precision])
    for mod in m.modules():
        if type(mod) is nn.LayerNorm:
            mod.__class__ = _FP32LayerNorm
    m.router.float()
    return m.eval()


def part_module(model: MixpertVision, spec: PartSpec, precision: str) -> nn.Module:
    """The torch module whose forward is exactly this part's graph (model already lowered)."""
    from mixpert_train.model import Deepstack

    dtype = PRECISIONS[precision]
    wrap = Deepstack if [t.name for t in spec.outputs][1:] == ["deepstack"] else (lambda m: m)
    if spec.name == "trunk":
        return _PixelsIn(wrap(model.trunk), dtype, model.cfg)
    if spec.name == "router":
        return model.router
    if spec.name == "single_encoder":
        return _PixelsIn(wrap(model.single_encoder()), dtype, model.cfg)
    return wrap(model.experts[spec.name[len("expert_"):]])


def example_inputs(spec: PartSpec, cfg: MixpertConfig, precision: str, crops: int = 3) -> tuple:
    """Trace inputs: rows of two images (`crops` crops; patch families: two grids of different sizes with their
    per-row inputs). Sizes > 1 so no dynamic axis is specialised."""
    from mixpert_train.families import adapter_for
    from mixpert_train.model import pool_matrix

    bb = cfg.backbone
    ad = adapter_for(bb)
    counts, rows = [crops - 1, 1], {}
    if ad.rows != "crops":
        grids = ad.example_grids(bb)
        counts, rows = [t * h * w for t, h, w in grids], ad.row_inputs(bb, grids)
    out = []
    for t in spec.inputs:
        if t.name == "pool":
            out.append(torch.from_numpy(pool_matrix(counts)))
            continue
        if t.name in rows:
            out.append(torch.from_numpy(rows[t.name]))
            continue
        shape = [sum(counts) if d in ("crops", "patches") else d for d in t.shape]
        if t.dtype == "uint8":  # pixels: any byte
            out.append(torch.randint(0, 256, shape, dtype=torch.uint8))
            continue
        dtype = PRECISIONS[precision] if t.dtype != "float32" else torch.float32
        out.append(torch.randn(shape).to(dtype))
    return tuple(out)


def _by_signature(module: nn.Module, dynamic: tuple) -> tuple:
    """torch.export matches dynamic shapes to forward's parameters: inputs past the named ones go to its *rows
    as one tuple (the per-row inputs of patch families; empty for crop families)."""
    import inspect

    params = list(inspect.signature(module.forward).parameters.values())
    if not params or params[-1].kind is not inspect.Parameter.VAR_POSITIONAL:
        return dynamic
    n = len(params) - 1
    return tuple(dynamic[:n]) + ((tuple(dynamic[n:]),) if len(dynamic) > n else ())


def _quiet():
    """The dynamo exporter prints its stages and warns about torchvision; keep the progress bar readable."""
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    return stack


def _trace(module: nn.Module, spec: PartSpec, cfg: MixpertConfig, precision: str, max_crops: int):
    """torch.export + translation of one part, not yet optimised (torch.onnx's ONNXProgram)."""
    from mixpert_train.families import adapter_for

    args = example_inputs(spec, cfg, precision)
    merge = adapter_for(cfg.backbone).io(cfg.backbone)["merge"]
    crops = torch.export.Dim("crops", min=1, max=max_crops)
    images = torch.export.Dim("images", min=1, max=max_crops)
    merged = torch.export.Dim("merged", min=1, max=max(1, max_crops // merge))
    dims = {"crops": crops, "images": images, "patches": merge * merged}  # a call's patches: whole merge windows
    dynamic = tuple({i: dims[d] for i, d in enumerate(t.shape) if isinstance(d, str)} for t in spec.inputs)
    with _quiet(), torch.no_grad():
        return torch.onnx.export(
            module, args, dynamo=True, opset_version=OPSET[precision],
            input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
            dynamic_shapes=_by_signature(module, dynamic), optimize=False, verbose=False,
        )


def _with_weights(template, module: nn.Module, spec: PartSpec):
    """`template` (an unoptimised expert graph) carrying `module`'s weights, optimised: what exporting `module`
    itself gives, without tracing it again. The experts share one architecture, so their graphs differ only in
    their initializers; the optimiser (constant folding, deduplication) then runs on the real weights."""
    import onnx_ir as ir

    weights = module.state_dict()
    named = set(template.model.graph.initializers)
    if not set(weights) <= named:
        raise MixpertError(f"ONNX export of {spec.name}: weights {sorted(set(weights) - named)[:3]} are not in the "
                           "shared expert graph; the experts' architectures differ")
    with _quiet():
        template.apply_weights(weights)
        prog = torch.onnx.ONNXProgram(ir.from_proto(template.model_proto), None)  # a copy: optimize() works in place
        prog.optimize()
    return prog


def export_part(model: MixpertVision, spec: PartSpec, out_dir: Path, precision: str, max_crops: int,
                shared: dict | None = None) -> list[Path]:
    """Export one part of an already-lowered model to out_dir/spec.file (+ .data when large).
    `shared`: a dict the caller keeps across the parts of one bundle; the experts are traced once into it and
    every expert's graph is that trace with its own weights. Returns the files written. Raises MixpertError
    naming the part on failure."""
    module = part_module(model, spec, precision).eval()
    path = out_dir / spec.file
    tmp = out_dir / f".{spec.file}.export"
    try:
        if spec.name.startswith("expert_") and shared is not None:
            if "expert" not in shared:
                shared["expert"] = _trace(module, spec, model.cfg, precision, max_crops)
            prog = _with_weights(shared["expert"], module, spec)
        else:
            prog = _trace(module, spec, model.cfg, precision, max_crops)
            with _quiet():
                prog.optimize()
        proto = prog.model_proto
    except MixpertError:
        raise
    except Exception as e:  # the exporter raises many types; name the part and keep one line
        raise MixpertError(f"ONNX export of {spec.name} failed: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
    _rename_dynamic_axes(proto, spec)
    large = _byte_size(proto) > EXTERNAL_DATA_BYTES
    data_name = f"{spec.file}.data"
    if large:
        onnx.save_model(proto, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        os.replace(tmp.parent / data_name, out_dir / data_name)
    else:
        onnx.save_model(proto, str(tmp))
    onnx.checker.check_model(str(tmp), full_check=False)
    onnx.shape_inference.infer_shapes_path(str(tmp), str(tmp))
    os.replace(tmp, path)
    return [path] + ([out_dir / data_name] if large else [])


def _byte_size(proto) -> float:
    try:
        return proto.ByteSize()
    except Exception:  # past 2 GiB protobuf refuses to serialise, let alone count
        return float("inf")


def _rename_dynamic_axes(proto, spec: PartSpec):
    """Name the graph's dynamic axes after the spec ('crops', 'images'), not the exporter's s0, s1."""
    for vi, t in zip(list(proto.graph.input) + list(proto.graph.output), spec.inputs + spec.outputs):
        for dim, want in zip(vi.type.tensor_type.shape.dim, t.shape):
            if isinstance(want, str):
                dim.dim_param = want
            elif not dim.HasField("dim_value") or dim.dim_value != want:
                raise MixpertError(f"ONNX export of {spec.name}: {t.name} has shape "
                                   f"{[d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]}, "
                                   f"expected {list(t.shape)}")


def onnx_io(path: Path) -> dict:
    """Input and output names, shapes and dtypes as the ONNX file declares them (for the manifest checks)."""
    m = onnx.load(str(path), load_external_data=False)

    def desc(vi):
        tt = vi.type.tensor_type
        return {"name": vi.name, "shape": [d.dim_param or d.dim_value for d in tt.shape.dim],
                "dtype": onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name if tt.elem_type != onnx.TensorProto.BFLOAT16 else "bfloat16"}

    return {"inputs": [desc(v) for v in m.graph.input], "outputs": [desc(v) for v in m.graph.output]}
