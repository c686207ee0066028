"""The Qwen-VL generations against transformers' own model and the Qwen2-VL image processor of a tiny snapshot saved
by save_pretrained (the independent reference): Qwen2-VL (issue 16), Qwen2.5-VL (issue 29: the same rows, RMSNorm +
SwiGLU blocks attending within windows except at fullatt_block_indexes) and Qwen3-VL (issue 29: 16 px patches, a
learned position table resampled per grid, DeepStack features from intermediate blocks). Native dynamic resolution, a
variable number of patches an image, all images of a call one packed sequence. Every test runs for each generation
(the `qwen` fixture's params)."""

import numpy as np
import pytest
import torch
from PIL import Image

from mixpert_train.backbones import get_backbone
from mixpert_train.errors import MixpertError
from mixpert_train.model import VERSATILE
from mixpert_train.weights import backbone_from_snapshot, model_from_snapshot

# (w, h): 4 to 256 patches at 8 px, tiny ones resized up (min_pixels), large ones down (max_pixels), extreme aspects
SIZES = [(64, 64), (100, 300), (300, 100), (257, 129), (500, 380), (9, 5), (40, 170)]
MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.3, 0.25)


# model_type -> (the tiny registry entry, transformers' config and model classes)
KINDS = {"qwen2_vl": "tiny-qwen2-vl", "qwen2_5_vl": "tiny-qwen2.5-vl", "qwen3_vl": "tiny-qwen3-vl"}


def _classes(kind):
    import transformers

    prefix = {"qwen2_vl": "Qwen2VL", "qwen2_5_vl": "Qwen2_5_VL", "qwen3_vl": "Qwen3VL"}[kind]
    return getattr(transformers, prefix + "Config"), getattr(transformers, prefix + "ForConditionalGeneration")


def make_qwen2_vl(seed=0, image_token_id=5, kind="qwen2_vl"):
    """A tiny transformers Qwen2-VL / Qwen2.5-VL (the tiny entry's ViT, a 2-layer LLM), every weight random and away
    from init."""
    config_cls, model_cls = _classes(kind)
    bb = get_backbone(KINDS[kind])
    cfg = config_cls(
        vision_config=dict(bb.vision, model_type=f"{kind}_vision"),
        text_config=dict(model_type=f"{kind}_text", hidden_size=bb.llm_hidden_size, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                         max_position_embeddings=4096, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                        "mrope_section": [4, 6, 6]},
                         **({"head_dim": 32} if kind == "qwen3_vl" else {})),
        image_token_id=image_token_id, video_token_id=image_token_id + 1, vision_start_token_id=image_token_id + 2,
    )
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ("norm" in name or "ln_q" in name) and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
            if name.startswith("model.visual.deepstack_merger_list.") and ".linear_fc2." in name:
                p.mul_(20.0)  # DeepStack features large enough to change the tiny LLM's answers (test_ask_...)
    return model


def save_snapshot(model, path, mean=MEAN, std=STD, pixels=(16 * 16, 128 * 128)):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    model.save_pretrained(path, max_shard_size="200KB")  # sharded: the loader opens only the vision shards
    Qwen2VLImageProcessorPil(size={"shortest_edge": pixels[0], "longest_edge": pixels[1]}, patch_size=8,
                             temporal_patch_size=2, merge_size=2, image_mean=list(mean),
                             image_std=list(std)).save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=sorted(KINDS))
def qwen(request, tmp_path_factory):
    """(transformers' model, its snapshot, the registry entry), for each generation."""
    model = make_qwen2_vl(kind=request.param)
    return model, save_snapshot(model, tmp_path_factory.mktemp(request.param)), KINDS[request.param]


def _images(sizes=SIZES, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def reference(model, snap, images, deepstack=False):
    """transformers' processor from the snapshot and the model's own image features, one tensor an image;
    deepstack=True: also Qwen3-VL's DeepStack features, one [taps, tokens, D_llm] an image (None for the others)."""
    from transformers import AutoImageProcessor

    proc = AutoImageProcessor.from_pretrained(snap)
    inputs = proc(images=images, return_tensors="pt")
    with torch.no_grad():
        out = model.model.get_image_features(pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])
    want = [f.numpy() for f in out.pooler_output]
    if not deepstack:
        return inputs, want
    taps = getattr(out, "deepstack_features", None)
    deep = [np.stack([t[i].numpy() for t in taps]) for i in range(len(images))] if taps else [None] * len(images)
    return inputs, want, deep


def assert_deepstack(got, want, tol):
    """The DeepStack features of one image (None for the generations without) within `tol` of transformers',
    relative to their largest magnitude where it is above 1 (the tiny model's DeepStack mergers are scaled up to
    reach 20-60, where float32's own spacing is 2-4e-6 and summation order alone moves values by 1e-5)."""
    if want is None:
        assert got is None
        return
    scale = max(1.0, float(np.abs(want).max()))
    assert got is not None and got.shape == want.shape and np.abs(got - want).max() <= tol * scale, \
        (None if got is None else (got.shape, want.shape, float(np.abs(got - want).max()), scale))


