"""The InternVL family (issue 15; InternVL3 and InternVL3.5, issue 29) against transformers' own
InternVLForConditionalGeneration and the GotOcr2 image processor of a tiny snapshot saved by save_pretrained (the
independent reference). The snapshot tests run once per LLM generation (the `internvl` fixture's params): Qwen2
(InternVL3's Qwen2.5) and Qwen3 (InternVL3.5), the one thing the 8B configs of the two differ in besides width."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mixpert_train.backbones import get_backbone
from mixpert_train.errors import MixpertError
from mixpert_train.model import VERSATILE
from mixpert_train.weights import backbone_from_snapshot, model_from_snapshot

SIZES = [(64, 64), (100, 300), (300, 100), (257, 129), (500, 380), (33, 47)]  # (w, h): 1 to 7 tiles


LLMS = {"qwen2": {}, "qwen3": {"head_dim": 32}}  # InternVL3 (Qwen2.5), InternVL3.5 (Qwen3: its own head_dim key)


def make_internvl(seed=0, max_patches=6, image_token_id=7, llm="qwen2", **overrides):
    """A tiny transformers InternVL (tiny-internvl's tower, a 2-layer Qwen2 or Qwen3), every weight random
    (transformers zeroes the class token and position embeddings at init: a test on those would not see them)."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    bb = get_backbone("tiny-internvl")
    vision = dict(bb.vision, model_type="internvl_vision")
    cfg = InternVLConfig(
        vision_config=vision,
        text_config=dict(model_type=llm, hidden_size=bb.llm_hidden_size, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=300, max_position_embeddings=4096,
                         **LLMS[llm]),
        image_token_id=image_token_id, downsample_ratio=0.5, **overrides,
    )
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    return model


def save_snapshot(model, path, max_patches=6, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    model.save_pretrained(path, max_shard_size="200KB")  # sharded: the loader opens only the vision shards
    # crop_to_patches false, as transformers' -hf conversion saves it: InternVLProcessor tiles anyway
    GotOcr2ImageProcessorPil(size={"height": 64, "width": 64}, crop_to_patches=False, min_patches=1,
                             max_patches=max_patches, image_mean=list(mean), image_std=list(std)).save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=sorted(LLMS))
def internvl(request, tmp_path_factory):
    """The tiny InternVL snapshot: weights, image processor, and (for `ask`) a tokenizer with InternVL's image
    tokens and a chat template; its LLM's weights scaled so that its answers react to the image."""
    model = make_internvl(image_token_id=5, llm=request.param)
    assert model.config.text_config.model_type == request.param
    with torch.no_grad():
        for p in model.model.language_model.parameters():
            p.mul_(4.0) if p.dim() > 1 else None
    snap = save_snapshot(model, tmp_path_factory.mktemp("internvl"), mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25))
    internvl_tokenizer().save_pretrained(snap)
    (snap / "chat_template.jinja").write_text(ASK_TEMPLATE)
    return model, snap


def _images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in SIZES]


def reference_pixels(snap, images, return_tensors="pt"):
    """What transformers' InternVLProcessor feeds the model: the snapshot's image processor, called with the
    processor's own image kwargs (InternVLProcessor.images_kwargs: crop_to_patches=True over the saved config)."""
    from transformers import AutoImageProcessor
    from transformers.models.internvl.processing_internvl import InternVLProcessor

    assert InternVLProcessor.images_kwargs == {"crop_to_patches": True}  # what this reference stands for
    proc = AutoImageProcessor.from_pretrained(snap)
    return proc(images=images, return_tensors=return_tensors, **InternVLProcessor.images_kwargs)


def reference_features(model, snap, images):
    """transformers' processing of the snapshot, then the model's own get_image_features."""
    out = reference_pixels(snap, images)
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=out["pixel_values"]).pooler_output
    return out["pixel_values"], out["num_patches"].tolist(), feats


