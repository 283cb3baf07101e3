"""Ditto's audio-to-motion sampling over a whole job, seeded.

``sample_motion`` turns HuBERT features (25 fps, 1024-d) into one 265-float motion
vector per frame, computing what upstream's offline pipeline computes
(``Audio2Motion`` driven by ``StreamSDK._audio2motion_offline``):

1. The condition per frame is [audio | emotion 8 | eye-open 2 | eye-ball 6 | source
   keypoints 63]; its width must match ``cond_projection.weight``.
2. Windows of ``window`` (80) frames start every ``window - overlap`` (70) frames while
   frames remain; the last is padded by repeating its last condition row.
3. Each window is sampled by DDIM (eta 1) over ``steps`` of a 1000-step cosine
   schedule (with one guard against a NaN, see ``_DDIM``), with classifier-free
   guidance, conditioned on one motion frame (``cond_frame``): the source's motion for
   the first window, then frame ``window - overlap - 1`` of the previous window's
   result.
4. Consecutive windows are crossfaded over ``overlap`` frames (weights 0, 1/overlap,
   ..., toward the new window), and a centred moving average of ``smoothing`` frames
   over the pose floats (scale, pitch, yaw, roll, t: the first 202) is applied to the
   frames around each seam, then once more to the whole track.

The one difference from upstream, on purpose, is the noise. Upstream draws the
per-step noise once per process (``setup``) and reuses it for every window of every
job, and draws each window's starting noise from the global RNG. Here all noise comes
from ``torch.Generator("cpu").manual_seed(seed)``, created fresh in each call, in this
order: for each window in turn, one ``randn([steps, window, 265])`` draw; slice 0 is the
window's starting x_T, slice k (1 <= k < steps) the noise added by the k-th DDIM update.
It is drawn in float64 and rounded to float32, then moved to the model's device:
float32 ``randn`` on CPU depends on the SIMD kernel torch picks (AVX2/AVX-512 versus
the scalar one differ in the last bits of about a third of the values), float64 does
not. So a seed gives the same noise on any machine, and two jobs share none.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from farm.errors import InvalidInput
from models.ditto.lmdm import LMDM

MOTION_DIM = 265
# Upstream's order of the 265 floats (``_cvt_LP_motion_info``); scale is stored minus 1.
MOTION_PARTS: tuple[tuple[str, int], ...] = (
    ("scale", 1),
    ("pitch", 66),
    ("yaw", 66),
    ("roll", 66),
    ("t", 3),
    ("exp", 63),
)
POSE_DIMS = 202  # scale, pitch, yaw, roll, t: the floats the moving average smooths

EMOTIONS = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise", "contempt")
KEYPOINT_DIM = 63
EYE_OPEN_DIM = 2
EYE_BALL_DIM = 6
EXTRA_COND_DIM = len(EMOTIONS) + EYE_OPEN_DIM + EYE_BALL_DIM + KEYPOINT_DIM  # 79

# Upstream's defaults (StreamSDK.setup's kwargs.get fallbacks; guidance is hard-coded).
DEFAULT_STEPS = 50
DEFAULT_GUIDANCE = 2.0
DEFAULT_EMOTION = 4  # neutral
DEFAULT_OVERLAP = 10
DEFAULT_WINDOW = 80
DEFAULT_SMOOTHING = 3
TRAIN_STEPS = 1000
_COSINE_S = 8e-3


def split_motion(motion: np.ndarray) -> dict[str, np.ndarray]:
    """The named parts of motion [..., 265], as upstream's ``arr2dic``: scale [..., 1]
    (the stored value plus 1), pitch/yaw/roll [..., 66] bin logits, t [..., 3],
    exp [..., 63]."""
    if motion.shape[-1] != MOTION_DIM:
        raise InvalidInput(f"motion has {motion.shape[-1]} floats per frame, expected 265")
    parts: dict[str, np.ndarray] = {}
    start = 0
    for name, size in MOTION_PARTS:
        parts[name] = motion[..., start : start + size]
        start += size
    parts["scale"] = parts["scale"] + 1
    return parts


def join_motion(parts: Mapping[str, np.ndarray]) -> np.ndarray:
    """Inverse of ``split_motion`` (upstream's ``dic2arr``): float32 [N, 265].

    Each part is read as [N, size] (upstream's [1, 1] scale and [1, 21, 3] exp work);
    this builds the source's motion vector from the motion extractor's outputs."""
    arrays = []
    for name, size in MOTION_PARTS:
        value = np.asarray(parts[name], dtype=np.float32).reshape(-1, size)
        arrays.append(value - 1 if name == "scale" else value)
    return np.concatenate(arrays, axis=-1)


def emotion_vector(emotion: int) -> np.ndarray:
    """Upstream's emotion condition for a label: softmax of 8 at the label, 0 elsewhere."""
    if not 0 <= emotion < len(EMOTIONS):
        raise InvalidInput(f"emotion {emotion} is not in 0..7 ({', '.join(EMOTIONS)})")
    logits = np.zeros(len(EMOTIONS), dtype=np.float32)
    logits[emotion] = 8
    e = np.exp(logits - logits.max())
    return e / e.sum()


def build_condition(
    audio_features: np.ndarray,
    source_kp: np.ndarray,
    emotion: int | np.ndarray,
    eye_open: np.ndarray,
    eye_ball: np.ndarray,
) -> np.ndarray:
    """The per-frame condition, float32 [T, audio + 79], as upstream's ConditionHandler.

    ``emotion``: a label (0..7, see ``EMOTIONS``) or weights [8] or [M, 8], cycled over
    the frames; ``eye_open`` [2] or [N, 2] and ``eye_ball`` [6] or [N, 6], N values of a
    source video read back and forth over the frames; ``source_kp`` [63], the source's
    canonical keypoints."""
    frames = audio_features.shape[0]
    if isinstance(emotion, int | np.integer):
        emotion = emotion_vector(int(emotion))
    columns = [np.asarray(audio_features, dtype=np.float32)]
    for name, value, width, order in (
        ("emotion", emotion, len(EMOTIONS), _cycle),
        ("eye_open", eye_open, EYE_OPEN_DIM, _mirror),
        ("eye_ball", eye_ball, EYE_BALL_DIM, _mirror),
        ("source_kp", source_kp, KEYPOINT_DIM, _cycle),
    ):
        value = np.asarray(value, dtype=np.float32)
        if value.ndim == 1:
            value = value[None]
        if value.ndim != 2 or value.shape[1] != width or len(value) == 0:
            raise InvalidInput(
                f"{name} has shape {list(value.shape)}, expected [{width}] or [N, {width}]"
            )
        columns.append(value[order(frames, len(value))])
    return np.concatenate(columns, axis=1)


def _cycle(frames: int, n: int) -> np.ndarray:
    """Frame i reads value i mod n."""
    return np.arange(frames) % n


def _mirror(frames: int, n: int) -> np.ndarray:
    """Frame i reads the values forth, back, forth, ... (0, 1, .., n-1, n-1, .., 0, 0, ..)."""
    turn, rest = np.divmod(np.arange(frames), n)
    return np.where(turn % 2 == 0, rest, n - 1 - rest)


def cosine_alphas_cumprod(n: int = TRAIN_STEPS) -> torch.Tensor:
    """Cumulative alphas [n] of the cosine schedule (s = 0.008, betas clipped to 0.999),
    float32, computed in upstream's precision and order."""
    steps = torch.arange(n + 1, dtype=torch.float64) / n + _COSINE_S
    f = torch.cos(steps / (1 + _COSINE_S) * np.pi / 2).pow(2)
    f = f / f[0]
    betas = (1 - f[1:] / f[:-1]).clamp(0, 0.999).float()
    return torch.cumprod(1.0 - betas, dim=0)


def ddim_times(steps: int, n: int = TRAIN_STEPS) -> list[tuple[int, int]]:
    """(time, next time) pairs from n-1 down to -1 (the last step returns x0)."""
    times = torch.linspace(-1, n - 1, steps=steps + 1, dtype=torch.float32).int().tolist()
    times = times[::-1]
    return list(zip(times[:-1], times[1:], strict=True))


class _DDIM:
    """Upstream's DDIM (eta 1) coefficients for a number of steps."""

    def __init__(self, steps: int, device: torch.device) -> None:
        ac = cosine_alphas_cumprod().to(device)
        self.pairs = ddim_times(steps)
        self.recip_sqrt_1m = torch.sqrt(1.0 / (1.0 - ac))  # 1 / sqrt(1 - a)
        self.sqrt_recipm1 = torch.sqrt(1.0 / ac - 1)  # sqrt(1 / a - 1)
        self.updates: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for time, time_next in self.pairs:
            if time_next < 0:
                continue
            alpha, alpha_next = ac[time], ac[time_next]
            sigma = ((1 - alpha / alpha_next) * (1 - alpha_next) / (1 - alpha)).sqrt()
            # Clamped at 0: for 5 steps, float32 rounding makes it -6e-8 at 999 -> 799,
            # where upstream's sqrt returns NaN; no other step count in 1..200 is affected.
            c = (1 - alpha_next - sigma**2).clamp(min=0).sqrt()
            self.updates.append((alpha_next.sqrt(), c, sigma))

    def noise_from_x0(self, x_t: torch.Tensor, time: int, x0: torch.Tensor) -> torch.Tensor:
        return self.recip_sqrt_1m[time] * x_t - x0 / self.sqrt_recipm1[time]


@torch.no_grad()
def _sample_window(
    model: LMDM,
    ddim: _DDIM,
    noise: torch.Tensor,
    cond_frame: torch.Tensor,
    cond: torch.Tensor,
    guidance: float,
) -> torch.Tensor:
    """One window [1, S, 265] by DDIM; noise [steps, S, 265] as documented above."""
    x = noise[0:1]
    for i, (time, time_next) in enumerate(ddim.pairs):
        t = torch.full((1,), time, dtype=torch.long, device=x.device)
        x0 = model.guided(x, cond_frame, cond, t, guidance)
        if time_next < 0:
            return x0
        pred_noise = ddim.noise_from_x0(x, time, x0)
        alpha_next_sqrt, c, sigma = ddim.updates[i]
        x = x0 * alpha_next_sqrt + c * pred_noise + sigma * noise[i + 1 : i + 2]
    return x


def _smooth(track: np.ndarray, start: int, stop: int, k: int) -> None:
    """In place: frames [start, stop) of track [N, 265] get the mean of the frames
    within k // 2 of them (clipped at the ends, read from a copy), pose floats only."""
    if k <= 1:
        return
    half = k // 2
    source = track[:, :POSE_DIMS].copy()
    n = len(track)
    for i in range(start, stop):
        track[i, :POSE_DIMS] = source[max(0, i - half) : min(n, i + half + 1)].mean(axis=0)


def sample_motion(
    model: LMDM,
    audio_features: np.ndarray,
    source_kp: np.ndarray,
    *,
    source_motion: np.ndarray | Mapping[str, np.ndarray],
    seed: int,
    eye_open: np.ndarray,
    eye_ball: np.ndarray,
    steps: int = DEFAULT_STEPS,
    guidance: float = DEFAULT_GUIDANCE,
    emotion: int | np.ndarray = DEFAULT_EMOTION,
    overlap: int = DEFAULT_OVERLAP,
    window: int = DEFAULT_WINDOW,
    smoothing: int = DEFAULT_SMOOTHING,
    value_range: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Motion float32 [T, 265] for audio_features [T, audio], the same for the same seed.

    ``source_kp`` [63] is the source's canonical keypoints (a condition column);
    ``source_motion`` is the source's own motion, which the first window continues
    from: 265 floats, or the motion extractor's outputs (scale, pitch, yaw, roll logits,
    t, exp; other keys ignored), joined by ``join_motion``.
    ``emotion``, ``eye_open``, ``eye_ball``: see ``build_condition``. ``value_range``
    (min [265], max [265]) clips the result, as upstream's ``v_min_max_for_clip``
    (applied after sampling and smoothing; it does not feed back into the windows).
    Runs on the model's device; see the module docstring for the noise order."""
    frames = audio_features.shape[0] if audio_features.ndim == 2 else 0
    if frames == 0:
        raise InvalidInput("no audio frames to sample motion for")
    cfg = model.config
    if window != cfg.seq_len:
        raise InvalidInput(f"window {window} does not match the model's {cfg.seq_len} frames")
    if not 1 <= overlap < window:
        raise InvalidInput(f"overlap {overlap} must be in 1..{window - 1}")
    if steps < 1:
        raise InvalidInput(f"steps must be at least 1, got {steps}")
    audio_dim = cfg.cond_dim - EXTRA_COND_DIM
    if audio_features.shape[1] != audio_dim:
        raise InvalidInput(
            f"audio features have {audio_features.shape[1]} floats per frame, "
            f"the model expects {audio_dim}"
        )
    if isinstance(source_motion, Mapping):
        source_motion = join_motion(source_motion)
    source_motion = np.asarray(source_motion, dtype=np.float32).reshape(-1)
    if source_motion.shape != (cfg.motion_dim,):
        raise InvalidInput(f"source_motion has {source_motion.size} floats, expected 265")

    cond_all = build_condition(audio_features, source_kp, emotion, eye_open, eye_ball)
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    ddim = _DDIM(steps, device)
    generator = torch.Generator("cpu").manual_seed(seed)
    hop = window - overlap
    fade = (np.arange(overlap, dtype=np.float32) / overlap)[:, None]

    track: np.ndarray | None = None
    cond_frame = source_motion
    for start in range(0, frames, hop):
        cond = cond_all[start : start + window]
        if len(cond) < window:
            cond = np.concatenate([cond, np.repeat(cond[-1:], window - len(cond), axis=0)])
        noise = torch.randn(
            (steps, window, cfg.motion_dim), generator=generator, dtype=torch.float64
        )
        noise = noise.to(torch.float32).to(device=device, dtype=dtype)
        pred = _sample_window(
            model,
            ddim,
            noise,
            torch.from_numpy(cond_frame[None]).to(device, dtype),
            torch.from_numpy(cond[None]).to(device, dtype),
            guidance,
        )
        pred_np = pred[0].float().cpu().numpy()
        if track is None:
            track = pred_np
            _smooth(track, 0, len(track), smoothing)
        else:
            n = len(track)
            track[n - overlap :] = track[n - overlap :] * (1 - fade) + pred_np[:overlap] * fade
            track = np.concatenate([track, pred_np[overlap:]])
            _smooth(track, n - overlap, n + 1, smoothing)
        cond_frame = track[len(track) - overlap - 1].copy()

    assert track is not None
    track = track[:frames]
    _smooth(track, 0, len(track), smoothing)
    if value_range is not None:
        low, high = (np.asarray(v, dtype=np.float32).reshape(-1) for v in value_range)
        track = np.clip(track, low, high)
    return np.ascontiguousarray(track, dtype=np.float32)
