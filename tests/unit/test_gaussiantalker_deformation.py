"""GaussianTalker's deformation network in farm (models/gaussiantalker/deformation.py):
config inference from ``deformation.pth`` shapes, strict loading, parity with upstream's
recorded outputs, purity and the independence of Gaussians and of frames.

Parity: tests/fixtures/gaussiantalker/deformation_*.npz hold outputs of upstream's own
``deform_network`` (KU-CVLAB/GaussianTalker, fine stage, eval mode; run once at dev time
on CPU, not in the repo) for weights and inputs that `random_state` and `random_inputs`
regenerate here from the seed stored in each fixture: a strided slice of every output
and per-output statistics. deformation_manifest.npz holds the keys and shapes of
upstream's state dict for the real config at audio widths 29, 44 and 1024.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from farm.errors import PermanentError
from models.gaussiantalker.deformation import Config, Deformation, audio_window

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "gaussiantalker"
OUTPUTS = ("xyz", "scales", "rotations", "opacity", "shs", "attention")

# Reduced sizes for fast tests: 2 levels of 6x7x8 planes, 4 channels each.
SMALL = Config(
    audio_in=29,
    grid_channels=4,
    resolution=(6, 7, 8),
    multires=(1, 2),
    d_model=8,
    n_head=2,
    ffn_hidden=16,
    net_width=16,
    defor_depth=2,
)


def random_state(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random weights in `module`'s state-dict layout, each tensor drawn from its
    own generator (seed + crc32 of its key) so the order of keys does not matter: weights
    ~ N(0, 1/fan_in), biases and LayerNorm offsets small, grids U(-1, 1), the box about
    +-1 per axis, upstream's positional-encoding buffers (2^i) as they are."""
    state: dict[str, torch.Tensor] = {}
    for key, like in module.state_dict().items():
        gen = torch.Generator().manual_seed(seed + zlib.crc32(key.encode()))
        name = key.rsplit(".", 1)[-1]
        if key.endswith("_poc"):
            value = 2.0 ** torch.arange(like.shape[0], dtype=torch.float32)
        elif name == "aabb":
            m = 1.0 + 0.2 * torch.rand(3, generator=gen)
            value = torch.stack([m, -m])
        elif ".grids." in key:
            value = torch.rand(like.shape, generator=gen) * 2 - 1
        elif name == "gamma":
            value = 1 + 0.1 * torch.randn(like.shape, generator=gen)
        elif name in ("beta", "bias"):
            value = 0.1 * torch.randn(like.shape, generator=gen)
        elif name == "null_vector":
            value = torch.randn(like.shape, generator=gen)
        else:
            fan_in = int(np.prod(like.shape[1:]))
            value = torch.randn(like.shape, generator=gen) / fan_in**0.5
        state[key] = value.to(torch.float32)
    return state


def random_inputs(config: Config, seed: int, n: int, b: int) -> dict[str, torch.Tensor]:
    """Seeded inputs for `Deformation.forward`: n Gaussians, some outside the box (the
    grid clamps them to its border), b frames; frame 0's first audio window is zeros (as
    at the start of a clip). eye is float64, as upstream's."""
    gen = torch.Generator().manual_seed(seed)
    audio = torch.randn(b, 8, 16, config.audio_in, generator=gen)
    audio[0, 0] = 0
    return {
        "xyz": torch.rand(n, 3, generator=gen) * 2.6 - 1.3,
        "scales": 0.5 * torch.randn(n, 3, generator=gen),
        "rotations": torch.randn(n, 4, generator=gen),
        "opacity": torch.randn(n, 1, generator=gen),
        "shs": 0.3 * torch.randn(n, 16, 3, generator=gen),
        "audio": audio,
        "eye": torch.rand(b, 1, generator=gen, dtype=torch.float64),
        "camera": torch.randn(b, 12, generator=gen),
    }


def seeded_model(config: Config, seed: int) -> Deformation:
    return Deformation.from_state_dict(
        random_state(Deformation(config), seed), n_head=config.n_head
    )


def fixture_config(data: np.lib.npyio.NpzFile) -> Config:
    return Config(
        audio_in=int(data["audio_in"]),
        grid_channels=int(data["grid_channels"]),
        resolution=tuple(int(r) for r in data["resolution"]),
        multires=tuple(int(m) for m in data["multires"]),
        d_model=int(data["d_model"]),
        n_head=int(data["n_head"]),
        ffn_hidden=int(data["ffn_hidden"]),
        n_layer=int(data["n_layer"]),
        net_width=int(data["net_width"]),
        defor_depth=int(data["defor_depth"]),
    )


# --- config inference and strict loading -------------------------------------------


