"""Ditto's render networks off PyTorch (models/ditto/export.py): the warp + decoder graph
and the stitching network exported to ONNX and checked against PyTorch on onnxruntime,
the fp16 graph's precision split, the engine cache key, and the renderer's choice of path
with its fallback. Building and running the TensorRT engine needs a GPU and tensorrt:
that test skips elsewhere."""

from __future__ import annotations

import copy
import importlib.util
import logging
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from farm.errors import PermanentError
from models import engines
from models.ditto import checkpoints, export, keypoints
from models.ditto.decoder import SPADEDecoder
from models.ditto.renderer import DittoRenderer
from models.ditto.stitch import StitchConfig, StitchingNetwork
from models.ditto.warp import WarpingNetwork
from tests.ditto_checkpoints import write_random_checkpoints
from tests.unit.test_ditto_render_nets import random_state

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None

# Reduced widths, upstream's keypoint count and spatial shapes (f_s 64 x 64, 512 out);
# the widths of tests/ditto_checkpoints.py's reduced checkpoints.
WARP = WarpingNetwork.Config(
    feature_channels=8,
    depth=4,
    out_channels=32,
    compress=2,
    hourglass_expansion=4,
    hourglass_max=32,
)
DECODER = SPADEDecoder.Config(in_channels=32, out_channels=16, hidden=16)
EXPORT_BATCH = 2


@pytest.fixture(scope="module")
def nets() -> tuple[WarpingNetwork, SPADEDecoder]:
    # random_state scales the weights so that activations stay in range: the image is
    # not a saturated constant, so a parity check means something.
    warp = WarpingNetwork.from_state_dict(random_state(WarpingNetwork(WARP), 11))
    decoder = SPADEDecoder.from_state_dict(random_state(SPADEDecoder(DECODER), 11))
    return warp, decoder


def pytorch_images(nets, f_s, x_s, x_d) -> np.ndarray:
    """What DittoRenderer.crops computes on the CPU, frame by frame."""
    warp, decoder = nets
    with torch.no_grad():
        frames = [decoder(warp(f_s, x_s, x_d[i : i + 1])).clamp(0, 1) for i in range(len(x_d))]
    return torch.cat(frames).numpy()


def session(data: bytes) -> ort.InferenceSession:
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def run(sess: ort.InferenceSession, f_s, x_s, x_d) -> np.ndarray:
    f_type = np.float16 if sess.get_inputs()[0].type == "tensor(float16)" else np.float32
    feed = {"f_s": f_s.numpy().astype(f_type), "x_s": x_s.numpy(), "x_d": x_d.numpy()}
    (image,) = sess.run([export.OUTPUT], feed)
    return image


@pytest.fixture(scope="module")
def onnx_fp32(nets) -> bytes:
    return export.render_onnx(*nets, batch=EXPORT_BATCH)


# --- the render graph -----------------------------------------------------------------


def test_the_render_graph_runs_in_onnxruntime_like_pytorch(nets, onnx_fp32):
    """Three frames against an avatar traced with two, then a second avatar: f_s and
    x_s are inputs broadcast over the batch, not constants of the graph."""
    sess = session(onnx_fp32)
    f_s, x_s, x_d = export.example_inputs(nets[0], 3, seed=1)
    got = run(sess, f_s, x_s, x_d)
    expected = pytorch_images(nets, f_s, x_s, x_d)
    assert got.shape == (3, 3, 512, 512) and got.dtype == np.float32
    # The same float32 arithmetic with other kernels (measured: max 2e-5).
    np.testing.assert_allclose(got, expected, atol=2e-4, rtol=0)
    # The driving keypoints move the picture (so the check above is not of a constant).
    assert np.abs(expected[0] - expected[1]).mean() > 1e-3

    f_s2, x_s2, x_d2 = export.example_inputs(nets[0], 1, seed=2)
    other = run(sess, f_s2, x_s2, x_d2)
    assert other.shape == (1, 3, 512, 512)
    np.testing.assert_allclose(other, pytorch_images(nets, f_s2, x_s2, x_d2), atol=2e-4, rtol=0)
    assert np.abs(other[0] - got[0]).mean() > 1e-2  # another avatar, another picture


def test_the_render_graph_is_plain_onnx(onnx_fp32):
    model = onnx.load_from_string(onnx_fp32)
    onnx.checker.check_model(model, full_check=True)
    ops = {node.op_type for node in model.graph.node}
    assert "GridSample" not in ops and "Gather" in ops  # 5-D sampling as gathers
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}  # no custom ops
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    assert "BatchNormalization" not in ops  # folded into the convolutions
    inputs = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
        for i in model.graph.input
    }
    assert inputs == {
        "f_s": [1, WARP.feature_channels, WARP.depth, 64, 64],
        "x_s": [1, 21, 3],
        "x_d": ["batch", 21, 3],
    }
    (output,) = model.graph.output
    dims = output.type.tensor_type.shape.dim
    assert [dims[0].dim_param, dims[1].dim_value] == ["batch", 3]  # H, W: from the resizes


