"""python -m mixpert_export triton: a bundle as a standard Triton Inference Server model repository.

    <out>/mixpert_trunk/        config.pbtxt, 1/model.plan | 1/model.onnx     dynamic batching over crops
    <out>/mixpert_router/       ...                                            no batching (images x crops pool)
    <out>/mixpert_expert_<d>/   ...  one per domain + versatile, own instance count
    <out>/mixpert/              config.pbtxt, 1/model.py, 1/manifest.json     Python backend (BLS): per request
                                                                               trunk -> router -> chosen expert

Configs are built as Triton's ModelConfig protobuf (tritonclient ships model_config_pb2) and written as its text
format. The `mixpert` model runs the same MixpertPipeline as every other runtime, over a backend whose infer()
is a BLS call to the part models, so routing and batching by crops are not copied here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mixpert_train.errors import MixpertError
from mixpert_train.families import adapter_for
from mixpert_train.staging import Output, staged_dir

from mixpert_export.bundle import manifest as mf
from .serve import INPUT, MODEL, deepstack_taps

PREFIX = "mixpert"
REPOSITORY = Output("Triton model repository", f"{MODEL}/1/{mf.NAME}", mf.FORMAT)  # what --out may replace
PLATFORMS = ("auto", "tensorrt_plan", "onnxruntime_onnx", "python")
_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "bf16": "TYPE_BF16",
          "int32": "TYPE_INT32", "int64": "TYPE_INT64", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8"}
# parts whose every input and output has crops first: Triton may batch them along that axis. Not patch families:
# requests concatenated along patches would share image ids (one attention segment) and an expert's output axis
# (merged patches) is not its input's.
_BATCHED = lambda part, rows="crops": rows == "crops" and (part == "trunk" or part.startswith("expert_"))  # noqa: E731


def part_model_name(part: str) -> str:
    return f"{PREFIX}_{part}"


def _pb():
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise MixpertError("writing a Triton model repository needs tritonclient: pip install 'mixpert-deploy[serve]'") from None
    return model_config_pb2, text_format


def _platform(manifest: dict, bundle: Path, requested: str) -> str:
    trt = manifest.get("tensorrt") or {}
    has_plans = all("engine" in p for p in manifest["parts"].values())
    if requested == "auto":
        return "tensorrt_plan" if has_plans and trt.get("flavour") == "tensorrt" else "onnxruntime_onnx"
    if requested == "tensorrt_plan":
        if not has_plans:
            raise MixpertError(f"{bundle / mf.NAME}: no TensorRT engines in this bundle; build them on the serving GPU: "
                               f"{mf.rebuild_command(manifest, bundle, engines=True)}, or use --platform onnxruntime_onnx")
        if trt.get("flavour") != "tensorrt":
            raise MixpertError(f"{bundle / mf.NAME}: its engines are {trt.get('flavour')} {trt.get('version')}, and Triton's "
                               "tensorrt backend loads standard TensorRT plans only; rebuild on the serving GPU with "
                               "standard tensorrt installed (--from-onnx) or use --platform onnxruntime_onnx")
    return requested


def _tensor(pb, spec: dict, batched: bool):
    shape = [-1 if isinstance(d, str) or d < 0 else int(d) for d in spec["shape"]]
    dtype = _TYPES.get(spec["dtype"])
    if dtype is None:
        raise MixpertError(f"tensor {spec['name']}: dtype {spec['dtype']} has no Triton type")
    return dict(name=spec["name"], data_type=getattr(pb, dtype), dims=shape[1:] if batched else shape)


def part_config(pb, name: str, part: str, entry: dict, platform: str, kind: str, instances: int, max_crops: int,
                rows: str = "crops", disabled: list[str] = ()):
    """ModelConfig of one part. entry: the manifest part; io from the file Triton will load. disabled: ONNX Runtime
    optimizers the python part leaves off (the backend's rule for the bundle, e.g. QDQ parts)."""
    io = (entry["engine"] if platform == "tensorrt_plan" else entry["onnx"])["io"]
    batched = _BATCHED(part, rows)
    cfg = pb.ModelConfig(name=name, max_batch_size=max_crops if batched else 0)
    if platform == "python":
        cfg.backend = "python"
        cfg.parameters["onnx_file"].string_value = "model.onnx"
        if disabled:
            cfg.parameters["disabled_optimizers"].string_value = ",".join(disabled)
    else:
        cfg.platform = platform
    for t in io["inputs"]:
        cfg.input.add(**_tensor(pb, t, batched))
    for t in io["outputs"]:
        cfg.output.add(**_tensor(pb, t, batched))
    if batched and platform != "python":
        cfg.dynamic_batching.max_queue_delay_microseconds = 100
    on_gpu = platform == "tensorrt_plan" or (platform == "onnxruntime_onnx" and kind == "gpu")  # python parts: CPU
    cfg.instance_group.add(count=instances, kind=pb.ModelInstanceGroup.KIND_GPU if on_gpu else pb.ModelInstanceGroup.KIND_CPU)
    return cfg


def mixpert_config(pb, manifest: dict, instances: int, max_batch_size: int, packed: bool = False):
    """The `mixpert` model: the outputs `serve` answers with (packed: `embeddings` [L, D_llm] in place of `tokens`)."""
    cfg_model = mf.bundle_config(manifest)
    bb, n = cfg_model.backbone, len(cfg_model.domains)
    cfg = pb.ModelConfig(name=MODEL, backend="python", max_batch_size=max_batch_size)
    cfg.input.add(name=INPUT, data_type=pb.TYPE_STRING, dims=[1])
    tokens = [-1] + [int(d) for d in adapter_for(bb).io(bb)["tokens"][1:]]  # [crops, T, D] or [merged, D]
    first = ("embeddings", pb.TYPE_FP32, [-1, bb.llm_hidden_size]) if packed else ("tokens", pb.TYPE_FP32, tokens)
    for name, dtype, dims in (first,
                              ("expert", pb.TYPE_STRING, [1]), ("scores", pb.TYPE_FP32, [n]),
                              ("crops", pb.TYPE_INT32, [1]), ("error", pb.TYPE_STRING, [1])):
        cfg.output.add(name=name, data_type=dtype, dims=dims)
    taps = deepstack_taps(bb)
    if taps:  # Qwen3-VL's DeepStack features [taps, L, D_llm], in the tokens' order
        cfg.output.add(name="deepstack", data_type=pb.TYPE_FP32, dims=[taps, -1, bb.llm_hidden_size])
    cfg.dynamic_batching.max_queue_delay_microseconds = 2000
    cfg.instance_group.add(count=instances, kind=pb.ModelInstanceGroup.KIND_CPU)
    cfg.parameters["part_models"].string_value = json.dumps({p: part_model_name(p) for p in manifest["parts"]
                                                              if p != "single_encoder"})
    cfg.parameters["packed"].string_value = "true" if packed else "false"
    return cfg


def write_repository(bundle: str | Path, out: str | Path, platform: str = "auto", kind: str = "gpu",
                     instances: int = 1, expert_instances: dict | None = None, max_batch_size: int = 16,
                     packed: bool = False) -> Path:
    """Write the repository all or nothing (a temporary sibling renamed at the end). Returns `out`. packed: the
    `mixpert` model answers with `embeddings`, the sequence the MLLM splices in, as `serve --packed` does."""
    pb, text_format = _pb()
    bundle, out = Path(bundle), Path(out)
    if platform not in PLATFORMS:
        raise MixpertError(f"--platform {platform}: expected one of {', '.join(PLATFORMS)}")
    manifest = mf.read_manifest(bundle)
    if packed:
        mf.read_packing(bundle, manifest)  # present and intact, before anything is written
    platform = _platform(manifest, bundle, platform)
    mf.verify_files(bundle, manifest, "engine" if platform == "tensorrt_plan" else "onnx")
    expert_instances = dict(expert_instances or {})
    unknown = set(expert_instances) - {p[len("expert_"):] for p in manifest["parts"] if p.startswith("expert_")}
    if unknown:
        raise MixpertError(f"--expert-instances: no expert named {', '.join(sorted(unknown))} in {bundle}")
    here = Path(__file__).parent
    rows = adapter_for(mf.bundle_config(manifest).backbone).rows
    with staged_dir(out, REPOSITORY, sources={"--engines": bundle}) as tmp:
        for part, entry in manifest["parts"].items():
            if part == "single_encoder":  # the baseline is for benchmarks, not for serving
                continue
            name = part_model_name(part)
            n = expert_instances.get(part[len("expert_"):], instances) if part.startswith("expert_") else instances
            mcfg = part_config(pb, name, part, entry, platform, kind, n, int(manifest["max_crops"]), rows,
                               mf.ort_disabled_optimizers(manifest))
            version = tmp / name / "1"
            version.mkdir(parents=True)
            if platform == "tensorrt_plan":
                shutil.copyfile(bundle / entry["engine"]["file"], version / "model.plan")
            else:
                for f in entry["onnx"]["sha256"]:  # the graph and its external-data files, names kept
                    shutil.copyfile(bundle / f, version / ("model.onnx" if f == entry["onnx"]["file"] else f))
                if platform == "python":
                    shutil.copyfile(here / "triton_part_model.py", version / "model.py")
            (tmp / name / "config.pbtxt").write_text(text_format.MessageToString(mcfg))
        version = tmp / MODEL / "1"
        version.mkdir(parents=True)
        shutil.copyfile(here / "triton_model.py", version / "model.py")
        (version / mf.NAME).write_text(json.dumps(manifest, indent=2))
        if packed:
            shutil.copyfile(bundle / manifest["packing"]["file"], version / manifest["packing"]["file"])
        (tmp / MODEL / "config.pbtxt").write_text(
            text_format.MessageToString(mixpert_config(pb, manifest, instances, max_batch_size, packed)))
    return out


def read_config(path: str | Path):
    """A config.pbtxt parsed as Triton's ModelConfig (raises on anything Triton would not parse)."""
    pb, text_format = _pb()
    return text_format.Parse(Path(path).read_text(), pb.ModelConfig())


def local_server(repo: str | Path, workdir: str | Path, host: str = "127.0.0.1", http_port: int = 8000,
                 grpc_port: int = 8001, metrics_port: int = 8002) -> tuple[list[str], dict]:
    """argv and environment that run `repo` on the tritonserver binary nvidia-pytriton ships (Python backend
    only: write the repository with --platform python). `workdir` receives the backend directory, with the
    Python-backend stub built for this interpreter's version."""
    import os
    import sys

    from .serve import python_backend_env

    try:
        import pytriton
    except ImportError:
        raise MixpertError("running a repository locally needs nvidia-pytriton: pip install 'mixpert-deploy[serve]'") from None
    dist = Path(pytriton.__file__).parent / "tritonserver"
    stub = dist / "python_backend_stubs" / f"{sys.version_info[0]}.{sys.version_info[1]}" / "triton_python_backend_stub"
    if not stub.is_file():
        raise MixpertError(f"{stub}: nvidia-pytriton has no Python-backend stub for Python "
                           f"{sys.version_info[0]}.{sys.version_info[1]}; use Python 3.8-3.13")
    backends = Path(workdir) / "backends"
    python = backends / "python"
    python.mkdir(parents=True, exist_ok=True)
    for f in (dist / "backends" / "python").iterdir():
        if f.is_file() and not (python / f.name).exists():
            (python / f.name).symlink_to(f)
    if not (python / stub.name).exists():
        (python / stub.name).symlink_to(stub)
    env = dict(os.environ)
    env.update(python_backend_env())
    libs = Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs"
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [env.get("LD_LIBRARY_PATH"), str(libs)]))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [*sys.path[1:], env.get("PYTHONPATH")]))  # the stub's imports
    argv = [str(dist / "bin" / "tritonserver"), f"--model-repository={Path(repo).resolve()}",
            f"--backend-directory={backends.resolve()}", f"--http-address={host}", f"--grpc-address={host}",
            f"--metrics-address={host}", f"--http-port={http_port}", f"--grpc-port={grpc_port}",
            f"--metrics-port={metrics_port}", "--exit-on-error=true", "--strict-readiness=true",
            f"--backend-config=python,shm-region-prefix-name=mixpert{os.getpid()}"]
    return argv, env