@pytest.mark.parametrize("width", [29, 44, 1024])
def test_config_is_inferred_from_the_shapes(width):
    config = Config(audio_in=width)
    sd = {k: torch.zeros(v.shape) for k, v in Deformation(config).state_dict().items()}
    assert sd["deformation_net.audio_net.encoder_conv.0.weight"].shape == (32, width, 3)
    assert Deformation.config_from_state_dict(sd) == config


def test_reduced_and_odd_sizes_are_inferred():
    config = Config(
        audio_in=44,
        grid_channels=3,
        resolution=(5, 6, 7),
        multires=(1, 2, 4),
        d_model=9,
        n_head=3,
        ffn_hidden=10,
        n_layer=2,
        net_width=11,
        defor_depth=3,
        posebase_pe=4,
        scale_rotation_pe=1,
        opacity_pe=3,
    )
    sd = random_state(Deformation(config), 0)
    model = Deformation.from_state_dict(sd, n_head=3)
    assert model.config == config
    assert not model.training


def test_d_model_32_skips_the_widening_mlps():
    """Upstream widens the audio and eye codes to d_model only when d_model != 32."""
    config = Config(grid_channels=16, resolution=(4, 4, 4), d_model=32, net_width=8)
    model = seeded_model(config, 3)
    out = model(**random_inputs(config, 3, n=5, b=1))
    assert out.xyz.shape == (1, 5, 3)


@pytest.mark.parametrize("width", [29, 44, 1024])
def test_keys_and_shapes_match_upstreams_state_dict(width):
    manifest = np.load(FIXTURES / "deformation_manifest.npz")
    keys = [str(k) for k in manifest[f"keys_{width}"]]
    shapes = manifest[f"shapes_{width}"]
    ours = Deformation(Config(audio_in=width)).state_dict()
    upstream = {k: tuple(int(n) for n in s if n >= 0) for k, s in zip(keys, shapes, strict=True)}
    assert {k: tuple(v.shape) for k, v in ours.items()} == upstream


def test_a_missing_key_is_named():
    sd = random_state(Deformation(SMALL), 0)
    del sd["deformation_net.cam_mlp.net.1.weight"]
    with pytest.raises(PermanentError) as e:
        Deformation.from_state_dict(sd)
    assert str(e.value) == (
        "GaussianTalker deformation: missing key deformation_net.cam_mlp.net.1.weight "
        "(expected shape [8, 64])"
    )


def test_an_unexpected_key_is_named():
    sd = random_state(Deformation(SMALL), 0)
    sd["deformation_net.static_mlp.1.weight"] = torch.zeros(2, 2)
    with pytest.raises(PermanentError, match=r"unexpected key deformation_net\.static_mlp"):
        Deformation.from_state_dict(sd)


def test_a_wrong_shape_names_both_shapes():
    sd = random_state(Deformation(SMALL), 0)
    sd["deformation_net.transformer.layers.0.norm2.beta"] = torch.zeros(7)
    with pytest.raises(PermanentError) as e:
        Deformation.from_state_dict(sd)
    assert str(e.value) == (
        "GaussianTalker deformation: wrong shape for "
        "deformation_net.transformer.layers.0.norm2.beta: expected [8], found [7]"
    )
    assert "\n" not in str(e.value)


def test_a_key_needed_for_inference_is_named():
    sd = random_state(Deformation(SMALL), 0)
    del sd["deformation_net.null_vector"]
    with pytest.raises(PermanentError, match="missing key deformation_net.null_vector"):
        Deformation.from_state_dict(sd)


def test_grid_width_that_disagrees_with_d_model_is_refused():
    sd = random_state(Deformation(SMALL), 0)
    sd["deformation_net.null_vector"] = torch.zeros(1, 1, 10)
    with pytest.raises(PermanentError, match="inconsistent sizes"):
        Deformation.from_state_dict(sd)


def test_not_a_state_dict_is_refused():
    with pytest.raises(PermanentError, match="expected a state dict"):
        Deformation.from_state_dict([1, 2])  # type: ignore[arg-type]


def test_audio_of_the_wrong_width_is_refused():
    model = seeded_model(SMALL, 0)
    inputs = random_inputs(Config(audio_in=44, **_sizes(SMALL)), 0, n=4, b=1)
    with pytest.raises(PermanentError, match="44 wide, the model was trained on 29"):
        model(**inputs)


def _sizes(config: Config) -> dict[str, object]:
    return {
        "grid_channels": config.grid_channels,
        "resolution": config.resolution,
        "d_model": config.d_model,
        "net_width": config.net_width,
        "ffn_hidden": config.ffn_hidden,
    }


# --- parity with upstream's recorded outputs ---------------------------------------