def test_preprocessing_is_transformers_processor_from_the_snapshot(qwen):
    """Patches and grids from the snapshot's own processor config (non-default mean/std, pixel bounds): equal to
    transformers' processor from_pretrained(snapshot), bit for bit, image by image."""
    from transformers import AutoImageProcessor

    from mixpert_train.preprocess import Preprocessor

    _, snap, name = qwen
    bb = backbone_from_snapshot(snap, name)
    assert bb.image_mean == MEAN and bb.image_std == STD and bb.pixels == (256, 16384)
    pre, proc = Preprocessor(bb), AutoImageProcessor.from_pretrained(snap)
    grids = set()
    for img in _images():
        rows, size, grid = pre.prepare(img)  # the engines' uint8 bytes, and what the table makes of them
        ref = proc(images=[img], return_tensors="np")
        px = pre.normalize(rows)
        assert rows.dtype == np.uint8 and px.dtype == np.float32 and np.array_equal(px, ref["pixel_values"]), img.size
        assert tuple(grid) == tuple(ref["image_grid_thw"][0]) and size == (img.height, img.width)
        grids.add(tuple(grid))
    assert len(grids) == len(SIZES)  # every size its own grid: a variable patch count


@pytest.mark.parametrize("k", [0, 2, 6])
def test_golden_versatile_equals_transformers_image_features(qwen, k):
    """Everything routed to versatile: trunk + versatile expert on the packed patches of several images of
    different sizes in one call == the model's get_image_features, image by image, <= 1e-5 (torch)."""
    from mixpert_train.families import adapter_for

    model, snap, name = qwen
    mix = model_from_snapshot(snap, name, expert_layers=k)
    inputs, want, want_deep = reference(model, snap, _images(), deepstack=True)
    bb = mix.cfg.backbone
    rows = adapter_for(bb).row_inputs(bb, inputs["image_grid_thw"].numpy())
    rows = [torch.from_numpy(rows[n]) for n, _, _ in adapter_for(bb).io(bb)["rows"]]
    with torch.no_grad():
        hidden, deep = mix.trunk.features(inputs["pixel_values"], *rows)
        tokens, more = mix.experts[VERSATILE].features(hidden, *rows)
    taps = adapter_for(bb).taps(bb)
    assert len(deep) == sum(t < bb.layers_in_use - k for t in taps) and len(deep) + len(more) == len(taps)
    split = np.cumsum([len(w) for w in want])[:-1]
    got = np.split(tokens.numpy(), split)
    deep = np.split(torch.stack(deep + more).numpy(), split, axis=1) if taps else [None] * len(want)
    for g, w, d, wd in zip(got, want, deep, want_deep):
        assert g.shape == w.shape and np.abs(g - w).max() <= 1e-5, (k, g.shape, np.abs(g - w).max())
        assert_deepstack(d, wd, 1e-5)


def test_refusals(qwen, tmp_path):
    """A Qwen2-VL snapshot with another family's --backbone, and the reverse, are refused in one line."""
    _, snap, name = qwen
    kind = next(k for k, v in KINDS.items() if v == name)
    with pytest.raises(MixpertError, match=f"{kind}.*--backbone tiny-internvl") as e:
        backbone_from_snapshot(snap, "tiny-internvl")
    assert "\n" not in str(e.value)


def test_snapshot_of_another_family_is_refused(qwen, tiny_snapshot):
    _, snap, name = qwen
    kind = next(k for k, v in KINDS.items() if v == name)
    tower = get_backbone(name).family
    with pytest.raises(MixpertError, match=rf"{kind} snapshot \({tower} tower\), but --backbone tiny takes the siglip") as e:
        backbone_from_snapshot(snap, "tiny")
    assert "\n" not in str(e.value)
    other = "tiny-qwen2.5-vl" if kind == "qwen2_vl" else "tiny-qwen2-vl"  # the other generation: another tower
    with pytest.raises(MixpertError, match=rf"{kind} snapshot \({tower} tower\), but --backbone {other}"):
        backbone_from_snapshot(snap, other)
    with pytest.raises(MixpertError, match=r"llava_onevision snapshot \(siglip tower\), but --backbone qwen2-vl-7b"):
        backbone_from_snapshot(tiny_snapshot, "qwen2-vl-7b")


def test_language_model_shards_are_never_opened(qwen, tmp_path):
    import json
    import shutil

    _, src, name = qwen
    snap = tmp_path / "s"
    shutil.copytree(src, snap)
    index = json.loads((snap / "model.safetensors.index.json").read_text())
    vision = {v for k, v in index["weight_map"].items() if k.startswith(("model.visual.", "visual."))}
    lm_only = sorted(set(index["weight_map"].values()) - vision)
    assert lm_only
    for shard in lm_only:
        (snap / shard).write_bytes(b"0123456789")
    model_from_snapshot(snap, name)  # opens only the vision shards


