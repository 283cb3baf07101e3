"""Ditto's appearance extractor, motion extractor and stitching network, and the keypoint
arithmetic around them: shapes, width inference, strict loading, and parity with
upstream's modules through outputs recorded in tests/fixtures/ditto/ (see its README).

The fixtures hold upstream's outputs only; the weights are rebuilt here from a seed
(`random_state_dict`) and the inputs from a seed or the fixture, and farm's modules
must reproduce upstream's numbers.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from farm.errors import PermanentError
from models.ditto import keypoints
from models.ditto.appearance import AppearanceConfig, AppearanceExtractor
from models.ditto.motion_extractor import OUTPUTS, MotionConfig, MotionExtractor
from models.ditto.stitch import StitchConfig, StitchingNetwork

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "ditto"

# Reduced widths for fast tests (and for the small recorded cases).
APPEARANCE_SMALL = AppearanceConfig(
    block_expansion=8, max_features=32, reshape_channels=4, reshape_depth=8, num_resblocks=2
)
MOTION_SMALL = MotionConfig(dims=(8, 16, 24, 32), depths=(1, 1, 2, 1))
STITCH_SMALL = StitchConfig(input_size=12, hidden_sizes=(16, 8), output_size=8)

# Seeds of the recorded cases: (weights, input).
APPEARANCE_SMALL_SEED = 11
APPEARANCE_FULL_SEEDS = (12, 13)
MOTION_SMALL_SEED = 21
MOTION_FULL_SEEDS = (22, 23)
STITCH_SEED = 31
# A recorded value matches when |farm - upstream| <= RTOL * max|upstream| (fp32).
RTOL = 1e-4


def random_state_dict(module: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Deterministic random weights in `module`'s state-dict layout, drawn in key order
    from a CPU generator seeded with `seed`, scaled so activations stay of order one.

    Every parameter and BatchNorm statistic is non-trivial (norm scales near 1, GRN
    gains non-zero, running variances in [0.5, 1.5]), so a mistake in any of them
    shows in the outputs.
    """
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for key, ref in module.state_dict().items():
        shape = ref.shape
        if key.endswith("num_batches_tracked"):
            out[key] = torch.zeros_like(ref)
            continue
        noise = torch.randn(shape, generator=gen)
        if key.endswith("running_var"):
            value = 0.5 + torch.rand(shape, generator=gen)
        elif key.endswith("running_mean"):
            value = 0.1 * noise
        elif key.endswith(("grn.gamma", "grn.beta")):
            value = 0.5 * noise
        elif len(shape) >= 2:
            value = noise / math.sqrt(math.prod(shape[1:]))
        elif key.endswith("weight"):  # norm scales
            value = 1.0 + 0.1 * noise
        else:  # biases
            value = 0.1 * noise
        out[key] = value.to(ref.dtype)
    return out


