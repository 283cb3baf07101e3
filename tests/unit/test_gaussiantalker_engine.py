"""TensorRT for the gaussiantalker backend, as far as a CPU can check it: the per-frame
deformation graph of one avatar (models/gaussiantalker/export.py) exported to ONNX and
run on onnxruntime against the PyTorch network, its precision boundary, the engine cache
key, the path the renderer takes and its fallback. Building and running an engine needs
a GPU and tensorrt: that test skips elsewhere.

The model is the synthetic one of tests/gaussiantalker_fixture.py with seeded random
weights whose offset heads are scaled down so the Gaussians move by a few hundredths of
a unit, as a trained model's do (the frames stay pictures of the blob).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from farm.errors import PermanentError
from models.gaussiantalker.archive import pack
from models.gaussiantalker.deform_parts import eye_encoding
from models.gaussiantalker.deformation import Config, Deformation, Deformed
from models.gaussiantalker.export import (
    GAUSSIANS,
    OUTPUTS,
    EyeCode,
    TensorRTDeformation,
    avatar_digest,
    engine_file,
    onnx_bytes,
    window_rows,
)
from models.gaussiantalker.renderer import CHANNELS, GaussianTalkerRenderer
from tests.gaussiantalker_fixture import write_synthetic_model
from tests.unit.test_gaussiantalker_deformation import random_state

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
WIDTH, ROWS, GAUSSIAN_COUNT = 44, 16, 300
HEAD_SCALE = 0.05  # on the heads' last layers: offsets of ~0.01-0.1


def state_dict(seed: int) -> dict[str, torch.Tensor]:
    sd = random_state(Deformation(Config(audio_in=WIDTH, resolution=(16, 16, 16))), seed)
    for key in sd:
        parts = key.split(".")
        if parts[0] == "deformation_net" and parts[1].endswith("_deform") and parts[2] == "3":
            sd[key] = sd[key] * HEAD_SCALE
    return sd


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("gt")
    dirs = write_synthetic_model(
        root, gaussians=GAUSSIAN_COUNT, audio_dim=WIDTH, deformation_state_dict=state_dict(7)
    )
    pack(*dirs, root / "model.tar")
    return dirs


@pytest.fixture(scope="module")
def archive(model) -> bytes:
    return (model[0].parent / "model.tar").read_bytes()


def cpu_renderer(tmp_path: Path | None = None) -> GaussianTalkerRenderer:
    renderer = GaussianTalkerRenderer(batch_size=3)
    renderer.load(tmp_path or Path("."), "cpu")
    return renderer


@pytest.fixture(scope="module")
def network(archive):
    """(net, gaussians, features, avatar) of a CPU renderer."""
    renderer = cpu_renderer()
    avatar = renderer.avatar_from_bytes(archive)
    return (*renderer._network(avatar), avatar)


def inputs(avatar, batch: int, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random audio windows and eyes, and the cameras of the tracked frames."""
    gen = torch.Generator().manual_seed(seed)
    frames = avatar.model.frames
    cams = [np.concatenate([f.camera.R.reshape(9), f.camera.T.reshape(3)]) for f in frames]
    camera = torch.tensor(np.stack([cams[i % len(cams)] for i in range(batch)]))
    return {
        "audio": torch.randn(batch, 8, ROWS, WIDTH, generator=gen),
        "eye": torch.rand(batch, 1, generator=gen),
        "camera": camera.float(),
    }


def pytorch(network, x: dict[str, torch.Tensor]) -> Deformed:
    net, gs, features, _ = network
    with torch.no_grad():
        return net(*(gs[k] for k in GAUSSIANS), x["audio"], x["eye"], x["camera"], features)


def run_onnx(data: bytes, x: dict[str, torch.Tensor]) -> list[np.ndarray]:
    import onnxruntime

    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    return session.run(list(OUTPUTS), {k: v.numpy() for k, v in x.items()})


@pytest.fixture(scope="module")
def onnx_fp32(network) -> bytes:
    net, gs, features, _ = network
    return onnx_bytes(net, gs, features, ROWS, 2)