def _pool_via_2d(original):
    """torch has no fp16 avg_pool3d on the CPU: the hourglass's (1, 2, 2) pooling as the
    equivalent 2-D pooling over its (C x D) planes, for tracing the fp16 graph here."""

    def avg_pool3d(x, kernel_size, *args, **kwargs):
        if x.dtype != torch.float16 or x.device.type != "cpu":
            return original(x, kernel_size, *args, **kwargs)
        assert tuple(kernel_size) == (1, 2, 2) and not args and not kwargs
        b, c, d, h, w = x.shape
        return F.avg_pool2d(x.reshape(b, c * d, h, w), 2).reshape(b, c, d, h // 2, w // 2)

    return avg_pool3d


def test_the_fp16_graph_keeps_positions_in_float32(monkeypatch):
    """The graph a GPU worker builds, traced here at a small size (f_s 16 x 16, three
    hourglass blocks: fp16 convolutions are slow on the CPU): convolutions fp16, every
    position, heatmap, softmax and normalisation statistic float32; and it renders
    like the float32 networks."""
    monkeypatch.setattr(F, "avg_pool3d", _pool_via_2d(F.avg_pool3d))
    small = WarpingNetwork.Config(**{**WARP.__dict__, "hourglass_blocks": 3})
    warp = WarpingNetwork.from_state_dict(random_state(WarpingNetwork(small), 12))
    decoder = SPADEDecoder.from_state_dict(random_state(SPADEDecoder(DECODER), 12))
    with torch.inference_mode():  # as the first render builds it, inside crops()
        data = export.render_onnx(warp, decoder, 2, torch.float16, size=16)

    model = onnx.load_from_string(data)
    onnx.checker.check_model(model, full_check=True)
    typed = onnx.shape_inference.infer_shapes(model, strict_mode=True, check_type=True)
    types = {v.name: v.type.tensor_type.elem_type for v in typed.graph.value_info}
    types |= {v.name: v.type.tensor_type.elem_type for v in typed.graph.input}
    types |= {t.name: t.data_type for t in model.graph.initializer}
    F16, F32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    assert [types[i.name] for i in model.graph.input] == [F16, F32, F32]
    assert model.graph.output[0].type.tensor_type.elem_type == F32
    nodes = model.graph.node

    def input_types(op: str, index: int = 0) -> set[int]:
        return {types[n.input[index]] for n in nodes if n.op_type == op}

    assert input_types("Conv") == {F16} and input_types("Conv", 1) == {F16}  # data, weights
    assert input_types("Floor") == {F32}  # the sampler's voxel coordinates
    assert input_types("Exp") == {F32}  # the keypoint heatmaps
    assert input_types("Softmax") == {F32}  # the mask that blends the sampling grids
    assert input_types("InstanceNormalization") == {F32}  # SPADE's statistics
    # The gathers: rows of the fp16 volume at computed voxel indices, and x, y, z of
    # the float32 sampling grids (besides shape arithmetic on int64).
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in typed.graph.value_info}
    gathered = {
        (ranks[n.input[0]], types[n.input[0]])
        for n in nodes
        if n.op_type == "Gather" and types[n.input[0]] != onnx.TensorProto.INT64
    }
    assert gathered == {(2, F16), (5, F32)}

    try:
        sess = session(data)
    except Exception as exc:  # an onnxruntime without some fp16 CPU kernel
        pytest.skip(f"onnxruntime cannot run this fp16 graph on the CPU: {exc}")
    f_s, x_s, x_d = export.example_inputs(warp, 3, seed=3, size=16)
    f_s = f_s.half().float()  # the avatar's volume is fp16 to begin with
    got = run(sess, f_s, x_s, x_d)
    with torch.no_grad():
        expected = decoder(warp(f_s.expand(3, -1, -1, -1, -1), x_s.expand(3, -1, -1), x_d))
    diff = np.abs(got - expected.clamp(0, 1).numpy())
    # fp16 arithmetic: measured max 1.1e-3, mean 1.3e-4 (one level, 1/255, is 3.9e-3;
    # the same graph with positions in fp16 too: max 1.5e-2, mean 1.7e-3).
    assert diff.max() < 3.9e-3 and diff.mean() < 5e-4, (diff.max(), diff.mean())


# --- the stitching network ------------------------------------------------------------