def test_preprocessing_equals_the_snapshots_processor_bit_for_bit(internvl):
    from mixpert_train.preprocess import Preprocessor

    _, snap = internvl
    bb = backbone_from_snapshot(snap, "tiny-internvl")
    assert bb.image_mean == (0.4, 0.5, 0.6) and bb.max_crops == 7  # the snapshot's own config, not the entry's
    ours = Preprocessor(bb)
    counts = []
    for im in _images():
        a = ours.pixel_values(im)[0]
        b = reference_pixels(snap, [im], "np")["pixel_values"]
        assert a.dtype == np.float32 and a.shape == b.shape and np.array_equal(a, b)
        counts.append(len(a))
    assert len(set(counts)) >= 4 and max(counts) <= bb.max_crops  # several tilings, thumbnail included


@pytest.mark.parametrize("k", [0, 2, 6])
def test_versatile_path_equals_transformers(internvl, k):
    model, snap = internvl
    ours = model_from_snapshot(snap, "tiny-internvl", expert_layers=k)
    assert ours.cfg.domains == ("chart", "doc", "general") and ours.cfg.expert_layers == k
    assert ours.router.fc2.out_features == 3
    px, counts, ref = reference_features(model, snap, _images())
    assert px.shape[0] == sum(counts) and ref.shape[1:] == (16, 128)  # 64 patches -> 16 tokens a tile
    with torch.no_grad():
        got = ours.experts[VERSATILE](ours.trunk(px))
    assert (got - ref).abs().max().item() <= 1e-5  # fp32, same kernels


def test_packed_embeddings_are_what_transformers_splices_in(internvl):
    """InternVL's placeholder positions take an image's tiles' tokens in order: the packing is the flattened
    features, image by image."""
    from mixpert_train.families import adapter_for

    model, snap = internvl
    ours = model_from_snapshot(snap, "tiny-internvl")
    px, counts, ref = reference_features(model, snap, _images()[:3])
    with torch.no_grad():
        tok = ours.experts[VERSATILE](ours.trunk(px))
    start = 0
    for n, im in zip(counts, _images()[:3]):
        packed = adapter_for(ours.cfg.backbone).pack(ours.cfg.backbone, tok[start:start + n], (im.height, im.width))
        assert packed.shape == (n * 16, 128)
        np.testing.assert_allclose(packed, ref[start:start + n].reshape(-1, 128).numpy(), atol=1e-5, rtol=0)
        start += n


def test_snapshot_of_another_family_is_refused(internvl, tiny_snapshot):
    _, snap = internvl
    with pytest.raises(MixpertError, match=r"internvl snapshot \(internvit tower\), but --backbone tiny takes the siglip") as e:
        backbone_from_snapshot(snap, "tiny")
    assert "\n" not in str(e.value)
    with pytest.raises(MixpertError, match=r"llava_onevision snapshot \(siglip tower\), but --backbone internvl2-8b"):
        backbone_from_snapshot(tiny_snapshot, "internvl2-8b")


def test_language_model_shards_are_never_opened(internvl, tmp_path):
    import shutil

    _, src = internvl
    snap = tmp_path / "s"
    shutil.copytree(src, snap)
    index = json.loads((snap / "model.safetensors.index.json").read_text())
    vision = {v for k, v in index["weight_map"].items() if k.startswith(("model.vision_tower.", "model.multi_modal_projector.", "vision_tower.", "multi_modal_projector."))}
    lm_only = sorted(set(index["weight_map"].values()) - vision)
    assert lm_only
    for shard in lm_only:
        (snap / shard).write_bytes(b"0123456789")
    model_from_snapshot(snap, "tiny-internvl")  # opens only the vision shards


