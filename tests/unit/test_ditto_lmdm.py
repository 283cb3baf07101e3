"""Ditto's LMDM (models/ditto/lmdm.py) and its seeded sampler (models/ditto/audio2motion.py).

The fixtures in tests/fixtures/ditto/lmdm_*.npz hold outputs of upstream's own code
(antgroup/ditto-talkinghead, run once at development time, never imported here) for
random weights and inputs that the helpers below rebuild from seeds: the network's
predictions, and one whole DDIM sampling run into which the noise farm draws for the
seed was injected (upstream draws its own noise; everything else is upstream's maths).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from farm.errors import InvalidInput, PermanentError
from models.ditto.audio2motion import (
    EXTRA_COND_DIM,
    MOTION_DIM,
    build_condition,
    join_motion,
    sample_motion,
    split_motion,
)
from models.ditto.lmdm import LMDM, Config

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "ditto"
SMALL = Config(cond_dim=32 + EXTRA_COND_DIM, latent_dim=64, ff_dim=96, num_layers=2, num_heads=4)
NETWORK_TOL = 1e-5  # max abs error over max abs value, fp32
SAMPLER_TOL = 1e-4


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    """Normal draws in float64 rounded to float32: the same on every CPU."""
    return torch.randn(shape, generator=g, dtype=torch.float64).float()


def config_from(z: np.lib.npyio.NpzFile) -> Config:
    return Config(**{k: int(z[f"config_{k}"]) for k in Config.__dataclass_fields__})


def random_state_dict(cfg: Config, seed: int) -> dict[str, torch.Tensor]:
    """Random weights in upstream's layout, the same on any machine for a seed: the keys
    in LMDM's order, each drawn from one float64 stream; matrices scaled by
    1/sqrt(fan-in), LayerNorm weights about 1, biases small, rotary freqs as built."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        layout = LMDM(cfg).state_dict()
    sd = {}
    for key, ref in layout.items():
        if key.endswith("freqs"):
            sd[key] = ref.clone()
            continue
        noise = _randn(g, *ref.shape)
        if key.startswith("null_cond_"):
            sd[key] = noise
        elif ref.dim() >= 2:
            sd[key] = noise / math.sqrt(ref.shape[-1])
        elif key.endswith("bias"):
            sd[key] = noise * 0.02
        else:  # LayerNorm weight
            sd[key] = 1 + noise * 0.1
    return sd


def network_inputs(cfg: Config, seed: int) -> tuple[torch.Tensor, ...]:
    """x [1, S, 265], cond_frame [1, 265], cond [1, S, C] for the network fixtures."""
    g = torch.Generator().manual_seed(seed)
    x = _randn(g, 1, cfg.seq_len, cfg.motion_dim)
    cond_frame = _randn(g, 1, cfg.motion_dim) * 0.5
    cond = _randn(g, 1, cfg.seq_len, cfg.cond_dim)
    return x, cond_frame, cond


def job_inputs(cfg: Config, frames: int, seed: int) -> dict[str, object]:
    """Audio features, the source's motion-extractor outputs and eye values of a job."""
    g = torch.Generator().manual_seed(seed)
    audio = _randn(g, frames, cfg.cond_dim - EXTRA_COND_DIM).numpy()
    source = {
        "scale": (1 + 0.1 * _randn(g, 1)).numpy(),
        "pitch": _randn(g, 66).numpy(),
        "yaw": _randn(g, 66).numpy(),
        "roll": _randn(g, 66).numpy(),
        "t": (0.1 * _randn(g, 3)).numpy(),
        "exp": (0.05 * _randn(g, 63)).numpy(),
        "kp": (0.2 * _randn(g, 63)).numpy(),
    }
    eye_open = (0.3 + 0.05 * _randn(g, 2)).numpy()
    eye_ball = (0.1 * _randn(g, 6)).numpy()
    return {"audio": audio, "source": source, "eye_open": eye_open, "eye_ball": eye_ball}