# --- the graph ------------------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 3])
def test_onnxruntime_deforms_like_pytorch(onnx_fp32, network, batch):
    x = inputs(network[3], batch)
    expected = pytorch(network, x)
    got = run_onnx(onnx_fp32, x)
    gs = network[1]
    for name, raw, out, ref in zip(OUTPUTS, GAUSSIANS, got, expected, strict=False):
        assert out.shape == tuple(ref.shape) and out.dtype == np.float32, name
        # The same float32 arithmetic in another order (measured: max 5e-7).
        np.testing.assert_allclose(out, ref.numpy(), rtol=0, atol=1e-5, err_msg=name)
        # Against offsets of ~1e-2 (so a graph that dropped or swapped them fails).
        assert (ref - gs[raw]).abs().mean() > 1e-3, name
    if batch > 1:  # each frame its own: the audio, eye and camera reach the graph
        assert not np.allclose(got[0][0], got[0][1], atol=1e-4)


def test_the_graph_is_plain_onnx_with_a_dynamic_batch(onnx_fp32):
    model = onnx.load_from_string(onnx_fp32)
    onnx.checker.check_model(model, full_check=True)
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}  # no custom ops
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    assert [i.name for i in model.graph.input] == ["audio", "eye", "camera"]
    assert [o.name for o in model.graph.output] == list(OUTPUTS)
    for value in [*model.graph.input, *model.graph.output]:
        first = value.type.tensor_type.shape.dim[0]
        assert first.dim_param and not first.dim_value, value.name
    ops = {n.op_type for n in model.graph.node}
    assert "If" not in ops and "Loop" not in ops and "GridSample" not in ops  # grid folded


def test_the_fp16_graph_keeps_the_geometry_in_float32(network):
    """The graph a GPU worker hands TensorRT: the per-Gaussian matrix products in fp16,
    the additions to the PLY's values and the outputs in float32, nothing in float64
    (TensorRT has none); on onnxruntime it deforms like the float32 network."""
    net, gs, features, avatar = network
    data = onnx_bytes(net, gs, features, ROWS, 1, torch.float16)
    model = onnx.load_from_string(data)
    typed = onnx.shape_inference.infer_shapes(model, strict_mode=True, check_type=True)
    values = [*typed.graph.value_info, *typed.graph.input, *typed.graph.output]
    kinds = {v.name: v.type.tensor_type.elem_type for v in values}
    kinds |= {t.name: t.data_type for t in model.graph.initializer}
    assert onnx.TensorProto.DOUBLE not in kinds.values()
    float16, float32 = onnx.TensorProto.FLOAT16, onnx.TensorProto.FLOAT
    assert all(o.type.tensor_type.elem_type == float32 for o in model.graph.output)

    def rows(name: str) -> int | None:
        dims = next((v.type.tensor_type.shape.dim for v in values if v.name == name), [])
        return dims[-2].dim_value if len(dims) >= 2 else None

    per_gaussian = [
        n
        for n in model.graph.node
        if n.op_type in ("MatMul", "Gemm") and rows(n.output[0]) == GAUSSIAN_COUNT
    ]
    assert len(per_gaussian) >= 10  # attention x2, w_concat, FFN x2, heads 1 + 5
    assert {kinds[n.output[0]] for n in per_gaussian} == {float16}
    producers = {o: n for n in model.graph.node for o in n.output}
    for output in model.graph.output:
        add = producers[output.name]
        assert add.op_type == "Add"
        assert [kinds[i] for i in add.input] == [float32, float32], output.name

    x = inputs(avatar, 3)
    expected = pytorch(network, x)
    try:
        got = run_onnx(data, x)
    except Exception as exc:  # an onnxruntime without fp16 CPU kernels
        if "NOT_IMPLEMENTED" in str(exc) or "implementation" in str(exc):
            pytest.skip(f"onnxruntime has no fp16 CPU kernel: {exc}")
        raise
    for name, raw, out, ref in zip(OUTPUTS, GAUSSIANS, got, expected, strict=False):
        offset = (ref - gs[raw]).abs().max().item()
        error = np.abs(out - ref.numpy())
        # fp16 offsets: measured max 0.2%, mean 0.05% of the largest offset.
        assert error.max() <= 0.01 * offset and error.mean() <= 0.0025 * offset, name


