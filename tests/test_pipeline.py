"""MixpertPipeline over torch and ONNX Runtime: golden tests against torch and transformers, dispatch,
per-crop routing, batching by crops, bad input, concurrency, and the run CLI."""

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_uint8_path_equals_float_path, reference_crop_features
from mixpert_export.__main__ import main
from mixpert_export.bundle.build import build_bundle
from mixpert_export.runtime.pipeline import MixpertPipeline
from mixpert_train.preprocess import Preprocessor
from mixpert_train.backbones import get_backbone
from mixpert_train.checkpoint import save_checkpoint
from mixpert_train.model import DOMAINS, VERSATILE, MixpertConfig, build_model


def decisive_model(seed=5):
    """A tiny model whose experts differ and whose router is confident (margins far above float noise),
    standing in for a trained one."""
    model = build_model(MixpertConfig.for_backbone(get_backbone("tiny")), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for e in model.experts.values():
            for p in e.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.01)
        model.router.fc1.weight.mul_(20)
        model.router.fc2.weight.mul_(20)
    return model


def images(seed=0):
    """Different sizes, aspect ratios and content, so several experts are chosen."""
    rng = np.random.default_rng(seed)
    out = []
    for i, (w, h) in enumerate([(64, 64), (200, 90), (90, 200), (333, 333), (30, 500), (640, 480), (48, 47), (128, 256)]):
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8) if i % 2 else np.full((h, w, 3), rng.integers(0, 256, 3), np.uint8)
        out.append(Image.fromarray(arr))
    return out


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    d = tmp_path_factory.mktemp("pipe")
    ck = save_checkpoint(decisive_model(), d / "ck")
    from mixpert_export.bundle.sources import resolve

    model, source = resolve(checkpoint=str(ck))
    build_bundle(model, d / "bundle", runtime="onnxruntime", max_crops=24, source=source, progress=False)
    return d / "bundle"


@pytest.fixture(scope="module")
def pipes(bundle):
    return {rt: MixpertPipeline.from_engines(bundle, runtime=rt, strategy="direct") for rt in ("torch", "onnxruntime")}


def test_onnxruntime_pipeline_equals_torch_pipeline(pipes):
    imgs = images()
    t, o = pipes["torch"](imgs), pipes["onnxruntime"](imgs)
    assert all(r.ok for r in t + o)
    assert [r.expert for r in t] == [r.expert for r in o]  # routing identical across runtimes
    assert len({r.expert for r in t}) >= 2, "the image set must exercise several experts"
    for a, b in zip(t, o):
        assert a.crops == b.crops and a.tokens.shape == (a.crops, 16, 256)
        assert np.abs(a.tokens - b.tokens).max() <= 1e-4  # fp32: 1e-4 (issue #5)
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)


def test_dispatch_is_one_launch_per_used_expert_and_matches_per_image_reference(bundle):
    model = decisive_model()
    pipe = MixpertPipeline.from_engines(bundle, runtime="onnxruntime", strategy="direct")
    imgs = [images()[i] for i in (0, 1, 2, 4, 6)]  # 2+7+7+4+2 = 22 crops: one call under the 24-crop limit
    res = pipe(imgs)
    used = {r.expert for r in res}
    assert pipe.stats.launches["trunk"] == pipe.stats.launches["router"] == 1
    assert {k for k in pipe.stats.launches if k.startswith("expert_")} == {f"expert_{e}" for e in used}
    assert all(v == 1 for v in pipe.stats.launches.values())
    pre = Preprocessor(model.cfg.backbone)
    for r, im in zip(res, imgs):  # independent reference: each image alone, by hand, in torch
        px = torch.from_numpy(pre.pixel_values(im)[0])
        with torch.no_grad():
            h = model.trunk(px)
            s = model.router(h, torch.full((1, len(px)), 1.0 / len(px)))
            expert = DOMAINS[int(s.argmax())]
            want = model.experts[expert](h).numpy()
        assert r.expert == expert
        assert np.abs(r.tokens - want).max() <= 1e-4


