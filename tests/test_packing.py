"""The embeddings the LLM splices in: the pipeline's packed output against transformers' own LLaVA-OneVision
packing (pack_image_features with the snapshot's image_newline) on its own features, for images of several sizes
and aspect ratios, one of them above the anyres budget (bilinear shrink). Tolerances: 1e-5 torch, 1e-4 ONNX
Runtime (fp32)."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_reference
from mixpert_export.__main__ import main
from mixpert_export.bundle.build import build_bundle
from mixpert_export.bundle.sources import resolve
from mixpert_export.runtime.pipeline import MixpertPipeline
from mixpert_train.errors import MixpertError
from mixpert_train.preprocess import Preprocessor

SIZES = [(64, 64), (200, 90), (90, 200), (333, 170), (640, 480), (30, 500)]  # (w, h): 1 to 10 crops


def photos():
    rng = np.random.default_rng(7)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in SIZES]


def reference_embeddings(model, image):
    """transformers alone: its processor's pixels, its tower + projector, its pack_image_features."""
    pre = Preprocessor(bb_of(model), fast=False).processor
    out = pre(images=[image], return_tensors="pt")
    with torch.no_grad():
        cfg = model.config
        px = out["pixel_values"][0]
        hs = model.model.vision_tower(px, output_hidden_states=True).hidden_states[cfg.vision_feature_layer]
        feats = model.model.multi_modal_projector(hs)
        packed, _ = model.model.pack_image_features([feats], out["image_sizes"], image_newline=model.model.image_newline,
                                                    vision_aspect_ratio=cfg.vision_aspect_ratio)
    return packed[0].numpy()


def bb_of(model):
    from mixpert_train.families.llava_ov import backbone_from_llava_config

    return backbone_from_llava_config(model.config.to_dict(), "tiny")


@pytest.fixture(scope="module", params=["anyres_max_9", "anyres_max_2"])
def case(request, tmp_path_factory):
    """A tiny transformers snapshot (anyres_max_2: most images exceed the budget and are shrunk), its bundle."""
    d = tmp_path_factory.mktemp(request.param)
    model = make_reference(seed=3, vision_aspect_ratio=request.param)
    with torch.no_grad():
        model.model.image_newline.normal_()  # transformers' init; make sure it is not zeros
    model.save_pretrained(d / "snap")
    m, src = resolve(weights=str(d / "snap"))
    build_bundle(m, d / "bundle", runtime="onnxruntime", max_crops=20, source=src, progress=False, validate=False)
    return model, d / "bundle"


@pytest.mark.parametrize("runtime,tol", [("torch", 1e-5), ("onnxruntime", 1e-4)])
def test_packed_embeddings_equal_transformers_packing(case, runtime, tol):
    model, bundle = case
    pipe = MixpertPipeline.from_engines(bundle, runtime=runtime, packed=True, strategy="score-difference", tau=1.0)
    imgs = photos()
    shrunk = 0
    for img, res in zip(imgs, pipe(imgs)):
        assert res.ok and res.expert == "versatile", res.error
        want = reference_embeddings(model, img)
        assert res.embeddings.shape == want.shape, (img.size, res.embeddings.shape, want.shape)
        assert np.abs(res.embeddings - want).max() <= tol, (img.size, float(np.abs(res.embeddings - want).max()))
        side = model.config.vision_config.image_size // model.config.vision_config.patch_size  # tokens a crop side
        unshrunk_max = res.crops * side * side + side * 3 * 3  # every token of every crop plus a newline a row
        shrunk += want.shape[0] < (res.crops - 1) * side * side  # fewer rows than the grid's tokens: interpolated
        assert want.shape[0] <= unshrunk_max
    if model.config.vision_aspect_ratio == "anyres_max_2":
        assert shrunk >= 2  # the budget case is really exercised


def test_packed_cli_and_refusals(case, tmp_path, capsys):
    model, bundle = case
    paths = []
    for i, img in enumerate(photos()[:3]):
        paths.append(str(tmp_path / f"{i}.png"))
        img.save(paths[-1])
    out = tmp_path / "f.npz"
    assert main(["run", "--engines", str(bundle), *paths, "--runtime", "onnxruntime", "--packed", "--tau", "1.0",
                 "--save-features", str(out)]) == 0
    feats = np.load(out)
    for i, img in enumerate(photos()[:3]):
        assert np.abs(feats[str(i)] - reference_embeddings(model, img)).max() <= 1e-4
    capsys.readouterr()
    with pytest.raises(MixpertError, match="per-crop"):
        MixpertPipeline.from_engines(bundle, runtime="onnxruntime", packed=True, per_crop=True)


@pytest.mark.parametrize("case", ["anyres_max_2"], indirect=True)  # one server: the case above the anyres budget
def test_serve_packed_answers_the_embeddings(case, tmp_path):
    pytest.importorskip("pytriton", reason="needs the serve extra: pip install 'mixpert-deploy[serve]'")
    import io
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from triton_load import ServeProcess
    from mixpert_export.serving.client import MixpertClient

    model, bundle = case
    assert model.config.vision_aspect_ratio == "anyres_max_2"
    with ServeProcess(bundle, log=tmp_path / "serve.log", extra=["--packed", "--tau", "1.0"]) as server:
        client = MixpertClient(server.url)
        for img in photos()[2:5]:
            buf = io.BytesIO()
            img.save(buf, "PNG")
            got = client.infer(buf.getvalue())
            assert got.tokens is None and got.expert == "versatile"
            assert np.abs(got.embeddings - reference_embeddings(model, img)).max() <= 1e-4
        with pytest.raises(MixpertError, match="not an image"):
            client.infer(b"GIF89a not really")
        client.close()