def test_the_eye_encoding_matches_float64_without_it():
    eye = torch.cat([torch.rand(4000, 1, generator=torch.Generator().manual_seed(0))])
    eye = torch.cat([eye, torch.tensor([[0.0], [1.0], [0.5], [2.0**-20], [1.99]])])
    exact = eye_encoding(eye.double())  # float64 products, as upstream
    got = EyeCode()(eye)
    assert got.dtype == torch.float32
    assert (got.double() - exact.double()).abs().max() < 2e-6
    # What it replaces: the product rounded to float32 (up to 2.4e-4 rad at 5.6e3 rad).
    freq = torch.pow(10000, (2 * torch.arange(16.0)) / 32)
    naive = torch.stack([(eye * freq).sin(), (eye * freq).cos()], -1).flatten(-2)
    assert (naive.double() - exact.double()).abs().max() > 1e-4


# --- the engine cache -----------------------------------------------------------------


def test_engine_names_key_weights_gaussians_batch_precision_and_audio(network, model, tmp_path):
    net, gs, features, _ = network
    weights = model[0] / "point_cloud" / "iteration_10000" / "deformation.pth"
    digest = avatar_digest(weights, gs, ROWS, WIDTH, "fp16")
    assert len(digest) == 16 and int(digest, 16) >= 0
    assert avatar_digest(weights, dict(gs), ROWS, WIDTH, "fp16") == digest  # stable

    other = tmp_path / "deformation.pth"
    torch.save(state_dict(8), other)
    moved = dict(gs, xyz=gs["xyz"].clone())
    moved["xyz"][5, 1] += 1e-4
    digests = {
        digest,
        avatar_digest(other, gs, ROWS, WIDTH, "fp16"),  # other weights
        avatar_digest(weights, moved, ROWS, WIDTH, "fp16"),  # one Gaussian moved
        avatar_digest(weights, gs, 2, WIDTH, "fp16"),  # HuBERT's 2-row windows
        avatar_digest(weights, gs, ROWS, 1024, "fp16"),  # another audio width
        avatar_digest(weights, gs, ROWS, WIDTH, "fp32"),
    }
    assert len(digests) == 6

    name = engine_file(digest, "sm90", "10.3.0", "fp16", 4, GAUSSIAN_COUNT)
    assert name == f"gaussiantalker-{digest}-sm90-trt10.3.0-fp16-b4-n300.engine"
    names = {
        name,
        engine_file(digest, "sm90", "10.3.0", "fp16", 8, GAUSSIAN_COUNT),
        engine_file(digest, "sm90", "10.3.0", "fp32", 4, GAUSSIAN_COUNT),
        engine_file(digest, "sm89", "10.3.0", "fp16", 4, GAUSSIAN_COUNT),
        engine_file(digest, "sm90", "10.4.0", "fp16", 4, GAUSSIAN_COUNT),
        engine_file(digest, "sm90", "10.3.0", "fp16", 4, 301),
    }
    assert len(names) == 6
    assert (window_rows(44), window_rows(1024)) == (16, 2)


# --- the path the renderer takes ------------------------------------------------------


def plan_of(avatar, frames: int = 3):
    from models.base import Plan

    gen = np.random.default_rng(3)
    track = np.zeros((frames, len(CHANNELS)), np.float32)
    track[:, 0] = np.arange(frames) % len(avatar.model.frames)  # every source frame
    track[:, 1] = np.linspace(0.1, 0.9, frames)  # eyes; no gaze (no face mesh needed)
    windows = gen.normal(0, 1, (frames, ROWS, WIDTH)).astype(np.float32)
    w, h = avatar.model.size
    return Plan(25, w, h, 0, track, CHANNELS, {"audio": windows})