def test_uint8_input_gives_the_tokens_the_float_input_gave(bundle):
    """The parts take the crops' bytes and normalise them in the graph: the same tokens as transformers' float32
    pixel_values through the model (torch 0.0, ONNX Runtime <= 1e-5), images of several sizes in shared calls."""
    worst = assert_uint8_path_equals_float_path(bundle, images())
    assert worst["torch"] == 0.0


def test_routing_strategies_and_tau(bundle):
    imgs = images()[:4]
    base = MixpertPipeline.from_engines(bundle, runtime="onnxruntime", strategy="direct")(imgs)
    for tau in (0.0, 0.3, 0.6, 1.0):
        res = MixpertPipeline.from_engines(bundle, runtime="onnxruntime", tau=tau)(imgs)  # score-difference
        for r, b in zip(res, base):
            assert r.expert == (b.expert if r.margin >= tau else VERSATILE)


def test_per_crop_routing(bundle):
    model = decisive_model()
    pipe = MixpertPipeline.from_engines(bundle, runtime="onnxruntime", strategy="direct", per_crop=True)
    imgs = images()[1:3]
    res = pipe(imgs)
    pre = Preprocessor(model.cfg.backbone)
    for r, im in zip(res, imgs):
        assert isinstance(r.expert, list) and len(r.expert) == r.crops == len(r.scores)
        px = torch.from_numpy(pre.pixel_values(im)[0])
        with torch.no_grad():
            h = model.trunk(px)
            for c in range(r.crops):
                s = model.router(h[c:c + 1], torch.ones(1, 1))
                e = DOMAINS[int(s.argmax())]
                assert r.expert[c] == e
                assert np.abs(r.tokens[c] - model.experts[e](h[c:c + 1]).numpy()[0]).max() <= 1e-4


def test_calls_larger_than_the_engines_are_split_and_keep_order(pipes):
    imgs = images() * 3  # about 3 x 30 crops, the bundle takes 24 a call
    pipe = pipes["onnxruntime"]
    res = pipe(imgs)
    alone = [pipe([im])[0] for im in imgs[:8]]
    assert [r.index for r in res] == list(range(len(imgs)))
    for r, a in zip(res, alone * 3):
        assert r.expert == a.expert and np.abs(r.tokens - a.tokens).max() <= 1e-5


def test_versatile_everywhere_equals_transformers(reference_model, tiny_snapshot, tmp_path):
    """Golden: every image routed to versatile -> the features transformers' LLaVA-OV computes for its crops."""
    from mixpert_export.bundle.sources import resolve

    model, source = resolve(weights=str(tiny_snapshot))
    build_bundle(model, tmp_path / "b", runtime="onnxruntime", source=source, progress=False)

    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    proc = LlavaOnevisionImageProcessorPil.from_dict({"size": {"height": 64, "width": 64},
                                                       "image_grid_pinpoints": reference_model.config.image_grid_pinpoints,
                                                       "image_mean": [0.5] * 3, "image_std": [0.5] * 3})
    imgs = images()[:3]
    for rt in ("torch", "onnxruntime"):
        res = MixpertPipeline.from_engines(tmp_path / "b", runtime=rt, strategy="score-threshold", lam=1.0)(imgs)
        for r, im in zip(res, imgs):
            assert r.expert == VERSATILE
            enc = proc(images=[im], return_tensors="pt")
            ref = reference_crop_features(reference_model, enc["pixel_values"], enc["image_sizes"])
            assert ref.shape == r.tokens.shape
            assert np.abs(r.tokens - ref.numpy()).max() <= (1e-5 if rt == "torch" else 1e-4)


