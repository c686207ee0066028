"""Deterministic synthetic data for the five domains, written in the manifest format: the miniature's designed
conflict, "one scene, five readings". Nothing is downloaded.

Every image, whatever its domain, is one coloured shape (circle, square or triangle, of random size and place) on
a pale page, and every question is the same: "which colour ?". The answer names the shape's colour in the domain's
own legend: each domain agrees with the plain colour names on four of the six colours and swaps the other two
(chart swaps red and green, doc blue and yellow, ...). What tells the domains apart is only the page: a faint ruling
(horizontal, vertical, grid, dots, diagonal) and a slight tint (grey, cream, blue, pink, green), 8 to 16
levels of 255 apart.

So the domains share most of what they need (seeing and naming a colour) and conflict on the rest: for a red shape,
chart wants "green" where the others want "red". A single encoder + LLM must learn an interaction (this page's tint
x this shape's colour -> that word), which plain gradient descent learns far more slowly than the main effect; one
domain alone is a main effect (its own legend). The router learns the page directly, from domain labels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from ..errors import MixpertError
from ..model import DOMAINS
from .manifest import SPLITS, Sample, write_manifest

SIZE = 64
QUESTION = "which colour ?"
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 50), "blue": (30, 60, 220), "yellow": (230, 200, 20),
           "purple": (130, 40, 170), "orange": (240, 130, 20)}
# Each domain's legend: the plain colour names but for one swapped pair; every colour is swapped in one or two domains.
SWAPS = {"chart": ("red", "green"), "doc": ("blue", "yellow"), "math": ("purple", "orange"), "ocr": ("red", "blue"),
         "general": ("green", "purple")}
# The page: a faint ruling and a slight tint (RGB of the paper) per domain.
PAGES = {"chart": ("horizontal", (248, 248, 248)), "doc": ("vertical", (252, 246, 236)),
         "math": ("grid", (238, 245, 252)), "ocr": ("dots", (248, 240, 244)), "general": ("diagonal", (240, 250, 240))}
DESIGN = {"name": "one scene, five readings", "question": QUESTION, "colours": list(COLOURS),
          "legend_swaps": {d: list(p) for d, p in SWAPS.items()},
          "pages": {d: {"ruling": r, "tint": list(t)} for d, (r, t) in PAGES.items()}, "image_size": SIZE}


def legend(domain: str, colour: str) -> str:
    """The answer a domain gives for a shape of `colour`."""
    a, b = SWAPS[domain]
    return b if colour == a else a if colour == b else colour


def page(domain: str, rng) -> Image.Image:
    """The domain's paper: a faint ruling (at a random offset) in a slight tint."""
    ruling, tint = PAGES[domain]
    img = Image.new("RGB", (SIZE, SIZE), tint)
    d = ImageDraw.Draw(img)
    ink = tuple(c - 45 for c in tint)
    o = int(rng.integers(0, 8))
    if ruling in ("horizontal", "grid"):
        for y in range(o, SIZE, 8):
            d.line([(0, y), (SIZE - 1, y)], fill=ink)
    if ruling in ("vertical", "grid"):
        for x in range(o, SIZE, 8):
            d.line([(x, 0), (x, SIZE - 1)], fill=ink)
    if ruling == "dots":
        for y in range(o % 6, SIZE, 6):
            for x in range(o % 6, SIZE, 6):
                d.point((x, y), fill=tuple(c - 100 for c in tint))
    if ruling == "diagonal":
        for k in range(-SIZE + o, SIZE, 8):
            d.line([(k, 0), (k + SIZE, SIZE)], fill=ink)
    return img


def sample(domain: str, rng) -> tuple[Image.Image, str, str]:
    """(image, question, answer) of one sample of `domain`."""
    if domain not in SWAPS:
        raise MixpertError(f"no synthetic generator for domain {domain!r}; choose from {', '.join(SWAPS)}")
    names = list(COLOURS)
    colour = names[int(rng.integers(len(names)))]
    img = page(domain, rng)
    d = ImageDraw.Draw(img)
    r = int(rng.integers(10, 19))
    cx, cy = int(rng.integers(r + 2, SIZE - r - 2)), int(rng.integers(r + 2, SIZE - r - 2))
    box = [cx - r, cy - r, cx + r, cy + r]
    shape = int(rng.integers(3))
    if shape == 0:
        d.ellipse(box, fill=COLOURS[colour])
    elif shape == 1:
        d.rectangle(box, fill=COLOURS[colour])
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[colour])
    return img, QUESTION, legend(domain, colour)


def generate(out: str | Path, n_per_domain: int = 200, seed: int = 0, fractions=(0.8, 0.1, 0.1), progress=True,
             domains=DOMAINS) -> dict:
    """Write images/<domain>/<i>.png and train/val/test.jsonl under `out` for `domains` (a backbone's own set, e.g.
    InternVL's chart, doc, general). Same seed, same bytes; a domain's images do not depend on the others chosen."""
    out = Path(out)
    unknown = [d for d in domains if d not in SWAPS]
    if unknown:
        raise MixpertError(f"no synthetic generator for domain(s) {unknown}; choose from {', '.join(SWAPS)}")
    splits = {s: [] for s in SPLITS}
    bar = tqdm(total=n_per_domain * len(domains), desc="data", unit="img", disable=not progress)
    for domain in domains:
        di = DOMAINS.index(domain)
        (out / "images" / domain).mkdir(parents=True, exist_ok=True)
        n_train, n_val = int(n_per_domain * fractions[0]), int(n_per_domain * fractions[1])
        for i in range(n_per_domain):
            img, q, a = sample(domain, np.random.default_rng([seed, di, i]))
            path = out / "images" / domain / f"{i:05d}.png"
            img.save(path)
            split = "train" if i < n_train else "val" if i < n_train + n_val else "test"
            splits[split].append(Sample(str(path), domain, q, a))
            bar.update()
    bar.close()
    for s, samples in splits.items():
        write_manifest(out / f"{s}.jsonl", samples, out)
    return {s: len(v) for s, v in splits.items()}
