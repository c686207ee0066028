"""Static-shape execution of the parts for the GPU path: crop-count buckets, padding, preallocated buffers,
and one CUDA graph per (part, bucket), captured lazily on first use and replayed after.

Layout (N = the call's crops, b = its bucket, M = max crops a call):
  pixels[b]          -> trunk graph[b]  -> hidden[M]   (rows :b written; pixel rows N:b are zeros, so the
                                                         padded hidden rows are finite)
  hidden[:b], pool   -> router graph[b] -> scores[b]   (pool padded with zeros: padded rows/columns weigh 0)
  hidden, src[g]     -> expert e graph[g]: tokens[M+1] (gather hidden.index_select(src) and scatter
                                                         tokens.index_copy_(dst) inside the graph; padded
                                                         src point at row 0, padded dst at the dump row M)
Only the per-group index vectors go host -> device, and only the scores and tokens[:N] come back.

Patch families (rows=...: Qwen2-VL, a variable number of patches an image, per-row position and image-id inputs)
use the same layout over patches: buckets of patches (multiples of the merge window), one extra row M holding
zeros and the padding image id -1 (so padded rows attend only to each other, never into an image), gathers
padded with M, and experts scattering their merged rows (idx[::merge] / merge) with the dump row M / merge.

Experts' graphs each get their own memory pool, so groups of different experts can replay concurrently on
separate streams (graphs that share a pool may share intermediates and must not overlap). With graphs=False
the same buffers and functions run eagerly: the CPU tests check the bucketing, padding, gathers and scatters
that way, and a GPU without graph support still gets the preallocated path.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from mixpert_train.errors import MixpertError

# 1 and 10 crops (a plain image; one anyres image) are common sizes; then about 1.25-1.5x apart, so padding
# wastes at most a third of a call
DEFAULT_BUCKETS = (1, 2, 4, 8, 10, 16, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256, 320, 384, 512)


# patches a call (Qwen2-VL: 256 = a 224 px square, 1024 = 448 px, 5120 = max_pixels): about 1.5x apart
DEFAULT_PATCH_BUCKETS = (16, 64, 256, 512, 768, 1024, 1536, 2048, 3072, 4096, 6144, 8192, 12288, 16384)
PAD_SEGMENT = -1  # the image id of padded rows: attention keeps them to themselves


def crop_buckets(max_crops: int, base: Sequence[int] = DEFAULT_BUCKETS) -> tuple[int, ...]:
    """The bucket sizes used for a bundle of `max_crops`: the base sizes below it, then max_crops itself."""
    if max_crops < 1:
        raise MixpertError(f"max crops {max_crops}: expected 1 or more")
    return tuple(sorted({int(b) for b in base if 0 < b < max_crops} | {int(max_crops)}))


def bucket_of(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds n rows."""
    for b in buckets:
        if n <= b:
            return b
    raise MixpertError(f"{n} crops in one call: above the largest bucket {buckets[-1]} (the bundle's max crops)")


def padded_index(idx: np.ndarray, size: int, pad: int) -> np.ndarray:
    """idx padded to `size` entries with `pad` (int64)."""
    out = np.full(size, pad, dtype=np.int64)
    out[: len(idx)] = idx
    return out


def assign_streams(sizes: Sequence[int], n_streams: int) -> list[int]:
    """Largest group first onto the least-loaded stream (ties: the lower stream, then input order):
    deterministic, so a call always uses the same stream for the same groups."""
    if n_streams < 1:
        raise MixpertError(f"{n_streams} streams: expected 1 or more")
    load = [0] * n_streams
    out = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        s = min(range(n_streams), key=lambda k: (load[k], k))
        out[i] = s
        load[s] += sizes[i]
    return out


class StaticRunner:
    """fn() over fixed buffers, as a CUDA graph (warm-up on a side stream, then capture) or eagerly."""

    def __init__(self, fn: Callable[[], torch.Tensor], graph: bool, pool=None, warmup: int = 2):
        self.fn, self.graph = fn, None
        if graph:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup):  # cuBLAS / autotuning workspaces are created outside the capture
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool):
                self.output = fn()

    def run(self) -> torch.Tensor:
        if self.graph is None:
            self.output = self.fn()
        else:
            self.graph.replay()
        return self.output