def test_preprocessing_matches_llava_ov_published_processor():
    """Our llava-ov-7b registry entry preprocesses as the published LLaVA-OV preprocessor_config does."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    published = LlavaOnevisionImageProcessorPil.from_dict({
        "size": {"height": 384, "width": 384}, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "image_grid_pinpoints": [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)],
        "do_convert_rgb": True, "do_pad": True, "resample": 3})
    ours = Preprocessor(get_backbone("llava-ov-7b"))
    rng = np.random.default_rng(1)
    for w, h in [(384, 384), (500, 300), (300, 900), (1000, 700), (17, 33)]:
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        want = published(images=[im], return_tensors="np")["pixel_values"][0]
        got = ours.pixel_values(im)[0]
        assert got.shape == want.shape and np.array_equal(got, want)


# ---------------------------------------------------------------------------------------------
# Bad input: each a per-image error, the rest of the call processed, nothing written half.
# ---------------------------------------------------------------------------------------------

def _bad_inputs(d):
    (d / "zero.png").write_bytes(b"")
    (d / "text.png").write_text("this is not a png")
    good = Image.fromarray(np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8))
    good.save(d / "full.jpg", quality=90)
    data = (d / "full.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 2])
    Image.new("1", (20000, 20000)).save(d / "huge.png")  # 400 Mpx, a few KB on disk
    nan = np.full((40, 40), np.nan, dtype=np.float32)
    Image.fromarray(nan, mode="F").save(d / "nan.tiff")
    return {"missing": (d / "missing.png", "no such file"), "zero": (d / "zero.png", "empty file"),
            "text": (d / "text.png", "not an image"), "truncated": (d / "truncated.jpg", "truncated"),
            "huge": (d / "huge.png", "400 Mpx, above the 64 Mpx limit"), "nan": (d / "nan.tiff", "NaN")}


def _odd_but_valid(d):
    rng = np.random.default_rng(2)
    out = {"1x1": Image.new("RGB", (1, 1), (10, 20, 30)),
           "gray": Image.fromarray(rng.integers(0, 256, (50, 70), dtype=np.uint8), mode="L"),
           "rgba": Image.fromarray(rng.integers(0, 256, (50, 70, 4), dtype=np.uint8), mode="RGBA"),
           "16bit": Image.fromarray(rng.integers(0, 65536, (50, 70), dtype=np.uint16).astype(np.uint16)),
           "cmyk": Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).convert("CMYK"),
           "palette": Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).convert("P")}
    paths = {}
    for k, im in out.items():
        p = d / f"{k}.{'jpg' if k == 'cmyk' else 'png'}"
        im.save(p)
        paths[k] = p
    return paths


def test_bad_inputs_are_per_image_errors(pipes, tmp_path):
    bad = _bad_inputs(tmp_path)
    odd = _odd_but_valid(tmp_path)
    good = images()[:2]
    pipe = pipes["onnxruntime"]
    clean = pipe(good)
    inputs = [good[0]] + [p for p, _ in bad.values()] + list(odd.values()) + [good[1]]
    res = pipe(inputs)
    assert len(res) == len(inputs)
    for r, (name, (_, why)) in zip(res[1:1 + len(bad)], bad.items()):
        assert not r.ok and why in r.error and "\n" not in r.error, (name, r.error)
    for r in res[1 + len(bad):-1]:
        assert r.ok and r.tokens.shape[1:] == (16, 256) and np.isfinite(r.tokens).all(), r.source
    for a, b in zip([res[0], res[-1]], clean):  # the good images are unaffected by their neighbours
        assert a.ok and a.expert == b.expert and np.abs(a.tokens - b.tokens).max() <= 1e-5


def test_an_image_that_makes_nan_tokens_is_an_error_for_that_image_only(bundle, monkeypatch):
    """Pixels are bytes now (every table value is finite), so NaN can only come from the model itself (an fp16
    overflow, broken weights): the experts' output rows of the second image are poisoned here."""
    pipe = MixpertPipeline.from_engines(bundle, runtime="onnxruntime", strategy="direct")
    imgs = images()[:3]
    counts = [len(pipe.preprocess.prepare(im)[0]) for im in imgs]
    real = pipe.backend.run_experts

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs).copy()
        out[counts[0]] = np.nan  # the second image's first crop
        return out

    monkeypatch.setattr(pipe.backend, "run_experts", poisoned)
    res = pipe(imgs)
    assert res[0].ok and res[2].ok and not res[1].ok and "NaN" in res[1].error


