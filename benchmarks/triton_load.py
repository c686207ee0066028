"""Load test of the `mixpert` Triton model over loopback gRPC: C concurrent clients x R requests each of
mixed-domain images, every response checked against the in-process pipeline on the same bundle.

    python benchmarks/triton_load.py --engines engines/demo [--clients 32 --requests 20]   # starts `serve` itself
    python benchmarks/triton_load.py --engines engines/demo --url 127.0.0.1:8001           # an existing server

Reports errors, lost responses, mismatches (expert differs, or tokens beyond --atol), p50 / p99 latency per
request as the client sees it, and throughput (requests a second over the whole run). The reference is the
in-process MixpertPipeline on the same runtime; Triton merges requests into other batches than the reference,
so tokens are compared with a tolerance (float summation order), experts exactly.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import platform
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from mixpert_export.serving.client import MixpertClient
from mixpert_export.runtime.pipeline import MixpertPipeline


def mixed_images(n: int = 40, seed: int = 0) -> list[bytes]:
    """Synthetic chart / doc / math / ocr / general images at several sizes (1 to 7 anyres crops on the tiny
    backbone), PNG-encoded."""
    from mixpert_train.data import synthetic

    rng = np.random.default_rng(seed)
    makers = [lambda rng, d=d: synthetic.sample(d, rng)[0] for d in synthetic.SWAPS]
    sizes = [(64, 64), (128, 64), (64, 128), (160, 120), (200, 200)]
    out = []
    for i in range(n):
        img = makers[i % len(makers)](rng)
        img = img[0] if isinstance(img, tuple) else img
        buf = io.BytesIO()
        img.convert("RGB").resize(sizes[(i // len(makers)) % len(sizes)]).save(buf, "PNG")
        out.append(buf.getvalue())
    return out


def reference(bundle, images: list[bytes], runtime: str = "onnxruntime") -> list[dict]:
    pipe = MixpertPipeline.from_engines(bundle, runtime=runtime)
    return [{"expert": r.expert, "tokens": np.asarray(r.tokens, np.float32)} for r in pipe(images)]


def run_load(url: str, images: list[bytes], expected: list[dict] | None, clients: int = 32, requests: int = 20,
             atol: float = 1e-4, timeout_s: float = 120.0) -> dict:
    """Every client sends `requests` images in turn (client c starts at image c), waiting for each answer."""
    latencies, errors, mismatches, answered = [], [], [], [0]
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def worker(c: int):
        client = MixpertClient(url, timeout_s=timeout_s)
        start.wait()
        for r in range(requests):
            i = (c + r * clients) % len(images)
            t0 = time.perf_counter()
            try:
                got = client.infer(images[i])
            except Exception as e:  # noqa: BLE001 - counted and reported
                with lock:
                    errors.append(f"client {c} request {r}: {e}")
                continue
            dt = time.perf_counter() - t0
            bad = None
            if expected is not None:
                want = expected[i]
                if got.expert != want["expert"]:
                    bad = f"image {i}: expert {got.expert}, in-process {want['expert']}"
                elif got.tokens.shape != want["tokens"].shape:
                    bad = f"image {i}: tokens {got.tokens.shape}, in-process {want['tokens'].shape}"
                elif not np.allclose(got.tokens, want["tokens"], atol=atol, rtol=0):
                    bad = f"image {i}: tokens differ by {np.abs(got.tokens - want['tokens']).max():.2e} > {atol}"
            with lock:
                latencies.append(dt)
                answered[0] += 1
                if bad:
                    mismatches.append(bad)
                elif expected is not None:
                    diffs.append(float(np.abs(got.tokens - expected[i]["tokens"]).max()))
        client.close()

    diffs: list[float] = []
    threads = [threading.Thread(target=worker, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    sent = clients * requests
    ms = np.array(latencies) * 1e3 if latencies else np.array([np.nan])
    return {"clients": clients, "requests_per_client": requests, "sent": sent, "answered": answered[0],
            "errors": len(errors), "lost": sent - answered[0] - len(errors), "mismatches": len(mismatches),
            "max_abs_diff": max(diffs) if diffs else None, "atol": atol,
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "throughput_rps": answered[0] / wall, "wall_s": wall,
            "error_samples": errors[:5], "mismatch_samples": mismatches[:5]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """`python -m mixpert_export serve` in a child process on free loopback ports."""

    def __init__(self, bundle, log: str | Path | None = None, ports: dict | None = None, extra=()):
        self.bundle, self.extra = str(bundle), list(extra)
        self.ports = ports or {"http": free_port(), "grpc": free_port(), "metrics": free_port()}
        self.url = f"127.0.0.1:{self.ports['grpc']}"
        self.log = Path(log) if log else None
        self.proc = None

    def start(self, timeout_s: float = 120.0) -> "ServeProcess":
        argv = [sys.executable, "-m", "mixpert_export", "serve", "--engines", self.bundle,
                "--http-port", str(self.ports["http"]), "--grpc-port", str(self.ports["grpc"]),
                "--metrics-port", str(self.ports["metrics"]), *self.extra]
        out = open(self.log, "a") if self.log else subprocess.DEVNULL
        # its own process group, so stop() can end the Triton server it starts too, whatever state serve is in
        self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        client = MixpertClient(self.url)
        t0 = time.time()
        while not client.ready():
            if self.proc.poll() is not None or time.time() - t0 > timeout_s:
                self.stop()
                raise RuntimeError(f"serve did not become ready in {timeout_s:.0f} s (log: {self.log})")
            time.sleep(0.3)
        client.close()
        return self

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(2)  # Ctrl-C: PyTriton stops the server cleanly
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc:  # a tritonserver left behind by a slow or killed shutdown would keep answering on the ports
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def format_md(res: dict, meta: dict) -> str:
    lines = [f"# Triton load test ({meta['bundle']}, {meta['server']})", "",
             f"Machine: {meta['machine']}. Loopback gRPC, {res['clients']} concurrent clients x "
             f"{res['requests_per_client']} requests, {meta['images']} mixed-domain images (1-7 crops).", "",
             "| sent | answered | errors | lost | mismatches | max abs diff | p50 ms | p99 ms | throughput req/s |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| {res['sent']} | {res['answered']} | {res['errors']} | {res['lost']} | {res['mismatches']} | "
             f"{res['max_abs_diff'] if res['max_abs_diff'] is None else format(res['max_abs_diff'], '.1e')} | "
             f"{res['p50_ms']:.1f} | {res['p99_ms']:.1f} | {res['throughput_rps']:.1f} |"]
    return "\n".join(lines) + "\n"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, no GPU used (ONNX Runtime CPU)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", required=True, help="bundle directory (the reference runs it in-process)")
    p.add_argument("--url", help="gRPC address of a running server (default: start `serve` on free ports)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--images", type=int, default=40)
    p.add_argument("--atol", type=float, default=1e-4)
    p.add_argument("--out", help="write <out>.json and <out>.md")
    args = p.parse_args(argv)
    images = mixed_images(args.images)
    expected = reference(args.engines, images)
    if args.url:
        res = run_load(args.url, images, expected, args.clients, args.requests, args.atol)
    else:
        with ServeProcess(args.engines) as server:
            res = run_load(server.url, images, expected, args.clients, args.requests, args.atol)
    meta = {"bundle": args.engines, "server": "PyTriton serve" if not args.url else args.url,
            "machine": machine(), "images": len(images)}
    md = format_md(res, meta)
    print(md)
    if args.out:
        Path(args.out + ".json").write_text(json.dumps(res | {"meta": meta}, indent=2))
        Path(args.out + ".md").write_text(md)
    return 0 if res["errors"] == res["lost"] == res["mismatches"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