@pytest.mark.parametrize("entry, llm", [("internvl2-8b", 4096), ("internvl3-8b", 3584), ("internvl3.5-8b", 4096)])
def test_real_scale_entry_matches_transformers_config(entry, llm):
    """The 8B towers, as transformers' InternVLVisionConfig builds them, and the parameter view (Table 6)."""
    from transformers.models.internvl.modeling_internvl import InternVLVisionModel
    from transformers.models.internvl.configuration_internvl import InternVLVisionConfig

    from mixpert_train.model import MixpertConfig, parameter_report

    bb = get_backbone(entry)
    assert (bb.hidden_tokens, bb.tokens_per_crop, bb.projector_in, bb.max_crops) == (1025, 256, 4096, 13)
    with torch.device("meta"):
        tower = InternVLVisionModel(InternVLVisionConfig(**bb.vision))
    n_tower = sum(p.numel() for p in tower.parameters())
    r = parameter_report(MixpertConfig.for_backbone(bb))
    projector = 4096 * 2 + 4096 * llm + llm + llm * llm + llm  # LayerNorm + two Linear layers
    assert r["baseline_total"] == n_tower + projector
    assert r["added_experts"] == 3 * r["expert"] and r["added_activated"] == r["router"]


@pytest.fixture(scope="module", params=[0, 2, 6])
def bundle(request, internvl, tmp_path_factory):
    """The snapshot through `build` (resolve -> export; the default validation is tested by test_build) with k."""
    from mixpert_export.bundle.build import build_bundle
    from mixpert_export.bundle.sources import resolve

    _, snap = internvl
    d = tmp_path_factory.mktemp(f"bundle_k{request.param}")
    m, src = resolve(backbone="tiny-internvl", weights=str(snap), expert_layers=request.param)
    build_bundle(m, d, runtime="onnxruntime", max_crops=30, source=src, with_baseline=False, progress=False, validate=False)
    return request.param, d


def test_uint8_input_gives_the_tokens_the_float_input_gave(bundle):
    """Tiles' bytes in, normalised in the graph: transformers' float32 pixel_values through the model give the same
    tokens (torch 0.0, ONNX Runtime <= 1e-5), for k = 0, 2 and the whole tower."""
    from conftest import assert_uint8_path_equals_float_path

    assert_uint8_path_equals_float_path(bundle[1], _images())


@pytest.mark.parametrize("runtime,tol", [("torch", 1e-5), ("onnxruntime", 1e-4)])
def test_bundle_everything_versatile_equals_transformers(internvl, bundle, runtime, tol):
    """Images of several sizes in one call, through the bundle on each runtime, packed for the LLM: equal to
    transformers' processor + get_image_features, image by image."""
    from mixpert_export.runtime.pipeline import MixpertPipeline

    model, snap = internvl
    k, path = bundle
    pipe = MixpertPipeline.from_engines(path, runtime=runtime, packed=True, tau=1.0)
    assert pipe.cfg.expert_layers == k and pipe.cfg.domains == ("chart", "doc", "general")
    images = _images()
    results = pipe(images)
    _, counts, ref = reference_features(model, snap, images)
    start = 0
    for im, n, r in zip(images, counts, results):
        assert r.ok and r.expert == VERSATILE and r.crops == n, (im.size, r.error)
        want = ref[start:start + n].numpy()
        assert np.abs(r.tokens - want).max() <= tol
        assert np.abs(r.embeddings - want.reshape(-1, want.shape[-1])).max() <= tol
        start += n


@pytest.mark.parametrize("bundle", [2], indirect=True)
def test_run_cli_on_the_bundle(bundle, tmp_path):
    from mixpert_export.__main__ import main

    _, path = bundle
    ims = []
    for i, im in enumerate(_images()[:3]):
        ims.append(tmp_path / f"{i}.png")
        im.save(ims[-1])
    (tmp_path / "bad.png").write_bytes(b"not an image")
    out = tmp_path / "out.json"
    rc = main(["run", "--engines", str(path), *map(str, ims), str(tmp_path / "bad.png"), "--packed", "--json", str(out)])
    rows = json.loads(out.read_text())
    assert rc == 1 and len(rows) == 4  # 1: some image failed; the others are answered
    assert [r["embeddings_shape"] for r in rows[:3]] == [[n * 16, 128] for n in (1, 4, 4)]
    assert "error" in rows[3] and "\n" not in rows[3]["error"]


