"""The dataset format: one JSONL manifest per split, one sample a line:
{"image": "images/chart/000.png", "domain": "chart", "question": "...", "answer": "..."}.
Image paths are relative to the manifest's directory (or absolute). Malformed lines and unknown domains are
errors naming the file and line; unreadable images are skipped and counted (or an error with strict=True)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from ..errors import MixpertError
from ..model import DOMAINS

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Sample:
    image: str  # absolute path once read
    domain: str
    question: str
    answer: str


def read_manifest(path: str | Path, domains=DOMAINS) -> list[Sample]:
    path = Path(path)
    if not path.is_file():
        raise MixpertError(f"{path}: manifest missing; create it with python -m mixpert_train data --out {path.parent}")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            s = Sample(str(d["image"]), str(d["domain"]), str(d["question"]), str(d["answer"]))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise MixpertError(f"{path}:{n}: malformed sample ({type(e).__name__}: {e}); expected JSON with "
                               "image, domain, question, answer") from None
        if s.domain not in domains:
            raise MixpertError(f"{path}:{n}: unknown domain {s.domain!r}; use one of {', '.join(domains)}")
        img = Path(s.image)
        out.append(Sample(str(img if img.is_absolute() else path.parent / img), s.domain, s.question, s.answer))
    return out


def write_manifest(path: Path, samples: list[Sample], root: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        for s in samples:
            d = asdict(s)
            d["image"] = os.path.relpath(s.image, root)
            f.write(json.dumps(d) + "\n")
    os.replace(tmp, path)
