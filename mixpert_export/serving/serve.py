"""python -m mixpert_export serve: the Mixpert pipeline behind a real Triton Inference Server, started
in-process through nvidia-pytriton (which ships the server binary; it runs on CPU too).

One model, `mixpert`, with dynamic batching: a request holds one encoded image (BYTES [1, 1]); Triton merges
concurrent requests into one call of the pipeline, so the trunk, the router and each used expert run once per
merged batch. Every response carries tokens [1, n_crops, T, D_llm] (float32), the expert, the router scores,
the crop count and `error`. PyTriton fails a whole merged batch when its callable raises, so an image that
cannot be decoded is answered in-band: `error` holds its one-line message (crops 0, tokens one zero crop) and
the other requests of the batch are answered normally (client.py turns a non-empty `error` into an
exception). Requests with a wrong dtype or shape never reach the model: Triton itself refuses them.
"""

from __future__ import annotations

import logging
import os
import sys
import sysconfig
from pathlib import Path

import numpy as np

from mixpert_train.errors import MixpertError

MODEL = "mixpert"
INPUT = "image"
OUTPUTS = ("tokens", "expert", "scores", "crops", "error")
PACKED_OUTPUTS = ("embeddings",) + OUTPUTS[1:]  # serve --packed: [1, L, D_llm], what the LLM splices in
DEFAULT_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}


def python_backend_env() -> dict:
    """The environment the server's Python-backend stub needs: this interpreter's own libpython first on
    LD_LIBRARY_PATH. The stub is linked against a system libpython3.x; under pyenv (or any interpreter not
    installed in /usr) that one is a different build and the stub dies inside multiprocessing. Applied to
    os.environ, because PyTriton starts the server with a copy of it."""
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    soname = sysconfig.get_config_var("INSTSONAME") or ""  # libpython3.x.so.1.0 for a shared build
    paths = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    if ".so" in soname and Path(libdir, soname).is_file() and libdir not in paths:
        paths.insert(0, libdir)
    return {"LD_LIBRARY_PATH": os.pathsep.join(paths)} if paths else {}


class PipelineCallable:
    """PyTriton's inference callable: a list of requests in (one merged batch), one response dict each out."""

    def __init__(self, pipeline, workers: int | None = None):
        self.pipeline = pipeline
        self.workers = workers  # threads decoding this merged batch's images (None: min(4, cores); 0: none)
        bb = pipeline.cfg.backbone
        self.packed = pipeline.packing is not None
        self.out = "embeddings" if self.packed else "tokens"
        # a row's shape: an embedding [D]; tokens per crop [T, D] (patch families: a merged token [D])
        self.token_shape = (bb.llm_hidden_size,) if self.packed else token_dims(pipeline)
        self.n_domains = len(pipeline.cfg.domains)
        self.taps = deepstack_taps(bb)  # Qwen3-VL: a `deepstack` output [taps, L, D_llm] beside the tokens
        self.outputs = (PACKED_OUTPUTS if self.packed else OUTPUTS) + (("deepstack",) if self.taps else ())

    def _error(self, msg: str, n: int = 1) -> dict:
        """n rows (the request's batch size); one zero crop each, not zero crops: PyTriton's shared-memory
        transport cannot carry an empty tensor."""
        return {self.out: np.zeros((n, 1) + self.token_shape, np.float32),
                "expert": np.full((n, 1), b"", dtype=object),
                "scores": np.full((n, self.n_domains), np.nan, np.float32),
                "crops": np.zeros((n, 1), np.int32),
                "error": np.full((n, 1), msg.encode(), dtype=object)} | (
            {"deepstack": np.zeros((n, self.taps, 1, self.token_shape[-1]), np.float32)} if self.taps else {})

    def __call__(self, requests) -> list[dict]:
        images, owners, responses = [], [], [None] * len(requests)
        for i, req in enumerate(requests):
            x = req[INPUT]
            if x.shape != (1, 1):
                responses[i] = self._error(f"send one image a request (shape [1, 1], got {list(x.shape)}); "
                                           "Triton batches concurrent requests itself", max(len(x), 1))
                continue
            data = x[0, 0]
            images.append(bytes(data) if isinstance(data, (bytes, bytearray, np.bytes_)) else str(data).encode())
            owners.append(i)
        for i, res in zip(owners, self.pipeline.map(images, workers=self.workers)):
            if not res.ok:
                responses[i] = self._error(res.error.replace("<bytes>", "image"))
                continue
            responses[i] = {self.out: np.asarray(res.embeddings if self.packed else res.tokens, np.float32)[None],
                            "expert": np.array([[res.expert.encode()]], dtype=object),
                            "scores": np.asarray(res.scores, np.float32)[None],
                            "crops": np.array([[res.crops]], np.int32),
                            "error": np.array([[b""]], dtype=object)} | (
                {"deepstack": np.asarray(res.deepstack, np.float32)[None]} if self.taps else {})
        return responses


