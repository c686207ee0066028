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
    """The trunk, router and experts of one bundle over preallocated buffers, bucketed by crops."""

    def __init__(self, modules: dict, max_crops: int, pixel_shape: tuple, hidden_shape: tuple, token_shape: tuple,
                 dtype: torch.dtype, device, graphs: bool, buckets: Sequence[int] | None = None,
                 streams: int = 1):
        self.modules, self.graphs, self.device = modules, graphs, torch.device(device)
        self.max_crops = int(max_crops)
        self.buckets = crop_buckets(self.max_crops, buckets or DEFAULT_BUCKETS)
        z = dict(device=self.device)
        self.hidden = torch.zeros((self.max_crops,) + tuple(hidden_shape), dtype=dtype, **z)
        self.tokens = torch.zeros((self.max_crops + 1,) + tuple(token_shape), dtype=dtype, **z)  # last row: dump
        self.pixels = torch.zeros((self.max_crops,) + tuple(pixel_shape), dtype=torch.float32, **z)  # [:b] per bucket
        self.pool = {b: torch.zeros((b, b), dtype=torch.float32, **z) for b in self.buckets}
        self.runners: dict[tuple, StaticRunner] = {}
        self.mem_pools: dict[str, object] = {}
        self.n_streams = max(1, int(streams)) if graphs else 1
        self.streams = [torch.cuda.Stream(device=self.device) for _ in range(self.n_streams)] if self.n_streams > 1 else []
        self.index_bufs: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
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
    def _stage_pixels(self, pixels: torch.Tensor) -> tuple[int, int, torch.Tensor]:
        n = len(pixels)
        b = bucket_of(n, self.buckets)
        buf = self.pixels[:b]  # a contiguous view: the same address for every call of bucket b
        buf[:n].copy_(pixels)
        if n < b:
            buf[n:].zero_()
        return n, b, buf

    def single(self, pixels: torch.Tensor) -> torch.Tensor:
        """The unsplit single encoder (the benchmarks' baseline) through the same buckets and graphs."""
        n, b, buf = self._stage_pixels(pixels)
        return self._runner(("single_encoder", b), lambda buf=buf: self.modules["single_encoder"](buf),
                            "single_encoder").run()[:n]

    def trunk(self, pixels: torch.Tensor) -> torch.Tensor:
        n, b, buf = self._stage_pixels(pixels)

        def fn(b=b, buf=buf):
            self.hidden[:b].copy_(self.modules["trunk"](buf))
            return self.hidden

        self._runner(("trunk", b), fn, "trunk_router").run()
        return self.hidden[:n]

    def router(self, hidden: torch.Tensor, pool: torch.Tensor) -> torch.Tensor:
        n = self.stage_hidden(hidden)
        images = pool.shape[0]
        b = bucket_of(max(n, images), self.buckets)
        pbuf = self.pool[b]
        pbuf.zero_()
        pbuf[:images, :n].copy_(pool)

        def fn(b=b, pbuf=pbuf):
            return self.modules["router"](self.hidden[:b], pbuf)

        return self._runner(("router", b), fn, "trunk_router").run()[:images]

    def _index(self, part: str, g: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Static gather / scatter indices and the gathered rows of one expert's group bucket: fixed addresses,
        so a graph (torch's, or ONNX Runtime's own) replays on them."""
        key = (part, g)
        if key not in self.index_bufs:
            z = dict(dtype=torch.int64, device=self.device)
            rows = torch.zeros((g,) + tuple(self.hidden.shape[1:]), dtype=self.hidden.dtype, device=self.device)
            self.index_bufs[key] = (torch.zeros(g, **z), torch.full((g,), self.max_crops, **z), rows)
        return self.index_bufs[key]

    def experts(self, hidden: torch.Tensor, groups: Sequence[tuple[str, np.ndarray]]) -> torch.Tensor:
        """Every (part, crop indices) group through its expert; tokens[:N] in crop order, on the device."""
        n = self.stage_hidden(hidden)
        plan = []
        for part, idx in groups:
            g = bucket_of(len(idx), self.buckets)
            src, dst, rows = self._index(part, g)
            src.copy_(torch.from_numpy(padded_index(idx, g, 0)))  # padded gathers read row 0
            dst.copy_(torch.from_numpy(padded_index(idx, g, self.max_crops)))  # padded scatters hit the dump row

            def fn(part=part, src=src, dst=dst, rows=rows):
                torch.index_select(self.hidden, 0, src, out=rows)
                return self.tokens.index_copy_(0, dst, self.modules[part](rows))

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
        return self.tokens[:n]