def test_one_pipeline_shared_by_8_threads(pipes):
    pipe = pipes["onnxruntime"]
    imgs = images()
    want = pipe(imgs)
    got, errors = [None] * 8, []

    def work(i):
        try:
            got[i] = pipe(imgs[i % 3:] + imgs[:i % 3])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert not errors
    for i, res in enumerate(got):
        order = (list(range(len(imgs)))[i % 3:] + list(range(len(imgs)))[:i % 3])
        for r, j in zip(res, order):
            assert r.expert == want[j].expert and np.array_equal(r.tokens, want[j].tokens)


def test_run_cli_table_json_and_features(bundle, tmp_path, capsys):
    good = tmp_path / "a.png"
    images()[1].save(good)
    (tmp_path / "bad.png").write_text("nope")
    js, feats = tmp_path / "out.json", tmp_path / "f.npz"
    rc = main(["run", "--engines", str(bundle), str(good), str(tmp_path / "bad.png"), str(good),
               "--json", str(js), "--save-features", str(feats), "--runtime", "onnxruntime"])
    assert rc == 1  # one input failed; the others were processed
    out = capsys.readouterr().out
    assert "ERROR" in out and "a.png" in out and "margin" in out
    recs = json.loads(js.read_text())
    assert [("error" in r) for r in recs] == [False, True, False]
    assert recs[0]["expert"] in DOMAINS + (VERSATILE,) and len(recs[0]["scores"]) == 5
    npz = np.load(feats)
    assert sorted(npz.files) == ["0", "2"] and npz["0"].shape == (recs[0]["crops"], 16, 256)
    assert not list(tmp_path.glob(".*.tmp"))


# ---------------------------------------------------------------------------------------------
# GPU: run where a CUDA GPU is visible; skipped here with the reason.
# ---------------------------------------------------------------------------------------------

def _need_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (none visible on this machine)")


@pytest.mark.gpu
def test_torch_cuda_pipeline_equals_cpu_reference(bundle, pipes):
    _need_cuda()
    imgs = images()
    cpu = pipes["onnxruntime"](imgs)
    gpu = MixpertPipeline.from_engines(bundle, runtime="torch", device="cuda", strategy="direct")(imgs)
    assert [r.expert for r in gpu] == [r.expert for r in cpu]
    for a, b in zip(gpu, cpu):
        assert np.abs(a.tokens - b.tokens).max() <= 1e-3  # fp32 on CUDA (TF32 off by default for matmul)


@pytest.mark.gpu
def test_tensorrt_engines_run_or_refuse_with_the_fix(bundle, pipes, tmp_path):
    _need_cuda()
    from mixpert_export.bundle import tensorrt_build as trtb
    from mixpert_export.bundle.build import compile_bundle
    from mixpert_train.errors import MixpertError

    if not trtb.available():
        pytest.skip("no tensorrt / tensorrt_rtx on this GPU machine")
    compile_bundle(bundle, tmp_path / "eng", gpu_targets=["current"] if trtb.import_tensorrt().flavour == "tensorrt_rtx" else None,
                   progress=False)
    try:
        pipe = MixpertPipeline.from_engines(tmp_path / "eng", runtime="tensorrt", strategy="direct")
    except MixpertError as e:  # e.g. TensorRT-RTX engines on a data-centre GPU
        assert "build with standard TensorRT on this machine" in str(e)
        return
    imgs = images()
    got, want = pipe(imgs), pipes["onnxruntime"](imgs)
    assert [r.expert for r in got] == [r.expert for r in want]
    for a, b in zip(got, want):
        cos = float((a.tokens.ravel() @ b.tokens.ravel()) / (np.linalg.norm(a.tokens) * np.linalg.norm(b.tokens)))
        assert cos >= 0.9999