def python_only(repo: str | Path) -> None:
    """Refuse, naming the model, a repository the tritonserver PyTriton ships cannot load: it has the Python backend
    and no onnxruntime or tensorrt backend (write the repository with --platform python)."""
    repo = Path(repo)
    models = sorted(p for p in repo.iterdir() if (p / "config.pbtxt").is_file()) if repo.is_dir() else []
    if not models:
        raise MixpertError(f"{repo}: no model repository here (no */config.pbtxt); write one with python -m "
                           "mixpert_export triton --platform python --engines BUNDLE --out DIR")
    for m in models:
        cfg = read_config(m / "config.pbtxt")
        if cfg.backend != "python":
            raise MixpertError(f"{m / 'config.pbtxt'}: platform {cfg.platform or cfg.backend}; the tritonserver nvidia-pytriton "
                               "ships has only the Python backend: rewrite with --platform python, or run your own tritonserver")


def start_local(repo: str | Path, host: str = "127.0.0.1", ports: dict | None = None, verbose: bool = False,
                timeout_s: float = 300.0) -> int:
    """Run a written repository on PyTriton's tritonserver until Ctrl-C or SIGTERM (the `triton-start` command):
    ports checked first, the backend stub and libraries set up in a temporary directory, Triton's log in a file
    (kept only when it failed), ready when /v2/health/ready answers."""
    import signal
    import subprocess
    import sys
    import tempfile
    import time
    import urllib.request

    from .serve import DEFAULT_PORTS, check_ports

    ports = {**DEFAULT_PORTS, **(ports or {})}
    python_only(repo)
    check_ports(host, {f"--{k}-port": v for k, v in ports.items()})
    log = Path(tempfile.mkstemp(prefix="mixpert-tritonserver-", suffix=".log")[1])
    ok = False
    with tempfile.TemporaryDirectory(prefix="mixpert-tritonserver-") as work:
        argv, env = local_server(repo, work, host, ports["http"], ports["grpc"], ports["metrics"])
        with open(log, "w") as out:
            proc = subprocess.Popen(argv + [f"--log-verbose={int(verbose)}"], env=env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)

        def stop(signum, frame):
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGTERM, stop)
        try:
            url, t0 = f"http://{host}:{ports['http']}/v2/health/ready", time.time()
            while True:
                if proc.poll() is not None or time.time() - t0 > timeout_s:
                    raise MixpertError(f"{repo}: tritonserver {'exited' if proc.poll() is not None else 'was not ready'} "
                                       f"(see its log: {log})")
                try:
                    with urllib.request.urlopen(url, timeout=2) as r:
                        if r.status == 200:
                            break
                except OSError:
                    time.sleep(0.5)
            print(f"serving repository {repo} on tritonserver (nvidia-pytriton's): grpc {host}:{ports['grpc']}, "
                  f"http {host}:{ports['http']}; Triton's log: {log}; Ctrl-C stops", flush=True)
            try:
                proc.wait()
            except KeyboardInterrupt:
                pass
            ok = proc.returncode in (None, 0)
        except KeyboardInterrupt:
            ok = True
        finally:
            signal.signal(signal.SIGTERM, previous)
            if proc.poll() is None:
                proc.terminate()  # tritonserver unloads its models and removes its shared memory on SIGTERM
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    if ok and not verbose:
        log.unlink(missing_ok=True)
    print("stopped", file=sys.stderr)
    return 0 if ok else 1