def test_the_stitching_network_runs_in_onnxruntime_like_pytorch():
    net = StitchingNetwork.from_state_dict(random_state(StitchingNetwork(StitchConfig()), 5))
    data = export.stitch_onnx(net, batch=2)
    model = onnx.load_from_string(data)
    onnx.checker.check_model(model, full_check=True)
    assert {node.domain for node in model.graph.node} <= {"", "ai.onnx"}
    gen = torch.Generator().manual_seed(5)
    x_s = torch.rand(7, 21, 3, generator=gen) * 2 - 1
    x_d = x_s + torch.randn(7, 21, 3, generator=gen) * 0.1
    (got,) = session(data).run(None, {"x_s": x_s.numpy(), "x_d": x_d.numpy()})
    with torch.no_grad():
        expected = keypoints.stitch(x_s, x_d, net)
    assert got.shape == (7, 21, 3)
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-5, rtol=0)
    assert np.abs(expected.numpy() - x_d.numpy()).mean() > 1e-3  # it corrects something


# --- the renderer: path, engine cache key, fallback -----------------------------------


@pytest.fixture(scope="module")
def ditto_root(tmp_path_factory) -> Path:
    return write_random_checkpoints(tmp_path_factory.mktemp("ditto"), reduced=True, seed=0)


@pytest.fixture(scope="module")
def renderer(ditto_root) -> DittoRenderer:
    r = DittoRenderer(batch_size=2)
    r.load(ditto_root, "cpu")
    return r


def test_load_logs_the_path_it_took(ditto_root, caplog):
    r = DittoRenderer()
    with caplog.at_level(logging.INFO, logger="models.ditto.renderer"):
        r.load(ditto_root, "cpu")
    lines = [m for m in caplog.messages if m.startswith("ditto renderer")]
    assert lines == ["ditto renderer: using cpu (device cpu requested)"]
    assert (r.backend, r.device.type, r.dtype) == ("cpu", "cpu", torch.float32)


def test_build_engines_refuses_without_tensorrt(renderer):
    with pytest.raises(PermanentError) as info:
        renderer.build_engines()
    assert str(info.value) == (
        "TensorRT is not in use for ditto on this worker: device cpu requested"
    )


def _altered(root: Path, dest: Path, role: str) -> Path:
    """A copy of the checkpoint root with one weight of `role`'s file changed."""
    shutil.copytree(root, dest)
    path = dest / checkpoints.FILES[role]
    saved = torch.load(path, weights_only=True)
    state = saved.get("model_state_dict", saved)  # the LMDM's container
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = state[key].clone()
    state[key].view(-1)[0] += 1e-3
    torch.save(saved, path)
    return dest


def test_the_engine_name_keys_everything_that_makes_an_engine_unusable(
    renderer, ditto_root, tmp_path
):
    path = export.engine_path(renderer, "sm90", "10.3.0")
    assert path.parent == ditto_root / "engines"  # no engine_dir given
    assert path.name.startswith("ditto-") and path.name.endswith(
        "-sm90-trt10.3.0-fp16-b2-512.engine"
    )

    # The same weights elsewhere: the same engine; changed weights: another.
    def loaded(root: Path, **kwargs) -> DittoRenderer:
        r = DittoRenderer(batch_size=2, **kwargs)
        r.load(root, "cpu")
        return r

    same = loaded(shutil.copytree(ditto_root, tmp_path / "same"), engine_dir=str(tmp_path / "e"))
    assert export.engine_path(same, "sm90", "10.3.0") == tmp_path / "e" / path.name
    names = {path.name}
    for role in export.ENGINE_WEIGHTS:
        other = loaded(_altered(ditto_root, tmp_path / role, role))
        names.add(export.engine_path(other, "sm90", "10.3.0").name)
    # A weight that is not in the engine (the LMDM's) leaves the name alone.
    lmdm = loaded(_altered(ditto_root, tmp_path / "lmdm", "lmdm"))
    assert export.engine_path(lmdm, "sm90", "10.3.0").name == path.name

    bigger = copy.copy(renderer)
    bigger.batch_size = 4
    names |= {
        export.engine_path(renderer, "sm89", "10.3.0").name,
        export.engine_path(renderer, "sm90", "10.4.0").name,
        export.engine_path(renderer, "sm90", "10.3.0", precision="fp32").name,
        export.engine_path(bigger, "sm90", "10.3.0").name,
    }
    assert len(names) == 7
    digests = {n.split("-")[1] for n in names}
    assert len(digests) == 4  # the two weight files and the precision are in the digest


