"""The paper's Table 6: total and activated parameters and GFLOPs, baseline vs Mixpert, on the meta device.

    python benchmarks/flops.py --backbone llava-ov-7b [--crops 1 10] [--prompt-tokens 64] [--out benchmarks/results]
    python benchmarks/flops.py --backbone qwen2-vl-7b [--sizes 448x448 1280x720] ...   (patch families: image sizes)

FLOPs are counted by torch's FlopCounterMode on meta tensors (matmuls, convolutions and attention; on CPU
tensors SDPA would be missed). One FLOP = one multiply or one add (2 per multiply-accumulate). The router is
also counted by hand. Element-wise work (GELU, LayerNorm, softmax, the router's mean pool) is not counted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from mixpert_train.backbones import get_backbone
from mixpert_train.model import VERSATILE, MixpertConfig, build_model, parameter_report

# The language model each backbone feeds (for the prefill column only): LLaVA-OV-7B's Qwen2-7B.
LLM = {
    "llava-ov-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                        num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, max_position_embeddings=8192),
    # InternVL2-8B's InternLM2.5-7B-chat (its config.json: 32 layers, GQA 32/8, SwiGLU 14336, no q/k/v bias,
    # untied head): the same arithmetic and parameter count as a Llama config of those sizes.
    "internvl2-8b": dict(arch="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=92544,
                         max_position_embeddings=32768, tie_word_embeddings=False),
    # Qwen2-VL-7B's language model is Qwen2-7B's shape (M-RoPE changes positions, not arithmetic or parameters).
    "qwen2-vl-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                        num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
                        tie_word_embeddings=False),
    # issue 29: Qwen2.5-VL-7B's and InternVL3-8B's Qwen2.5-7B (Qwen2-7B's shape), InternVL3.5-8B's and Qwen3-VL-8B's
    # Qwen3-8B (its config.json: 36 layers, GQA 32/8, head_dim 128, SwiGLU 12288, q/k norm, untied head)
    "qwen2.5-vl-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                          num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
                          tie_word_embeddings=False),
    "internvl3-8b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                         num_key_value_heads=4, vocab_size=151674, max_position_embeddings=32768,
                         tie_word_embeddings=False),
    "internvl3.5-8b": dict(arch="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                           num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                           max_position_embeddings=40960, tie_word_embeddings=False),
    "qwen3-vl-8b": dict(arch="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                        max_position_embeddings=40960, tie_word_embeddings=False),
}


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def router_flops_by_hand(d: int, n_domains: int, crops: int) -> int:
    """One image: the pooling matmul [1, rows] @ [rows, d] (rows: crops, or patches), then two matmuls on the pooled
    vector. (Crop families: the mean over each crop's 729 tokens is a reduction, not counted: ~0.84 MFLOP a crop.)"""
    return 2 * crops * d + 2 * (d * d + d * n_domains)


def _points(cfg, crops_list, sizes):
    """(label, pixels, per-row inputs, rows) per point: crops of the backbone's size, or (patch families) one image
    of each size, its grid as the family's own processor makes it; meta tensors."""
    from PIL import Image

    from mixpert_train.families import adapter_for
    from mixpert_train.preprocess import Preprocessor

    bb = cfg.backbone
    ad = adapter_for(bb)
    if ad.rows == "crops":
        for c in crops_list:
            yield c, torch.empty(c, 3, bb.crop_size, bb.crop_size, device="meta"), (), c
        return
    pre = Preprocessor(bb)
    for w, h in sizes:
        px, grid = pre.pixel_values(Image.new("RGB", (w, h)))
        rows = tuple(torch.from_numpy(v).to("meta") for v in ad.row_inputs(bb, [grid]).values())
        yield f"{w}x{h}", torch.empty(px.shape, device="meta"), rows, len(px)


def count(backbone: str, crops_list=(1, 10), prompt_tokens: int = 64, sizes=((448, 448), (1280, 720))) -> dict:
    cfg = MixpertConfig.for_backbone(get_backbone(backbone))
    bb = cfg.backbone
    model = build_model(cfg, device="meta")
    params = parameter_report(cfg)
    rows = {}
    for key, x, extra, n in _points(cfg, crops_list, sizes):
        h = model.trunk(x, *extra)
        trunk = _flops(lambda: model.trunk(x, *extra))
        router = _flops(lambda: model.router(h, torch.full((1, n), 1.0 / n, device="meta")))
        expert = _flops(lambda: model.experts[VERSATILE](h, *extra))
        tokens = int(model.experts[VERSATILE](h, *extra).shape[:-1].numel())
        llm = _llm_prefill_flops(backbone, tokens + prompt_tokens) if backbone in LLM else 0
        rows[key] = {"trunk": trunk, "router": router, "expert": expert, "llm_prefill": llm, "rows": n,
                     "baseline_vision": trunk + expert, "mixpert_vision": trunk + router + expert,
                     "baseline_total": trunk + expert + llm, "mixpert_total": trunk + router + expert + llm,
                     "visual_tokens": tokens}
    first = next(iter(rows.values()))
    hand = router_flops_by_hand(bb.hidden_size, len(cfg.domains), first["rows"])
    if first["router"] != hand:
        raise AssertionError(f"router FLOPs: counted {first['router']}, by hand {hand}")
    llm_params = _llm_params(backbone) if backbone in LLM else 0
    return {"backbone": backbone, "expert_layers": cfg.expert_layers, "prompt_tokens": prompt_tokens,
            "params": params, "llm_params": llm_params, "flops": rows, "router_flops_by_hand": hand}


def _llm(backbone):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    cfg = dict(LLM[backbone])
    config, model = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM),
                     "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[cfg.pop("arch", "qwen2")]
    with torch.device("meta"):
        return model(config(**cfg))


