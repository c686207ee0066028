"""Deterministic synthetic data for the five domains, written in the manifest format. Every answer needs the
image; every answer is one word (exact match is then one token of a word-level vocabulary). Nothing is
downloaded: fonts and natural photos come from matplotlib's own package data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from tqdm.auto import tqdm

from ..errors import MixpertError
from ..model import DOMAINS
from .manifest import SPLITS, Sample, write_manifest

WORDS = ("alpha", "delta", "river", "stone", "cloud", "pixel", "orbit", "maple", "tiger", "lemon",
         "piano", "ocean", "robot", "honey", "light", "frame", "north", "spark", "table", "zebra")
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
           "purple": (140, 60, 180), "orange": (245, 140, 30), "black": (20, 20, 20), "white": (245, 245, 245)}
LETTERS = ("A", "B", "C", "D")


def _mpl_data() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path())


def _fonts() -> list[Path]:
    ttf = _mpl_data() / "fonts" / "ttf"
    names = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf", "DejaVuSerif-Bold.ttf")
    return [ttf / n for n in names if (ttf / n).is_file()]


def _font(rng, size) -> ImageFont.FreeTypeFont:
    fonts = _fonts()
    return ImageFont.truetype(str(fonts[rng.integers(len(fonts))]), int(size))


def _photos() -> list[Image.Image]:
    d = _mpl_data() / "sample_data"
    out = []
    for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png"):
        if (d / name).is_file():
            out.append(Image.open(d / name).convert("RGB"))
    return out


def chart(rng):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = rng.integers(1, 10, len(LETTERS))
    kind = ("bar", "line", "pie")[rng.integers(3)]
    fig, ax = plt.subplots(figsize=(0.64, 0.64), dpi=100)
    if kind == "bar":
        values = rng.permutation(np.arange(2, 10))[:4]
        ax.bar(LETTERS, values, color=[np.array(c) / 255 for c in rng.permutation(list(COLOURS.values())[:6])[:4]])
        ax.set_yticks([])
        q, a = "which bar is tallest ?", LETTERS[int(np.argmax(values))]
    elif kind == "line":
        values[rng.integers(4)] = 9 if values.max() < 9 else values.max()
        ax.plot(LETTERS, values, marker="o")
        q, a = "which point is highest ?", LETTERS[int(np.argmax(values))]
    else:
        values[rng.integers(4)] += 6
        ax.pie(values, labels=LETTERS, textprops={"fontsize": 4})
        q, a = "which slice is largest ?", LETTERS[int(np.argmax(values))]
    ax.tick_params(labelsize=4, length=1, pad=1)
    fig.tight_layout(pad=0.05)
    fig.canvas.draw()
    img = Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())
    plt.close(fig)
    return img, q, a


def doc(rng):
    w, h = 128, 64
    img = Image.new("RGB", (w, h), (255, 255, 255) if rng.random() < 0.7 else (250, 246, 232))
    d = ImageDraw.Draw(img)
    font = _font(rng, 12)
    n_lines = 3
    lines = [[WORDS[j] for j in rng.integers(len(WORDS), size=2)] for _ in range(n_lines)]
    y = 4
    for line in lines:
        d.text((4, y), " ".join(line), fill=(0, 0, 0), font=font)
        y += (h - 6) // n_lines
    i = int(rng.integers(n_lines))
    return img, f"what is the first word of line {i + 1} ?", lines[i][0]


def math(rng):
    img = Image.new("RGB", (64, 64), "white")
    d = ImageDraw.Draw(img)
    if rng.random() < 0.5:
        n = int(rng.integers(3, 7))
        r, cx, cy, phase = 24, 32, 32, rng.uniform(0, 2 * np.pi)
        pts = [(cx + r * np.cos(phase + 2 * np.pi * k / n), cy + r * np.sin(phase + 2 * np.pi * k / n)) for k in range(n)]
        d.polygon(pts, outline=(0, 0, 0), width=2)
        font = _font(rng, 10)
        for k, (x, y) in enumerate(pts):
            d.text((x - 3, y - 6), chr(ord("A") + k), fill=(200, 0, 0), font=font)
        return img, "how many sides does the shape have ?", str(n)
    a, b = int(rng.integers(0, 5)), int(rng.integers(0, 5))
    d.text((4, 22), f"{a}+{b}=", fill=(0, 0, 0), font=_font(rng, 18))
    return img, "what is the result ?", str(a + b)


def ocr(rng):
    word = WORDS[rng.integers(len(WORDS))] if rng.random() < 0.7 else str(rng.integers(10))
    bg = tuple(int(x) for x in rng.integers(150, 256, 3))
    img = Image.new("RGB", (128, 64), bg)
    d = ImageDraw.Draw(img)
    fg = tuple(int(x) for x in rng.integers(0, 90, 3))
    d.text((int(rng.integers(2, 30)), int(rng.integers(4, 24))), word, fill=fg, font=_font(rng, rng.integers(18, 28)))
    img = img.rotate(float(rng.uniform(-12, 12)), fillcolor=bg)
    arr = np.asarray(img, np.float32) + rng.normal(0, 8, (64, 128, 3))
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return (img.filter(ImageFilter.GaussianBlur(0.6)) if rng.random() < 0.3 else img), "what is written ?", word


def general(rng, photos=None):
    names = list(COLOURS)
    if photos and rng.random() < 0.3:  # a natural photo, random crop and flip; the answer read off its pixels
        p = photos[rng.integers(len(photos))]
        s = int(rng.integers(48, min(p.size) // 2))
        x, y = int(rng.integers(0, p.size[0] - s)), int(rng.integers(0, p.size[1] - s))
        img = p.crop((x, y, x + s, y + s)).resize((64, 64))
        if rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        mean = np.asarray(img, np.float32).reshape(-1, 3).mean(0)
        a = names[int(np.argmin([np.sum((mean - np.array(c)) ** 2) for c in COLOURS.values()]))]
        return img, "what is the dominant colour ?", a
    img = Image.new("RGB", (64, 64), tuple(int(x) for x in rng.integers(200, 256, 3)))
    d = ImageDraw.Draw(img)
    if rng.random() < 0.5:
        big, small = rng.choice(names[:6], 2, replace=False)
        d.ellipse([4, 4, 44, 44], fill=COLOURS[big])
        d.rectangle([48, 48, 60, 60], fill=COLOURS[small])
        return img, "what colour is the large object ?", str(big)
    n = int(rng.integers(1, 6))
    for _ in range(n):
        x, y = rng.integers(2, 52, 2)
        d.ellipse([int(x), int(y), int(x) + 10, int(y) + 10], fill=COLOURS[names[rng.integers(6)]])
    return img, "how many circles ?", str(n)


GENERATORS = {"chart": chart, "doc": doc, "math": math, "ocr": ocr, "general": general}


def generate(out: str | Path, n_per_domain: int = 200, seed: int = 0, fractions=(0.8, 0.1, 0.1), progress=True,
             domains=DOMAINS) -> dict:
    """Write images/<domain>/<i>.png and train/val/test.jsonl under `out` for `domains` (a backbone's own set, e.g.
    InternVL's chart, doc, general). Same seed, same bytes; a domain's images do not depend on the others chosen."""
    out = Path(out)
    unknown = [d for d in domains if d not in GENERATORS]
    if unknown:
        raise MixpertError(f"no synthetic generator for domain(s) {unknown}; choose from {', '.join(GENERATORS)}")
    photos = _photos()
    splits = {s: [] for s in SPLITS}
    bar = tqdm(total=n_per_domain * len(domains), desc="data", unit="img", disable=not progress)
    for domain in domains:
        di = DOMAINS.index(domain)
        (out / "images" / domain).mkdir(parents=True, exist_ok=True)
        n_train, n_val = int(n_per_domain * fractions[0]), int(n_per_domain * fractions[1])
        for i in range(n_per_domain):
            rng = np.random.default_rng([seed, di, i])
            gen = GENERATORS[domain]
            img, q, a = gen(rng, photos) if domain == "general" else gen(rng)
            path = out / "images" / domain / f"{i:05d}.png"
            img.save(path)
            split = "train" if i < n_train else "val" if i < n_train + n_val else "test"
            splits[split].append(Sample(str(path), domain, q, a))
            bar.update()
    bar.close()
    for s, samples in splits.items():
        write_manifest(out / f"{s}.jsonl", samples, out)
    return {s: len(v) for s, v in splits.items()}