def test_training_stages_on_a_tiny_internvl(tmp_path):
    """joint SFT of a tiny InternVL -> disentangled experts (trunk and LM frozen) -> router -> eval, on the
    family's own domain set; routed to versatile everywhere the split answers exactly as transformers' joint model."""
    from mixpert_train.checkpoint import load_checkpoint
    from mixpert_train.data.synthetic import generate
    from mixpert_train.evaluate import evaluate
    from mixpert_train.experts import ExpertConfig, run_experts
    from mixpert_train.joint import JointConfig, run_joint
    from mixpert_train.router import RouterConfig, run_router

    data = tmp_path / "data"
    assert generate(data, n_per_domain=10, seed=3, progress=False, domains=("chart", "doc", "general")) == {
        "train": 24, "val": 3, "test": 3}
    joint = run_joint(data, tmp_path / "joint", JointConfig("tiny-internvl", epochs=1, batch=8), progress=False)
    assert json.loads((joint / "config.json").read_text())["model_type"] == "internvl"
    assert backbone_from_snapshot(joint).family == "internvit"
    experts = run_experts(data, joint, tmp_path / "experts",
                          ExpertConfig(epochs=1, batch=8, micro_batch=4, lr_projector=1e-3, lr_vision=1e-3, select_on_val=False),
                          progress=False)
    tuned, base = load_checkpoint(experts), model_from_snapshot(joint, "tiny-internvl")
    assert tuned.cfg.domains == ("chart", "doc", "general")
    for k, v in tuned.state_dict().items():
        if k.startswith(("trunk.", "experts.versatile.")):
            assert torch.equal(v, base.state_dict()[k]), k  # frozen: bit-identical to the joint snapshot
    for d in tuned.cfg.domains:
        assert not torch.equal(tuned.experts[d].projector.linear_2.weight, base.experts[VERSATILE].projector.linear_2.weight)
    final = run_router(data, experts, tmp_path / "final", RouterConfig(epochs=5, batch=8, lr=2e-3), progress=False)
    assert load_checkpoint(final).router.fc2.out_features == 3
    rep = evaluate(data, final, progress=False)
    acc = rep["accuracy"]
    assert acc["versatile everywhere"]["to_versatile"] == 1.0
    for d in ("chart", "doc", "general", "all"):
        assert acc["versatile everywhere"][d] == acc["joint"][d]


@pytest.mark.parametrize("bundle", [2], indirect=True)
def test_serve_and_triton_repository(internvl, bundle, tmp_path):
    """`serve --packed` (a real Triton server through PyTriton) answers transformers' embeddings; the model
    repository declares this family's token shape."""
    pytest.importorskip("pytriton", reason="needs the serve extra: pip install 'mixpert-deploy[serve]'")
    import io
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from triton_load import ServeProcess

    from mixpert_export.serving.client import MixpertClient
    from mixpert_export.serving.triton_repo import read_config, write_repository

    model, snap = internvl
    _, path = bundle
    repo = write_repository(path, tmp_path / "repo", platform="python", kind="cpu")
    top, part = read_config(repo / "mixpert" / "config.pbtxt"), read_config(repo / "mixpert_expert_versatile" / "config.pbtxt")
    assert [list(o.dims) for o in top.output if o.name == "tokens"] == [[-1, 16, 128]]  # crops x 16 tokens x D_llm
    assert [list(o.dims) for o in part.input] == [[65, 96]] and [list(o.dims) for o in part.output] == [[16, 128]]
    images = _images()[1:4]
    _, counts, ref = reference_features(model, snap, images)
    with ServeProcess(path, log=tmp_path / "serve.log", extra=["--packed", "--tau", "1.0"]) as server:
        client = MixpertClient(server.url)
        start = 0
        for im, n in zip(images, counts):
            buf = io.BytesIO()
            im.save(buf, "PNG")
            got = client.infer(buf.getvalue())
            want = ref[start:start + n].reshape(-1, 128).numpy()
            assert got.expert == VERSATILE and got.embeddings.shape == want.shape
            assert np.abs(got.embeddings - want).max() <= 1e-4
            start += n
        with pytest.raises(MixpertError, match="not an image"):
            client.infer(b"GIF89a not really")
        client.close()


