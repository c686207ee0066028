"""The GPU fast path's logic on CPU (buckets, padding, in-graph gathers and scatters run eagerly over the same
static buffers, stream assignment), and its CUDA behaviour where a GPU is visible (graph replay, concurrent
experts, bf16 accuracy, routing across runtimes)."""

import numpy as np
import pytest
import torch

from mixpert_export.runtime.backends.torch import TorchBackend
from mixpert_export.runtime.cuda_graphs import assign_streams, bucket_of, crop_buckets, padded_index
from mixpert_export.runtime.pipeline import MixpertPipeline
from mixpert_train.errors import MixpertError
from mixpert_train.model import DOMAINS, VERSATILE
from test_pipeline import bundle, images, pipes  # noqa: F401 (fixtures)


def test_buckets_and_padding():
    assert crop_buckets(40) == (1, 2, 4, 8, 10, 16, 24, 32, 40)
    assert crop_buckets(24) == (1, 2, 4, 8, 10, 16, 24)
    assert crop_buckets(12) == (1, 2, 4, 8, 10, 12)
    assert crop_buckets(1) == (1,)
    b = crop_buckets(24)
    assert [bucket_of(n, b) for n in (1, 2, 3, 5, 9, 10, 11, 17, 24)] == [1, 2, 4, 8, 10, 10, 16, 24, 24]
    with pytest.raises(MixpertError, match="above the largest bucket 24"):
        bucket_of(25, b)
    with pytest.raises(MixpertError):
        crop_buckets(0)
    assert padded_index(np.array([3, 5]), 4, 24).tolist() == [3, 5, 24, 24]
    assert padded_index(np.array([], dtype=np.int64), 1, 0).tolist() == [0]


def test_assign_streams_balances_largest_first_and_is_deterministic():
    assert assign_streams([10, 1, 1, 1], 2) == [0, 1, 1, 1]
    assert assign_streams([3, 3, 3, 3], 2) == [0, 1, 0, 1]
    assert assign_streams([5, 7, 2], 1) == [0, 0, 0]
    sizes = [4, 9, 1, 6, 6, 2]
    a = assign_streams(sizes, 3)
    assert a == assign_streams(sizes, 3)
    loads = [sum(s for s, k in zip(sizes, a) if k == i) for i in range(3)]
    assert max(loads) - min(loads) <= max(sizes)  # LPT bound
    with pytest.raises(MixpertError):
        assign_streams([1], 0)


def _mixed_experts(n):
    return [(DOMAINS + (VERSATILE,))[i % 6] for i in range(n)]


def test_static_bucketed_path_equals_plain_torch_on_cpu(bundle, pipes):  # noqa: F811
    """Same bundle, same images: the bucketed static-buffer path (run eagerly on CPU) against the plain torch
    backend, for calls whose crop counts fall strictly inside buckets (padding), one-domain and mixed groups,
    per-crop routing, and calls split by max crops."""
    plain = pipes["torch"]
    static = MixpertPipeline(TorchBackend("cpu", static=True).load(bundle, plain.manifest), plain.manifest,
                             strategy="direct")
    assert static.backend.describe()["static"] and static.backend.static.buckets == crop_buckets(24)
    imgs = images()
    for a, b in zip(static(imgs), plain(imgs)):
        assert a.ok and b.ok and a.expert == b.expert and a.crops == b.crops
        np.testing.assert_allclose(a.tokens, b.tokens, atol=1e-5, rtol=0)
    px, total = [], 0
    for im in imgs:  # a call of several images, crop total not a bucket size, within max crops
        p = static.preprocess.rows(im)[0]
        if total + len(p) <= 21:
            px.append((None, p))
            total += len(p)
    assert len(px) >= 3 and total not in crop_buckets(24)
    for forced in (["chart"] * len(px), _mixed_experts(len(px))):
        got = [type("R", (), {})() for _ in px]
        want = [type("R", (), {})() for _ in px]
        for r in got + want:
            r.source = "x"
        static.run_crops(list(zip(got, [p for _, p in px])), experts=forced)
        plain.run_crops(list(zip(want, [p for _, p in px])), experts=forced)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g.tokens, w.tokens, atol=1e-5, rtol=0)
    pc_static = MixpertPipeline(static.backend, plain.manifest, strategy="direct", per_crop=True)
    pc_plain = MixpertPipeline(plain.backend, plain.manifest, strategy="direct", per_crop=True)
    for a, b in zip(pc_static(imgs[:4]), pc_plain(imgs[:4])):
        assert a.expert == b.expert
        np.testing.assert_allclose(a.tokens, b.tokens, atol=1e-5, rtol=0)
    # the padded rows never leak: the dump row took the padded scatters, real rows match above
    assert static.backend.static.captures >= 3


def test_graphs_and_streams_need_cuda():
    with pytest.raises(MixpertError, match="need --device cuda"):
        TorchBackend("cpu", graphs=True)


# ---------------------------------------------------------------------------------------------
# GPU: run where a CUDA GPU is visible; skipped here with the reason.
# ---------------------------------------------------------------------------------------------

def _need_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (none visible on this machine)")


