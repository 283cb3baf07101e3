"""Ditto's render networks in farm (models/ditto/{grid,warp,decoder}.py): the gather-based
5-D sampler against F.grid_sample and through ONNX/onnxruntime, the networks' shapes,
config inference and strict loading, and parity with upstream's modules.

Parity: the fixtures in tests/fixtures/ditto/render_nets_*.npz hold outputs of
upstream's own WarpingNetwork / SPADEDecoder (ditto-talkinghead, recorded once at dev
time, not in the repo) run on weights and inputs that `random_state`, `warp_inputs` and
`decoder_input` regenerate here from the seed stored in each fixture: they hold outputs
only (a strided slice and per-channel statistics). render_nets_manifest.npz holds the
keys and shapes of upstream's full-size state dicts.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from farm.errors import PermanentError
from models.ditto.decoder import SPADEDecoder
from models.ditto.grid import grid_sample_3d
from models.ditto.warp import WarpingNetwork

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "ditto"

# Reduced widths for fast tests; spatial shapes stay upstream's (16x64x64 in, 512x512 out).
WARP_SMALL = WarpingNetwork.Config(
    num_kp=5,
    feature_channels=4,
    depth=16,
    out_channels=32,
    compress=2,
    hourglass_expansion=4,
    hourglass_max=64,
    hourglass_blocks=5,
)
# Upstream's keypoint count and compress width, other widths at 1/8.
WARP_KP21 = WarpingNetwork.Config(
    feature_channels=4, out_channels=32, hourglass_expansion=4, hourglass_max=128
)
DECODER_SMALL = SPADEDecoder.Config(in_channels=32, out_channels=8, hidden=16)


def random_state(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random weights in `module`'s state-dict layout, scaled so activations stay
    in range: conv weights ~ N(0, 1/fan_in), BatchNorm near identity, and spectral-norm
    u, v the leading singular vectors of their weight (from power iteration)."""
    gen = torch.Generator().manual_seed(seed)

    def normal(shape: torch.Size, scale: float) -> torch.Tensor:
        return torch.randn(shape, generator=gen) * scale

    state: dict[str, torch.Tensor] = {}
    for key, like in module.state_dict().items():
        name = key.rsplit(".", 1)[-1]
        if name in ("weight", "weight_orig") and like.dim() > 1:
            value = normal(like.shape, like[0].numel() ** -0.5)
        elif name == "weight":  # BatchNorm scale
            value = 1 + normal(like.shape, 0.1)
        elif name in ("bias", "running_mean"):
            value = normal(like.shape, 0.1)
        elif name == "running_var":
            value = 0.5 + torch.rand(like.shape, generator=gen)
        elif name == "num_batches_tracked":
            value = torch.tensor(1000, dtype=torch.long)
        elif name in ("weight_u", "weight_v"):
            continue  # after weight_orig, below
        else:
            raise AssertionError(f"no rule for {key}")
        state[key] = value.to(like.dtype)
    for key in [k for k in state if k.endswith(".weight_orig")]:
        prefix = key[: -len("weight_orig")]
        matrix = state[key].reshape(state[key].shape[0], -1)
        u = F.normalize(torch.randn(matrix.shape[0], generator=gen), dim=0)
        for _ in range(30):
            v = F.normalize(matrix.t() @ u, dim=0)
            u = F.normalize(matrix @ v, dim=0)
        state[prefix + "weight_u"], state[prefix + "weight_v"] = u, v
    return {k: state[k] for k in module.state_dict()}


def warp_inputs(config: WarpingNetwork.Config, seed: int) -> tuple[torch.Tensor, ...]:
    """f_s [1, C, D, 64, 64] and source/driving keypoints [1, K, 3] near each other."""
    gen = torch.Generator().manual_seed(seed)
    f_s = torch.randn(1, config.feature_channels, config.depth, 64, 64, generator=gen)
    kp_source = (torch.rand(1, config.num_kp, 3, generator=gen) * 2 - 1) * 0.7
    kp_driving = kp_source + torch.randn(1, config.num_kp, 3, generator=gen) * 0.05
    return f_s, kp_source, kp_driving