@pytest.mark.gpu
def test_onnxruntime_cuda_with_iobinding_equals_cpu(bundle, pipes):
    _need_cuda()
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu is not installed (its CUDA EP is needed)")
    imgs = images()
    cpu = pipes["onnxruntime"](imgs)
    gpu = MixpertPipeline.from_engines(bundle, runtime="onnxruntime", device="cuda", strategy="direct")(imgs)
    assert [r.expert for r in gpu] == [r.expert for r in cpu]
    for a, b in zip(gpu, cpu):
        assert np.abs(a.tokens - b.tokens).max() <= 1e-3


# --- map(): preprocessing overlapped with inference, bounded, in input order -----------------------------------

def test_map_equals_call_in_input_order_with_bad_images_between(pipes, tmp_path):
    pipe = pipes["onnxruntime"]
    bad = [p for p, _ in _bad_inputs(tmp_path).values()]
    good = images() + images(seed=1)
    inputs = [x for pair in zip(good, bad + bad + bad) for x in pair]  # a bad image after every good one
    want = pipe(inputs)
    got = list(pipe.map(iter(inputs), workers=2, prefetch=3))
    assert [r.index for r in got] == list(range(len(inputs)))
    for a, b in zip(got, want):
        assert a.ok == b.ok and a.error == b.error and a.expert == b.expert and a.crops == b.crops
        if a.ok:  # map may start a call early (the next image not ready yet), so its calls can group differently;
            # each crop's arithmetic is the same but for the BLAS blocking of a longer or shorter batch
            np.testing.assert_allclose(a.tokens, b.tokens, rtol=0, atol=1e-5)


