"""The MLLM around the vision side, shared by every training stage and by eval: a word-level tokenizer built
offline from the data, a tiny transformers MLLM of the backbone's family (its adapter builds it), and the one
forward that turns per-crop visual tokens into the answer's logits (packed as the family's MLLM packs them).

The loss is cross-entropy on the answer tokens only (teacher forcing); exact match means every answer token is
the argmax given the correct prefix, i.e. greedy decoding reproduces the answer. The synthetic data's answers
are one word, one token of the word-level vocabulary; a real tokenizer may split them, which is handled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from .backbones import Backbone
from .data.manifest import Sample
from .errors import MixpertError
from .preprocess import ImageError, Preprocessor

SPECIAL = ("<pad>", "<unk>", "<image>", "<eos>")


def build_tokenizer(samples: list[Sample]):
    """A word-level tokenizer over the data's own questions and answers (the `tokenizers` library, offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for s in samples for w in (s.question + " " + s.answer).split()})
    vocab = {t: i for i, t in enumerate(SPECIAL + tuple(words))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def tiny_mllm(backbone: Backbone, vocab_size: int, seed: int = 0):
    """A tiny transformers MLLM of the backbone's family: its tower + projector and a 2-layer Qwen2 LM."""
    from .families import adapter_for

    torch.manual_seed(seed)
    return adapter_for(backbone).tiny_mllm(backbone, vocab_size, SPECIAL.index("<image>"))


def _adapter(mllm):
    from .families import adapter_for_config

    return adapter_for_config(mllm.config.to_dict(), f"the {type(mllm).__name__}")


@dataclass
class Item:
    """One preprocessed sample: its crops, original size, question token ids and answer token id."""
    sample: Sample
    crops: torch.Tensor  # [n_crops, 3, S, S]; patch families: its patches [n_patches, C*t*p*p]
    size: tuple[int, int]  # (h, w) of the original image
    question: torch.Tensor  # [Lq] int64
    answer: torch.Tensor  # [La] int64, La >= 1
    grid: tuple | None = None  # (t, h, w) in patches, for patch families


def item_rows(items: list[Item], backbone: Backbone) -> tuple[torch.Tensor, tuple]:
    """A batch's rows (its items' crops or patches, concatenated) and the per-row inputs every part takes with
    them (patch families: positions and image ids, from the grids; () for crop families)."""
    from .families import adapter_for

    x = torch.cat([it.crops for it in items])
    ad = adapter_for(backbone)
    if ad.rows == "crops":
        return x, ()
    return x, tuple(torch.from_numpy(v) for v in ad.row_inputs(backbone, [it.grid for it in items]).values())


def token_sizes(items: list[Item], backbone: Backbone) -> list[int]:
    """Rows of tokens each item's image gives (crops; merged patches)."""
    from .families import adapter_for

    merge = adapter_for(backbone).io(backbone)["merge"] if adapter_for(backbone).rows != "crops" else 1
    return [len(it.crops) // merge for it in items]


def is_vision_parameter(mllm, name: str) -> bool:
    """Whether an MLLM parameter belongs to its vision tower or projector (the family's snapshot prefixes)."""
    ad = _adapter(mllm)
    return name.startswith(ad.tower_prefixes + ad.projector_prefixes)


def load_items(samples: list[Sample], pre: Preprocessor, tokenizer, strict: bool = False, log=print) -> list[Item]:
    """Preprocess every sample; a corrupt or missing image is skipped, counted and named (strict: an error)."""
    from .preprocess import load_image

    items, skipped = [], []
    for s in samples:
        try:
            img = load_image(s.image)
            crops, grid = pre.pixel_values(img)
        except ImageError as e:
            if strict:
                raise MixpertError(f"{e} (run without --strict to skip bad images)") from None
            skipped.append(str(e))
            continue
        q = tokenizer(s.question, add_special_tokens=False)["input_ids"]
        a = tokenizer(s.answer, add_special_tokens=False)["input_ids"]
        if not a:
            raise MixpertError(f"sample {s.image}: empty answer")
        items.append(Item(s, torch.from_numpy(crops), (img.size[1], img.size[0]), torch.tensor(q, dtype=torch.long),
                          torch.tensor(a, dtype=torch.long), grid))
    if skipped:
        log(f"skipped {len(skipped)} unreadable image(s): " + "; ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
    return items


def reference_crop_tokens(mllm, crops: torch.Tensor, grids=None) -> torch.Tensor:
    """transformers' own vision path for crops [N, 3, S, S] -> tokens [N, T, D_llm] (the family adapter's
    mllm_crop_tokens: tower, feature selection, projector, as the MLLM computes them). Patch families: the
    patches of several images [P, ...] and their grids -> [P / merge, D_llm]."""
    return _adapter(mllm).mllm_crop_tokens(mllm, crops, grids)


def answer_scores(llava, crop_tokens: list[torch.Tensor], items: list[Item]):
    """Teacher-forced answer: (mean cross-entropy over answer tokens, exact match per sample [B] bool).
    Each sequence is the packed visual tokens (the MLLM's own packing), the question, then the answer (right padded)."""
    pack = _adapter(llava).mllm_pack
    lm = llava.model.language_model
    embed = lm.get_input_embeddings()
    dev = embed.weight.device
    seqs, spans = [], []
    for tokens, it in zip(crop_tokens, items):
        packed = pack(llava, tokens, it.size)
        text = embed(torch.cat([it.question, it.answer[:-1]]).to(dev))
        seqs.append(torch.cat([packed.to(embed.weight.dtype), text]))
        start = len(packed) + len(it.question) - 1  # the position that predicts the first answer token
        spans.append((start, len(it.answer)))
    lens = torch.tensor([len(x) for x in seqs])
    x = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)
    mask = (torch.arange(x.shape[1])[None] < lens[:, None]).long().to(dev)
    visual = [s0 + 1 - len(it.question) for (s0, _), it in zip(spans, items)]  # packed visual tokens first
    pos = _adapter(llava).mllm_positions(llava, [it.grid for it in items], lens.tolist(), visual)
    hidden = lm(inputs_embeds=x, attention_mask=mask,
                **({"position_ids": pos.to(dev)} if pos is not None else {})).last_hidden_state
    rows = torch.cat([torch.full((n,), b) for b, (_, n) in enumerate(spans)])
    cols = torch.cat([torch.arange(s0, s0 + n) for s0, n in spans])
    logits = llava.lm_head(hidden[rows, cols])  # [sum La, vocab]
    target = torch.cat([it.answer for it in items]).to(dev)
    loss = F.cross_entropy(logits, target)
    hit = (logits.argmax(-1) == target).cpu()
    correct = torch.stack([hit[rows == b].all() for b in range(len(items))])
    return loss, correct


def batches(n: int, size: int, rng: np.random.Generator | None):
    order = rng.permutation(n) if rng is not None else np.arange(n)
    return [order[i:i + size] for i in range(0, n, size)]


def load_tokenizer(path: Path):
    from transformers import PreTrainedTokenizerFast

    if not (Path(path) / "tokenizer.json").is_file():
        raise MixpertError(f"{path}: no tokenizer.json; --joint must be a snapshot written by the joint stage or a HF snapshot")
    return PreTrainedTokenizerFast.from_pretrained(str(path))


def write_json(path: Path, data: dict):
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
