"""Answers through the engines against transformers' own LLaVA-OneVision generate(): a tiny snapshot with a
tokenizer, an image processor and a chat template; the reference prompt and pixels come from transformers'
LlavaOnevisionProcessor, the reference answer from LlavaOnevisionForConditionalGeneration.generate (greedy).

1. Everything routed to versatile: token-for-token the same answer, through torch and ONNX Runtime.
2. Everything routed to a domain expert whose weights differ: the same answer as transformers' model with that
   expert's layers and projector in its tower, and not the versatile answer (so the vision side really counts).
"""

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import make_reference
from mixpert_export.__main__ import main
from mixpert_export.bundle.build import build_bundle
from mixpert_export.bundle.sources import resolve
from mixpert_export.runtime.pipeline import MixpertPipeline
from mixpert_export.serving.ask import LanguageModel, ask
from mixpert_train.checkpoint import save_checkpoint
from mixpert_train.errors import MixpertError
from mixpert_train.model import DOMAINS
from mixpert_train.weights import model_from_snapshot

TEMPLATE = ("{% for m in messages %}<|user|> {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
            "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %} <|assistant|>{% endif %}")
QUESTION = " w10 w11 w12"
NEW = 12


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<eos>": 2, "<|user|>": 3, "<|assistant|>": 4}
    vocab |= {f"w{i}": i for i in range(5, 999)} | {"<image>": 999}  # 999: the config's image_token_index
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>",
                                   additional_special_tokens=["<image>"])


class Reference:
    """transformers' side of the comparison, without LlavaOnevisionProcessor (it needs torchvision for its video
    processor): its image processor's pixels, the template rendered by jinja2 as processors do, the placeholder
    expanded to as many image tokens as transformers' own packing yields (text.replace, as the processor does),
    then its tokenizer."""

    def __init__(self, model):
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

        self.tokenizer = tokenizer()
        self.image_processor = LlavaOnevisionImageProcessorPil(
            size={"height": 64, "width": 64}, image_grid_pinpoints=model.config.image_grid_pinpoints,
            image_mean=[0.5] * 3, image_std=[0.5] * 3, do_convert_rgb=True)

    def inputs(self, model, image):
        from jinja2 import Template

        px = self.image_processor(images=[image], return_tensors="pt")
        with torch.no_grad():
            feats = model.model.get_image_features(pixel_values=px["pixel_values"], image_sizes=px["image_sizes"],
                                                   vision_feature_layer=-1, vision_feature_select_strategy="full")
        feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
        n = sum(len(f) for f in feats)  # the model's own packed length for this image
        text = Template(TEMPLATE).render(messages=[{"role": "user", "content": [{"type": "image"},
                                                                               {"type": "text", "text": QUESTION}]}],
                                         add_generation_prompt=True)
        ids = self.tokenizer(text.replace("<image>", "<image>" * n), return_tensors="pt")
        return {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"], **px}


def images():
    rng = np.random.default_rng(11)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in [(64, 64), (200, 90), (90, 160)]]


def reference_answer(model, proc, image):
    inputs = proc.inputs(model, image)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    new = out[0, inputs["input_ids"].shape[1]:].tolist()
    return (new[:new.index(2)] if 2 in new else new), inputs["input_ids"][0].tolist()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("ask")
    model = make_reference(seed=4)
    with torch.no_grad():
        model.model.image_newline.normal_()
        for p in model.model.language_model.parameters():  # a random LLM that reacts to its input
            p.mul_(4.0) if p.dim() > 1 else None
    snap = d / "snap"
    model.save_pretrained(snap)
    proc = Reference(model)
    proc.tokenizer.save_pretrained(snap)
    proc.image_processor.save_pretrained(snap)
    (snap / "chat_template.jinja").write_text(TEMPLATE)
    m, src = resolve(weights=str(snap))
    build_bundle(m, d / "versatile", runtime="onnxruntime", max_crops=20, source=src, progress=False, validate=False)
    return {"model": model, "proc": proc, "snap": snap, "dir": d}


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_answers_equal_transformers_generate_when_routed_to_versatile(world, runtime):
    pipe = MixpertPipeline.from_engines(world["dir"] / "versatile", runtime=runtime, packed=True, tau=1.0)
    llm = LanguageModel.from_snapshot(world["snap"])
    for img in images():
        want, want_prompt = reference_answer(world["model"], world["proc"], img)
        got = ask(pipe, llm, img, QUESTION, max_new_tokens=NEW)
        assert got.expert == "versatile"
        assert llm.input_ids(QUESTION, got.image_positions) == want_prompt  # the processor's own prompt, expanded
        assert got.token_ids == want and len(want) >= 3, (img.size, got.token_ids, want)