def decoder_input(config: SPADEDecoder.Config, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, config.in_channels, 64, 64, generator=gen)


def summary(out: torch.Tensor, step: int) -> dict[str, np.ndarray]:
    """What a fixture records of an output: a strided slice and per-channel statistics."""
    return {
        "slice": out[0, :, ::step, ::step].numpy(),
        "mean": out[0].mean(dim=(1, 2)).numpy(),
        "std": out[0].std(dim=(1, 2)).numpy(),
    }


# ---------------------------------------------------------------- the 5-D sampler


@pytest.mark.parametrize(
    "shape", [(2, 3, 5, 7, 9, (2, 4, 6, 5)), (1, 4, 16, 64, 64, (1, 8, 64, 64))]
)
def test_grid_sample_3d_matches_torch_inside_and_outside(shape):
    n, c, d, h, w, out = shape
    gen = torch.Generator().manual_seed(1)
    volume = torch.randn(n, c, d, h, w, generator=gen)
    # Points up to 40% beyond the volume on every side, plus exact edges and centres.
    grid = torch.rand(*out, 3, generator=gen) * 2.8 - 1.4
    grid[:, 0, 0, 0] = torch.tensor([-1.0, 1.0, 0.0])
    grid[:, 0, 0, 1] = torch.tensor([1.0, -1.0, 1.0])
    grid[:, 0, 0, 2] = torch.tensor([1 / (w - 1) - 1, -1 / (h - 1), 0.5])
    expected = F.grid_sample(volume, grid, align_corners=False)
    got = grid_sample_3d(volume, grid)
    assert got.shape == (n, c, *out[1:])
    assert (grid.abs() > 1).any(dim=-1).float().mean() > 0.3
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_grid_sample_3d_far_outside_is_zero():
    volume = torch.randn(1, 2, 4, 4, 4)
    grid = torch.tensor([[5.0, 0, 0], [0, -1e6, 0], [0, 0, 1.25], [1.25, 1.25, 1.25]])
    got = grid_sample_3d(volume, grid.view(1, 1, 1, 4, 3))
    assert torch.equal(got, torch.zeros(1, 2, 1, 1, 4))