@pytest.mark.parametrize("entry", ["qwen2-vl-7b", "qwen2.5-vl-7b", "qwen3-vl-8b"])
def test_real_scale_entry_matches_transformers(entry):
    """The 7B / 8B ViT and merger (Qwen3-VL: and its DeepStack mergers, the trunk's at k = 2) as transformers
    builds them (meta device), and the Table 6 view."""
    import transformers
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    from mixpert_train.model import MixpertConfig, build_model, parameter_report

    bb = get_backbone(entry)
    cfg = MixpertConfig.for_backbone(bb)
    d = bb.hidden_size
    assert (d, bb.tower_layers, bb.layers_in_use, bb.max_crops) == {
        "qwen3-vl-8b": (1152, 27, 27, 65536)}.get(entry, (1280, 32, 32, 5120))
    assert cfg.domains == ("chart", "doc", "general") and cfg.expert_layers == 2
    tower_cls, config_cls = {"qwen2-vl-7b": (Qwen2VisionTransformerPretrainedModel, transformers.Qwen2VLVisionConfig),
                             "qwen2.5-vl-7b": (Qwen2_5_VisionTransformerPretrainedModel,
                                               transformers.models.qwen2_5_vl.Qwen2_5_VLVisionConfig),
                             "qwen3-vl-8b": (Qwen3VLVisionModel, transformers.models.qwen3_vl.Qwen3VLVisionConfig)}[entry]
    with torch.device("meta"):
        tower = tower_cls(config_cls(**bb.vision))
    n_tower = sum(p.numel() for p in tower.parameters())  # blocks + patch embedding + merger (+ DeepStack mergers)
    r = parameter_report(cfg)
    assert r["baseline_total"] == n_tower
    assert r["added_experts"] == 3 * r["expert"] and r["added_activated"] == r["router"] == d * d + d + d * 3 + 3
    m = build_model(cfg, device="meta")
    assert sum(p.numel() for p in m.experts[VERSATILE].projector.parameters()) == sum(p.numel() for p in tower.merger.parameters())


@pytest.fixture(scope="module", params=[0, 2, 6])
def bundle(request, qwen, tmp_path_factory):
    """The snapshot through `build` (resolve -> export) with k; k=2 also validates every part (torch vs ONNX)."""
    from mixpert_export.bundle.build import build_bundle
    from mixpert_export.bundle.sources import resolve

    _, snap, name = qwen
    d = tmp_path_factory.mktemp(f"qbundle_k{request.param}")
    m, src = resolve(backbone=name, weights=str(snap), expert_layers=request.param)
    manifest = build_bundle(m, d, runtime="onnxruntime", source=src, with_baseline=False, progress=False,
                            validate=request.param == 2)
    return request.param, d, manifest


def test_bundle_parts_have_a_patch_axis(qwen, bundle):
    k, _, manifest = bundle
    assert manifest["max_crops"] == 256  # the patch budget: one largest image (128 x 128 px of 8 px patches)
    trunk, expert = manifest["parts"]["trunk"]["spec"], manifest["parts"]["expert_versatile"]["spec"]
    qwen3 = qwen[2] == "tiny-qwen3-vl"  # + the position table's taps and weights; DeepStack outputs
    assert [(t["name"], t["shape"], t["dtype"]) for t in trunk["inputs"]] == [
        ("pixel_values", ["patches", 192], "uint8"), ("position_ids", ["patches", 2], "int64"),
        ("segment_ids", ["patches"], "int64")] + ([("pos_index", ["patches", 4], "int64"),
                                                   ("pos_weight", ["patches", 4], "float32")] if qwen3 else [])
    assert expert["outputs"][0]["shape"] == ["merged", 128]
    if qwen3:  # taps after blocks 1, 3, 4 of 6: the trunk runs those of its 6 - k blocks, the experts the rest
        n_trunk = sum(t < 6 - k for t in (1, 3, 4))
        assert [(o["name"], o["shape"]) for o in trunk["outputs"]] == [("hidden", ["patches", 96])] + (
            [("deepstack", ["merged", n_trunk, 128])] if n_trunk else [])
        assert [(o["name"], o["shape"]) for o in expert["outputs"]] == [("tokens", ["merged", 128])] + (
            [("deepstack", ["merged", 3 - n_trunk, 128])] if n_trunk < 3 else [])
        assert [o["name"] for o in manifest["parts"]["router"]["spec"]["outputs"]] == ["scores"]
    assert manifest["parts"]["router"]["spec"]["inputs"][1]["shape"] == ["images", "patches"]
    if k == 2:
        for name, part in manifest["parts"].items():
            v = part["validation"]
            assert v["status"] == "pass" and next(iter(v["outputs"].values()))["max_abs"] <= 1e-4, name


