"""MixpertPipeline: crops -> trunk (all crops of the call, once) -> router (one pooled vector per image) ->
route() -> each used expert once on its group -> tokens back in input order.

Pure Python over a Backend; it never imports a runtime library. Only the B x n_domains scores are read on
the host. A bad image becomes an error in its own result and never stops the rest of the call.
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from mixpert_train.errors import MixpertError
from mixpert_train.families import adapter_for
from mixpert_train.model import margins, pool_matrix, route

from mixpert_export.bundle import manifest as mf
from .backends import create_backend
from mixpert_train.preprocess import ImageError, Preprocessor, concat_crops


@dataclass
class ImageResult:
    index: int  # position in the call's input list
    source: str
    expert: str | list[str] | None = None  # one name; a name per crop with per_crop routing
    scores: list | None = None  # router softmax over the domains (per crop with per_crop routing)
    margin: float | list | None = None  # top1 - top2
    crops: int = 0  # rows: crops, or patches for dynamic-resolution families (Qwen2-VL)
    tokens: Any = None  # [n_crops, T, D_llm]: the experts' output, per crop; patch families: [n_patches / 4, D_llm]
    embeddings: Any = None  # [L, D_llm] with packed=True: what the LLM splices in at the image's token positions
    # Qwen3-VL: the DeepStack features [taps, n_patches / 4, D_llm] (packed=True: [taps, L, D_llm], in the
    # embeddings' order), which its LLM adds to its first layers' hidden states at the image's positions
    deepstack: Any = None
    image_size: tuple | None = None  # (height, width) of the decoded image
    grid: tuple | None = None  # (t, h, w) in patches, for patch families
    error: str | None = None
    latency_ms: float = 0.0  # the batch this image ran in (preprocessing excluded)
    host_ms: float = 0.0  # host CPU time (thread CPU time) this image's decode and preprocessing took

    @property
    def ok(self) -> bool:
        return self.error is None

    def record(self) -> dict:
        d = {"index": self.index, "path": self.source, "crops": self.crops} | ({"grid": list(self.grid)} if self.grid else {})
        if self.error:
            return d | {"error": self.error}
        d |= {"expert": self.expert, "scores": self.scores, "margin": self.margin, "latency_ms": self.latency_ms,
              "host_ms": round(self.host_ms, 3)}
        d |= {"deepstack_shape": list(self.deepstack.shape)} if self.deepstack is not None else {}
        return d | ({"embeddings_shape": list(self.embeddings.shape)} if self.embeddings is not None else {})


@dataclass
class PipelineStats:
    launches: dict = field(default_factory=dict)  # part -> calls, for the "one launch per expert" check


class MixpertPipeline:
    def __init__(self, backend, manifest: dict, strategy: str | None = None, tau: float | None = None,
                 lam: float | None = None, per_crop: bool = False, preprocess_device: str | None = None,
                 packing: dict | None = None, call_rows: int | None = None):
        self.backend = backend
        self.manifest = manifest
        self.cfg = mf.bundle_config(manifest)
        self.strategy = strategy or self.cfg.strategy
        self.tau = self.cfg.tau if tau is None else tau
        self.lam = self.cfg.lam if lam is None else lam
        self.per_crop = per_crop
        self.max_crops = int(manifest["max_crops"])  # rows a call at most: crops, or patches (the patch budget)
        self.adapter = adapter_for(self.cfg.backbone)
        self.io = self.adapter.io(self.cfg.backbone)
        self.unit = self.adapter.rows
        # rows map() puts in one call (<= max_crops): consecutive images share a call while they fit. Patch families
        # attend over the whole call (a block-diagonal mask), so their default budget is smaller (Adapter.call_rows,
        # benchmarks/attention_form.py); an image above it runs alone.
        call_rows = call_rows or self.adapter.call_rows(self.cfg.backbone)
        self.call_rows = min(int(call_rows), self.max_crops) if call_rows else self.max_crops
        if per_crop and self.unit != "crops":
            raise MixpertError(f"per-crop routing: {self.cfg.backbone.name} has no crops (one sequence of patches an "
                               "image); drop --per-crop")
        self.preprocess = Preprocessor(self.cfg.backbone, device=preprocess_device)  # None: PIL on the host
        # packing (the bundle's image_newline, manifest.read_packing): each result also gets the embeddings its MLLM
        # splices in for the image (the family adapter's pack), not only the per-crop tokens
        self.packing = packing
        if packing is not None and per_crop:
            raise MixpertError("packed embeddings need one expert an image; drop --per-crop")
        self.stats = PipelineStats()
        # Qwen3-VL's DeepStack outputs: which parts give one (bundle/contract.py)
        outs = {name: [o["name"] for o in part.get("spec", {}).get("outputs", [])] for name, part in manifest["parts"].items()}
        self.deepstack = {part for part, names in outs.items() if "deepstack" in names}
        if self.deepstack and getattr(backend, "static", None) is not None:
            raise MixpertError(f"{self.cfg.backbone.name}: the static (bucketed, CUDA-graph) path does not carry "
                               "DeepStack outputs yet; run without --static / --graphs")
        self._serial = threading.Lock() if backend.serial else contextlib.nullcontext()
        route(np.full((1, len(self.cfg.domains)), 1.0 / len(self.cfg.domains)), self.cfg.domains, self.strategy)  # validate
        for name, value, uses in (("tau", tau, "score-difference"), ("lam", lam, "score-threshold")):
            if value is None:
                continue
            if not 0.0 <= value <= 1.0:  # a softmax score, or a difference of two: nothing outside [0, 1] means anything
                raise MixpertError(f"--{name} {value}: outside [0, 1] (0: always the top expert, 1: every image to "
                                   "versatile)")
            if self.strategy != uses:  # never a setting silently ignored
                raise MixpertError(f"--{name} {value}: only the {uses} strategy uses it, and this pipeline routes by "
                                   f"{self.strategy}; pass --strategy {uses}, or drop --{name}")

    @classmethod
    def from_engines(cls, bundle: str | Path, runtime: str = "auto", device: str | None = None, model=None,
                     backend_options: dict | None = None, packed: bool = False, **routing):
        """packed=True: results carry `embeddings`, the sequence the MLLM's LLM takes for each image."""
        bundle = Path(bundle)
        manifest = mf.read_manifest(bundle)
        packing = mf.read_packing(bundle, manifest) if packed else None
        return cls(create_backend(runtime, bundle, manifest, device, model, **(backend_options or {})), manifest,
                   packing=packing, **routing)

    # ------------------------------------------------------------------------------------------
    def __call__(self, images: Sequence) -> list[ImageResult]:
        """Every image of `images` through the pipeline (preprocessed here, between calls): results in input order."""
        return list(self.map(images, workers=0))

    def map(self, images: Iterable, workers: int | None = None, prefetch: int | None = None) -> Iterator[ImageResult]:
        """Results in input order, each as soon as the call it ran in is done; calls group consecutive images up to
        the call budget (call_rows). `workers` threads decode and preprocess the next images while a call runs (PIL
        and the runtimes release the GIL), at most `prefetch` images ahead of the call being filled, so memory
        stays bounded however long `images` is. With workers a call also starts early, with the images that are
        ready, when the next one is not: the engines never wait for a call to fill (so the grouping, and the
        tokens' last bits, may vary with timing). workers=0: preprocess in this thread, fixed grouping."""
        if workers is None:
            workers = min(4, os.cpu_count() or 1)
        if prefetch is None:  # two full calls of the largest images ahead
            prefetch = max(2 * workers, 2 * max(1, self.max_crops // self.cfg.backbone.max_crops))
        waiting: collections.deque[ImageResult] = collections.deque()  # input order, not yet yielded
        batch, n = [], 0
        for res, job in self._prepared(images, workers, prefetch):
            waiting.append(res)
            if batch and not job.done():  # the next image is still being prepared: run what is ready rather than
                self.run_crops(batch)     # wait idle (a call is never held back for a slower preprocessor)
                batch, n = [], 0
                while waiting[0] is not res:
                    yield waiting.popleft()
            px = job.result()
            if px is not None:
                if batch and n + len(px) > self.call_rows:
                    self.run_crops(batch)
                    batch, n = [], 0
                batch.append((res, px))
                n += len(px)
            while waiting and (waiting[0].error is not None or waiting[0].tokens is not None):
                yield waiting.popleft()
        if batch:
            self.run_crops(batch)
        yield from waiting

    def calls(self, rows: Sequence[int]) -> list[list[int]]:
        """The calls map() makes when every image is ready: consecutive images (their row counts) while the call's
        rows stay within call_rows; an image above it runs alone. For benchmarks that measure what the product runs."""
        out, n = [[]], 0
        for i, r in enumerate(rows):
            if out[-1] and n + r > self.call_rows:
                out, n = out + [[]], 0
            out[-1].append(i)
            n += r
        return out if out[-1] else []

    def _prepared(self, images: Iterable, workers: int, prefetch: int):
        """(result, a future of its crops or None) in input order; with workers, made up to `prefetch` images
        ahead; without, each made here before it is yielded (so always done)."""
        items = ((ImageResult(i, str(src) if isinstance(src, (str, Path)) else f"<{type(src).__name__}>"), src)
                 for i, src in enumerate(images))
        if not workers:
            for res, src in items:
                done: Future = Future()
                done.set_result(self._prepare(res, src))
                yield res, done
            return
        with ThreadPoolExecutor(workers, thread_name_prefix="mixpert-preprocess") as pool:
            ahead: collections.deque = collections.deque()
            for res, src in items:
                ahead.append((res, pool.submit(self._prepare, res, src)))
                if len(ahead) > prefetch:
                    yield ahead.popleft()
            while ahead:
                yield ahead.popleft()

    def _prepare(self, res: ImageResult, src) -> np.ndarray | None:
        """The image's uint8 rows, or None with `res.error` set (one line, this image only)."""
        t0 = time.thread_time()
        try:
            px, res.image_size, res.grid = self.preprocess.prepare(src)
        except ImageError as e:
            res.error = str(e)
            return None
        except MixpertError as e:
            res.error = f"{res.source}: {e}"
            return None
        finally:
            res.host_ms = (time.thread_time() - t0) * 1e3
        res.crops = len(px)
        if res.crops > self.max_crops:
            res.error = (f"{res.source}: needs {res.crops} {self.unit}, the bundle takes {self.max_crops} a call; "
                         f"rebuild with --max-crops {res.crops} or more")
            return None
        return px

    def _count(self, part):
        self.stats.launches[part] = self.stats.launches.get(part, 0) + 1

    def run_crops(self, batch: list[tuple[ImageResult, np.ndarray]], experts: Sequence[str] | None = None) -> None:
        """One call: trunk once, router once, each used expert once, scatter back. Fills the results.
        `experts` (one name per routing unit) overrides route()'s choice, for benchmarks of given mixes:
        the router still runs and its scores are still read."""
        with self._serial:  # static buffers (CUDA-graph path) hold one call at a time
            self._run_crops(batch, experts)

    def row_feeds(self, grids: Sequence) -> dict:
        """Patch families: a call's per-row inputs (positions, which image) from its images' grids, on the backend;
        every part takes them, the single encoder too. {} for crop families."""
        if not self.io["rows"]:
            return {}
        return {k: self.backend.from_host(v) for k, v in self.adapter.row_inputs(self.cfg.backbone, grids).items()}

    def _run_crops(self, batch, experts) -> None:
        be = self.backend
        t0 = time.perf_counter()
        counts = [len(px) for _, px in batch]
        pixels = concat_crops([px for _, px in batch])
        # patch families' per-row inputs, gathered with each expert's rows
        rows = self.row_feeds([res.grid for res, _ in batch]) if self.io["rows"] else {}
        trunk = be.infer("trunk", {"pixel_values": be.from_host(pixels)} | rows)
        hidden = trunk["hidden"]
        self._count("trunk")
        pool = pool_matrix(counts, per_crop=self.per_crop)
        scores = be.to_host(be.infer("router", {"hidden": hidden, "pool": be.from_host(pool)})["scores"])
        self._count("router")
        names = route(scores, self.cfg.domains, self.strategy, self.tau, self.lam) if experts is None else list(experts)
        # routing units are images, or crops with per-crop routing; each unit owns a range of rows
        starts = np.concatenate([[0], np.cumsum(counts)])
        unit_crops = ([np.arange(starts[i], starts[i + 1]) for i in range(len(counts))] if not self.per_crop
                      else [np.array([c]) for c in range(len(pixels))])
        groups = [(f"expert_{expert}", np.concatenate([unit_crops[u] for u, n in enumerate(names) if n == expert]))
                  for expert in dict.fromkeys(names)]  # first-use order: deterministic
        merge = self.io["merge"]
        # [N_rows / merge, ...] on the host
        deep = []  # DeepStack [n / merge, taps, D] of the trunk's taps, then the experts'
        if "expert_versatile" in self.deepstack:
            outs = be.run_expert_outputs(hidden, groups, len(pixels), rows=rows, merge=merge)
            out = outs["tokens"]
            deep.append(outs["deepstack"])
        else:
            out = be.run_experts(hidden, groups, len(pixels), rows=rows, merge=merge) if rows else \
                be.run_experts(hidden, groups, len(pixels))
        if "deepstack" in trunk:
            deep.insert(0, be.to_host(trunk["deepstack"]))
        deep = np.concatenate(deep, axis=1) if deep else None
        for part, _ in groups:
            self._count(part)
        be.synchronize()
        ms = (time.perf_counter() - t0) * 1e3
        margin = margins(scores)
        for b, (res, _) in enumerate(batch):
            lo, hi = starts[b], starts[b + 1]
            res.tokens = out[lo // merge:hi // merge]
            res.deepstack = None if deep is None else deep[lo // merge:hi // merge].transpose(1, 0, 2)
            res.latency_ms = ms
            if self.per_crop:
                res.expert = [names[c] for c in range(lo, hi)]
                res.scores = scores[lo:hi].tolist()
                res.margin = margin[lo:hi].tolist()
            else:
                res.expert, res.scores, res.margin = names[b], scores[b].tolist(), float(margin[b])
            if not np.isfinite(res.tokens.astype(np.float32)).all() or \
                    (res.deepstack is not None and not np.isfinite(res.deepstack.astype(np.float32)).all()):
                res.error = f"{res.source}: the model produced NaN or infinite tokens for this image"
                res.tokens = res.deepstack = None
            elif self.packing is not None:
                ad, bb = adapter_for(self.cfg.backbone), self.cfg.backbone
                res.embeddings = ad.pack(bb, res.tokens, res.image_size, self.packing.get("image_newline"))
                if res.deepstack is not None:  # each tap packed as the tokens are
                    res.deepstack = np.stack([ad.pack(bb, d, res.image_size, None) for d in res.deepstack])

    def describe(self) -> dict:
        return {"backend": self.backend.describe(), "preprocess": self.preprocess.describe(), "strategy": self.strategy,
                "tau": self.tau, "lam": self.lam,
                "per_crop": self.per_crop, "max_crops": self.max_crops, "call_rows": self.call_rows}
