"""Every command that writes a directory (build, int8, compile, checkpoints, joint, Triton repository): it never
deletes a user's directory, says what is wrong with --out in one line, cleans up after a killed run (and only
after a dead one), and refuses manifest entries that point outside the bundle."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mixpert_train.staging as staging
from mixpert_export.bundle import manifest as mf
from mixpert_export.__main__ import main as export_main
from mixpert_export.bundle.build import build_bundle
from mixpert_train.__main__ import main as train_main
from mixpert_train.backbones import get_backbone
from mixpert_train.checkpoint import load_checkpoint, save_checkpoint
from mixpert_train.errors import MixpertError
from mixpert_train.model import MixpertConfig, build_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    return build_model(MixpertConfig.for_backbone(get_backbone("tiny")), seed=3)


@pytest.fixture(scope="module")
def bundle(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("st") / "bundle"
    build_bundle(model, out, runtime="onnxruntime", max_crops=8, with_baseline=False, validate=False, progress=False)
    return out


@pytest.fixture
def user_dir(tmp_path):
    d = tmp_path / "models"
    d.mkdir()
    (d / "notes.txt").write_text("mine")
    return d


def one_line_error(capsys, rc) -> str:
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "\n" not in err, err
    return err


def only(tmp_path, *names):
    """Nothing but `names` in tmp_path: no staging directory, no probe file, no partial output."""
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)


# --- a directory that is not ours is never replaced -----------------------------------------------------------

@pytest.mark.parametrize("extra", [[], ["--precision", "int8-dynamic"]], ids=["build", "int8"])
def test_build_refuses_a_users_directory_and_deletes_nothing(user_dir, tmp_path, capsys, extra):
    rc = export_main(["build", "--backbone", "tiny", "--random-init", "--out", str(user_dir), "--runtime", "onnxruntime",
                      "--quiet", *extra])
    err = one_line_error(capsys, rc)
    assert "exists and is not a bundle (it holds notes.txt)" in err and "nothing was written or deleted" in err
    assert (user_dir / "notes.txt").read_text() == "mine"
    only(tmp_path, "models")


def test_library_calls_refuse_too(model, user_dir, tmp_path):
    for write in (lambda: build_bundle(model, user_dir, runtime="onnxruntime", progress=False),
                  lambda: build_bundle(model, user_dir, precision="int8-dynamic", progress=False),
                  lambda: save_checkpoint(model, user_dir)):
        with pytest.raises(MixpertError, match="exists and is not a"):
            write()
    assert [p.name for p in user_dir.iterdir()] == ["notes.txt"]
    only(tmp_path, "models")


@pytest.mark.parametrize("stage", ["joint", "experts", "router"])
def test_training_stages_refuse_before_any_work(stage, user_dir, tmp_path, capsys):
    """The refusal comes first: the data directory given does not even exist."""
    args = {"joint": ["--data", str(tmp_path / "nodata")],
            "experts": ["--data", str(tmp_path / "nodata"), "--joint", str(tmp_path / "nojoint")],
            "router": ["--data", str(tmp_path / "nodata"), "--experts", str(tmp_path / "noexperts")]}[stage]
    rc = train_main([stage, *args, "--out", str(user_dir), "--quiet"])
    err = one_line_error(capsys, rc)
    kind = "joint-stage model" if stage == "joint" else "Mixpert checkpoint"
    assert f"--out {user_dir}: exists and is not a {kind}" in err
    assert [p.name for p in user_dir.iterdir()] == ["notes.txt"]


def test_triton_repository_refuses_a_users_directory_and_a_path_inside_the_bundle(bundle, user_dir, tmp_path, capsys):
    rc = export_main(["triton", "--engines", str(bundle), "--out", str(user_dir), "--platform", "python"])
    assert "exists and is not a Triton model repository" in one_line_error(capsys, rc)
    assert [p.name for p in user_dir.iterdir()] == ["notes.txt"]
    inside = bundle / "repo"
    rc = export_main(["triton", "--engines", str(bundle), "--out", str(inside), "--platform", "python"])
    assert f"is inside --engines {bundle}" in one_line_error(capsys, rc)
    assert not inside.exists()


def test_what_the_command_wrote_is_replaced_and_an_empty_directory_is_used(bundle, model, tmp_path, capsys):
    repo = tmp_path / "repo"
    repo.mkdir()  # empty: fine
    for _ in range(2):  # the second run replaces the repository the first wrote
        assert export_main(["triton", "--engines", str(bundle), "--out", str(repo), "--platform", "python"]) == 0
    assert (repo / "mixpert" / "1" / "manifest.json").is_file()
    ck = tmp_path / "ck"
    save_checkpoint(model, ck)
    save_checkpoint(model, ck)
    assert load_checkpoint(ck).cfg == model.cfg
    only(tmp_path, "repo", "ck")
    # a checkpoint is not a bundle and a bundle is not a checkpoint: neither replaces the other
    with pytest.raises(MixpertError, match="is not a bundle"):
        build_bundle(model, ck, runtime="onnxruntime", progress=False)
    with pytest.raises(MixpertError, match="is not a Mixpert checkpoint"):
        save_checkpoint(model, repo)


# --- --out itself is wrong: one line each --------------------------------------------------------------------

def test_out_dot_file_blocked_and_unwritable(tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "a.txt").write_text("x")
    monkeypatch.chdir(work)
    base = ["build", "--backbone", "tiny", "--random-init", "--runtime", "onnxruntime", "--quiet", "--out"]
    cases = {".": "is the current directory, which this command would replace",
             str(tmp_path): "is a parent of the current directory",
             "a.txt": "a.txt: is a file, not a directory",
             "a.txt/bundle": f"{work / 'a.txt'} is a file, so no directory can be made below it",
             "/proc/mixpert-no/bundle": "cannot write in /proc/mixpert-no"}
    for out, message in cases.items():
        err = one_line_error(capsys, export_main(base + [out]))
        assert message in err, (out, err)
    assert sorted(p.name for p in work.iterdir()) == ["a.txt"]


def test_out_must_not_hold_or_sit_inside_what_is_read(bundle, model, tmp_path, capsys):
    ck = save_checkpoint(model, tmp_path / "ck")
    base = ["build", "--checkpoint", str(ck), "--runtime", "onnxruntime", "--quiet", "--out"]
    err = one_line_error(capsys, export_main(base + [str(ck / "engines")]))
    assert f"is inside --checkpoint {ck}" in err
    err = one_line_error(capsys, export_main(base + [str(ck)]))
    assert "is not a bundle" in err  # a checkpoint is never replaced by a bundle
    # a bundle that holds the checkpoint it would be rebuilt from: replacing it would delete the checkpoint
    outer = tmp_path / "outer"
    shutil.copytree(bundle, outer)
    shutil.copytree(ck, outer / "ck")
    err = one_line_error(capsys, export_main(["build", "--checkpoint", str(outer / "ck"), "--out", str(outer), "--quiet"]))
    assert f"holds --checkpoint {outer / 'ck'}, which replacing it would delete" in err
    assert (outer / "ck" / "mixpert.json").is_file()


# --- leftovers of a killed run --------------------------------------------------------------------------------

def _hold_staging(target: Path):
    """Another live process inside staged_dir(target): returns it once its staging directory exists."""
    code = ("import sys, time; from mixpert_train.staging import staged_dir; from mixpert_export.bundle.manifest import BUNDLE\n"
            "with staged_dir(sys.argv[1], BUNDLE) as tmp:\n    print(tmp, flush=True); time.sleep(120)\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    return p, Path(p.stdout.readline().strip())


def test_stale_staging_is_removed_live_and_unmarked_ones_are_kept(tmp_path):
    target = tmp_path / "bundle"
    live, live_dir = _hold_staging(target)
    dead, dead_dir = _hold_staging(target)
    try:
        dead.send_signal(signal.SIGKILL)
        dead.wait()
        decoy = tmp_path / ".bundle.tmp-mine"  # the right name, no marker: not ours
        decoy.mkdir()
        (decoy / "keep.txt").write_text("x")
        removed = staging.remove_stale(target.resolve())
        assert removed == [dead_dir] and not dead_dir.exists()
        assert live_dir.is_dir() and (decoy / "keep.txt").is_file()
    finally:
        live.kill()
        live.wait()
    assert staging.remove_stale(target.resolve()) == [live_dir]  # dead now


def test_replacing_without_an_atomic_exchange_still_leaves_one_complete_directory(model, tmp_path, monkeypatch):
    monkeypatch.setattr(staging, "_exchange", lambda a, b: False)  # a filesystem without renameat2 exchange
    ck = tmp_path / "ck"
    save_checkpoint(model, ck)
    save_checkpoint(model, ck)
    assert load_checkpoint(ck).cfg == model.cfg
    only(tmp_path, "ck")


def test_killed_build_leaves_nothing_loadable_and_the_next_builds_clean_up(tmp_path):
    """A build killed by SIGKILL mid-export; then two builds of the same --out at once (one in another process,
    one here): both finish, the killed run's leftovers are gone, the live one's staging was not touched."""
    out = tmp_path / "kb"
    cmd = [sys.executable, "-m", "mixpert_export", "build", "--backbone", "tiny", "--random-init", "--out", str(out),
           "--runtime", "onnxruntime", "--quiet"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    killed = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".kb.tmp-*/*.onnx")) and time.time() < deadline:
        time.sleep(0.2)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    (leftover,) = tmp_path.glob(".kb.tmp-*")
    assert list(leftover.glob("*.onnx")) and (leftover / staging.MARKER).is_file()
    assert not out.exists()
    with pytest.raises(MixpertError, match="missing"):
        mf.read_manifest(out)

    other = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    live = []
    while not live and other.poll() is None and time.time() < deadline:  # until it has begun its own staging
        time.sleep(0.2)
        live = [d for d in tmp_path.glob(".kb.tmp-*") if d != leftover]
    assert not leftover.exists() and len(live) == 1  # its cleanup removed the dead run's leftover first
    assert export_main(cmd[3:]) == 0
    assert other.wait(timeout=300) == 0, other.stderr.read()
    m = mf.read_manifest(out)
    mf.verify_files(out, m, "onnx")
    only(tmp_path, "kb")


# --- manifest and checkpoint entries stay inside their directory ----------------------------------------------

@pytest.mark.parametrize("name", ["../x.onnx", "/etc/hostname"])
def test_manifest_entry_outside_the_bundle_is_refused(bundle, tmp_path, capsys, name):
    forged = tmp_path / "forged"
    shutil.copytree(bundle, forged)
    m = json.loads((forged / mf.NAME).read_text())
    onnx = m["parts"]["trunk"]["onnx"]
    onnx["sha256"] = {name: "0" * 64}
    onnx["file"] = name
    (forged / mf.NAME).write_text(json.dumps(m))
    img = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (32, 24), "white").save(img)
    err = one_line_error(capsys, export_main(["run", "--engines", str(forged), str(img), "--runtime", "onnxruntime"]))
    assert f"entry {name!r} is not a plain file name inside {forged}" in err and str(forged / mf.NAME) in err


def test_checkpoint_domain_that_would_name_a_file_outside_is_refused(model, tmp_path):
    ck = save_checkpoint(model, tmp_path / "ck")
    meta = json.loads((ck / "mixpert.json").read_text())
    meta["domains"][0] = "../../evil"
    (ck / "mixpert.json").write_text(json.dumps(meta))
    with pytest.raises(MixpertError, match=r"mixpert.json: invalid model description \(domain names \['../../evil'\]"):
        load_checkpoint(ck)