def test_uint8_input_gives_the_tokens_the_float_input_gave(bundle):
    """One frame of patch bytes in, normalised and repeated in time in the graph: transformers' float32
    pixel_values (both frames) through the model give the same tokens (torch 0.0, ONNX Runtime <= 1e-5), images of
    several sizes sharing calls, for k = 0, 2 and the whole tower."""
    from conftest import assert_uint8_path_equals_float_path

    assert_uint8_path_equals_float_path(bundle[1], _images() + _images([(20, 20), (33, 50), (64, 16)], seed=1))


@pytest.mark.parametrize("runtime,tol", [("torch", 1e-5), ("onnxruntime", 1e-4)])
def test_bundle_everything_versatile_equals_transformers(qwen, bundle, runtime, tol):
    """Images of several sizes (4 to 256 patches, tiny ones resized up), calls packing several of them under the
    patch budget, through the bundle on each runtime, packed for the LLM: equal to transformers' processor +
    get_image_features, image by image."""
    from mixpert_export.runtime.pipeline import MixpertPipeline

    model, snap, name = qwen
    k, path, _ = bundle
    pipe = MixpertPipeline.from_engines(path, runtime=runtime, packed=True, tau=1.0)
    assert pipe.cfg.expert_layers == k and pipe.cfg.domains == ("chart", "doc", "general")
    images = _images() + _images([(20, 20), (33, 50), (64, 16)], seed=1)
    results = pipe(images)
    inputs, want, deep = reference(model, snap, images, deepstack=True)
    grids = inputs["image_grid_thw"].tolist()
    assert pipe.stats.launches["trunk"] < len(images)  # small images share a call
    for im, g, r, w, d in zip(images, grids, results, want, deep):
        assert r.ok and r.expert == VERSATILE and r.crops == int(np.prod(g)) and list(r.grid) == g, (im.size, r.error)
        assert r.tokens.shape == w.shape and np.abs(r.tokens - w).max() <= tol
        assert np.abs(r.embeddings - w).max() <= tol
        assert_deepstack(r.deepstack, d, tol)  # Qwen3-VL: every tap, the trunk's and the expert's, in order


def _expert_reference(model, mix, expert):
    """transformers' model with `expert`'s blocks and merger (and DeepStack mergers) in its tower: what that
    expert's tokens must be."""
    import copy

    ref = copy.deepcopy(model)
    vis, k, e = ref.model.visual, mix.cfg.expert_layers, mix.experts[expert]
    L = len(vis.blocks)
    with torch.no_grad():
        for i, layer in enumerate(e.layers):
            vis.blocks[L - k + i].load_state_dict(layer.state_dict())
        vis.merger.load_state_dict(e.projector.state_dict())
        for tap, merger in zip(e.taps, getattr(e, "deepstack", [])):
            vis.deepstack_merger_list[list(vis.deepstack_visual_indexes).index(tap)].load_state_dict(merger.state_dict())
    return ref


@pytest.mark.parametrize("runtime,tol", [("torch", 1e-5), ("onnxruntime", 1e-4)])
def test_mixed_call_each_image_gets_its_own_experts_tokens(qwen, tmp_path_factory, runtime, tol):
    """Experts whose weights differ, one call holding images of different sizes routed to different experts:
    each expert runs once on its group of patches (positions and image ids gathered with them) and every image
    equals transformers' model with that expert in its tower. Fails if rows, positions or groups are mixed up."""
    from mixpert_export.bundle.build import build_bundle
    from mixpert_export.runtime.pipeline import MixpertPipeline
    from mixpert_train.preprocess import Preprocessor

    model, snap, name = qwen
    mix = model_from_snapshot(snap, name, expert_layers=2)
    with torch.no_grad():
        for i, d in enumerate(mix.cfg.domains):
            for p in mix.experts[d].parameters():
                p.add_(0.02 * (i + 1) * torch.randn_like(p))
    path = tmp_path_factory.mktemp("mixed") / "b"
    if not path.exists():
        build_bundle(mix, path, runtime="onnxruntime", with_baseline=False, progress=False, validate=False)
    pipe = MixpertPipeline.from_engines(path, runtime=runtime, model=mix)
    images = _images()[:5]
    experts = ["doc", "versatile", "chart", "doc", "general"]
    pre = Preprocessor(pipe.cfg.backbone)
    from mixpert_export.runtime.pipeline import ImageResult

    batch = []
    for i, im in enumerate(images):
        res = ImageResult(i, f"im{i}")
        px, res.image_size, res.grid = pre.prepare(im)
        batch.append((res, px))
    pipe.run_crops(batch, experts=experts)
    assert {k: v for k, v in pipe.stats.launches.items() if k.startswith("expert_")} == {
        "expert_doc": 1, "expert_versatile": 1, "expert_chart": 1, "expert_general": 1}
    for (res, _), im, e in zip(batch, images, experts):
        _, want, deep = reference(_expert_reference(model, mix, e), snap, [im], deepstack=True)
        assert np.abs(res.tokens - want[0]).max() <= tol, (e, im.size)
        assert_deepstack(res.deepstack, deep[0], tol)  # Qwen3-VL at k = 2: two trunk taps, the expert's own third
    _, other = reference(model, snap, [images[0]])  # the versatile answer for image 0 differs from doc's
    assert np.abs(batch[0][0].tokens - other[0]).max() > 100 * tol