def write_original_layout(model, path, max_patches=6):
    """The tiny model as the original InternVL (trust_remote_code) snapshot stores it: vision_model.* with fused
    attn.qkv, ls1/ls2, norm1/norm2, mlp1.{0,1,3}, an internvl_chat config.json keeping the tiling, and the unused
    CLIP-style preprocessor_config.json such snapshots carry."""
    import re

    from safetensors.torch import save_file

    sd, out = model.state_dict(), {}
    inverse = [(r"^model\.vision_tower", "vision_model"), (r"\.layer\.", ".layers."), ("cls_token", "class_embedding"),
               ("position_embeddings", "position_embedding"), (r"patch_embeddings\.projection", "patch_embedding"),
               (r"\.lambda_(\d)$", r".ls\1"), (r"attention\.projection_layer", "attn.proj"), (r"\.attention\.", ".attn."),
               ("layernorm_before", "norm1"), ("layernorm_after", "norm2")]
    for k, v in sd.items():
        if k.startswith("model.vision_tower."):
            if ".attention.k_proj." in k or ".attention.v_proj." in k:
                continue
            name = k
            for a, b in inverse:
                name = re.sub(a, b, name)
            if ".attn.q_proj." in name:
                kk, vv = k.replace("q_proj", "k_proj"), k.replace("q_proj", "v_proj")
                out[name.replace("q_proj", "qkv")] = torch.cat([v, sd[kk], sd[vv]]).contiguous()
            else:
                out[name] = v.contiguous()
        elif k.startswith("model.multi_modal_projector."):
            rest = k[len("model.multi_modal_projector."):]
            for new, old in (("mlp1.0.", "layer_norm."), ("mlp1.1.", "linear_1."), ("mlp1.3.", "linear_2.")):
                if rest.startswith(old):
                    out[new + rest[len(old):]] = v.contiguous()
        else:
            out[k.replace("model.language_model.", "language_model.model.")] = v.clone().contiguous()
    path.mkdir(parents=True)
    save_file(out, str(path / "model.safetensors"))
    c = model.config
    vision = {k: getattr(c.vision_config, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                       "num_attention_heads", "patch_size", "hidden_act", "layer_norm_eps", "norm_type")}
    vision |= {"model_type": "intern_vit_6b", "qkv_bias": True, "qk_normalization": False, "image_size": 64,
               "patch_size": 8, "architectures": ["InternVisionModel"]}
    (path / "config.json").write_text(json.dumps({
        "model_type": "internvl_chat", "architectures": ["InternVLChatModel"], "vision_config": vision,
        "llm_config": {"model_type": "qwen2", "hidden_size": c.text_config.hidden_size}, "select_layer": -1,
        "downsample_ratio": 0.5, "ps_version": "v2", "force_image_size": 64, "dynamic_image_size": True,
        "use_thumbnail": True, "min_dynamic_patch": 1, "max_dynamic_patch": max_patches, "template": "internlm2-chat"}))
    (path / "preprocessor_config.json").write_text(json.dumps({"crop_size": 64, "do_center_crop": True, "size": 64,
                                                               "feature_extractor_type": "CLIPFeatureExtractor"}))
    return path