def deepstack_taps(bb) -> int:
    """DeepStack taps of a backbone's tower in use (Qwen3-VL), 0 for the families without: the `deepstack`
    output's leading dim in serve's and the Triton repository's `mixpert` model."""
    from mixpert_train.families import adapter_for

    return sum(t < bb.layers_in_use for t in adapter_for(bb).taps(bb))


def token_dims(pipeline) -> tuple:
    """The tokens output's dims after the leading (crops, or merged patches) one: [T, D] or [D]."""
    return tuple(int(d) for d in pipeline.io["tokens"][1:])


def model_tensors(pipeline):
    from pytriton.model_config import Tensor

    bb = pipeline.cfg.backbone
    inputs = [Tensor(name=INPUT, dtype=bytes, shape=(1,))]
    first = (Tensor(name="embeddings", dtype=np.float32, shape=(-1, bb.llm_hidden_size)) if pipeline.packing is not None
             else Tensor(name="tokens", dtype=np.float32, shape=(-1,) + token_dims(pipeline)))
    outputs = [first,
               Tensor(name="expert", dtype=bytes, shape=(1,)),
               Tensor(name="scores", dtype=np.float32, shape=(len(pipeline.cfg.domains),)),
               Tensor(name="crops", dtype=np.int32, shape=(1,)),
               Tensor(name="error", dtype=bytes, shape=(1,))]
    if deepstack_taps(bb):  # Qwen3-VL: [taps, L, D_llm], the tokens' order
        outputs.append(Tensor(name="deepstack", dtype=np.float32, shape=(deepstack_taps(bb), -1, bb.llm_hidden_size)))
    return inputs, outputs


def check_ports(host: str, ports: dict[str, int]):
    """Refuse, in one line naming the flag, a port another process listens on (Triton would start, fail to bind,
    and PyTriton would end up talking to the other server), or one port given for two endpoints."""
    import socket

    seen = {}
    for flag, port in ports.items():
        if port in seen:
            raise MixpertError(f"{flag} {port}: also given as {seen[port]}; the three endpoints need three ports")
        seen[port] = flag
        try:
            family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        except socket.gaierror as e:
            raise MixpertError(f"--host {host}: cannot resolve it ({e.strerror})") from None
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a server binds: TIME_WAIT is no conflict
            try:
                probe.bind(addr)
            except OSError as e:
                raise MixpertError(f"{flag} {port}: {host}:{port} is {'in use' if e.errno == 98 else e.strerror} "
                                   f"(another server?); stop it or pass a free port with {flag}") from None