class StaticParts:
    """The trunk, router and experts of one bundle over preallocated buffers, bucketed by crops (or patches).

    rows: patch families' per-row inputs, name -> (trailing shape, torch dtype), in the parts' input order (the
    row-id input is "segment_ids"); merge: input rows an expert's output row takes; pixel_dtype: the parts' pixel
    input (uint8: the bytes, normalised inside the graph)."""

    def __init__(self, modules: dict, max_crops: int, pixel_shape: tuple, hidden_shape: tuple, token_shape: tuple,
                 dtype: torch.dtype, device, graphs: bool, buckets: Sequence[int] | None = None,
                 streams: int = 1, rows: dict | None = None, merge: int = 1, pixel_dtype: torch.dtype = torch.uint8):
        self.modules, self.graphs, self.device = modules, graphs, torch.device(device)
        self.max_crops = int(max_crops)
        self.merge, self.row_specs = int(merge), dict(rows or {})
        if self.row_specs:
            base = [b for b in (buckets or DEFAULT_PATCH_BUCKETS) if b % self.merge == 0]
            self.buckets = crop_buckets(self.max_crops, base)
        else:
            self.buckets = crop_buckets(self.max_crops, buckets or DEFAULT_BUCKETS)
        z = dict(device=self.device)
        M, pad = self.max_crops, 1 if self.row_specs else 0  # patch families: row M is the padding row
        self.hidden = torch.zeros((M + pad,) + tuple(hidden_shape), dtype=dtype, **z)
        self.tokens = torch.zeros((M // self.merge + 1,) + tuple(token_shape), dtype=dtype, **z)  # last row: dump
        self.pixels = torch.zeros((M,) + tuple(pixel_shape), dtype=pixel_dtype, **z)  # [:b] per bucket (uint8 bytes)
        self.rows = {}
        for name, (shape, dt) in self.row_specs.items():
            self.rows[name] = torch.zeros((M + 1,) + tuple(shape), dtype=dt, **z)
        if "segment_ids" in self.rows:
            self.rows["segment_ids"][M] = PAD_SEGMENT
        self.pool: dict[tuple, torch.Tensor] = {} if self.row_specs else {
            (b, b): torch.zeros((b, b), dtype=torch.float32, **z) for b in self.buckets}
        self.runners: dict[tuple, StaticRunner] = {}
        self.mem_pools: dict[str, object] = {}
        self.n_streams = max(1, int(streams)) if graphs else 1
        self.streams = [torch.cuda.Stream(device=self.device) for _ in range(self.n_streams)] if self.n_streams > 1 else []
        self.index_bufs: dict[tuple, tuple] = {}
        self.captures = 0

    # ------------------------------------------------------------------------------------------ helpers
    def _mem_pool(self, key: str):
        if not self.graphs:
            return None
        if key not in self.mem_pools:
            self.mem_pools[key] = torch.cuda.graph_pool_handle()
        return self.mem_pools[key]

    def _runner(self, key: tuple, fn: Callable, pool_key: str) -> StaticRunner:
        r = self.runners.get(key)
        if r is None:
            r = self.runners[key] = StaticRunner(fn, self.graphs, self._mem_pool(pool_key))
            self.captures += 1
        return r

    def owns(self, hidden: torch.Tensor) -> bool:
        return isinstance(hidden, torch.Tensor) and hidden.data_ptr() == self.hidden.data_ptr()

    def stage_hidden(self, hidden: torch.Tensor) -> int:
        """Make self.hidden[:n] hold `hidden` (a no-op when it is already a view of it). Returns n."""
        n = len(hidden)
        if not self.owns(hidden):
            self.hidden[:n].copy_(hidden)
        return n

    # ------------------------------------------------------------------------------------------ parts
    def _stage_pixels(self, pixels: torch.Tensor, rows=()) -> tuple[int, int, torch.Tensor]:
        n = len(pixels)
        b = bucket_of(n, self.buckets)
        buf = self.pixels[:b]  # a contiguous view: the same address for every call of bucket b
        buf[:n].copy_(pixels)
        if n < b:
            buf[n:].zero_()
        self._stage_rows(rows, n, b)
        return n, b, buf

    def _stage_rows(self, rows, n: int, b: int | None = None):
        """Per-row inputs into their buffers; rows n:b (a bucket's padding) get the padding row's values."""
        for (name, buf), x in zip(self.rows.items(), rows):
            buf[:n].copy_(x)
            if b is not None and n < b:
                buf[n:b].copy_(buf[self.max_crops].expand_as(buf[n:b]))

    def _row_views(self, b: int) -> list[torch.Tensor]:
        return [buf[:b] for buf in self.rows.values()]

    def single(self, pixels: torch.Tensor, *rows) -> torch.Tensor:
        """The unsplit single encoder (the benchmarks' baseline) through the same buckets and graphs."""
        n, b, buf = self._stage_pixels(pixels, rows)
        views = self._row_views(b)
        out = self._runner(("single_encoder", b), lambda buf=buf, views=views: self.modules["single_encoder"](buf, *views),
                           "single_encoder").run()
        return out[:n // self.merge]

    def trunk(self, pixels: torch.Tensor, *rows) -> torch.Tensor:
        n, b, buf = self._stage_pixels(pixels, rows)
        views = self._row_views(b)

        def fn(b=b, buf=buf, views=views):
            self.hidden[:b].copy_(self.modules["trunk"](buf, *views))
            return self.hidden

        self._runner(("trunk", b), fn, "trunk_router").run()
        return self.hidden[:n]

    def router(self, hidden: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
        n = self.stage_hidden(hidden)
        images = pool.shape[0]
        if self.row_specs:  # patches: [image bucket, patch bucket], images far fewer than patches
            b = bucket_of(n, self.buckets)
            key = (bucket_of(images, crop_buckets(self.max_crops)), b)
        else:
            b = bucket_of(max(n, images), self.buckets)
            key = (b, b)
        pbuf = self.pool.get(key)
        if pbuf is None:
            pbuf = self.pool[key] = torch.zeros(key, dtype=torch.float32, device=self.device)
        pbuf.zero_()
        pbuf[:images, :n].copy_(pool)

        def fn(b=b, pbuf=pbuf):
            return self.modules["router"](self.hidden[:b], pbuf)

        return self._runner(("router",) + key, fn, "trunk_router").run()[:images]

    def _index(self, part: str, g: int) -> tuple:
        """Static gather / scatter indices, the gathered rows and per-row inputs of one expert's group bucket:
        fixed addresses, so a graph (torch's, or ONNX Runtime's own) replays on them."""
        key = (part, g)
        if key not in self.index_bufs:
            z = dict(dtype=torch.int64, device=self.device)
            rows = torch.zeros((g,) + tuple(self.hidden.shape[1:]), dtype=self.hidden.dtype, device=self.device)
            extra = [torch.zeros((g,) + tuple(buf.shape[1:]), dtype=buf.dtype, device=self.device) for buf in self.rows.values()]
            out = g // self.merge
            self.index_bufs[key] = (torch.zeros(g, **z), torch.full((out,), self.max_crops // self.merge, **z), rows, extra)
        return self.index_bufs[key]

    def experts(self, hidden: torch.Tensor, groups: Sequence[tuple[str, np.ndarray]], rows=()) -> torch.Tensor:
        """Every (part, row indices) group through its expert; tokens[:N / merge] in row order, on the device.
        rows: the call's per-row inputs (patch families), staged again in case the trunk ran elsewhere."""
        n = self.stage_hidden(hidden)
        if rows:
            self._stage_rows(rows, n)
        pad_row = self.max_crops if self.row_specs else 0  # crops: padded gathers read row 0 (crops are independent)
        plan = []
        for part, idx in groups:
            g = bucket_of(len(idx), self.buckets)
            src, dst, grows, extra = self._index(part, g)
            src.copy_(torch.from_numpy(padded_index(idx, g, pad_row)))
            out_idx = idx[::self.merge] // self.merge  # an image's rows are whole merge windows
            dst.copy_(torch.from_numpy(padded_index(out_idx, g // self.merge, self.max_crops // self.merge)))

            def fn(part=part, src=src, dst=dst, grows=grows, extra=extra):
                torch.index_select(self.hidden, 0, src, out=grows)
                for buf, out in zip(self.rows.values(), extra):
                    torch.index_select(buf, 0, src, out=out)
                return self.tokens.index_copy_(0, dst, self.modules[part](grows, *extra))

            plan.append(self._runner((part, g), fn, part))  # one pool per expert: groups may overlap in time
        if self.streams:
            main = torch.cuda.current_stream(self.device)
            for runner, s in zip(plan, assign_streams([len(i) for _, i in groups], len(self.streams))):
                stream = self.streams[s]
                stream.wait_stream(main)
                with torch.cuda.stream(stream):
                    runner.run()
            for stream in self.streams:
                main.wait_stream(stream)
        else:
            for runner in plan:
                runner.run()
        return self.tokens[:n // self.merge]