@pytest.mark.parametrize(
    "path", sorted(FIXTURES.glob("deformation_parity_*.npz")), ids=lambda p: p.stem
)
def test_outputs_match_upstreams(path):
    data = np.load(path)
    config = fixture_config(data)
    seed, n, b = int(data["seed"]), int(data["n"]), int(data["b"])
    model = seeded_model(config, seed)
    with torch.no_grad():
        out = model(**random_inputs(config, seed, n, b))
    stride = int(data["stride"])
    for name in OUTPUTS:
        ours = getattr(out, name).numpy()
        got = ours[..., ::stride, :] if name == "attention" else ours[:, ::stride]
        np.testing.assert_allclose(got, data[f"{name}_slice"], rtol=1e-4, atol=1e-5, err_msg=name)
        stats = np.array([ours.mean(), ours.std(), ours.min(), ours.max()])
        np.testing.assert_allclose(stats, data[f"{name}_stats"], rtol=1e-4, atol=1e-5)


def test_the_fixtures_are_there():
    assert len(list(FIXTURES.glob("deformation_parity_*.npz"))) >= 2


# --- purity and independence ---------------------------------------------------------


def test_same_inputs_same_outputs_and_no_state_between_calls():
    model = seeded_model(SMALL, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a = random_inputs(SMALL, 1, n=20, b=1)
    other = random_inputs(SMALL, 2, n=7, b=3)  # another model size and batch in between
    with torch.no_grad():
        first = model(**a)
        model(**other)
        second = model(**a)
    for name in OUTPUTS:
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert set(vars(model)) == set(vars(seeded_model(SMALL, 1)))


def test_gaussians_are_independent_of_each_other():
    model = seeded_model(SMALL, 4)
    inputs = random_inputs(SMALL, 4, n=30, b=2)
    pick = torch.tensor([3, 17, 29, 0])
    subset = dict(inputs)
    for name in ("xyz", "scales", "rotations", "opacity", "shs"):
        subset[name] = inputs[name][pick]
    with torch.no_grad():
        whole, part = model(**inputs), model(**subset)
    for name in OUTPUTS:
        got = getattr(part, name)
        want = getattr(whole, name)[..., pick, :] if name == "attention" else None
        if want is None:
            want = getattr(whole, name)[:, pick]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)


def test_frames_are_independent_of_each_other():
    model = seeded_model(SMALL, 5)
    inputs = random_inputs(SMALL, 5, n=12, b=3)
    with torch.no_grad():
        batch = model(**inputs)
        one = model(
            **{
                **inputs,
                "audio": inputs["audio"][1:2],
                "eye": inputs["eye"][1:2],
                "camera": inputs["camera"][1:2],
            }
        )
    for name in OUTPUTS:
        torch.testing.assert_close(getattr(one, name), getattr(batch, name)[1:2], msg=name)


def test_precomputed_features_give_the_same_result():
    model = seeded_model(SMALL, 6)
    inputs = random_inputs(SMALL, 6, n=10, b=2)
    with torch.no_grad():
        features = model.canonical_features(inputs["xyz"])
        assert torch.equal(model(**inputs).xyz, model(**inputs, features=features).xyz)
    assert features.shape == (10, SMALL.d_model)


def test_outputs_are_inputs_plus_offsets_and_activation_is_upstreams():
    model = seeded_model(SMALL, 7)
    inputs = random_inputs(SMALL, 7, n=6, b=1)
    with torch.no_grad():
        out = model(**inputs)
    assert out.xyz.shape == (1, 6, 3) and out.shs.shape == (1, 6, 16, 3)
    assert out.rotations.shape == (1, 6, 4) and out.opacity.shape == (1, 6, 1)
    assert out.attention.shape == (1, 1, 6, 4)
    torch.testing.assert_close(out.attention.sum(-1), torch.ones(1, 1, 6))
    act = out.activated()
    torch.testing.assert_close(act.scales, out.scales.exp())
    torch.testing.assert_close(act.opacity, out.opacity.sigmoid())
    torch.testing.assert_close(act.rotations.norm(dim=-1), torch.ones(1, 6))
    assert act.xyz is out.xyz and act.shs is out.shs


def test_audio_window_pads_with_zeros_at_both_ends():
    features = torch.arange(1, 6, dtype=torch.float32).view(5, 1, 1).expand(5, 16, 2)
    assert audio_window(features, 0)[:, 0, 0].tolist() == [0, 0, 0, 0, 1, 2, 3, 4]
    assert audio_window(features, 4)[:, 0, 0].tolist() == [1, 2, 3, 4, 5, 0, 0, 0]
    assert audio_window(features[:1], 0)[:, 0, 0].tolist() == [0, 0, 0, 0, 1, 0, 0, 0]
    assert audio_window(features, 2).shape == (8, 16, 2)