def test_original_layout_snapshot_equals_transformers(internvl, tmp_path):
    """An original-layout snapshot of the same weights: fused q/k/v split, keys renamed, tiling from config.json;
    versatile = transformers' (-hf) features on transformers' tiles, <= 1e-5."""
    from mixpert_train.preprocess import Preprocessor

    model, snap = internvl
    orig = write_original_layout(model, tmp_path / "orig")
    bb = backbone_from_snapshot(orig, "tiny-internvl")
    assert bb.max_crops == 7 and bb.image_mean == (0.485, 0.456, 0.406)
    ours = model_from_snapshot(orig, "tiny-internvl")
    images = _images()
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    ref_proc = GotOcr2ImageProcessorPil(size={"height": 64, "width": 64}, crop_to_patches=True, min_patches=1, max_patches=6,
                                        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    px = ref_proc(images=images, return_tensors="pt")["pixel_values"]
    assert np.array_equal(np.concatenate([Preprocessor(bb).pixel_values(im)[0] for im in images]), px.numpy())
    with torch.no_grad():
        ref = model.model.get_image_features(pixel_values=px).pooler_output
        got = ours.experts[VERSATILE](ours.trunk(px))
    assert (got - ref).abs().max().item() <= 1e-5
    with pytest.raises(MixpertError, match="ps_version 'v1'"):
        cfg = json.loads((orig / "config.json").read_text())
        (orig / "config.json").write_text(json.dumps(cfg | {"ps_version": "v1"}))
        backbone_from_snapshot(orig, "tiny-internvl")


ASK_TEMPLATE = ("{% for m in messages %}<|user|> {% for c in m['content'] %}{% if c['type'] == 'image' %}<IMG_CONTEXT>"
                "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %} <|assistant|>{% endif %}")


def internvl_tokenizer():
    """A word-level tokenizer with InternVL's image tokens registered as transformers' -hf tokenizers have them."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2, "<img>": 3, "</img>": 4, "<IMG_CONTEXT>": 5, "<video>": 6,
             "<|user|>": 7, "<|assistant|>": 8} | {f"w{i}": i for i in range(9, 300)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>",
                                   extra_special_tokens={"start_image_token": "<img>", "end_image_token": "</img>",
                                                         "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})


@pytest.mark.parametrize("bundle", [2], indirect=True)
def test_ask_equals_transformers_generate(internvl, bundle):
    """ask on an InternVL bundle + the snapshot's LLM: token-for-token transformers' InternVLForConditionalGeneration
    .generate (greedy) on the prompt InternVLProcessor builds (start + context x 16 x tiles + end), torch and ORT."""
    from jinja2 import Template

    from mixpert_export.runtime.pipeline import MixpertPipeline
    from mixpert_export.serving.ask import LanguageModel, ask

    model, snap = internvl
    _, path = bundle
    tok = internvl_tokenizer()
    llm = LanguageModel.from_snapshot(snap)
    question, new = " w10 w11 w12", 10
    answers = []
    for runtime in ("torch", "onnxruntime"):
        pipe = MixpertPipeline.from_engines(path, runtime=runtime, packed=True, tau=1.0)
        for im in _images()[:3]:
            px = reference_pixels(snap, [im])
            n = int(px["num_patches"][0]) * 16
            text = Template(ASK_TEMPLATE).render(messages=[{"role": "user", "content": [
                {"type": "image"}, {"type": "text", "text": question}]}], add_generation_prompt=True)
            text = text.replace("<IMG_CONTEXT>", "<img>" + "<IMG_CONTEXT>" * n + "</img>")  # replace_image_token
            ids = tok(text, return_tensors="pt", add_special_tokens=False)
            with torch.no_grad():
                out = model.generate(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"],
                                     pixel_values=px["pixel_values"], max_new_tokens=new, do_sample=False, pad_token_id=0)
            want = out[0, ids["input_ids"].shape[1]:].tolist()
            want = want[:want.index(2)] if 2 in want else want
            got = ask(pipe, llm, im, question, max_new_tokens=new)
            assert llm.input_ids(question, got.image_positions) == ids["input_ids"][0].tolist()
            assert got.expert == VERSATILE and got.token_ids == want and len(want) >= 3, (im.size, got.token_ids, want)
            answers.append(tuple(want))
    assert len(set(answers)) >= 2  # the image changes the answer: the test would see an ignored vision side