def random_input(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """An image-like tensor in [0, 1), deterministic from `seed`."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def seeded(cls, config, seed: int):
    """`cls` built to `config` and loaded (through from_state_dict) with seeded weights."""
    return cls.from_state_dict(random_state_dict(cls(config), seed))


def fixture(name: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / f"{name}.npz") as data:
        return dict(data)


def assert_close(found: torch.Tensor, recorded: np.ndarray, what: str) -> None:
    found_np = found.detach().double().numpy()
    assert found_np.shape == recorded.shape, what
    scale = max(float(np.abs(recorded).max()), 1e-6)
    err = float(np.abs(found_np - recorded).max())
    assert err <= RTOL * scale, f"{what}: max abs diff {err:.3g} (output scale {scale:.3g})"


# --- shapes and width inference ---------------------------------------------------


def test_appearance_small_shapes_and_inference():
    net = seeded(AppearanceExtractor, APPEARANCE_SMALL, 0)
    assert net.config == APPEARANCE_SMALL
    assert not net.training
    with torch.no_grad():
        out = net(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 4, 8, 8, 8)


def test_appearance_full_size_parameters_and_inference():
    net = AppearanceExtractor()
    params = sum(p.numel() for p in net.parameters())
    assert 0.8e6 < params < 0.9e6
    assert AppearanceExtractor.config_from_state_dict(net.state_dict()) == AppearanceConfig()
    assert "resblocks_3d.3dr5.norm2.running_var" in net.state_dict()


def test_motion_small_shapes_and_inference():
    net = seeded(MotionExtractor, MOTION_SMALL, 0)
    assert net.config == MOTION_SMALL
    with torch.no_grad():
        out = net(torch.rand(2, 3, 64, 64))
    assert set(out) == set(OUTPUTS)
    shapes = {k: tuple(v.shape) for k, v in out.items()}
    assert shapes == {
        "kp": (2, 63),
        "exp": (2, 63),
        "pitch": (2, 66),
        "yaw": (2, 66),
        "roll": (2, 66),
        "t": (2, 3),
        "scale": (2, 1),
    }


def test_motion_full_size_parameters_and_inference():
    net = MotionExtractor()
    params = sum(p.numel() for p in net.parameters())
    assert 27e6 < params < 29e6
    assert MotionExtractor.config_from_state_dict(net.state_dict()) == MotionConfig()
    assert all(k.startswith("detector.") for k in net.state_dict())


def test_stitch_full_size_and_checkpoint_layout():
    net = StitchingNetwork()
    params = sum(p.numel() for p in net.parameters())
    assert 0.04e6 < params < 0.06e6
    sd = random_state_dict(net, 0)
    # stitch_network.pth: the state dict under "retarget_shoulder", keys "module.*",
    # beside the other retargeting modules Ditto does not read.
    checkpoint = {
        "retarget_shoulder": {f"module.{k}": v for k, v in sd.items()},
        "retarget_mouth": {"module.mlp.0.weight": torch.zeros(1)},
    }
    for source in (checkpoint, sd):
        loaded = StitchingNetwork.from_state_dict(source)
        assert loaded.config == StitchConfig()
        assert torch.equal(loaded.mlp[0].weight, sd["mlp.0.weight"])


def test_stitch_small_widths():
    net = seeded(StitchingNetwork, STITCH_SMALL, 0)
    assert net.config == STITCH_SMALL
    x_s, x_d = torch.randn(3, 2, 3), torch.randn(3, 2, 3)
    assert net(keypoints.stitching_input(x_s, x_d)).shape == (3, 8)
    assert net.stitch(x_s, x_d).shape == (3, 2, 3)


# --- strict loading ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "config", "key", "expected"),
    [
        (AppearanceExtractor, APPEARANCE_SMALL, "down_blocks.1.norm.bias", "[32]"),
        (MotionExtractor, MOTION_SMALL, "detector.stages.2.1.grn.gamma", "[1, 1, 1, 96]"),
        (StitchingNetwork, STITCH_SMALL, "mlp.2.bias", "[8]"),
    ],
)
def test_missing_key_is_one_line_naming_it(cls, config, key, expected):
    sd = random_state_dict(cls(config), 0)
    del sd[key]
    with pytest.raises(PermanentError) as err:
        cls.from_state_dict(sd)
    message = str(err.value)
    assert "\n" not in message
    assert f"missing key {key} (expected shape {expected})" in message


@pytest.mark.parametrize(
    ("cls", "config", "key"),
    [
        (AppearanceExtractor, APPEARANCE_SMALL, "resblocks_3d.3dr1.conv2.weight"),
        (MotionExtractor, MOTION_SMALL, "detector.fc_exp.bias"),
        (StitchingNetwork, STITCH_SMALL, "mlp.4.weight"),
    ],
)
def test_wrong_shape_is_one_line_with_both_shapes(cls, config, key):
    sd = random_state_dict(cls(config), 0)
    expected = list(sd[key].shape)
    sd[key] = torch.zeros(*expected[:-1], expected[-1] + 1)
    found = [*expected[:-1], expected[-1] + 1]
    with pytest.raises(PermanentError) as err:
        cls.from_state_dict(sd)
    message = str(err.value)
    assert "\n" not in message
    assert f"wrong shape for {key}: expected {expected}, found {found}" in message


def test_unexpected_key_and_missing_inference_key():
    sd = random_state_dict(MotionExtractor(MOTION_SMALL), 0)
    sd["detector.head.weight"] = torch.zeros(2, 2)
    with pytest.raises(PermanentError, match=r"unexpected key detector\.head\.weight"):
        MotionExtractor.from_state_dict(sd)
    with pytest.raises(PermanentError, match=r"missing key first\.conv\.weight"):
        AppearanceExtractor.from_state_dict({})
    with pytest.raises(PermanentError, match=r"missing key mlp\.0\.weight"):
        StitchingNetwork.from_state_dict({"retarget_shoulder": {}})


def test_num_batches_tracked_may_be_absent():
    # torch itself fills these in for older checkpoints; they do not affect inference.
    sd = random_state_dict(AppearanceExtractor(APPEARANCE_SMALL), 0)
    sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    AppearanceExtractor.from_state_dict(sd)


# --- parity with upstream's recorded outputs --------------------------------------


def test_appearance_matches_upstream_small():
    rec = fixture("appearance")
    net = seeded(AppearanceExtractor, APPEARANCE_SMALL, APPEARANCE_SMALL_SEED)
    with torch.no_grad():
        out = net(torch.from_numpy(rec["small_input"]))
    assert_close(out, rec["small_output"], "appearance f_s (small)")


def test_appearance_matches_upstream_full_size():
    rec = fixture("appearance")
    weights, inputs = APPEARANCE_FULL_SEEDS
    net = seeded(AppearanceExtractor, AppearanceConfig(), weights)
    with torch.no_grad():
        out = net(random_input((1, 3, 256, 256), inputs))
    assert out.shape == (1, 32, 16, 64, 64)
    assert_close(out[0, :, :, 20, 40], rec["full_column"], "f_s[0, :, :, 20, 40]")
    assert_close(out[0, 5, 7], rec["full_plane"], "f_s[0, 5, 7]")
    assert_close(out.mean(dim=(2, 3, 4)), rec["full_channel_means"], "f_s channel means")
    assert_close(out.std().reshape(1), rec["full_std"], "f_s std")


@pytest.mark.parametrize("case", ["small", "full"])
def test_motion_matches_upstream(case):
    rec = fixture("motion")
    if case == "small":
        net = seeded(MotionExtractor, MOTION_SMALL, MOTION_SMALL_SEED)
        image = torch.from_numpy(rec["small_input"])
    else:
        weights, inputs = MOTION_FULL_SEEDS
        net = seeded(MotionExtractor, MotionConfig(), weights)
        image = random_input((1, 3, 256, 256), inputs)
    with torch.no_grad():
        out = net(image)
    for name in OUTPUTS:
        assert_close(out[name], rec[f"{case}_{name}"], f"motion {name} ({case})")


def test_stitch_matches_upstream():
    rec = fixture("stitch")
    net = seeded(StitchingNetwork, StitchConfig(), STITCH_SEED)
    x_s, x_d = torch.from_numpy(rec["x_s"]), torch.from_numpy(rec["x_d"])
    with torch.no_grad():
        delta = net(keypoints.stitching_input(x_s, x_d))
        stitched = net.stitch(x_s, x_d)
    assert_close(delta, rec["delta"], "stitch MLP output")
    assert_close(stitched, rec["stitched"], "stitched x_d")
    assert torch.equal(x_d, torch.from_numpy(rec["x_d"]))  # the input is left alone


def test_keypoint_math_matches_upstream():
    rec = fixture("keypoints")
    motion = {k: torch.from_numpy(rec[f"in_{k}"]) for k in OUTPUTS}
    angles = [keypoints.headpose_to_degrees(motion[k]) for k in ("pitch", "yaw", "roll")]
    for name, value in zip(("pitch", "yaw", "roll"), angles, strict=True):
        assert_close(value, rec[f"degrees_{name}"], f"{name} degrees")
    assert_close(keypoints.rotation_matrix(*angles), rec["rotation"], "rotation matrix")
    assert_close(keypoints.keypoints_from_motion(motion), rec["x"], "transformed keypoints")
    # Angles already in degrees ([B] or [B, 1]) pass through, as upstream's do.
    in_degrees = dict(motion, pitch=angles[0][:, None], yaw=angles[1], roll=angles[2])
    assert_close(keypoints.keypoints_from_motion(in_degrees), rec["x"], "from degrees")


# --- keypoint math properties -----------------------------------------------------


def test_one_hot_bin_gives_its_angle():
    logits = torch.full((3, 66), -1e4)
    logits[0, 0] = logits[1, 33] = logits[2, 65] = 0.0
    degrees = keypoints.headpose_to_degrees(logits)
    assert torch.allclose(degrees, torch.tensor([-97.5, 1.5, 97.5]))
    uniform = keypoints.headpose_to_degrees(torch.zeros(1, 66))
    assert torch.allclose(uniform, torch.tensor([0.0]), atol=1e-4)
    with pytest.raises(ValueError):
        keypoints.headpose_to_degrees(torch.zeros(1, 65))


def test_rotation_matrix_is_a_rotation_with_upstreams_axes():
    gen = torch.Generator().manual_seed(0)
    pitch, yaw, roll = (torch.rand(8, generator=gen) * 180 - 90 for _ in range(3))
    rot = keypoints.rotation_matrix(pitch, yaw, roll)
    eye = torch.eye(3).expand(8, 3, 3)
    assert torch.allclose(rot @ rot.transpose(1, 2), eye, atol=1e-6)
    assert torch.allclose(torch.linalg.det(rot), torch.ones(8), atol=1e-6)
    zero = torch.zeros(1)
    assert torch.allclose(keypoints.rotation_matrix(zero, zero, zero)[0], torch.eye(3))
    # Pure yaw of 90 degrees: p @ R is Ry(90) applied to the column vector p (R is its
    # transpose), which sends x to -z.
    yaw90 = keypoints.rotation_matrix(zero, torch.tensor([90.0]), zero)
    point = torch.tensor([[[1.0, 0.0, 0.0]]])
    assert torch.allclose(point @ yaw90, torch.tensor([[[0.0, 0.0, -1.0]]]), atol=1e-6)


def test_transform_keypoints_identity_scale_and_translation():
    kp = torch.randn(2, 63)
    zero_exp, eye = torch.zeros(2, 63), torch.eye(3).expand(2, 3, 3)
    one, no_t = torch.ones(2, 1), torch.zeros(2, 3)
    x = keypoints.transform_keypoints(kp, one, eye, no_t, zero_exp)
    assert torch.allclose(x, kp.view(2, 21, 3))
    exp, scale, t = torch.randn(2, 63), torch.tensor([[2.0], [0.5]]), torch.randn(2, 3)
    x = keypoints.transform_keypoints(kp, scale, eye, t, exp)
    expected = scale[:, :, None] * (kp + exp).view(2, 21, 3)
    expected[..., :2] += t[:, None, :2]  # t_z is not applied
    assert torch.allclose(x, expected, atol=1e-6)


def test_apply_stitching_adds_offsets_and_xy_shift():
    x_d = torch.zeros(1, 2, 3)
    delta = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 10.0, 20.0]])
    out = keypoints.apply_stitching(x_d, delta)
    assert out.tolist() == [[[11.0, 22.0, 3.0], [14.0, 25.0, 6.0]]]
    features = keypoints.stitching_input(torch.ones(1, 2, 3), x_d)
    assert features.tolist() == [[1.0] * 6 + [0.0] * 6]