@pytest.mark.gpu
def test_cuda_graph_replay_equals_eager(bundle, pipes):  # noqa: F811
    _need_cuda()
    m = pipes["torch"].manifest
    eager = MixpertPipeline(TorchBackend("cuda", static=True, graphs=False).load(bundle, m), m, strategy="direct")
    graphed = MixpertPipeline(TorchBackend("cuda", graphs=True).load(bundle, m), m, strategy="direct")
    imgs = images()
    for _ in range(2):  # first call captures, second replays
        for a, b in zip(graphed(imgs), eager(imgs)):
            assert a.expert == b.expert
            assert np.array_equal(a.tokens, b.tokens)
    assert graphed.backend.static.captures > 0


@pytest.mark.gpu
def test_concurrent_experts_equal_sequential_bit_for_bit(bundle, pipes):  # noqa: F811
    _need_cuda()
    m = pipes["torch"].manifest
    seq = MixpertPipeline(TorchBackend("cuda", graphs=True, streams=1).load(bundle, m), m, strategy="direct")
    con = MixpertPipeline(TorchBackend("cuda", graphs=True, streams=4).load(bundle, m), m, strategy="direct")
    px, total = [], 0
    for im in images():
        p = seq.preprocess.rows(im)[0]
        if total + len(p) <= 24:
            px.append(p)
            total += len(p)
    for _ in range(3):
        got = [type("R", (), {"source": "x"})() for _ in px]
        want = [type("R", (), {"source": "x"})() for _ in px]
        con.run_crops(list(zip(got, px)), experts=_mixed_experts(len(px)))
        seq.run_crops(list(zip(want, px)), experts=_mixed_experts(len(px)))
        for g, w in zip(got, want):
            assert np.array_equal(g.tokens, w.tokens)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_cuda_cosine_and_routing(bundle, pipes, tmp_path, precision):  # noqa: F811
    """bf16 / fp16 torch CUDA (graphs) against fp32 CPU: cosine >= 0.999 per image, identical routing."""
    _need_cuda()
    import json

    m = json.loads(json.dumps(pipes["torch"].manifest))
    m["precision"] = precision
    half = MixpertPipeline(TorchBackend("cuda", graphs=True).load(bundle, m), m, strategy="direct")
    imgs = images()
    for a, b in zip(half(imgs), pipes["onnxruntime"](imgs)):
        assert a.expert == b.expert
        x, y = a.tokens.astype(np.float64).ravel(), b.tokens.astype(np.float64).ravel()
        assert x @ y / np.linalg.norm(x) / np.linalg.norm(y) >= 0.999


def test_onnxruntime_static_bound_path_equals_plain_on_cpu(bundle, pipes):  # noqa: F811
    """ONNX Runtime through the static buffers and fixed-address IOBinding (the CUDA-graph path's binding code,
    on the CPU EP): equal to the plain ONNX Runtime pipeline, and every call of one shape reuses one binding."""
    from mixpert_export.runtime.backends.onnxruntime import OnnxRuntimeBackend

    plain = pipes["onnxruntime"]
    be = OnnxRuntimeBackend("cpu", static=True).load(bundle, plain.manifest)
    static = MixpertPipeline(be, plain.manifest, strategy="direct")
    imgs = images()
    for _ in range(2):
        for a, b in zip(static(imgs), plain(imgs)):
            assert a.ok and b.ok and a.expert == b.expert
            np.testing.assert_allclose(a.tokens, b.tokens, atol=1e-5, rtol=0)
    bound = {k: len(m.bound) for k, m in be.static.modules.items()}
    calls = dict(static.stats.launches)
    assert bound["trunk"] < calls["trunk"]  # the second pass bound nothing new
    # the baseline through the same buckets
    px = np.concatenate([static.preprocess.rows(im)[0] for im in imgs[:2]])
    got = be.to_host(be.infer("single_encoder", {"pixel_values": be.from_host(px)})["tokens"])
    want = plain.backend.infer("single_encoder", {"pixel_values": px})["tokens"]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    with pytest.raises(MixpertError, match="need --device cuda"):
        OnnxRuntimeBackend("cpu", cuda_graphs=True)


@pytest.mark.gpu
def test_onnxruntime_cuda_static_graphs_equal_cpu(bundle, pipes):  # noqa: F811
    _need_cuda()
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu not installed on this GPU machine")
    gpu = MixpertPipeline.from_engines(bundle, runtime="onnxruntime", device="cuda", strategy="direct")
    assert gpu.backend.describe()["static"] and gpu.backend.describe()["cuda_graphs"]
    imgs = images()
    for _ in range(3):  # capture, then replays
        for a, b in zip(gpu(imgs), pipes["onnxruntime"](imgs)):
            assert a.expert == b.expert
            assert np.abs(a.tokens - b.tokens).max() <= 1e-3


def test_static_pipeline_shared_by_threads_runs_calls_one_at_a_time(bundle, pipes):  # noqa: F811
    import threading

    from mixpert_export.runtime.backends.onnxruntime import OnnxRuntimeBackend

    m = pipes["onnxruntime"].manifest
    pipe = MixpertPipeline(OnnxRuntimeBackend("cpu", static=True).load(bundle, m), m, strategy="direct")
    assert pipe.backend.serial and not pipes["onnxruntime"].backend.serial
    imgs = images()
    want = pipes["onnxruntime"](imgs)
    got = [None] * 4

    def work(i):
        got[i] = pipe(imgs[i:] + imgs[:i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    for i, res in enumerate(got):
        for r, j in zip(res, list(range(len(imgs)))[i:] + list(range(len(imgs)))[:i]):
            assert r.expert == want[j].expert
            np.testing.assert_allclose(r.tokens, want[j].tokens, atol=1e-5, rtol=0)