def frames_of(renderer, avatar, plan) -> np.ndarray:
    return np.stack([renderer.frame(avatar, plan, i) for i in range(plan.frame_count)])


@pytest.fixture(scope="module")
def pytorch_frames(archive) -> np.ndarray:
    renderer = cpu_renderer()
    avatar = renderer.avatar_from_bytes(archive)
    return frames_of(renderer, avatar, plan_of(avatar))


def test_load_on_cpu_logs_the_path_and_keeps_pytorch(caplog, tmp_path):
    renderer = GaussianTalkerRenderer(engine_dir=str(tmp_path / "engines"))
    with caplog.at_level(logging.INFO, logger="models.gaussiantalker"):
        renderer.load(tmp_path, "cpu")
    lines = [r.getMessage() for r in caplog.records if "gaussiantalker renderer" in r.getMessage()]
    assert lines == ["gaussiantalker renderer: using cpu (device cpu requested)"]
    assert (renderer.backend, renderer.device.type) == ("cpu", "cpu")
    assert renderer.engine_dir == tmp_path / "engines"


def test_build_engines_refuses_in_one_line_where_tensorrt_is_not_in_use(archive):
    renderer = cpu_renderer()
    avatar = renderer.avatar_from_bytes(archive)
    with pytest.raises(PermanentError) as info:
        renderer.build_engines([avatar])
    assert str(info.value) == (
        "TensorRT is not in use for gaussiantalker on this worker: device cpu requested"
    )


def test_build_engines_reports_a_failed_build_as_a_permanent_error(archive, monkeypatch):
    renderer = cpu_renderer()
    renderer.backend = "tensorrt"

    def fail(*args, **kwargs):
        raise RuntimeError("out of memory while building")

    monkeypatch.setattr(TensorRTDeformation, "for_network", fail)
    with pytest.raises(PermanentError) as info:
        renderer.build_engines([renderer.avatar_from_bytes(archive)])
    assert str(info.value) == (
        "the gaussiantalker TensorRT engine failed: out of memory while building"
    )


def test_a_failed_engine_build_falls_back_to_pytorch(archive, pytorch_frames, monkeypatch, caplog):
    renderer = cpu_renderer()
    renderer.backend = "tensorrt"  # as load() leaves it on a GPU worker with tensorrt
    calls = []

    def fail(*args, **kwargs):
        calls.append(1)
        raise PermanentError("TensorRT cannot parse the gaussiantalker deformation: no Round")

    monkeypatch.setattr(TensorRTDeformation, "for_network", fail)
    avatar = renderer.avatar_from_bytes(archive)
    with caplog.at_level(logging.WARNING, logger="models.gaussiantalker"):
        frames = frames_of(renderer, avatar, plan_of(avatar))
    assert np.array_equal(frames, pytorch_frames)  # exactly PyTorch's
    assert len(calls) == 1  # one try per avatar and audio window
    assert [r.getMessage() for r in caplog.records] == [
        "gaussiantalker renderer: TensorRT failed (TensorRT cannot parse the gaussiantalker "
        "deformation: no Round); using PyTorch CUDA"
    ]


class OnnxDeformation:
    """Stands in for an engine on the CPU: the float32 graph on onnxruntime."""

    def __init__(self, data: bytes, path: Path) -> None:
        import onnxruntime

        self.session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
        self.path = path
        self.calls = 0

    def __call__(self, audio, eye, camera) -> Deformed:
        self.calls += 1
        feed = {"audio": audio.numpy(), "eye": eye.numpy(), "camera": camera.numpy()}
        outs = [torch.from_numpy(o) for o in self.session.run(list(OUTPUTS), feed)]
        return Deformed(*outs, attention=torch.empty(0))