class _Sampler(torch.nn.Module):
    def forward(self, volume: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        return grid_sample_3d(volume, grid)


def test_grid_sample_3d_exports_to_plain_onnx_and_runs_in_onnxruntime():
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    gen = torch.Generator().manual_seed(2)
    volume = torch.randn(2, 3, 4, 6, 8, generator=gen)
    grid = torch.rand(2, 3, 5, 7, 3, generator=gen) * 2.6 - 1.3
    buffer = io.BytesIO()
    torch.onnx.export(
        _Sampler(),
        (volume, grid),
        buffer,
        dynamo=False,
        opset_version=17,
        input_names=["volume", "grid"],
        output_names=["out"],
        dynamic_axes={"volume": {0: "n", 2: "d", 3: "h", 4: "w"}, "grid": {0: "n", 1: "do"}},
    )
    model = onnx.load_from_string(buffer.getvalue())
    ops = {node.op_type for node in model.graph.node}
    assert "GridSample" not in ops and "Gather" in ops
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    # Other sizes than traced: the graph reads them from the inputs.
    volume = torch.randn(1, 3, 5, 9, 4, generator=gen)
    grid = torch.rand(1, 6, 5, 7, 3, generator=gen) * 2.6 - 1.3
    (got,) = session.run(None, {"volume": volume.numpy(), "grid": grid.numpy()})
    expected = F.grid_sample(volume, grid, align_corners=False).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def _onnx_run(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> np.ndarray:
    """Export `module` (TorchScript exporter, opset 17), check the graph holds no
    GridSample, run it in onnxruntime on the same inputs."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    names = [f"in{i}" for i in range(len(inputs))]
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and instance-norm training-mode notes
        torch.onnx.export(module, inputs, buffer, dynamo=False, opset_version=17, input_names=names)
    ops = {node.op_type for node in onnx.load_from_string(buffer.getvalue()).graph.node}
    assert "GridSample" not in ops
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    feed = {name: x.numpy() for name, x in zip(names, inputs, strict=True)}
    return session.run(None, feed)[0]


def test_networks_export_to_onnx_and_run_in_onnxruntime():
    """The whole warping network (both 5-D samplings as gathers) and the decoder, at
    reduced widths: plain ONNX that onnxruntime runs, matching PyTorch."""
    warp = WarpingNetwork.from_state_dict(random_state(WarpingNetwork(WARP_SMALL), 7))
    decoder = SPADEDecoder.from_state_dict(random_state(SPADEDecoder(DECODER_SMALL), 7))
    inputs = warp_inputs(WARP_SMALL, 7)
    with torch.no_grad():
        feature = warp(*inputs)
        image = decoder(feature)
    np.testing.assert_allclose(_onnx_run(warp, inputs), feature.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(_onnx_run(decoder, (feature,)), image.numpy(), atol=1e-4, rtol=0)


# ---------------------------------------------------------------- shapes and loading


def test_full_size_configs_are_upstreams():
    """Parameter counts of upstream's defaults (Ditto: 45.5 M warp, 55.4 M decoder) and
    every key and shape of upstream's full-size state dicts (recorded from upstream)."""
    manifest = np.load(FIXTURES / "render_nets_manifest.npz")
    for name, net in (("warp", WarpingNetwork()), ("decoder", SPADEDecoder())):
        keys = [str(k) for k in manifest[f"{name}_keys"]]
        shapes = manifest[f"{name}_shapes"]
        own = net.state_dict()
        assert list(own) == keys
        dims = [list(s[s >= 0]) for s in shapes]
        assert [list(t.shape) for t in own.values()] == dims
    assert sum(p.numel() for p in WarpingNetwork().parameters()) == 45_529_829
    assert sum(p.numel() for p in SPADEDecoder().parameters()) == 55_365_388


def test_reduced_width_shapes():
    warp = WarpingNetwork(WARP_SMALL).eval()
    decoder = SPADEDecoder(DECODER_SMALL).eval()
    with torch.no_grad():
        feature = warp(*warp_inputs(WARP_SMALL, 0))
        image = decoder(feature)
    assert feature.shape == (1, 32, 64, 64)
    assert image.shape == (1, 3, 512, 512)
    assert 0 <= image.min() and image.max() <= 1


@pytest.mark.parametrize(
    "cls, config",
    [(WarpingNetwork, WARP_SMALL), (WarpingNetwork, WARP_KP21), (SPADEDecoder, DECODER_SMALL)],
)
def test_from_state_dict_infers_the_config(cls, config):
    state = random_state(cls(config), 3)
    net = cls.from_state_dict(state)
    assert net.config == config
    assert not net.training
    for key, value in net.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_from_state_dict_infers_full_size():
    manifest = np.load(FIXTURES / "render_nets_manifest.npz")
    for name, cls in (("warp", WarpingNetwork), ("decoder", SPADEDecoder)):
        keys = [str(k) for k in manifest[f"{name}_keys"]]
        shapes = [tuple(s[s >= 0]) for s in manifest[f"{name}_shapes"]]
        meta = {k: torch.empty(s, device="meta") for k, s in zip(keys, shapes, strict=True)}
        assert cls.config_of(meta) == cls.Config()


@pytest.mark.parametrize(
    "cls, config", [(WarpingNetwork, WARP_SMALL), (SPADEDecoder, DECODER_SMALL)]
)
def test_strict_load_errors_name_the_first_bad_key(cls, config):
    state = random_state(cls(config), 4)
    keys = list(state)
    # Any key but a BatchNorm counter (torch, and farm, allow those to be absent).
    victim = next(k for k in keys[len(keys) // 2 :] if not k.endswith("num_batches_tracked"))

    missing = {k: v for k, v in state.items() if k != victim}
    with pytest.raises(PermanentError, match=f"missing key {victim} \\(expected shape"):
        cls.from_state_dict(missing)

    extra = {**state, "module.extra.weight": torch.zeros(2, 3)}
    with pytest.raises(
        PermanentError, match=r"unexpected key module.extra.weight \(found shape \[2, 3\]\)"
    ):
        cls.from_state_dict(extra)

    wrong = dict(state)
    bias = next(k for k in keys if k.endswith(".bias"))
    wrong[bias] = torch.zeros(wrong[bias].shape[0] + 1)
    n = state[bias].shape[0]
    message = f"wrong shape for {bias}: expected \\[{n}\\], found \\[{n + 1}\\]"
    with pytest.raises(PermanentError, match=message) as info:
        cls.from_state_dict(wrong)
    assert "\n" not in str(info.value)

    # A key that the widths are read from: still one clear error.
    first = keys[0] if cls is SPADEDecoder else "dense_motion_network.mask.weight"
    with pytest.raises(PermanentError, match=f"missing key {first}"):
        cls.from_state_dict({k: v for k, v in state.items() if k != first})


def test_spectral_norm_matches_torch_in_eval():
    """SpectralConv2d computes what torch.nn.utils.spectral_norm computes in eval mode
    from the same weight_orig / weight_u / weight_v, and loads torch's state dict."""
    from models.ditto.decoder import SpectralConv2d

    torch.manual_seed(5)
    reference = torch.nn.utils.spectral_norm(torch.nn.Conv2d(6, 4, 3, padding=1))
    reference.train()
    reference(torch.randn(1, 6, 8, 8))  # one power-iteration step moves u and v
    reference.eval()
    ours = SpectralConv2d(6, 4, 3)
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(2, 6, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- parity


def _relative(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(got - expected).max() / max(np.abs(expected).max(), 1e-12))


def _check_fixture(path: Path, out: torch.Tensor) -> None:
    fixture = np.load(path)
    got = summary(out, int(fixture["step"]))
    for name, value in got.items():
        assert value.shape == fixture[name].shape, name
        assert _relative(value, fixture[name]) <= 1e-4, (name, _relative(value, fixture[name]))


WARP_CASES = {"warp_small": WARP_SMALL, "warp_kp21": WARP_KP21}


@pytest.mark.parametrize("name", list(WARP_CASES))
def test_warp_matches_upstream(name):
    path = FIXTURES / f"render_nets_{name}.npz"
    seed = int(np.load(path)["seed"])
    config = WARP_CASES[name]
    net = WarpingNetwork.from_state_dict(random_state(WarpingNetwork(config), seed))
    with torch.no_grad():
        out = net(*warp_inputs(config, seed))
    _check_fixture(path, out)


def test_decoder_matches_upstream():
    path = FIXTURES / "render_nets_decoder_small.npz"
    seed = int(np.load(path)["seed"])
    net = SPADEDecoder.from_state_dict(random_state(SPADEDecoder(DECODER_SMALL), seed))
    with torch.no_grad():
        out = net(decoder_input(DECODER_SMALL, seed))
    _check_fixture(path, out)


def test_warp_with_gathers_equals_grid_sample():
    config = WARP_SMALL
    net = WarpingNetwork.from_state_dict(random_state(WarpingNetwork(config), 6))
    inputs = warp_inputs(config, 6)
    with torch.no_grad():
        with_gathers = net(*inputs)
        net.use_gathers = False
        with_grid_sample = net(*inputs)
    torch.testing.assert_close(with_gathers, with_grid_sample, atol=1e-5, rtol=1e-5)


def test_full_size_forward_matches_upstream():
    """One batch-1 forward of each network at upstream's widths (the slowest test)."""
    path = FIXTURES / "render_nets_full.npz"
    seed = int(np.load(path)["seed"])
    warp = WarpingNetwork.from_state_dict(random_state(WarpingNetwork(), seed))
    decoder = SPADEDecoder.from_state_dict(random_state(SPADEDecoder(), seed))
    with torch.no_grad():
        feature = warp(*warp_inputs(warp.config, seed))
        image = decoder(feature)
    fixture = np.load(path)
    for prefix, out in (("warp_", feature), ("decoder_", image)):
        for name, value in summary(out, int(fixture["step"])).items():
            expected = fixture[prefix + name]
            assert _relative(value, expected) <= 1e-4, (prefix + name, _relative(value, expected))
