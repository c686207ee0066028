"""Answers through the engines: the image's packed embeddings from a bundle (any runtime), the language model and
the prompt template from a local MLLM snapshot, greedy generation.

    python -m mixpert_export ask --engines DIR --llm SNAPSHOT IMAGE "question" [--json]

Only the language model's tensors are read from the snapshot (its vision tower and projector are the bundle's
business); nothing is downloaded. The prompt is the snapshot's own chat template when it has one (the processor's
`chat_template.json` / `.jinja`, else the tokenizer's), rendered with one image and the question; without one the
sequence is the image followed by the question, as the demo's MLLM was trained. The image placeholder becomes one
position per packed embedding (inside the family's image start / end tokens where it has them: InternVL), exactly
as the family's transformers processor expands it (the family adapter's image_prompt), and those positions take
the embeddings: what LlavaOnevisionForConditionalGeneration / InternVLForConditionalGeneration do inside their
own forward. Qwen2-VL's LLM places tokens with M-RoPE (3D positions from the image's grid), so its language side is
the MLLM class itself without its ViT (the adapter's language_model), given the ids and grid its generate() needs.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mixpert_train.errors import MixpertError

# (prefix in the snapshot, prefix in a plain causal LM), newest layout first
LLM_PREFIXES = (("model.language_model.", "model."), ("lm_head.", "lm_head."),
                ("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."))


@dataclass
class Answer:
    text: str
    token_ids: list
    expert: str
    scores: list
    margin: float
    image_positions: int  # packed embeddings spliced in
    prompt_tokens: int
    vision_ms: float  # decode + crops + engines + packing
    llm_ms: float  # prompt + generation
    extra: dict = field(default_factory=dict)

    def record(self) -> dict:
        return {k: getattr(self, k) for k in ("text", "token_ids", "expert", "scores", "margin", "image_positions",
                                                "prompt_tokens", "vision_ms", "llm_ms")}


class LanguageModel:
    """The LLM half of a local MLLM snapshot: its causal LM, tokenizer and prompt template."""

    def __init__(self, model, tokenizer, template: str | None, image_token_id: int, placeholder: str, source: Path,
                 open_ids: list | None = None, close_ids: list | None = None, family=None):
        self.model, self.tokenizer, self.template = model, tokenizer, template
        self.image_token_id, self.placeholder, self.source = image_token_id, placeholder, source
        self.open_ids, self.close_ids = list(open_ids or []), list(close_ids or [])
        self.family = family  # the MLLM family's adapter: its generate() inputs beyond the embeddings

    @property
    def hidden_size(self) -> int:
        return int(self.model.get_input_embeddings().embedding_dim)

    @classmethod
    def from_snapshot(cls, snapshot: str | Path, device: str = "cpu", dtype: str | None = None,
                      flag: str = "--llm") -> "LanguageModel":
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        from mixpert_train.families import adapter_for_config
        from mixpert_train.weights import _open, _shard_map, read_snapshot_config

        snap = Path(snapshot)
        config = read_snapshot_config(snap, flag)
        family = adapter_for_config(config, str(snap / "config.json"))
        if "text_config" not in config:
            raise MixpertError(f"{snap / 'config.json'}: no text_config (model_type {config.get('model_type')!r}); "
                               "ask needs a transformers (-hf) snapshot of the MLLM, e.g. save_pretrained's")
        own = family.language_model(config)  # the MLLM class itself where a plain causal LM cannot stand in
        if own is None:
            text = dict(config["text_config"])
            if "tie_word_embeddings" in config:  # the MLLM's own flag governs its LM head (InternVL ties by default)
                text["tie_word_embeddings"] = bool(config["tie_word_embeddings"])
            cfg = AutoConfig.for_model(text.pop("model_type", "qwen2"), **text)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(cfg)
            prefixes = LLM_PREFIXES
        else:
            (model, prefixes), cfg = own, own[0].config
        want = model.state_dict()
        state = {}
        for key, shard in _shard_map(snap).items():
            for src, dst in prefixes:
                if key.startswith(src) and dst + key[len(src):] in want:
                    state[dst + key[len(src):]] = (key, shard)
                    break
        missing = [k for k in want if k not in state and not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
        if missing:
            raise MixpertError(f"{snap}: language-model tensor {missing[0]} not found ({len(missing)} missing); "
                               "is this the full MLLM snapshot (not only its vision side)?")
        tensors = {}
        by_shard: dict = {}
        for dst, (key, shard) in state.items():
            by_shard.setdefault(shard, []).append((dst, key))
        for shard, pairs in sorted(by_shard.items()):
            with _open(shard) as f:
                for dst, key in pairs:
                    tensors[dst] = f.get_tensor(key)
        embed_key = next(k for k, v in model.named_parameters() if v is model.get_input_embeddings().weight)
        torch_dtype = getattr(torch, dtype) if dtype else tensors[embed_key].dtype  # the snapshot's own dtype
        model.load_state_dict({k: v.to(torch_dtype) for k, v in tensors.items()}, strict=False, assign=True)
        if cfg.tie_word_embeddings:
            model.tie_weights()
        for name, mod in list(model.named_modules()):  # buffers computed at construction (rotary inv_freq)
            if any(b.is_meta for b in mod.buffers(recurse=False)):
                parent, _, leaf = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, leaf, type(mod)(config=getattr(mod, "config", cfg)))
        left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if left:
            raise MixpertError(f"{snap}: language-model tensor {left[0]} has no value ({len(left)} missing)")
        model = model.to(device).eval()
        try:
            tokenizer = AutoTokenizer.from_pretrained(snap, local_files_only=True)
        except (OSError, ValueError) as e:
            raise MixpertError(f"{snap}: no tokenizer transformers can load ({str(e).splitlines()[0][:120]}); "
                               "the snapshot needs its tokenizer files") from None
        placeholder, image_token_id, open_ids, close_ids = family.image_prompt(config, tokenizer)
        return cls(model, tokenizer, _template(snap, tokenizer), image_token_id, placeholder, snap, open_ids, close_ids,
                   family)

    def prompt(self, question: str) -> tuple[str, str]:
        """The text before and after the image placeholder."""
        if self.template:
            from jinja2 import Template  # what transformers renders chat templates with

            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            text = Template(self.template).render(messages=messages, add_generation_prompt=True,
                                                  bos_token=self.tokenizer.bos_token or "")
        else:
            text = f"{self.placeholder}{question}"
        if text.count(self.placeholder) != 1:
            raise MixpertError(f"{self.source}: the prompt template gives {text.count(self.placeholder)} image "
                               f"placeholders {self.placeholder!r} for one image")
        before, after = text.split(self.placeholder)
        return before, after

    def input_ids(self, question: str, n_image: int) -> list[int]:
        """Token ids with the placeholder expanded to `n_image` image-token positions (as the processor does)."""
        before, after = self.prompt(question)
        enc = lambda s: self.tokenizer(s, add_special_tokens=False)["input_ids"] if s else []  # noqa: E731
        return enc(before) + self.open_ids + [self.image_token_id] * n_image + self.close_ids + enc(after)

    def generate(self, embeddings: np.ndarray, question: str, max_new_tokens: int = 32,
                 grid=None, deepstack: np.ndarray | None = None) -> tuple[list[int], int]:
        """Greedy: (new token ids, prompt length) with `embeddings` [L, D] at the image positions; `grid`: the
        image's (t, h, w) in patches, for families whose positions depend on it (Qwen2-VL); `deepstack`: Qwen3-VL's
        DeepStack features [taps, L, D], which its LLM adds inside its first layers (the family then hands
        generate() the vision side's output as transformers' pre-encoded features, Adapter.generate_inputs)."""
        import torch

        ids = torch.tensor([self.input_ids(question, len(embeddings))], device=self.model.device)
        embed = self.model.get_input_embeddings()
        features = (embeddings, deepstack) if deepstack is not None else None
        extra = self.family.generate_inputs(ids, grid, self.image_token_id, features) \
            if self.family is not None and grid else {}
        greedy = dict(attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                      pad_token_id=self.tokenizer.pad_token_id or 0)
        with torch.no_grad():
            if "mm_encoder_outputs" in extra:  # the model splices the image in itself, DeepStack included
                out = self.model.generate(**greedy, **extra)
            else:
                x = embed(ids)
                mask = ids[0] == self.image_token_id
                x[0, mask] = torch.as_tensor(embeddings, device=x.device, dtype=x.dtype)
                out = self.model.generate(inputs_embeds=x, **greedy, **extra)
        new = out[0, ids.shape[1]:].tolist() if "input_ids" in extra else out[0].tolist()  # with ids: prompt first
        eos = self.tokenizer.eos_token_id
        if eos is not None and eos in new:
            new = new[:new.index(eos)]
        return new, ids.shape[1]


def _template(snap: Path, tokenizer) -> str | None:
    """The processor's chat template (what LLaVA-OV snapshots carry), else the tokenizer's, else None."""
    for name in ("chat_template.jinja", "chat_template.json"):
        f = snap / name
        if f.is_file():
            text = f.read_text()
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    proc = snap / "processor_config.json"
    if proc.is_file():
        t = json.loads(proc.read_text()).get("chat_template")
        if t:
            return t
    return getattr(tokenizer, "chat_template", None) or None


def ask(pipeline, llm: LanguageModel, image, question: str, max_new_tokens: int = 32) -> Answer:
    """One image and one question through the engines (packed embeddings) and the LLM."""
    if pipeline.packing is None:
        raise MixpertError("ask needs a pipeline built with packed=True")
    width = pipeline.cfg.backbone.llm_hidden_size
    if llm.hidden_size != width:
        raise MixpertError(f"{llm.source}: its language model is {llm.hidden_size} wide, the bundle's projector gives "
                           f"{width}; pass --llm the snapshot the bundle was built from")
    t0 = time.perf_counter()
    (res,) = pipeline([image])
    if not res.ok:
        raise MixpertError(res.error)
    t1 = time.perf_counter()
    ids, n_prompt = llm.generate(res.embeddings, question, max_new_tokens, grid=res.grid, deepstack=res.deepstack)
    t2 = time.perf_counter()
    return Answer(text=llm.tokenizer.decode(ids, skip_special_tokens=True), token_ids=ids, expert=res.expert,
                  scores=res.scores, margin=res.margin, image_positions=len(res.embeddings), prompt_tokens=n_prompt,
                  vision_ms=(t1 - t0) * 1e3, llm_ms=(t2 - t1) * 1e3)