def test_the_engine_path_renders_through_the_engine(archive, pytorch_frames, monkeypatch):
    renderer = cpu_renderer()
    renderer.backend = "tensorrt"
    built: list[OnnxDeformation] = []

    def build(net, gaussians, features, *, deformation_path, rows, batch, cache):
        assert (rows, batch, cache) == (ROWS, 3, renderer.engine_dir)
        assert deformation_path.name == "deformation.pth"
        built.append(OnnxDeformation(onnx_bytes(net, gaussians, features, rows), cache / "x"))
        return built[-1]

    monkeypatch.setattr(TensorRTDeformation, "for_network", build)
    avatar = renderer.avatar_from_bytes(archive)
    assert renderer.build_engines([avatar]) == [renderer.engine_dir / "x"]
    frames = frames_of(renderer, avatar, plan_of(avatar))
    assert len(built) == 1 and built[0].calls == len(frames)  # built once, used per frame
    diff = np.abs(frames.astype(np.int16) - pytorch_frames.astype(np.int16))
    # Offsets within 1e-6 of PyTorch's: a level where a value sits on a rounding edge.
    assert diff.max() <= 1 and diff.mean() < 0.01
    assert np.abs(pytorch_frames[0].astype(np.int16) - pytorch_frames[1]).max() > 10


# --- on a GPU -------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.skipif(not HAS_TENSORRT, reason="needs tensorrt: pip install 'farm[tensorrt]'")
def test_tensorrt_engine_deforms_like_pytorch_cuda(archive, tmp_path, monkeypatch):
    monkeypatch.delenv("FARM_TENSORRT", raising=False)
    renderer = GaussianTalkerRenderer(batch_size=3, engine_dir=str(tmp_path / "engines"))
    renderer.load(tmp_path, "cuda")
    assert renderer.backend == "tensorrt", renderer.backend_reason
    avatar = renderer.avatar_from_bytes(archive)
    (path,) = renderer.build_engines([avatar])
    assert path.parent == tmp_path / "engines" and path.name.endswith("-fp16-b3-n300.engine")
    engine = avatar.cache[renderer._engine_key(ROWS, WIDTH)]
    assert isinstance(engine, TensorRTDeformation)  # not the fallback

    net, gs, features = renderer._network(avatar)
    for batch in (1, 3):
        x = {k: v.cuda() for k, v in inputs(avatar, batch).items()}
        with torch.no_grad():
            expected = net(*(gs[k] for k in GAUSSIANS), *x.values(), features)
        got = engine(**x)
        for name, raw in zip(OUTPUTS, GAUSSIANS, strict=True):
            out, ref = getattr(got, name), getattr(expected, name)
            assert out.dtype == torch.float32 and out.shape == ref.shape, name
            offset = (ref - gs[raw]).abs().max().item()
            error = (out - ref).abs()
            # fp16 heads: as onnxruntime's fp16 graph on the CPU (max 0.2%, mean 0.05%).
            assert error.max() <= 0.01 * offset and error.mean() <= 0.0025 * offset, name

    # The frames through the engine, against PyTorch CUDA's (gsplat or the reference).
    plan = plan_of(avatar)
    frames = frames_of(renderer, avatar, plan)
    monkeypatch.setenv("FARM_TENSORRT", "0")
    reference = GaussianTalkerRenderer(batch_size=3)
    reference.load(tmp_path, "cuda")
    assert reference.backend == "cuda"
    monkeypatch.delenv("FARM_TENSORRT")
    expected_frames = frames_of(reference, reference.avatar_from_bytes(archive), plan)
    diff = np.abs(frames.astype(np.int16) - expected_frames.astype(np.int16))
    # fp16 offsets on onnxruntime render within 1 level of float32 (mean 0.006).
    assert diff.mean() < 0.25 and np.percentile(diff, 99.9) <= 6
    # A second process finds the engine on disk instead of building it again.
    stamp = path.stat().st_mtime_ns
    again = GaussianTalkerRenderer(batch_size=3, engine_dir=str(tmp_path / "engines"))
    again.load(tmp_path, "cuda")
    assert again.build_engines([again.avatar_from_bytes(archive)]) == [path]
    assert path.stat().st_mtime_ns == stamp