def _rel(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(out - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def small_model() -> LMDM:
    return LMDM.from_state_dict(random_state_dict(SMALL, 1), num_heads=SMALL.num_heads)


def _sample(model: LMDM, frames: int, seed: int, steps: int = 2, **kw: object) -> np.ndarray:
    job = job_inputs(model.config, frames, 5)
    source = job["source"]
    assert isinstance(source, dict)
    return sample_motion(
        model,
        job["audio"],  # type: ignore[arg-type]
        source["kp"],
        source_motion=source,
        seed=seed,
        eye_open=job["eye_open"],  # type: ignore[arg-type]
        eye_ball=job["eye_ball"],  # type: ignore[arg-type]
        steps=steps,
        **kw,  # type: ignore[arg-type]
    )


# --- the network ---------------------------------------------------------------------


def test_from_state_dict_infers_the_config_and_accepts_the_checkpoint_wrapper() -> None:
    sd = random_state_dict(SMALL, 1)
    model = LMDM.from_state_dict({"model_state_dict": sd}, num_heads=4)
    assert model.config == SMALL
    assert not model.training
    three = Config(cond_dim=50 + EXTRA_COND_DIM, latent_dim=32, ff_dim=40, num_layers=3)
    assert LMDM.from_state_dict(random_state_dict(three, 2)).config == three


def _break(sd: dict[str, torch.Tensor], how: str) -> dict[str, torch.Tensor]:
    sd = dict(sd)
    if how == "missing":
        del sd["seqTransDecoder.stack.1.film2.block.1.bias"]
    elif how == "unexpected":
        sd["seqTransDecoder.stack.0.extra"] = torch.zeros(3)
    elif how == "shape":
        sd["cond_encoder.1.linear2.weight"] = torch.zeros(64, 95)
    elif how == "not a tensor":
        sd["norm_cond.bias"] = [0.0] * 64  # type: ignore[assignment]
    elif how == "inference key":
        del sd["cond_projection.weight"]
    return sd


@pytest.mark.parametrize(
    ("how", "expected"),
    [
        (
            "missing",
            "LMDM: missing key seqTransDecoder.stack.1.film2.block.1.bias (expected shape [128])",
        ),
        ("unexpected", "LMDM: unexpected key seqTransDecoder.stack.0.extra (found shape [3])"),
        (
            "shape",
            "LMDM: wrong shape for cond_encoder.1.linear2.weight: "
            "expected [64, 96], found [64, 95]",
        ),
        ("not a tensor", "'norm_cond.bias' holds list, expected a tensor"),
        ("inference key", "LMDM: missing key cond_projection.weight (needed to infer"),
    ],
)
def test_strict_load_names_the_first_bad_key(how: str, expected: str) -> None:
    with pytest.raises(PermanentError) as err:
        LMDM.from_state_dict(_break(random_state_dict(SMALL, 1), how), num_heads=4)
    message = str(err.value)
    assert expected in message
    assert "\n" not in message


def test_network_matches_upstream_fixture() -> None:
    z = np.load(FIXTURES / "lmdm_network.npz")
    cfg = config_from(z)
    model = LMDM.from_state_dict(random_state_dict(cfg, int(z["weights_seed"])), num_heads=4)
    x, cond_frame, cond = network_inputs(cfg, int(z["inputs_seed"]))
    rows = z["rows"]
    with torch.no_grad():
        for i, time in enumerate(z["times"]):
            t = torch.tensor([int(time)])
            guided = model.guided(x, cond_frame, cond, t, float(z["guidance"]))
            assert _rel(guided[0, rows].numpy(), z["guided"][i]) < NETWORK_TOL
            assert _rel(model(x, cond_frame, cond, t)[0, rows].numpy(), z["cond"][i]) < NETWORK_TOL
            assert (
                _rel(model(x, cond_frame, None, t)[0, rows].numpy(), z["uncond"][i]) < NETWORK_TOL
            )


def test_full_size_network_matches_upstream_fixture() -> None:
    z = np.load(FIXTURES / "lmdm_network_full.npz")
    cfg = config_from(z)
    assert cfg == Config()  # upstream's widths
    sd = random_state_dict(cfg, int(z["weights_seed"]))
    model = LMDM.from_state_dict(sd)
    assert model.config == cfg
    assert len(sd) == 249
    assert sum(p.numel() for p in model.parameters()) == 47_788_297
    x, cond_frame, cond = network_inputs(cfg, int(z["inputs_seed"]))
    with torch.no_grad():
        out = model.guided(x, cond_frame, cond, torch.tensor([int(z["times"][0])]), 2.0)
    assert _rel(out[0, z["rows"]].numpy(), z["guided"][0]) < NETWORK_TOL


# --- the sampler ---------------------------------------------------------------------


def test_sampler_matches_upstream_fixture() -> None:
    z = np.load(FIXTURES / "lmdm_sampler.npz")
    cfg = config_from(z)
    model = LMDM.from_state_dict(random_state_dict(cfg, int(z["weights_seed"])), num_heads=4)
    frames = int(z["frames"])
    job = job_inputs(cfg, frames, int(z["inputs_seed"]))
    source = job["source"]
    assert isinstance(source, dict)
    motion = sample_motion(
        model,
        job["audio"],  # type: ignore[arg-type]
        source["kp"],
        source_motion=source,
        seed=int(z["seed"]),
        eye_open=job["eye_open"],  # type: ignore[arg-type]
        eye_ball=job["eye_ball"],  # type: ignore[arg-type]
        steps=int(z["steps"]),
    )
    assert motion.shape == (frames, MOTION_DIM) and motion.dtype == np.float32
    assert _rel(motion[z["rows"]], z["motion"]) < SAMPLER_TOL


def test_same_seed_same_motion_and_no_state_is_carried(small_model: LMDM) -> None:
    rng_before = torch.get_rng_state()
    first = _sample(small_model, 100, seed=11)
    other = _sample(small_model, 100, seed=12)
    again = _sample(small_model, 100, seed=11)
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-3
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is not used


@pytest.mark.parametrize("frames", [7, 80, 150, 231])
def test_one_motion_frame_per_audio_frame(small_model: LMDM, frames: int) -> None:
    motion = _sample(small_model, frames, seed=3, steps=1)
    assert motion.shape == (frames, MOTION_DIM)
    assert motion.dtype == np.float32
    assert np.isfinite(motion).all()


def test_five_steps_stay_finite(small_model: LMDM) -> None:
    # upstream's float32 DDIM coefficient c is sqrt(-6e-8) = NaN at 5 steps; farm clamps
    assert np.isfinite(_sample(small_model, 20, seed=2, steps=5)).all()


def test_value_range_clips_the_result(small_model: LMDM) -> None:
    low, high = np.full(MOTION_DIM, -0.5, np.float32), np.full(MOTION_DIM, 0.25, np.float32)
    free = _sample(small_model, 30, seed=4, steps=1)
    clipped = _sample(small_model, 30, seed=4, steps=1, value_range=(low, high))
    np.testing.assert_array_equal(clipped, np.clip(free, low, high))


def test_sampler_rejects_bad_inputs(small_model: LMDM) -> None:
    with pytest.raises(InvalidInput, match="no audio frames"):
        _sample(small_model, 0, seed=1)
    with pytest.raises(InvalidInput, match="window 64"):
        _sample(small_model, 10, seed=1, window=64)
    with pytest.raises(InvalidInput, match="overlap 80"):
        _sample(small_model, 10, seed=1, overlap=80)
    with pytest.raises(InvalidInput, match="emotion 9"):
        _sample(small_model, 10, seed=1, emotion=9)
    wide = np.zeros((10, 33), np.float32)
    with pytest.raises(InvalidInput, match="33 floats per frame, the model expects 32"):
        sample_motion(
            small_model,
            wide,
            np.zeros(63),
            source_motion=np.zeros(265),
            seed=1,
            eye_open=np.zeros(2),
            eye_ball=np.zeros(6),
        )


def test_condition_columns() -> None:
    audio = np.ones((5, 32), np.float32)
    eye_open = np.arange(10, dtype=np.float32).reshape(5, 2)
    cond = build_condition(audio, np.full(63, 7.0), 4, eye_open, np.full(6, 3.0))
    assert cond.shape == (5, 32 + EXTRA_COND_DIM) and cond.dtype == np.float32
    emotion = cond[:, 32:40]
    assert emotion.argmax(axis=1).tolist() == [4] * 5
    np.testing.assert_allclose(emotion.sum(axis=1), 1, rtol=1e-6)
    assert emotion[0, 4] == pytest.approx(math.exp(8) / (math.exp(8) + 7), rel=1e-6)
    np.testing.assert_array_equal(cond[:, 40:42], eye_open)
    assert (cond[:, 42:48] == 3).all() and (cond[:, 48:] == 7).all()
    with pytest.raises(InvalidInput, match="eye_ball"):
        build_condition(audio, np.zeros(63), 4, eye_open, np.zeros(5))


def test_condition_reads_shorter_sequences_like_upstream() -> None:
    # emotion weights cycle; a video's eye values go back and forth (ConditionHandler)
    audio = np.zeros((7, 32), np.float32)
    emotions = np.eye(8, dtype=np.float32)[[2, 5, 6]]
    eye_open = np.arange(3, dtype=np.float32)[:, None].repeat(2, axis=1)
    cond = build_condition(audio, np.zeros(63), emotions, eye_open, np.zeros((1, 6)))
    assert cond[:, 32:40].argmax(axis=1).tolist() == [2, 5, 6, 2, 5, 6, 2]
    assert cond[:, 40].tolist() == [0, 1, 2, 2, 1, 0, 0]
    assert build_condition(audio, np.zeros(63), np.int64(3), eye_open, np.zeros(6))[0, 35] > 0.99


# --- the 265 floats ------------------------------------------------------------------


def test_split_motion_follows_upstreams_order() -> None:
    motion = np.arange(2 * MOTION_DIM, dtype=np.float32).reshape(2, MOTION_DIM)
    parts = split_motion(motion)
    sizes = {k: v.shape[-1] for k, v in parts.items()}
    assert sizes == {"scale": 1, "pitch": 66, "yaw": 66, "roll": 66, "t": 3, "exp": 63}
    assert list(parts) == ["scale", "pitch", "yaw", "roll", "t", "exp"]
    assert parts["scale"][:, 0].tolist() == [1.0, 266.0]  # stored as scale - 1
    assert parts["pitch"][0, 0] == 1 and parts["yaw"][0, 0] == 67 and parts["roll"][0, 0] == 133
    assert parts["t"][0].tolist() == [199, 200, 201] and parts["exp"][0, -1] == 264
    np.testing.assert_array_equal(join_motion(parts), motion)
    upstream_shapes = {"scale": np.ones((1, 1)), "exp": np.zeros((1, 21, 3))}
    joined = join_motion({**{k: v[:1] for k, v in parts.items()}, **upstream_shapes})
    assert joined.shape == (1, MOTION_DIM) and joined[0, 0] == 0
    with pytest.raises(InvalidInput):
        split_motion(np.zeros((3, 264), np.float32))
