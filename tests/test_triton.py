"""Triton: the model repository (configs parsed as Triton's protobuf and checked against the ONNX graphs; the
repository served by a real tritonserver), and `serve` through PyTriton: a 32 x 20 loopback load test against
the in-process pipeline, bad requests beside good ones, and a server restart. Loopback only, bounded."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

pytest.importorskip("pytriton", reason="needs the serve extra: pip install 'mixpert-deploy[serve]'")
tritonclient_grpc = pytest.importorskip("tritonclient.grpc")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from triton_load import ServeProcess, free_port, mixed_images, reference, run_load  # noqa: E402

from mixpert_export.bundle import manifest as mf  # noqa: E402
from mixpert_export.__main__ import main  # noqa: E402
from mixpert_export.bundle.build import build_bundle  # noqa: E402
from mixpert_export.serving.client import MixpertClient  # noqa: E402
from mixpert_export.serving.serve import python_backend_env  # noqa: E402
from mixpert_export.serving.triton_repo import _platform, local_server, read_config, write_repository  # noqa: E402
from mixpert_train.checkpoint import save_checkpoint  # noqa: E402
from mixpert_train.errors import MixpertError  # noqa: E402
from test_pipeline import decisive_model  # noqa: E402

ONNX_TYPES = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16",
              onnx.TensorProto.BFLOAT16: "TYPE_BF16", onnx.TensorProto.UINT8: "TYPE_UINT8",
              onnx.TensorProto.INT64: "TYPE_INT64"}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    d = tmp_path_factory.mktemp("triton")
    from mixpert_export.bundle.sources import resolve

    model, source = resolve(checkpoint=str(save_checkpoint(decisive_model(), d / "ck")))
    build_bundle(model, d / "bundle", runtime="onnxruntime", max_crops=24, source=source, progress=False)
    return d / "bundle"


@pytest.fixture(scope="module")
def images():
    return mixed_images(20)


@pytest.fixture(scope="module")
def expected(bundle, images):
    return reference(bundle, images)


def _dims(value_info):
    return [d.dim_value if d.HasField("dim_value") else -1 for d in value_info.type.tensor_type.shape.dim]


# ---------------------------------------------------------------------------------------- repository
@pytest.mark.parametrize("platform", ["onnxruntime_onnx", "python"])
def test_repository_configs_parse_and_name_the_onnx_tensors(bundle, tmp_path, platform):
    from tritonclient.grpc import model_config_pb2 as pb

    repo = write_repository(bundle, tmp_path / "repo", platform=platform, kind="cpu", instances=2,
                            expert_instances={"general": 3})
    manifest = mf.read_manifest(bundle)
    parts = [p for p in manifest["parts"] if p != "single_encoder"]
    assert sorted(p.name for p in repo.iterdir()) == sorted(["mixpert"] + [f"mixpert_{p}" for p in parts])
    for part in parts:
        cfg = read_config(repo / f"mixpert_{part}" / "config.pbtxt")
        assert cfg.name == f"mixpert_{part}"
        assert (cfg.backend == "python") if platform == "python" else (cfg.platform == "onnxruntime_onnx")
        graph = onnx.load(repo / f"mixpert_{part}" / "1" / "model.onnx", load_external_data=False).graph
        batched = part != "router"
        assert cfg.max_batch_size == (manifest["max_crops"] if batched else 0)
        for got, want in [(cfg.input, graph.input), (cfg.output, graph.output)]:
            assert [t.name for t in got] == [v.name for v in want]
            for t, v in zip(got, want):
                assert pb.DataType.Name(t.data_type) == ONNX_TYPES[v.type.tensor_type.elem_type]
                assert list(t.dims) == (_dims(v)[1:] if batched else _dims(v))
        assert cfg.instance_group[0].count == (3 if part == "expert_general" else 2)
        assert cfg.instance_group[0].kind == pb.ModelInstanceGroup.KIND_CPU
        assert cfg.HasField("dynamic_batching") == (batched and platform != "python")
    cfg = read_config(repo / "mixpert" / "config.pbtxt")
    assert cfg.backend == "python" and cfg.max_batch_size == 16 and cfg.HasField("dynamic_batching")
    assert [(t.name, pb.DataType.Name(t.data_type), list(t.dims)) for t in cfg.input] == [("image", "TYPE_STRING", [1])]
    outs = {t.name: (pb.DataType.Name(t.data_type), list(t.dims)) for t in cfg.output}
    assert outs == {"tokens": ("TYPE_FP32", [-1, 16, 256]), "expert": ("TYPE_STRING", [1]),
                    "scores": ("TYPE_FP32", [5]), "crops": ("TYPE_INT32", [1]), "error": ("TYPE_STRING", [1])}
    assert set(json.loads(cfg.parameters["part_models"].string_value).values()) == {f"mixpert_{p}" for p in parts}
    assert (repo / "mixpert" / "1" / "model.py").is_file() and (repo / "mixpert" / "1" / "manifest.json").is_file()


def test_repository_platform_choice_and_refusals(bundle, tmp_path):
    manifest = mf.read_manifest(bundle)
    assert _platform(manifest, bundle, "auto") == "onnxruntime_onnx"  # no engines
    with pytest.raises(MixpertError, match="no TensorRT engines"):
        _platform(manifest, bundle, "tensorrt_plan")
    with_engines = json.loads(json.dumps(manifest))
    for p in with_engines["parts"].values():
        p["engine"] = {"file": "x.engine", "io": p["onnx"]["io"]}
    with_engines["tensorrt"] = {"flavour": "tensorrt_rtx", "version": "1.7.1.116"}
    assert _platform(with_engines, bundle, "auto") == "onnxruntime_onnx"  # RTX plans do not load in Triton
    with pytest.raises(MixpertError, match="standard TensorRT plans only"):
        _platform(with_engines, bundle, "tensorrt_plan")
    with_engines["tensorrt"]["flavour"] = "tensorrt"
    assert _platform(with_engines, bundle, "auto") == "tensorrt_plan"
    # a bad request leaves nothing behind; a good one through the CLI prints the table
    with pytest.raises(MixpertError, match="no expert named nope"):
        write_repository(bundle, tmp_path / "r", expert_instances={"nope": 2})
    assert not (tmp_path / "r").exists() and not list(tmp_path.iterdir())
    assert main(["triton", "--engines", str(bundle), "--out", str(tmp_path / "r"), "--expert-instances", "x"]) == 2
    assert main(["triton", "--engines", str(bundle), "--out", str(tmp_path / "r"), "--kind", "cpu"]) == 0
    assert read_config(tmp_path / "r" / "mixpert_trunk" / "config.pbtxt").instance_group[0].kind == 2  # KIND_CPU


def test_repository_served_by_tritonserver(bundle, images, expected, tmp_path):
    """The written repository (parts on the Python backend: PyTriton's server has no onnxruntime backend) on a
    real tritonserver: the mixpert model's BLS calls equal the in-process pipeline; a garbage image sent among
    good ones gets its own error response."""
    repo = write_repository(bundle, tmp_path / "repo", platform="python", kind="cpu")
    ports = [free_port() for _ in range(3)]
    argv, env = local_server(repo, tmp_path / "work", http_port=ports[0], grpc_port=ports[1], metrics_port=ports[2])
    log = tmp_path / "tritonserver.log"
    proc = subprocess.Popen(argv, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        client = MixpertClient(f"127.0.0.1:{ports[1]}")
        t0 = time.time()
        while not client.ready():
            assert proc.poll() is None and time.time() - t0 < 180, log.read_text()[-3000:]
            time.sleep(0.5)
        res = run_load(client.url, images + [b"\x89PNG garbage"], expected + [None], clients=6, requests=4)
        assert res["errors"] == 1 and res["lost"] == 0 and res["mismatches"] == 0, res
        assert "not an image" in res["error_samples"][0]
    finally:
        proc.terminate()
        proc.wait(60)


# ---------------------------------------------------------------------------------------- PyTriton serve
@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory):
    with ServeProcess(bundle, log=tmp_path_factory.mktemp("serve") / "serve.log") as s:
        yield s


def test_serve_load_32_clients_x_20_requests(server, images, expected):
    res = run_load(server.url, images, expected, clients=32, requests=20)
    print(json.dumps({k: v for k, v in res.items() if not k.endswith("samples")}))
    assert res["sent"] == 640
    assert (res["errors"], res["lost"], res["mismatches"]) == (0, 0, 0), res
    assert res["answered"] == 640 and res["p99_ms"] >= res["p50_ms"] > 0


def _raw(server, arr, dtype):
    x = tritonclient_grpc.InferInput("image", list(arr.shape), dtype)
    x.set_data_from_numpy(arr)
    return tritonclient_grpc.InferenceServerClient(server.url).infer("mixpert", [x])


def test_serve_bad_requests_fail_alone(server, images, expected):
    """Wrong dtype, wrong shape, an empty batch, two images in one request and garbage bytes, sent while
    good requests are in flight: each bad one gets an error, every good one its right answer."""
    from tritonclient.utils import InferenceServerException

    bad = {
        "dtype": lambda: _raw(server, np.zeros((1, 1), np.float32), "FP32"),
        "shape": lambda: _raw(server, np.array([[b"a", b"b"]], dtype=object), "BYTES"),
        "empty": lambda: _raw(server, np.zeros((0, 1), dtype=object), "BYTES"),
        "garbage": lambda: MixpertClient(server.url).infer(b"GIF89a not really"),
        "empty-bytes": lambda: MixpertClient(server.url).infer(b""),
        "two-images": lambda: _raw(server, np.array([[images[0]], [images[1]]], dtype=object), "BYTES"),
    }
    outcome = {}

    def send(name, fn):
        try:
            r = fn()
            outcome[name] = r
        except (MixpertError, InferenceServerException) as e:
            outcome[name] = e

    good = {}

    def send_good():
        good.update(run_load(server.url, images, expected, clients=4, requests=5))

    threads = [threading.Thread(target=send, args=kv) for kv in bad.items()] + [threading.Thread(target=send_good)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (good["errors"], good["lost"], good["mismatches"]) == (0, 0, 0), good
    for name in ("dtype", "shape", "empty", "garbage", "empty-bytes"):
        assert isinstance(outcome[name], (MixpertError, InferenceServerException)), (name, outcome[name])
        assert "\n" not in str(outcome[name]) or isinstance(outcome[name], InferenceServerException)
    assert "expects 'BYTES'" in str(outcome["dtype"]) and "unexpected shape" in str(outcome["shape"])
    assert "not an image" in str(outcome["garbage"]) and "empty" in str(outcome["empty-bytes"])
    two = outcome["two-images"].as_numpy("error")  # answered in-band, one row per image of the request
    assert two.shape == (2, 1) and two[0, 0].startswith(b"send one image a request (shape [1, 1], got [2, 1])")
    assert MixpertClient(server.url).infer(images[0]).expert == expected[0]["expert"]  # still serving


def test_serve_restart_clean_error_then_recovery(server, images, expected):
    client = MixpertClient(server.url, timeout_s=10)
    assert client.infer(images[1]).expert == expected[1]["expert"]
    server.stop()
    with pytest.raises(MixpertError, match="unreachable"):
        client.infer(images[1])
    server.start()
    got = client.infer(images[1])  # the same client object, reconnected
    assert got.expert == expected[1]["expert"] and np.allclose(got.tokens, expected[1]["tokens"], atol=1e-4)


def test_python_backend_env_puts_this_interpreters_libpython_first(monkeypatch):
    import sysconfig

    monkeypatch.setenv("LD_LIBRARY_PATH", "/opt/x")
    env = python_backend_env()
    soname = sysconfig.get_config_var("INSTSONAME") or ""
    if ".so" in soname and Path(sysconfig.get_config_var("LIBDIR"), soname).is_file():
        assert env["LD_LIBRARY_PATH"].split(":") == [sysconfig.get_config_var("LIBDIR"), "/opt/x"]
    else:  # a static interpreter: nothing to point the stub at, the path is left alone
        assert env["LD_LIBRARY_PATH"] == "/opt/x"


def test_serve_callables_share_one_pipeline_and_preprocess_on_worker_threads(bundle, images, expected):
    """What `serve` binds: `instances` callables over one pipeline, each decoding its merged batch on a thread
    pool. Two batches at once (as Triton sends them to two instances) get their own right answers."""
    from mixpert_export.runtime.pipeline import MixpertPipeline
    from mixpert_export.serving.serve import PipelineCallable, create_server

    pipe = MixpertPipeline.from_engines(bundle, runtime="onnxruntime")
    threads_seen = set()
    pre = pipe.preprocess.prepare

    def spy(src):
        threads_seen.add(threading.current_thread().name.split("_")[0])
        return pre(src)

    pipe.preprocess.prepare = spy
    callables = [PipelineCallable(pipe, workers=2) for _ in range(2)]
    batches = [[{"image": np.array([[im]], dtype=object)} for im in images[k::2]] for k in range(2)]
    answers = [None, None]

    def call(k):
        answers[k] = callables[k](batches[k])

    ts = [threading.Thread(target=call, args=(k,)) for k in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for k in range(2):
        for resp, want in zip(answers[k], expected[k::2]):
            assert resp["error"][0, 0] == b"" and resp["expert"][0, 0].decode() == want["expert"]
            assert np.allclose(resp["tokens"][0], want["tokens"], atol=1e-4)
    assert threads_seen == {"mixpert-preprocess"}
    with pytest.raises(MixpertError, match="--instances 0"):
        create_server(pipe, instances=0)


# ---------------------------------------------------------------------------------------- issue 30: first hour
def _wait_ready(url: str, proc, out_path: Path, timeout_s: float = 240.0):
    client = MixpertClient(url)
    t0 = time.time()
    while not client.ready():
        assert proc.poll() is None and time.time() - t0 < timeout_s, out_path.read_text()[-3000:]
        time.sleep(0.5)
    return client


def test_packed_repository_started_by_triton_start_answers_as_the_packed_pipeline(bundle, images, tmp_path):
    """`triton --packed` gives the repository serve --packed's outputs; `triton-start` runs it on the tritonserver
    PyTriton ships (no manual stub or LD_LIBRARY_PATH), refuses a taken port in one line, and stops on SIGTERM
    leaving neither its work directory nor its log behind."""
    from mixpert_export.runtime.pipeline import MixpertPipeline

    repo = tmp_path / "repo"
    assert main(["triton", "--engines", str(bundle), "--out", str(repo), "--platform", "python", "--kind", "cpu",
                 "--packed"]) == 0
    cfg = read_config(repo / "mixpert" / "config.pbtxt")
    d_llm = mf.bundle_config(mf.read_manifest(bundle)).backbone.llm_hidden_size
    assert cfg.output[0].name == "embeddings" and list(cfg.output[0].dims) == [-1, d_llm]
    assert cfg.parameters["packed"].string_value == "true"
    ports = [free_port() for _ in range(3)]
    flags = ["--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2])]
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp))
    log = tmp_path / "start.log"
    proc = subprocess.Popen([sys.executable, "-m", "mixpert_export", "triton-start", str(repo), *flags], env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        client = _wait_ready(f"127.0.0.1:{ports[1]}", proc, log)
        want = MixpertPipeline.from_engines(bundle, runtime="onnxruntime", packed=True)(images[:4])
        for img, w in zip(images[:4], want):
            got = client.infer(img)
            assert got.tokens is None and got.expert == w.expert and got.crops == w.crops
            assert got.embeddings.shape == w.embeddings.shape and np.abs(got.embeddings - w.embeddings).max() <= 1e-5
        again = subprocess.run([sys.executable, "-m", "mixpert_export", "triton-start", str(repo), *flags],
                               capture_output=True, text=True, timeout=120)
        assert again.returncode == 2 and again.stderr.count("\n") == 1 and "is in use" in again.stderr
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert "serving repository" in text and "stopped" in text and "Traceback" not in text
    left = [p for p in tmp.iterdir() if p.name != ".ses"]  # .ses: ONNX Runtime's own session id, kept by design
    assert not left, left  # work directory and log removed after a clean stop
    # the repository PyTriton's server cannot load is refused in one line naming the model
    onnx_repo = write_repository(bundle, tmp_path / "onnx_repo", platform="onnxruntime_onnx", kind="cpu")
    r = subprocess.run([sys.executable, "-m", "mixpert_export", "triton-start", str(onnx_repo)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "platform onnxruntime_onnx" in r.stderr


def test_serve_stops_cleanly_on_sigterm_and_keeps_tritons_log_off_the_console(bundle, images, tmp_path):
    """Before: after SIGTERM, 'leaked shared_memory objects' and a 22 MB ~/.cache/pytriton/workspace_* per run, and
    Triton's E-lines on the console without --verbose."""
    import tempfile

    # PyTriton's handshake socket lives in its workspace: a Unix socket path must stay under 108 bytes, which
    # pytest's tmp_path does not
    home, tmp = Path(tempfile.mkdtemp(prefix="pt-", dir="/tmp")), tmp_path / "tmp"
    tmp.mkdir()
    ports = [free_port() for _ in range(3)]
    env = dict(os.environ, PYTRITON_HOME=str(home), TMPDIR=str(tmp))
    log = tmp_path / "serve.log"
    proc = subprocess.Popen([sys.executable, "-m", "mixpert_export", "serve", "--engines", str(bundle), "--http-port",
                             str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2])], env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        client = _wait_ready(f"127.0.0.1:{ports[1]}", proc, log)
        assert client.infer(images[0]).tokens is not None
        assert len(list(home.glob("workspace_*"))) == 1 and len(list(tmp.glob("mixpert-triton-*.log"))) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(120) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert "serving model 'mixpert'" in text and "Triton's log:" in text and text.rstrip().endswith("stopped")
    assert "leaked" not in text and "Traceback" not in text
    assert not re.search(r"^[EW]\d{4} ", text, re.M), text  # Triton's own E/W lines went to its log file
    assert not list(home.glob("workspace_*")) and not list(tmp.glob("mixpert-triton-*.log"))
    shutil.rmtree(home)