def test_map_overlaps_preprocessing_with_inference_and_stays_bounded(bundle):
    """Intervals recorded on the real threads: with workers, some preprocessing runs while a call runs; without,
    none does. The input is consumed lazily: at most `prefetch` images beyond the call being filled."""
    import time

    pipe = MixpertPipeline.from_engines(bundle, runtime="onnxruntime", strategy="direct")
    spans = {"pre": [], "infer": []}
    pre, infer = pipe.preprocess.prepare, pipe.backend.infer

    def timed(kind, fn):
        def wrapped(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spans[kind].append((t, time.perf_counter()))
        return wrapped

    pipe.preprocess.prepare, pipe.backend.infer = timed("pre", pre), timed("infer", infer)
    imgs = images() * 3  # 24 images, several calls of at most 24 crops

    def overlap() -> float:
        return sum(max(0.0, min(b1, b2) - max(a1, a2)) for a1, b1 in spans["pre"] for a2, b2 in spans["infer"])

    list(pipe.map(imgs, workers=0))
    assert overlap() == 0.0
    spans["pre"].clear(), spans["infer"].clear()
    list(pipe.map(imgs, workers=2, prefetch=4))
    assert overlap() > 0.0

    consumed = []

    def source():
        for i, im in enumerate(imgs * 2):
            consumed.append(i)
            yield im

    first_call, n = 0, 0  # images in the first call: consecutive images up to the bundle's max crops
    for r in pipe(imgs):
        if n + r.crops > pipe.max_crops:
            break
        n, first_call = n + r.crops, first_call + 1
    it = pipe.map(source(), workers=2, prefetch=4)
    first = next(it)  # yielded right after the first call ran
    assert first.index == 0 and first.ok
    assert len(consumed) <= first_call + 1 + 4  # the call, the image that did not fit, `prefetch` more
    rest = list(it)
    assert [r.index for r in [first] + rest] == list(range(2 * len(imgs)))


def test_onnxruntime_cpu_parts_share_one_arena_that_is_given_back_after_each_run(pipes):
    """The memory settings that keep a 7B patch-family bundle inside a 24 GiB host (figures in the backend's
    comment): every part's session draws on the one environment arena, and every run shrinks it."""
    be = pipes["onnxruntime"].backend
    assert be.run_options.get_run_config_entry("memory.enable_memory_arena_shrinkage") == "cpu:0"
    for name, sess in be.sessions.items():
        assert sess.get_session_options().get_session_config_entry("session.use_env_allocators") == "1", name


def test_map_runs_the_ready_images_instead_of_waiting_for_a_slow_one(bundle):
    """The engines never idle while a call could run: when the next image is still being prepared, map runs the
    images that are ready. Image 4 takes 0.6 s to preprocess; images 0-3 come back before it is ready, in one call."""
    import time

    pipe = MixpertPipeline.from_engines(bundle, runtime="onnxruntime", strategy="direct")
    imgs = [Image.new("RGB", (64, 64), (i * 30, 0, 0)) for i in range(4)] + ["slow"] + \
        [Image.new("RGB", (64, 64), (0, i * 30, 0)) for i in range(3)]
    prepare, ready = pipe.preprocess.prepare, {}

    def slowly(src):
        if src == "slow":
            time.sleep(0.6)
            ready["slow"] = time.perf_counter()
            return prepare(Image.new("RGB", (64, 64), (0, 0, 200)))
        return prepare(src)

    pipe.preprocess.prepare = slowly
    got, when = [], []
    for r in pipe.map(imgs, workers=2, prefetch=6):
        got.append(r)
        when.append(time.perf_counter())
    assert [r.index for r in got] == list(range(8)) and all(r.ok for r in got)
    assert max(when[:4]) < ready["slow"] <= min(when[4:])  # 0-3 yielded before image 4 was even prepared
    assert pipe.stats.launches["trunk"] >= 2
    want = pipe([*imgs[:4], Image.new("RGB", (64, 64), (0, 0, 200)), *imgs[5:]])  # fixed grouping
    for a, b in zip(got, want):
        assert a.expert == b.expert
        np.testing.assert_allclose(a.tokens, b.tokens, rtol=0, atol=1e-5)


def test_run_cli_takes_a_directory_and_a_glob(bundle, tmp_path, capsys):
    d = tmp_path / "imgs"
    d.mkdir()
    for i, im in enumerate(images()[:4]):
        im.save(d / f"{i}.png")
    (d / "notes.txt").write_text("not an image, not picked up")
    assert main(["run", "--engines", str(bundle), str(d), "--runtime", "onnxruntime", "--json", str(tmp_path / "a.json")]) == 0
    rec = json.loads((tmp_path / "a.json").read_text())
    assert [Path(r["path"]).name for r in rec] == ["0.png", "1.png", "2.png", "3.png"]
    assert main(["run", "--engines", str(bundle), str(d / "[02].png"), "--runtime", "onnxruntime", "--workers", "0",
                 "--json", str(tmp_path / "b.json")]) == 0
    assert [Path(r["path"]).name for r in json.loads((tmp_path / "b.json").read_text())] == ["0.png", "2.png"]
    capsys.readouterr()
    assert main(["run", "--engines", str(bundle), str(d / "*.jpg"), "--runtime", "onnxruntime"]) == 2
    err = capsys.readouterr().err.strip()
    assert "the pattern matches no file" in err and "\n" not in err


# --- preprocessing with torch on a device: tokens-level check against the PIL path ---------------------------

def _cosines(a, b):
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _tokens_agree(got, want):
    """Identical routing on the fixed set; every crop's tokens at cosine >= 0.9999 to the PIL path's."""
    assert [r.expert for r in got] == [r.expert for r in want]
    assert len({r.expert for r in want}) >= 2  # the set routes to several experts: routing is really compared
    worst = min(float(_cosines(a.tokens, b.tokens).min()) for a, b in zip(got, want))
    assert worst >= 0.9999, worst
    return worst


def test_torch_cpu_preprocessing_gives_the_same_routing_and_tokens_within_cosine(bundle, pipes, tmp_path, capsys):
    imgs = images() + images(seed=1)
    dev = MixpertPipeline.from_engines(bundle, runtime="onnxruntime", strategy="direct", preprocess_device="cpu")
    assert dev.describe()["preprocess"]["path"] == "torch uint8 resize"
    _tokens_agree(dev(imgs), pipes["onnxruntime"](imgs))
    paths = []
    for i, im in enumerate(imgs[:3]):
        paths.append(str(tmp_path / f"{i}.png"))
        im.save(paths[-1])
    assert main(["run", "--engines", str(bundle), *paths, "--runtime", "onnxruntime", "--preprocess-device", "cpu"]) == 0
    assert "preprocessing: torch uint8 resize on cpu" in capsys.readouterr().out


@pytest.mark.gpu
@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_cuda_preprocessing_feeds_the_gpu_backend_without_the_host(bundle, pipes, runtime):
    _need_cuda()
    if runtime == "onnxruntime":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            pytest.skip("onnxruntime without the CUDA EP (pip install onnxruntime-gpu)")
    imgs = images() + images(seed=1)
    dev = MixpertPipeline.from_engines(bundle, runtime=runtime, device="cuda", strategy="direct", preprocess_device="cuda")
    assert dev.describe()["preprocess"] == {"path": "torch float32 resize", "device": "cuda"}
    _tokens_agree(dev(imgs), pipes["onnxruntime"](imgs))


def test_calls_are_the_grouping_map_makes(bundle, monkeypatch):
    """pipe.calls (what the benchmarks run) groups images exactly as map() does when every image is ready."""
    pipe = MixpertPipeline.from_engines(bundle, runtime="onnxruntime", strategy="direct", call_rows=9)
    made = []
    real = pipe.run_crops
    monkeypatch.setattr(pipe, "run_crops", lambda batch, experts=None: (made.append([r.index for r, _ in batch]),
                                                                         real(batch, experts)))
    imgs = images()
    res = list(pipe.map(imgs, workers=0))
    assert all(r.ok for r in res)
    counts = [r.crops for r in res]
    assert pipe.calls(counts) == made and len(made) > 2  # several calls, one of them above the budget alone
    assert any(counts[c[0]] > 9 for c in made if len(c) == 1)
    assert pipe.calls([]) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a host without a CUDA GPU")
@pytest.mark.parametrize("flags,names", [
    (["--runtime", "torch", "--device", "cuda"], "--device cuda"),
    (["--runtime", "onnxruntime", "--device", "cuda"], "--device cuda"),
    (["--runtime", "onnxruntime", "--preprocess-device", "cuda"], "--preprocess-device cuda"),
    (["--runtime", "torch", "--device", "gpu"], "--device gpu"),
])
def test_cuda_asked_on_a_host_without_one_is_one_line_naming_the_flag(bundle, tmp_path, capsys, flags, names):
    """Issue 30 (part): before, an AssertionError from torch, "Cannot access accelerator device", or advice to
    rebuild the bundle; now exit 2 and one line naming the flag the user typed."""
    img = tmp_path / "a.png"
    images()[0].save(img)
    capsys.readouterr()
    assert main(["run", "--engines", str(bundle), str(img)] + flags) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and names in err and "\n" not in err and "Traceback" not in err
    assert "rebuild" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a host without a CUDA GPU")
def test_ask_llm_device_cuda_without_a_gpu_is_one_line_before_any_loading(tmp_path, capsys):
    assert main(["ask", "--engines", str(tmp_path / "none"), "--llm", str(tmp_path / "none"), "a.png", "q",
                 "--llm-device", "cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --llm-device cuda:") and "\n" not in err