def create_server(pipeline, host: str = "127.0.0.1", http_port: int = DEFAULT_PORTS["http"],
                  grpc_port: int = DEFAULT_PORTS["grpc"], metrics_port: int = DEFAULT_PORTS["metrics"],
                  max_batch_size: int = 32, max_queue_delay_us: int = 2000, verbose: bool = False,
                  instances: int = 2, workers: int | None = None, log_file: str | Path | None = None):
    """A started-on-run() PyTriton server with `mixpert` bound. Use as a context manager; .run() returns once
    the model is ready, .serve() blocks.

    `instances` callables share the one pipeline, so Triton hands a second merged batch to the model while the
    first one runs: its images are decoded and preprocessed (PIL releases the GIL) while the first batch's crops
    are on the runtime, and a backend with static buffers still runs one call at a time (the pipeline's lock).
    In flight at most `instances` x `max_batch_size` requests: memory stays bounded. `log_file`: Triton's own log
    goes there instead of stderr (serve passes one unless --verbose)."""
    os.environ.update(python_backend_env())  # before the server process starts
    from pytriton.model_config import DynamicBatcher, ModelConfig
    from pytriton.triton import Triton, TritonConfig

    if not verbose:
        logging.getLogger("pytriton").setLevel(logging.WARNING)
    config = TritonConfig(http_address=host, grpc_address=host, http_port=http_port, grpc_port=grpc_port,
                          metrics_address=host, metrics_port=metrics_port, log_verbose=1 if verbose else 0,
                          log_file=Path(log_file) if log_file else None, exit_on_error=True)
    triton = Triton(config=config)
    inputs, outputs = model_tensors(pipeline)
    if instances < 1:
        raise MixpertError(f"--instances {instances}: serve needs at least one model instance")
    triton.bind(model_name=MODEL, infer_func=[PipelineCallable(pipeline, workers) for _ in range(instances)],
                inputs=inputs, outputs=outputs,
                config=ModelConfig(max_batch_size=max_batch_size,
                                   batcher=DynamicBatcher(max_queue_delay_microseconds=max_queue_delay_us)),
                strict=False)
    return triton


def serve(args) -> int:
    import signal
    import tempfile

    from mixpert_export.runtime.pipeline import MixpertPipeline

    check_ports(args.host, {"--http-port": args.http_port, "--grpc-port": args.grpc_port,
                            "--metrics-port": args.metrics_port})  # before loading anything
    pipeline = MixpertPipeline.from_engines(args.engines, runtime=args.runtime, device=args.device,
                                            strategy=args.strategy, tau=args.tau,
                                            preprocess_device=args.preprocess_device, packed=args.packed)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: serving on {args.host}: anyone who can reach it can send requests (no auth)", file=sys.stderr)
    log = None if args.verbose else Path(tempfile.mkstemp(prefix="mixpert-triton-", suffix=".log")[1])
    triton = create_server(pipeline, args.host, args.http_port, args.grpc_port, args.metrics_port,
                           args.max_batch_size, args.max_queue_delay_us, args.verbose, args.instances, args.workers,
                           log_file=log)

    def stop(signum, frame):  # SIGTERM (a service manager, `kill`) stops as Ctrl-C does: server, workspace, shm
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    d = pipeline.describe()["backend"]
    clean = False
    try:
        with triton:
            try:
                triton.run()
            except Exception as e:  # PyTriton's errors are tracebacks; Triton's reason is in its log
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise MixpertError(f"Triton did not start ({type(e).__name__}: {first})"
                                   + (f"; its log: {log}" if log else "")) from None
            print(f"serving model '{MODEL}' from {args.engines} ({d['runtime']} {d['version']} on {d['device']}): "
                  f"grpc {args.host}:{args.grpc_port}, http {args.host}:{args.http_port}"
                  + (f"; Triton's log: {log}" if log else "") + "; Ctrl-C stops", flush=True)
            try:
                triton.serve()
            except KeyboardInterrupt:
                pass
        clean = True
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if log is not None and clean:
            log.unlink(missing_ok=True)  # kept when the server failed: the error's detail is there
    print("stopped", file=sys.stderr)
    return 0