@pytest.mark.parametrize("bundle", [2], indirect=True)
def test_run_cli_bad_inputs_are_one_line_each(qwen, bundle, tmp_path):
    import json

    from mixpert_export.__main__ import main

    _, path, _ = bundle
    ims = []
    for i, im in enumerate(_images()[:3]):
        ims.append(tmp_path / f"{i}.png")
        im.save(ims[-1])
    (tmp_path / "bad.png").write_bytes(b"not an image")
    Image.new("RGB", (1, 300)).save(tmp_path / "thin.png")  # aspect 300: Qwen2-VL's processor refuses it
    out, npz = tmp_path / "out.json", tmp_path / "features.npz"
    rc = main(["run", "--engines", str(path), *map(str, ims), str(tmp_path / "bad.png"), str(tmp_path / "thin.png"),
               "--packed", "--json", str(out), "--save-features", str(npz)])
    rows = json.loads(out.read_text())
    assert rc == 1 and len(rows) == 5  # 1: some image failed; the others are answered
    inputs, want, deep = reference(qwen[0], qwen[1], _images()[:3], deepstack=True)
    grids = inputs["image_grid_thw"].numpy()
    assert [r["grid"] for r in rows[:3]] == grids.tolist()
    assert [r["embeddings_shape"] for r in rows[:3]] == [[int(np.prod(g)) // 4, 128] for g in grids]
    saved = np.load(npz)
    for i in range(3):  # the saved features are transformers' (Qwen3-VL: with each image's DeepStack features)
        assert np.abs(saved[str(i)] - want[i]).max() <= 1e-4
        assert_deepstack(saved[f"{i}_deepstack"] if f"{i}_deepstack" in saved else None, deep[i], 1e-4)
        assert ("deepstack_shape" in rows[i]) == (deep[i] is not None)
    assert sorted(saved.files) == sorted([str(i) for i in range(3)] + [f"{i}_deepstack" for i in range(3) if deep[i] is not None])
    for r in rows[3:]:
        assert "error" in r and "\n" not in r["error"]
    assert rows[4]["error"].startswith(str(tmp_path / "thin.png")) and "aspect ratio" in rows[4]["error"]


@pytest.mark.parametrize("bundle", [2], indirect=True)
def test_serve_and_triton_repository(qwen, bundle, tmp_path):
    """`serve` (a real Triton server through PyTriton) answers each image its own number of tokens, equal to
    transformers'; the model repository declares the patch axis and never lets Triton batch the parts (requests
    concatenated along patches would share image ids)."""
    pytest.importorskip("pytriton", reason="needs the serve extra: pip install 'mixpert-deploy[serve]'")
    import io
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from triton_load import ServeProcess

    from mixpert_export.serving.client import MixpertClient
    from mixpert_export.serving.triton_repo import read_config, write_repository

    model, snap, name = qwen
    _, path, _ = bundle
    repo = write_repository(path, tmp_path / "repo", platform="python", kind="cpu")
    top = read_config(repo / "mixpert" / "config.pbtxt")
    assert [list(o.dims) for o in top.output if o.name == "tokens"] == [[-1, 128]]  # merged patches x D_llm
    for part in ("trunk", "expert_versatile", "router"):
        cfg = read_config(repo / f"mixpert_{part}" / "config.pbtxt")
        assert cfg.max_batch_size == 0 and not cfg.HasField("dynamic_batching"), part
    trunk = read_config(repo / "mixpert_trunk" / "config.pbtxt")
    qwen3 = name == "tiny-qwen3-vl"
    assert [(i.name, list(i.dims), i.data_type) for i in trunk.input] == [  # one frame of patch bytes
        ("pixel_values", [-1, 192], 2), ("position_ids", [-1, 2], 9), ("segment_ids", [-1], 9)] + (  # UINT8, INT64
        [("pos_index", [-1, 4], 9), ("pos_weight", [-1, 4], 11)] if qwen3 else [])  # + FP32
    # Qwen3-VL: the mixpert model answers DeepStack [taps, L, D] too, and the parts that run taps give theirs
    assert [list(o.dims) for o in top.output if o.name == "deepstack"] == ([[3, -1, 128]] if qwen3 else [])
    assert [o.name for o in trunk.output] == ["hidden"] + (["deepstack"] if qwen3 else [])
    images = _images()[1:4]
    _, want, deep = reference(model, snap, images, deepstack=True)
    with ServeProcess(path, log=tmp_path / "serve.log", extra=["--tau", "1.0"]) as server:
        client = MixpertClient(server.url)
        for im, w, d in zip(images, want, deep):
            buf = io.BytesIO()
            im.save(buf, "PNG")
            got = client.infer(buf.getvalue())
            assert got.expert == VERSATILE and got.tokens.shape == w.shape
            assert np.abs(got.tokens - w).max() <= 1e-4
            assert_deepstack(got.deepstack, d, 1e-4)
        with pytest.raises(MixpertError, match="not an image"):
            client.infer(b"GIF89a not really")
        client.close()


ASK_TEMPLATE = ("{% for m in messages %}<|user|> {% for c in m['content'] %}{% if c['type'] == 'image' %}"
                "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}"
                "{% if add_generation_prompt %} <|assistant|>{% endif %}")


def qwen_tokenizer():
    """Qwen2-VL's image tokens at the tiny config's ids (5 image pad, 6 video pad, 7 vision start), words after."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<unk>", "<eos>", "<|user|>", "<|assistant|>", "<|image_pad|>", "<|video_pad|>",
               "<|vision_start|>", "<|vision_end|>"]
    vocab = {t: i for i, t in enumerate(special)} | {f"w{i}": i for i in range(len(special), 300)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>",
                                   additional_special_tokens=special[3:],
                                   extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})


@pytest.mark.parametrize("bundle", [2], indirect=True)
def test_ask_equals_transformers_generate(qwen, bundle, tmp_path):
    """ask on a Qwen2-VL bundle + the snapshot's LLM: token-for-token transformers' Qwen2VLForConditionalGeneration
    .generate (greedy) on the prompt its processor builds (<|image_pad|> x merged tokens, M-RoPE positions from the
    image's grid computed by the model), through torch and ONNX Runtime, images of different sizes and grids."""
    import copy

    from jinja2 import Template
    from transformers import AutoImageProcessor

    from mixpert_export.runtime.pipeline import MixpertPipeline
    from mixpert_export.serving.ask import LanguageModel, ask

    base, snap, name = qwen
    _, path, _ = bundle
    model = copy.deepcopy(base)  # the same vision side as the bundle's; an LLM that reacts to its input
    with torch.no_grad():
        for p in model.model.language_model.parameters():
            p.mul_(4.0) if p.dim() > 1 else None
    llm_snap = save_snapshot(model, tmp_path / "llm")
    tok = qwen_tokenizer()
    tok.save_pretrained(llm_snap)
    (llm_snap / "chat_template.jinja").write_text(ASK_TEMPLATE)
    llm = LanguageModel.from_snapshot(llm_snap)
    proc = AutoImageProcessor.from_pretrained(snap)
    question, new = " w10 w11 w12", 10
    answers, without = [], []
    for runtime in ("torch", "onnxruntime"):
        pipe = MixpertPipeline.from_engines(path, runtime=runtime, packed=True, tau=1.0)
        for im in _images()[:4]:
            px = proc(images=[im], return_tensors="pt")
            n = int(px["image_grid_thw"][0].prod()) // 4
            text = Template(ASK_TEMPLATE).render(messages=[{"role": "user", "content": [
                {"type": "image"}, {"type": "text", "text": question}]}], add_generation_prompt=True)
            ids = tok(text.replace("<|image_pad|>", "<|image_pad|>" * n), return_tensors="pt", add_special_tokens=False)
            types = (ids["input_ids"] == 5).int()  # what Qwen2VLProcessor returns as mm_token_type_ids
            with torch.no_grad():
                out = model.generate(**ids, pixel_values=px["pixel_values"], image_grid_thw=px["image_grid_thw"],
                                     mm_token_type_ids=types, max_new_tokens=new, do_sample=False, pad_token_id=0)
            want = out[0, ids["input_ids"].shape[1]:].tolist()
            want = want[:want.index(2)] if 2 in want else want
            got = ask(pipe, llm, im, question, max_new_tokens=new)
            assert llm.input_ids(question, got.image_positions) == ids["input_ids"][0].tolist()
            assert got.expert == VERSATILE and got.token_ids == want and len(want) >= 3, (im.size, got.token_ids, want)
            answers.append(tuple(want))
            if name == "tiny-qwen3-vl":  # the same embeddings without DeepStack: what ignoring it would answer
                (res,) = pipe([im])
                assert res.deepstack.shape == (3,) + res.embeddings.shape
                without.append(tuple(llm.generate(res.embeddings, question, new, grid=res.grid)[0]) != tuple(want))
    assert len(set(answers)) >= 2  # the image changes the answer: the test would see an ignored vision side
    assert not without or any(without)  # Qwen3-VL: DeepStack changes answers, so the equality above checks it


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_training_stages_on_a_tiny_qwen2_vl(tmp_path, kind):
    """joint SFT of a tiny Qwen2-VL (whole images of their own sizes, patches and grids) -> disentangled experts
    (trunk and LM frozen) -> router over the image's patches -> eval on the family's domain set; routed to versatile
    everywhere the split answers exactly as transformers' joint model."""
    import json

    from mixpert_train.checkpoint import load_checkpoint
    from mixpert_train.data.synthetic import generate
    from mixpert_train.evaluate import evaluate
    from mixpert_train.experts import ExpertConfig, run_experts
    from mixpert_train.joint import JointConfig, run_joint
    from mixpert_train.router import RouterConfig, run_router

    data = tmp_path / "data"
    generate(data, n_per_domain=10, seed=3, progress=False, domains=("chart", "doc", "general"))
    name = KINDS[kind]
    if kind == "qwen3_vl":  # DeepStack enters the LLM's first layers, which the stages' loss does not feed: refused
        with pytest.raises(MixpertError, match="do not support Qwen3-VL yet") as e:
            run_joint(data, tmp_path / "joint", JointConfig(name, epochs=1, batch=8), progress=False)
        assert "\n" not in str(e.value) and not (tmp_path / "joint").exists()
        return
    joint = run_joint(data, tmp_path / "joint", JointConfig(name, epochs=1, batch=8), progress=False)
    assert json.loads((joint / "config.json").read_text())["model_type"] == kind
    assert backbone_from_snapshot(joint).family == get_backbone(name).family
    base = model_from_snapshot(joint, name)
    experts = run_experts(data, joint, tmp_path / "experts",
                          ExpertConfig(epochs=1, batch=8, micro_batch=4, lr_projector=1e-3, lr_vision=1e-3, select_on_val=False),
                          progress=False)
    tuned = load_checkpoint(experts)
    assert tuned.cfg.domains == ("chart", "doc", "general")
    for k, v in tuned.state_dict().items():
        if k.startswith(("trunk.", "experts.versatile.")):
            assert torch.equal(v, base.state_dict()[k]), k  # frozen: bit-identical to the joint snapshot
    for d in tuned.cfg.domains:  # every domain expert moved, its blocks and its merger
        assert not torch.equal(tuned.experts[d].projector.mlp[2].weight, base.experts[VERSATILE].projector.mlp[2].weight)
        assert not torch.equal(tuned.experts[d].layers[0].attn.qkv.weight, base.experts[VERSATILE].layers[0].attn.qkv.weight)
    final = run_router(data, experts, tmp_path / "final", RouterConfig(epochs=5, batch=8, lr=2e-3), progress=False)
    assert load_checkpoint(final).router.fc2.out_features == 3
    rep = evaluate(data, final, progress=False)
    acc = rep["accuracy"]
    assert acc["versatile everywhere"]["to_versatile"] == 1.0
    for d in ("chart", "doc", "general", "all"):
        assert acc["versatile everywhere"][d] == acc["joint"][d]


def test_training_scores_use_the_models_own_mrope_positions(qwen):
    """The training side's teacher-forced loss for [image tokens, question, answer] equals transformers' own
    Qwen2VLForConditionalGeneration forward on input_ids with the image placeholders (3D M-RoPE positions from the
    grid), so what the stages train and evaluate is the MLLM's real arithmetic."""
    import torch.nn.functional as F

    from mixpert_train.data.manifest import Sample
    from mixpert_train.mllm import Item, answer_scores, reference_crop_tokens
    from mixpert_train.preprocess import Preprocessor

    model, snap, name = qwen
    bb = backbone_from_snapshot(snap, name)
    pre = Preprocessor(bb)
    if name == "tiny-qwen3-vl":  # the loss would drop DeepStack: the training side's vision path refuses in one line
        px, grid = pre.pixel_values(_images()[1])
        with pytest.raises(MixpertError, match="do not support Qwen3-VL yet") as e:
            reference_crop_tokens(model, torch.from_numpy(px), [grid])
        assert "\n" not in str(e.value)
        return
    items = []
    for i, im in enumerate(_images()[1:4]):
        px, grid = pre.pixel_values(im)
        items.append(Item(Sample(f"{i}.png", "q", "a", "chart"), torch.from_numpy(px), (im.height, im.width),
                          torch.tensor([11, 12, 13 + i]), torch.tensor([40 + i, 50]), grid))
    with torch.no_grad():
        tokens = reference_crop_tokens(model, torch.cat([it.crops for it in items]), [it.grid for it in items])
        sizes = [len(it.crops) // 4 for it in items]
        loss, _ = answer_scores(model, list(tokens.split(sizes)), items)
        want = []
        for it, n in zip(items, sizes):
            ids = torch.cat([torch.full((n,), model.config.image_token_id), it.question, it.answer[:-1]])[None]
            types = (ids == model.config.image_token_id).int()  # what Qwen2VLProcessor returns beside input_ids
            out = model(input_ids=ids, pixel_values=it.crops, image_grid_thw=torch.tensor([it.grid]), mm_token_type_ids=types)
            logits = out.logits[0, n + len(it.question) - 1:]
            want.append(F.cross_entropy(logits, it.answer, reduction="sum"))
        want = torch.stack(want).sum() / sum(len(it.answer) for it in items)
    assert abs(loss.item() - want.item()) <= 1e-5, (loss.item(), want.item())


@pytest.mark.parametrize("bundle", [2], indirect=True)
def test_static_bucketed_path_over_patches_equals_dynamic_on_cpu(qwen, bundle):
    """The GPU fast path's logic over patches, run eagerly on CPU (torch) and through ONNX Runtime's bound static
    path: patch buckets (calls padded inside a bucket with the padding image id), a mixed call's expert groups
    gathered with their positions and image ids and scattered as merged rows: equal to the dynamic path."""
    from mixpert_export.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from mixpert_export.runtime.backends.torch import TorchBackend
    from mixpert_export.runtime.cuda_graphs import crop_buckets
    from mixpert_export.runtime.pipeline import ImageResult, MixpertPipeline
    from mixpert_train.preprocess import Preprocessor

    _, path, manifest = bundle
    plain = MixpertPipeline.from_engines(path, runtime="onnxruntime")
    if qwen[2] == "tiny-qwen3-vl":  # not built yet for DeepStack's second outputs: refused, never half-carried
        with pytest.raises(MixpertError, match="static .* path does not carry DeepStack") as e:
            MixpertPipeline(TorchBackend("cpu", static=True).load(path, manifest), manifest)
        assert "\n" not in str(e.value)
        return
    statics = [MixpertPipeline(TorchBackend("cpu", static=True).load(path, manifest), manifest),
               MixpertPipeline(OnnxRuntimeBackend("cpu", static=True).load(path, manifest), manifest)]
    for s in statics:
        assert s.backend.describe()["static"] and s.backend.static.buckets == crop_buckets(256, (16, 64, 256))
    pre = Preprocessor(plain.cfg.backbone)
    images = _images([(64, 64), (9, 5), (100, 40), (40, 60)])  # 152 patches: inside the 256 bucket
    experts = ["doc", "versatile", "doc", "general"]

    def call(pipe):
        batch = []
        for i, im in enumerate(images):
            res = ImageResult(i, f"im{i}")
            px, res.image_size, res.grid = pre.prepare(im)
            res.crops = len(px)
            batch.append((res, px))
        pipe.run_crops(batch, experts=experts)
        return [r for r, _ in batch]

    want = call(plain)
    assert sum(r.crops for r in want) == 152 and 152 not in crop_buckets(256, (16, 64, 256))  # padded in its bucket
    for s in statics:
        for _ in range(2):  # the second call reuses the bucket's buffers (and on a GPU, its graphs)
            for a, b in zip(call(s), want):
                assert a.expert == b.expert and a.tokens.shape == b.tokens.shape
                np.testing.assert_allclose(a.tokens, b.tokens, atol=1e-5, rtol=0)
        one = s([images[1]])[0]  # a 4-patch image alone: the 16 bucket, 12 padded rows
        np.testing.assert_allclose(one.tokens, plain([images[1]])[0].tokens, atol=1e-5, rtol=0)


def test_window_masks_are_transformers_windows():
    """Qwen2.5-VL's windowed blocks attend within the windows transformers' own get_vision_window_index makes
    (patches reordered by window, cu_window_seqlens cutting them): for several grids in one call (sides not
    multiples of the window, one merge unit wide, several windows), the same-window mask computed in the graph from
    positions and image ids equals the one read off transformers' window index, pair by pair."""
    from transformers.vision_utils import get_vision_window_index

    from mixpert_train.families import adapter_for
    from mixpert_train.families.qwen2_vl import attention_masks

    bb = get_backbone("qwen2.5-vl-7b")
    ad = adapter_for(bb)
    grids = [(1, 16, 24), (1, 2, 2), (1, 34, 10), (1, 8, 8), (1, 2, 40)]
    rows = ad.row_inputs(bb, grids)
    v = bb.vision
    _, window = attention_masks(torch.from_numpy(rows["position_ids"]), torch.from_numpy(rows["segment_ids"]),
                                (v["spatial_merge_size"], ad.window_units(v)))
    index, cu = get_vision_window_index(torch.tensor(grids), v["spatial_merge_size"], v["window_size"], v["patch_size"])
    unit = v["spatial_merge_size"] ** 2
    order = (index[:, None] * unit + torch.arange(unit)).reshape(-1)  # patch order inside transformers' blocks
    win_of_slot = torch.repeat_interleave(torch.arange(len(cu) - 1), (cu[1:] - cu[:-1]).long())
    win = torch.empty_like(win_of_slot)
    win[order] = win_of_slot  # each patch (processor order): its window
    want = win[:, None] == win[None, :]
    assert window.shape == want.shape and torch.equal(window, want)
    seg = torch.from_numpy(rows["segment_ids"])
    assert len(cu) - 1 > 2 * len(grids) and not torch.equal(window, seg[:, None] == seg[None, :])