def _llm_params(backbone) -> int:
    return sum(p.numel() for p in _llm(backbone).parameters())


def _llm_prefill_flops(backbone: str, tokens: int) -> int:
    lm = _llm(backbone)
    ids = torch.zeros(1, tokens, dtype=torch.long, device="meta")
    return _flops(lambda: lm(input_ids=ids, logits_to_keep=1))  # the LM head on the last token only


def markdown(r: dict) -> str:
    p, M, G = r["params"], 1e6, 1e9
    lines = [f"### Table 6 reproduction: {r['backbone']} (k={r['expert_layers']}, prompt {r['prompt_tokens']} tokens)", "",
             "| model | total params | activated params | " + " | ".join(
                 f"GFLOPs ({c} crop{'s' if c > 1 else ''})" if isinstance(c, int) else f"GFLOPs ({c}, {f['rows']} patches)"
                 for c, f in r["flops"].items()) + " |",
             "|---|---|---|" + "---|" * len(r["flops"])]
    llm = r["llm_params"]
    for name, tot, act, key in (("baseline (single encoder)", p["baseline_total"], p["baseline_activated"], "baseline_total"),
                                ("Mixpert", p["mixpert_total"], p["mixpert_activated"], "mixpert_total")):
        lines.append(f"| {name} | {(tot + llm) / M:,.1f}M | {(act + llm) / M:,.1f}M | "
                     + " | ".join(f"{f[key] / G:,.3f}" for f in r["flops"].values()) + " |")
    lines.append(f"| **added by Mixpert** | **{p['added_total'] / M:.1f}M** (experts {p['added_experts'] / M:.1f}M, "
                 f"router {p['router'] / M:.3f}M) | **{p['added_activated'] / M:.3f}M** | "
                 + " | ".join(f"**{(f['mixpert_total'] - f['baseline_total']) / G:.4f}**" for f in r["flops"].values()) + " |")
    lines += ["", "Per component (GFLOPs): " + "; ".join(
        f"{c if not isinstance(c, int) else f'{c} crop(s)'}: trunk {f['trunk'] / G:.2f}, router {f['router'] / G:.5f}, expert {f['expert'] / G:.2f}, "
        f"LLM prefill ({f['visual_tokens']} + {r['prompt_tokens']} tokens) {f['llm_prefill'] / G:,.1f}"
        for c, f in r["flops"].items()),
        "", f"Router by hand ({next(iter(r['flops']))}): 2 x (rows*d + d*d + d*n) = {r['router_flops_by_hand'] / G:.5f} GFLOPs "
        f"= {r['router_flops_by_hand'] / 2 / G:.5f} GMACs (the paper's ~0.001 G is in multiply-accumulates).",
        "Totals include the language model's parameters and its prefill; the paper's totals may use another prompt "
        "length, count MACs, and (LLaVA-OV) include anyres packing (newline tokens, 2x2 pooling above 9 crops), which we do not."
        + ("" if r["llm_params"] else " This backbone has no language model entry in flops.LLM: totals are the vision side only.")]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="llava-ov-7b")
    ap.add_argument("--crops", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--sizes", nargs="+", default=["448x448", "1280x720"], help="patch families: image sizes WxH")
    ap.add_argument("--out", help="directory for flops_<backbone>.md and .json")
    a = ap.parse_args(argv)
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in a.sizes]
    r = count(a.backbone, tuple(a.crops), a.prompt_tokens, sizes)
    md = markdown(r)
    print(md)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"flops_{a.backbone}.md").write_text(md)
        (out / f"flops_{a.backbone}.json").write_text(json.dumps(r, indent=2, default=int))
    return 0


if __name__ == "__main__":
    sys.exit(main())