def test_a_routed_expert_answers_from_its_own_embeddings(world, tmp_path):
    """chart's layers and projector perturbed, the router sending everything to chart: the answer is transformers'
    with chart's weights in its tower, and differs from the versatile answer."""
    mix = model_from_snapshot(world["snap"], "tiny")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in mix.experts["chart"].parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
        mix.router.fc2.bias[DOMAINS.index("chart")] = 50.0
    build_bundle(mix, tmp_path / "chart", runtime="onnxruntime", max_crops=20,
                 source={"kind": "checkpoint", "path": str(save_checkpoint(mix, tmp_path / "ck"))}, progress=False,
                 validate=False)
    ref = copy.deepcopy(world["model"])
    k = mix.cfg.expert_layers
    layers = ref.model.vision_tower.encoder.layers
    with torch.no_grad():
        for j, layer in enumerate(mix.experts["chart"].layers):
            layers[len(layers) - k + j].load_state_dict(layer.state_dict())
        ref.model.multi_modal_projector.load_state_dict(mix.experts["chart"].projector.state_dict())
    pipe = MixpertPipeline.from_engines(tmp_path / "chart", runtime="onnxruntime", packed=True)
    llm = LanguageModel.from_snapshot(world["snap"])
    differs = 0
    for img in images():
        got = ask(pipe, llm, img, QUESTION, max_new_tokens=NEW)
        assert got.expert == "chart"
        want, _ = reference_answer(ref, world["proc"], img)
        assert got.token_ids == want, (img.size, got.token_ids, want)
        differs += want != reference_answer(world["model"], world["proc"], img)[0]
    assert differs >= 2  # chart's embeddings change the answers: a mixed-up or ignored vision side would show


def test_ask_cli_and_its_one_line_errors(world, tmp_path, capsys):
    img = tmp_path / "a.png"
    images()[1].save(img)
    args = ["ask", "--engines", str(world["dir"] / "versatile"), "--llm", str(world["snap"]), str(img), QUESTION,
            "--runtime", "onnxruntime", "--tau", "1.0", "--max-new-tokens", str(NEW)]
    assert main(args + ["--json"]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["token_ids"] == reference_answer(world["model"], world["proc"], images()[1])[0]
    assert rec["expert"] == "versatile" and rec["vision_ms"] > 0 and rec["llm_ms"] > 0
    assert main(args) == 0
    assert "expert versatile" in capsys.readouterr().out
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    for argv, words in [([str(bad)], "bad.png"), (["--llm", str(tmp_path / "nope")], "no such directory"),
                        (["--llm", str(other)], "qwen2_vl")]:
        a = list(args)
        if argv[0].startswith("--"):
            a[a.index(argv[0]) + 1] = argv[1]
        else:
            a[5] = argv[0]
        assert main(a) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and "\n" not in err, err
    narrow = copy.deepcopy(world["model"].config.to_dict())
    narrow["text_config"]["hidden_size"] = 128
    (other / "config.json").write_text(json.dumps(narrow))
    with pytest.raises(MixpertError):
        LanguageModel.from_snapshot(other)
