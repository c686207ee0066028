"""The first hour with the CLI (issue 30): every mistake a new user made is exit 2 and one line on stderr naming the
flag and the fix, with no traceback, before anything slow is loaded; nothing meaningless is accepted in silence."""

import socket
import subprocess
import sys

import pytest

from mixpert_export.__main__ import main
from mixpert_export.bundle import tensorrt_build as trtb
from mixpert_train.backbones import REGISTRY
from mixpert_train.families import ADAPTERS
from test_pipeline import images


def cli(args, capsys) -> tuple[int, str, str]:
    """main(args) in this process, argparse's own exits included: (exit code, stdout, stderr)."""
    capsys.readouterr()
    try:
        rc = main(args)
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def one_line(err: str) -> str:
    line = err.strip()
    assert line and "\n" not in line and "Traceback" not in line, err
    return line


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from mixpert_export.bundle.build import build_bundle
    from mixpert_export.bundle.sources import resolve

    model, src = resolve("tiny", random_init=True)
    out = tmp_path_factory.mktemp("cli") / "b"
    build_bundle(model, out, runtime="onnxruntime", max_crops=8, source=src, progress=False)
    return out


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    p = tmp_path_factory.mktemp("img") / "a.png"
    images()[0].save(p)
    return p


def test_a_mistyped_flag_is_the_subcommands_error_with_the_close_match(capsys):
    rc, _, err = cli(["build", "--backbone", "tiny", "--wieghts", "w"], capsys)
    line = one_line(err)
    assert rc == 2 and line.startswith("python -m mixpert_export build: error: unrecognized arguments: --wieghts w")
    assert "did you mean --weights?" in line and line.endswith("see python -m mixpert_export build --help")
    rc, _, err = cli(["run", "--engines", "b", "a.png", "--taus", "0.5"], capsys)
    assert rc == 2 and "mixpert_export run: error" in one_line(err) and "did you mean --tau?" in err
    rc, _, err = cli(["biuld"], capsys)  # a mistyped command: the choices, on one line
    assert rc == 2 and "invalid choice: 'biuld'" in one_line(err) and "'build'" in err


def test_version_through_the_real_cli():
    from mixpert_export import __version__

    r = subprocess.run([sys.executable, "-m", "mixpert_export", "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == f"mixpert-deploy {__version__}" and r.stderr == ""


@pytest.mark.parametrize("args, flag", [(["--tau", "2"], "--tau"), (["--tau", "-0.1"], "--tau"),
                                        (["--strategy", "score-threshold", "--lam", "1.5"], "--lam"),
                                        (["--tau", "nan"], "--tau"), (["--tau", "x"], "--tau")])
def test_routing_thresholds_outside_their_range_are_refused(args, flag, capsys):
    rc, _, err = cli(["run", "--engines", "nowhere", "a.png", *args], capsys)
    line = one_line(err)
    assert rc == 2 and f"argument {flag}:" in line


def test_a_threshold_the_strategy_does_not_use_is_refused_not_ignored(bundle, image, capsys):
    rc, _, err = cli(["run", "--engines", str(bundle), str(image), "--strategy", "direct", "--tau", "0.3"], capsys)
    line = one_line(err)
    assert rc == 2 and "--tau 0.3: only the score-difference strategy uses it" in line and "--strategy score-difference" in line
    rc, _, err = cli(["run", "--engines", str(bundle), str(image), "--lam", "0.3"], capsys)  # bundle default: score-difference
    assert rc == 2 and "--lam 0.3: only the score-threshold strategy" in one_line(err)
    # the edges are meaningful: 1 sends every image to versatile, 0 always to the top expert
    rc, out, err = cli(["run", "--engines", str(bundle), str(image), "--tau", "1"], capsys)
    assert rc == 0 and "versatile" in out
    rc, out, _ = cli(["run", "--engines", str(bundle), str(image), "--tau", "0"], capsys)
    assert rc == 0 and "versatile" not in out.split("\n\n")[0]


@pytest.mark.skipif(trtb.build_gpu() is not None, reason="checks the refusal on a host that sees no CUDA GPU")
@pytest.mark.skipif(not trtb.available(), reason="needs tensorrt_rtx (or tensorrt) to reach the engine build")
def test_gpu_targets_current_without_a_gpu_is_refused_before_anything_is_built(bundle, tmp_path, capsys):
    rc, _, err = cli(["build", "--from-onnx", str(bundle), "--out", str(tmp_path / "e"), "--gpu-targets", "current"], capsys)
    line = one_line(err)
    assert rc == 2 and "--gpu-targets current: this process sees no CUDA GPU" in line and "sm89" in line
    assert not (tmp_path / "e").exists()


def test_gpu_targets_where_no_engine_is_built_are_refused_before_export(tmp_path, capsys):
    rc, _, err = cli(["build", "--backbone", "tiny", "--random-init", "--runtime", "onnxruntime", "--gpu-targets",
                      "sm89", "--out", str(tmp_path / "b")], capsys)
    assert rc == 2 and "--gpu-targets sm89: this build makes no TensorRT engines (--runtime onnxruntime)" in one_line(err)
    assert not (tmp_path / "b").exists()


def test_ask_llm_missing_names_llm_before_loading_the_engines(tmp_path, capsys):
    rc, _, err = cli(["ask", "--engines", str(tmp_path / "no-bundle"), "--llm", str(tmp_path / "missing"), "a.png", "q"],
                     capsys)
    line = one_line(err)
    assert rc == 2 and line.startswith(f"error: --llm {tmp_path / 'missing'}: no such directory") and "--weights" not in line


def test_serve_with_a_port_in_use_is_one_line_before_loading(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        rc, _, err = cli(["serve", "--engines", "nowhere", "--grpc-port", str(port)], capsys)
        line = one_line(err)
        assert rc == 2 and line == (f"error: --grpc-port {port}: 127.0.0.1:{port} is in use (another server?); stop it "
                                    "or pass a free port with --grpc-port")
        rc, _, err = cli(["serve", "--engines", "nowhere", "--http-port", "8123", "--grpc-port", "8123"], capsys)
        assert rc == 2 and "--grpc-port 8123: also given as --http-port" in one_line(err)


def test_build_help_comes_from_the_registry(capsys):
    rc, out, _ = cli(["build", "--help"], capsys)
    flat = " ".join(out.split())
    assert rc == 0
    for name in REGISTRY:  # argparse may wrap a name at its hyphen
        assert name in flat.replace("- ", "-"), name
    for kind in (t for ad in ADAPTERS.values() for t in ad.config_types):
        assert kind in flat.replace("_ ", "_"), kind
    assert "LLaVA-OneVision snapshot" not in flat
