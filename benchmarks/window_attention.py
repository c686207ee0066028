"""Qwen2.5-VL's windowed blocks: what the chosen attention form costs against attending window by window.

    python benchmarks/window_attention.py --backbone qwen2.5-vl-7b --sizes 448x448 1288x728 [--rounds 5]

The parts attend over a whole call with a mask (families/qwen2_vl.attention_masks): a windowed block masks all
but the patch's own window, so it computes P^2 scores where transformers' window-by-window split (reordering the
patches by window, cu_window_seqlens) computes sum over windows of w^2. Same block, same weights, same patches
(random init, torch CPU, one block; its output checked equal to the windowed reference), side by side in
interleaved rounds:
  masked     the exported form: one attention over the call's P patches with the same-window mask
  windowed   transformers' own Qwen2_5_VLVisionBlock on the window-ordered patches with cu_window_seqlens
  full       a full-attention block (the same-image mask): what 4 of the 32 blocks do in both forms
Reported per case: masked / windowed and full / windowed (median [min, max]), and the whole tower's estimated
cost of the masked form (28 windowed + 4 full blocks at 7B) over transformers' (the same 4 full blocks), with the
attention share of FLOPs in each form. Absolute times are context only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import device_name, slug, write_report  # noqa: E402


def case(bb, size, rounds: int) -> dict:
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionBlock
    from transformers.vision_utils import get_vision_window_index

    from mixpert_train.families import adapter_for
    from mixpert_train.preprocess import Preprocessor
    from PIL import Image

    ad, v = adapter_for(bb), bb.vision
    w, h = size
    _, _, grid = Preprocessor(bb).prepare(Image.new("RGB", (w, h), "gray"))
    rows = ad.row_inputs(bb, [grid])
    pos, seg = torch.from_numpy(rows["position_ids"]), torch.from_numpy(rows["segment_ids"])
    torch.manual_seed(0)
    windowed_block, full_block = ad.layer(bb, 0), ad.layer(bb, v["fullatt_block_indexes"][0])
    full_block.load_state_dict(windowed_block.state_dict())
    for b in (windowed_block, full_block):
        b.eval()
    ctx = ad.context(bb)
    with torch.no_grad():
        cos, sin, same_image, same_window = ctx(pos, seg)
    n = len(pos)
    x = torch.randn(n, bb.hidden_size)
    # transformers' form: patches reordered by window (whole merge units), attention per window over cu_seqlens
    unit = int(v["spatial_merge_size"]) ** 2
    index, cu = get_vision_window_index(torch.tensor([list(grid)]), v["spatial_merge_size"], v["window_size"],
                                        v["patch_size"])
    order = (index[:, None] * unit + torch.arange(unit)).reshape(-1)
    ref = Qwen2_5_VLVisionBlock(ad.config(bb))  # transformers' own block, the same weights
    ref.load_state_dict(windowed_block.state_dict())
    ref.eval()
    x_ord, cos_ord, sin_ord = x[order], cos[order], sin[order]

    forms = {
        "masked": lambda: windowed_block(x, cos, sin, same_image, same_window),
        "windowed": lambda: ref(x_ord, cu_seqlens=cu, position_embeddings=(cos_ord, sin_ord)),
        "full": lambda: full_block(x, cos, sin, same_image, same_window),
    }
    with torch.no_grad():
        got, want = forms["masked"](), forms["windowed"]()
        err = float((got[order] - want).abs().max())
        for f in forms.values():  # warm-up
            f()
        times = {k: [] for k in forms}
        for r in range(rounds):
            names = list(forms)
            for k in names[r % 3:] + names[:r % 3]:
                t = time.perf_counter()
                forms[k]()
                times[k].append((time.perf_counter() - t) * 1e3)
    ratio = lambda k: [a / b for a, b in zip(times[k], times["windowed"])]  # noqa: E731
    med = {k: statistics.median(t) for k, t in times.items()}
    L, n_full = bb.layers_in_use, len(v["fullatt_block_indexes"])
    tower_masked = (L - n_full) * med["masked"] + n_full * med["full"]
    tower_ref = (L - n_full) * med["windowed"] + n_full * med["full"]
    d = bb.hidden_size
    linear = 2 * n * (4 * d * d + 3 * d * int(v["intermediate_size"]))  # qkv + proj + SwiGLU, one block
    sizes = (cu[1:] - cu[:-1]).tolist()
    attn_win, attn_full = 4 * d * sum(s * s for s in sizes), 4 * d * n * n
    return {"size": [w, h], "grid": list(grid), "patches": n, "windows": len(sizes),
            "max_abs_vs_transformers": err, "ms": {k: {"median": med[k], "all": times[k]} for k in forms},
            "over_windowed": {k: {"median": statistics.median(ratio(k)), "min": min(ratio(k)), "max": max(ratio(k))}
                              for k in ("masked", "full")},
            "tower_estimate_masked_over_transformers": tower_masked / tower_ref,
            "attention_share": {"masked_block": attn_full / (attn_full + linear),
                                "windowed_block": attn_win / (attn_win + linear)}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="qwen2.5-vl-7b")
    ap.add_argument("--sizes", nargs="+", default=["448x448", "1288x728"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args(argv)
    from mixpert_train.backbones import get_backbone

    bb = get_backbone(a.backbone)
    if "window_size" not in bb.vision:
        print(f"error: {a.backbone} has no windowed attention", file=sys.stderr)
        return 2
    torch.set_num_threads(torch.get_num_threads())
    cases = [case(bb, tuple(int(x) for x in s.lower().split("x")), a.rounds) for s in a.sizes]
    report = {"backbone": bb.name, "runtime": f"torch {torch.__version__} CPU", "device": device_name(None),
              "date": time.strftime("%Y-%m-%d %H:%M"), "rounds": a.rounds, "cases": cases}
    md = (f"### Windowed attention as a mask: {bb.name}, one block, torch CPU, {report['device']}\n\n"
          f"Measured {report['date']}, {a.rounds} interleaved rounds, random init.\n\n"
          "| image (patches, windows) | windowed ms (transformers, context) | masked / windowed | full / windowed | "
          "tower estimate, ours / transformers | attention share of FLOPs, masked / windowed block | max abs vs transformers |\n"
          "|---|---|---|---|---|---|---|\n")
    for c in cases:
        o = c["over_windowed"]
        md += (f"| {c['size'][0]}x{c['size'][1]} ({c['patches']}, {c['windows']}) | {c['ms']['windowed']['median']:.1f} | "
               f"**{o['masked']['median']:.2f}** [{o['masked']['min']:.2f}, {o['masked']['max']:.2f}] | "
               f"{o['full']['median']:.2f} [{o['full']['min']:.2f}, {o['full']['max']:.2f}] | "
               f"**{c['tower_estimate_masked_over_transformers']:.2f}** | "
               f"{c['attention_share']['masked_block']:.1%} / {c['attention_share']['windowed_block']:.1%} | "
               f"{c['max_abs_vs_transformers']:.1e} |\n")
    print(md)
    write_report(a.out, f"window_attention_{slug(report['device'])}_torch_{bb.name}", report, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