def test_a_failed_engine_leaves_the_worker_on_pytorch(renderer, tmp_path, monkeypatch, caplog):
    f_s, x_s, x_d = export.example_inputs(renderer.nets["warp"], 2, seed=4)
    expected = renderer.crops(f_s, x_s, x_d)

    # As load() leaves it on a GPU worker with tensorrt; the engine's build then fails.
    monkeypatch.setattr(renderer, "backend", "tensorrt")
    monkeypatch.setattr(renderer, "backend_reason", "Fake GPU sm90, TensorRT 10.3.0 fp16")
    monkeypatch.setattr(renderer, "engine_dir", tmp_path)
    monkeypatch.setattr(renderer, "_engine", None)
    monkeypatch.setattr(
        engines, "import_tensorrt", lambda: type("trt", (), {"__version__": "10.3.0"})
    )
    monkeypatch.setattr(engines, "gpu_arch", lambda device: "sm90")
    builds = []

    def fail(r):
        builds.append(r)
        raise PermanentError("TensorRT cannot parse the ditto render graph: no Range")

    monkeypatch.setattr(export, "build_render_engine", fail)
    with caplog.at_level(logging.WARNING, logger="models.ditto.renderer"):
        got = renderer.crops(f_s, x_s, x_d)
        again = renderer.crops(f_s, x_s, x_d[:1])
    assert builds == [renderer]  # tried once, under the engine's real cache path
    assert torch.equal(got, expected) and torch.equal(again, expected[:1])
    assert caplog.messages == [
        "ditto renderer: TensorRT failed (TensorRT cannot parse the ditto render graph: "
        "no Range); using PyTorch CUDA"
    ]
    assert renderer.backend == "cuda"
    assert not list(tmp_path.glob("*.engine")) and not list(tmp_path.glob(".*partial"))
    with pytest.raises(
        PermanentError, match="not in use for ditto on this worker: TensorRT failed"
    ):
        renderer.build_engines()


# --- on a GPU -------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(not HAS_TENSORRT, reason="needs tensorrt: pip install 'farm[tensorrt]'")
def test_tensorrt_engine_renders_like_pytorch_cuda(tmp_path, monkeypatch):
    monkeypatch.delenv(engines.TENSORRT_SWITCH, raising=False)
    root = write_random_checkpoints(tmp_path / "ditto", reduced=True, seed=0)
    # Weights that keep activations in range, in the files the engine's name hashes.
    torch.save(random_state(WarpingNetwork(WARP), 13), root / checkpoints.FILES["warp"])
    torch.save(random_state(SPADEDecoder(DECODER), 13), root / checkpoints.FILES["decoder"])
    renderer = DittoRenderer(batch_size=4, engine_dir=str(tmp_path / "engines"))
    renderer.load(root, "cuda")
    assert renderer.backend == "tensorrt", renderer.backend_reason
    engine = renderer.engine()
    assert isinstance(engine, export.TensorRTRender)  # not the fallback after a failure
    built = list((tmp_path / "engines").glob("ditto-*-fp16-b4-512.engine"))
    assert built == [engine.path]

    f_s, x_s, x_d = export.example_inputs(renderer.nets["warp"], 6, "cuda", seed=6)
    f_s = f_s.half().float()  # as the avatar holds it
    got = renderer.crops(f_s, x_s, x_d)  # 6 frames: a batch of 4, then 2
    assert got.shape == (6, 3, 512, 512) and got.dtype == torch.float32
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # a float32 reference
    with torch.no_grad():
        warp, decoder = renderer.nets["warp"], renderer.nets["decoder"]
        exact = decoder(warp(f_s.expand(6, -1, -1, -1, -1), x_s.expand(6, -1, -1), x_d))
        exact = exact.clamp(0, 1)
    renderer.backend = "cuda"  # the PyTorch CUDA path (fp16 autocast) on the same input
    autocast = renderer.crops(f_s, x_s, x_d)
    renderer.backend = "tensorrt"
    trt_error = (got - exact).abs()
    torch_error = (autocast - exact).abs()
    # Both fp16 for the arithmetic: the engine's error is of the PyTorch CUDA path's
    # order, and well under a level (1/255) on average.
    assert trt_error.mean() <= 2 * torch_error.mean() + 1e-4, (trt_error.mean(), torch_error.mean())
    assert trt_error.mean() < 1e-3 and trt_error.max() < 0.03
    # A frame does not depend on its batch: alone, it is what it was in the batch.
    alone = renderer.crops(f_s, x_s, x_d[4:5])
    assert (alone - got[4:5]).abs().max() < 2e-3

    # Built once: build_engines and a fresh worker find the file.
    stamp = built[0].stat().st_mtime_ns
    assert renderer.build_engines() == built
    fresh = DittoRenderer(batch_size=4, engine_dir=str(tmp_path / "engines"))
    fresh.load(root, "cuda")
    assert isinstance(fresh.engine(), export.TensorRTRender)
    assert built[0].stat().st_mtime_ns == stamp
