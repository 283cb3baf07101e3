"""The `ditto` backend: Ditto's networks on farm's plan/render split.

Avatar (once per photo, on a worker): Ditto's own preprocessing (face detector, 106
and 203 landmarks, the rotation-aligned 512 crop), then the appearance extractor's
feature volume f_s (kept in fp16), the motion extractor's source motion, the eye
values, the crop's matrix and the photo.

Plan (sequential, seeded): HuBERT features of the job's audio, LMDM sampling with
noise from the job's seed (models/ditto/audio2motion.py), then motion stitching for
the whole job (models/ditto/stitching.py). The plan holds every frame's driving
keypoints x_d, so each frame is a pure function of (avatar, plan, frame index).

Render: frames [start, stop) in batches through warp -> decoder (a TensorRT engine on
a GPU worker with tensorrt, models/ditto/export.py; else PyTorch, fp16 on CUDA, fp32 on
CPU), then the 512 crop letterboxed to the job's size, or pasted back into the
photo through the feathered mask (`--size photo`), on the device. With living eyes
(`--eyes natural`, the default) the plan also holds a seeded gaze track, and each frame's
irises are moved by it on the host, inside the crop's eye regions carried along with the
head (models/ditto/gaze.py).
"""

from __future__ import annotations

import io
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from farm.errors import PermanentError
from models.base import FrameSink, Phone, Plan, RenderStats, Speech
from models.eyes import EyeRegions, regions_from_arrays, regions_to_arrays
from models.frames import FrameWriter

log = logging.getLogger(__name__)

CROP = 512  # the decoder's output: the face crop
MOTION_FPS = 25  # HuBERT features and LMDM motion run at 25 frames per second
SOURCE_KEYS = ("kp", "pitch", "yaw", "roll", "t", "exp", "scale")
X_D = tuple(f"x_d{i}" for i in range(63))  # the plan's channels: 21 keypoints x 3
# The 512 crop around the face (prepare_avatar): the landmarks' extent times the scale,
# its centre shifted by vy times the side (up: more forehead).
FACE_CROP_SCALE = 2.3
FACE_CROP_VY = -0.125


@dataclass
class DittoAvatar:
    photo: np.ndarray  # uint8 [H, W, 3], even sides, long side <= 1920 (as upstream)
    m_c2o: np.ndarray  # float64 [3, 3]: crop (512) -> photo
    f_s: np.ndarray  # float16 [32, 16, 64, 64]: the appearance feature volume
    source: dict[str, np.ndarray]  # the motion extractor's output for the photo
    x_s: np.ndarray  # float32 [21, 3]: the posed source keypoints
    eye_open: np.ndarray  # float32 [2]
    eye_ball: np.ndarray  # float32 [6]
    # The crop's eyes for the living eyes (models/eyes.py, crop pixels); None where the
    # face mesh found none, or in an avatar stored before they were kept: no living eyes.
    eye_regions: EyeRegions | None = None
    cache: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def photo_size(self) -> tuple[int, int]:
        """(width, height) of whole-photo output, even sides for H.264."""
        h, w = self.photo.shape[:2]
        return w - w % 2, h - h % 2

    @property
    def face_box(self) -> tuple[int, int, int]:
        """(x0, y0, side) of the face in whole-photo output pixels (models/base.py). The
        crop is the landmarks' extent times FACE_CROP_SCALE, shifted up by 0.125 of its
        side (prepare_avatar); undone here and mapped to the photo by M_c2o. A 512x512
        photo renders as the crop itself, so there the box is in crop pixels."""
        side = CROP / FACE_CROP_SCALE
        centre = np.array([CROP / 2, CROP / 2 - FACE_CROP_VY * CROP, 1.0])  # the face's mid
        if self.photo_size != (CROP, CROP):
            m = np.asarray(self.m_c2o, dtype=np.float64)
            centre = m @ centre
            side *= math.sqrt(abs(np.linalg.det(m[:2, :2])))
        x, y = float(centre[0]), float(centre[1])
        return int(round(x - side / 2)), int(round(y - side / 2)), max(int(round(side)), 1)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez_compressed(
            buf,
            photo=self.photo,
            m_c2o=self.m_c2o,
            f_s=self.f_s,
            x_s=self.x_s,
            eye_open=self.eye_open,
            eye_ball=self.eye_ball,
            **{f"source_{k}": v for k, v in self.source.items()},
            **({} if self.eye_regions is None else _eye_arrays(self.eye_regions)),
        )
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> DittoAvatar:
        with np.load(io.BytesIO(data)) as z:
            source = {k: z[f"source_{k}"] for k in SOURCE_KEYS}
            eyes = {k.removeprefix("eyes_"): z[k] for k in z.files if k.startswith("eyes_")}
            return cls(
                z["photo"],
                z["m_c2o"],
                z["f_s"],
                source,
                z["x_s"],
                z["eye_open"],
                z["eye_ball"],
                eye_regions=regions_from_arrays(eyes) if eyes else None,
            )


class DittoRenderer:
    name = "ditto"
    # The path it renders on, "tensorrt" | "cuda" | "cpu", and why: load() chooses it
    # (models/engines.py); a failed TensorRT engine turns "tensorrt" into "cuda".
    backend = "cpu"
    backend_reason = "not loaded"

    def __init__(
        self,
        batch_size: int = 16,
        steps: int = 0,
        emotion: int = -1,
        engine_dir: str = "",
        eyes: str = "natural",
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if eyes not in ("natural", "still"):
            raise ValueError(f"eyes must be natural or still, got {eyes!r}")
        self.eyes = eyes  # the living eyes of jobs that do not say (`submit --eyes`)
        self.batch_size = batch_size
        self.steps, self.emotion = steps, emotion  # 0 / -1: the checkpoint config's
        self.engine_dir = Path(engine_dir) if engine_dir else None  # TensorRT engine cache
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.root: Path | None = None
        self.nets: dict[str, torch.nn.Module] = {}
        self.config: dict[str, Any] = {}
        self._aux: dict[str, Any] = {}

    # --- loading -------------------------------------------------------------

    def load(self, model_dir: Path, device: str = "auto") -> None:
        """The checkpoints under `model_dir` (FARM_DITTO_DIR), checked and loaded once
        per worker process; the networks stay warm across jobs. Chooses the path and
        says which: TensorRT (its engine found or built on the first render, under
        `engine_dir`), PyTorch CUDA (fp16) or the CPU (fp32)."""
        from models.ditto.checkpoints import load_networks, open_checkpoints
        from models.engines import backend_choice

        choice = backend_choice(device)
        self.backend, self.backend_reason = choice.path, choice.reason
        self.device = torch.device(choice.device)
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.root = Path(model_dir)
        checkpoints = open_checkpoints(self.root)
        self.config = checkpoints.config
        self.checkpoint_sha256 = checkpoints.sha256  # by role: names the engine's weights
        self.nets = load_networks(checkpoints, self.device)
        self._engine: Any = None  # the TensorRT engine, made on first use
        log.info("ditto renderer: using %s (%s)", choice.path, choice.reason)

    def aux(self, role: str) -> Any:
        """An ONNX aux model (detector, landmark106, landmark203, hubert) from the
        checkpoint root, opened on first use (CUDA where onnxruntime has it)."""
        if role not in self._aux:
            from models.ditto import aux, checkpoints

            assert self.root is not None, "load() first"
            path = self.root / checkpoints.FILES[role]
            self._aux[role] = aux.MODELS[role](path, device=self.device.type)
        return self._aux[role]

    # --- avatar --------------------------------------------------------------

    def prepare_avatar(self, photo: np.ndarray) -> DittoAvatar:
        from models.ditto import crop, eyes
        from models.portrait.avatar import fit_photo

        photo, _ = fit_photo(photo)  # <= 1920 on the long side, even sides
        faces = self.aux("detector")(photo)
        if len(faces) == 0:
            raise PermanentError("no face found in the photo: use one clear, frontal face")
        lmk106 = self.aux("landmark106")(photo, faces.boxes[faces.largest()])
        # Ditto's two crops: a 224 one from the 106 points for the 203-point model,
        # then the 512 one from the 203 points that the networks see.
        m224 = crop.crop_matrix(lmk106, 224, scale=1.5, vy=-0.1)
        face224 = crop.warp(photo, m224, (224, 224))
        lmk203 = self.aux("landmark203")(face224, np.linalg.inv(m224))
        m_o2c = crop.crop_matrix(lmk203, CROP, scale=FACE_CROP_SCALE, vx=0.0, vy=FACE_CROP_VY)
        face = crop.warp(photo, m_o2c, (CROP, CROP))
        eye_open, eye_ball, eye_regions = eyes.measure_with_regions(face)
        if eye_regions is None:
            log.warning("ditto: no eyes found in the crop: neutral eye values, no living eyes")
        small = _to_chw256(face)
        with torch.inference_mode():
            f_s = self.nets["appearance"](small.to(self.device))[0]
            motion = self.nets["motion_extractor"](small.to(self.device))
        source = {k: motion[k][0].detach().float().cpu().numpy().reshape(-1) for k in SOURCE_KEYS}
        from models.ditto.stitching import pose

        x_s = pose({k: v[None] for k, v in source.items()})[0]
        return DittoAvatar(
            photo=photo,
            m_c2o=np.linalg.inv(m_o2c),
            f_s=f_s.half().cpu().numpy(),
            source=source,
            x_s=x_s,
            eye_open=eye_open,
            eye_ball=eye_ball,
            eye_regions=eye_regions,
        )

    def avatar_from_bytes(self, data: bytes) -> DittoAvatar:
        return DittoAvatar.from_bytes(data)

    # --- plan ----------------------------------------------------------------

    def plan(
        self,
        avatar: DittoAvatar,
        speech_seconds: float,
        phones: list[Phone],
        fps: int,
        size: tuple[int, int],
        seed: int,
        audio: Speech | None = None,
        options: dict[str, int] | None = None,
    ) -> Plan:
        from models.ditto.audio2motion import sample_motion, split_motion
        from models.ditto.stitching import resample_frames, stitch_plan
        from models.wav import resample

        if audio is None:
            raise PermanentError("the ditto renderer needs the job's audio to plan")
        samples = audio.samples.astype(np.float32) / 32768.0
        audio16k = resample(samples, audio.sample_rate, 16000)
        features = self.aux("hubert").features(audio16k)
        motion_frames = math.ceil(speech_seconds * MOTION_FPS)
        features = _fit(features, motion_frames)
        living_eyes = (options or {}).get("eyes", 1 if self.eyes == "natural" else 0) == 1
        options = self.options(options or {})
        with torch.inference_mode():
            motion = sample_motion(
                self.nets["lmdm"],
                features,
                avatar.source["kp"],
                source_motion=avatar.source,
                seed=seed,
                eye_open=avatar.eye_open,
                eye_ball=avatar.eye_ball,
                **options,
            )
        driving = split_motion(motion)
        blinks = self.config.get("default_kwargs", {}).get("delta_eye_arr")
        blink_shapes = None if blinks is None else np.asarray(blinks, np.float32).reshape(-1, 63)
        _, x_d = stitch_plan(avatar.source, driving, self.stitch, seed, blink_shapes)
        frames = math.ceil(speech_seconds * fps)
        track = resample_frames(x_d.reshape(len(x_d), 63), MOTION_FPS, fps, frames)
        arrays: dict[str, np.ndarray] = {}
        if living_eyes and avatar.eye_regions is not None:
            # The living eyes: the seeded gaze [frames, 2] in iris radii, faded while
            # the lids close on the same blink schedule (models/ditto/gaze.py). Kept out
            # of the track so that its channels stay the keypoints.
            from models.ditto.gaze import eye_openness, plan_gaze

            opened = eye_openness(blink_shapes, len(x_d), MOTION_FPS, seed, fps, frames)
            arrays["gaze"] = plan_gaze(frames, fps, seed, opened)
        return Plan(fps, size[0], size[1], seed, track.astype(np.float32), X_D, arrays)

    def options(self, job: dict[str, int]) -> dict[str, Any]:
        """LMDM's sampling options: the job's (`submit --ditto-steps/--emotion`), else
        FARM_DITTO_STEPS / FARM_DITTO_EMOTION where set, else the checkpoint config's
        defaults, else the sampler's (upstream's)."""
        defaults = self.config.get("default_kwargs", {})
        options: dict[str, Any] = {}
        steps = job.get("steps") or self.steps or defaults.get("sampling_timesteps")
        if steps:
            options["steps"] = int(steps)
        emotion = job.get("emotion", self.emotion if self.emotion >= 0 else defaults.get("emo"))
        if emotion is not None:
            options["emotion"] = emotion  # a label, or per-frame weights [M, 8]
        clip = defaults.get("v_min_max_for_clip")
        if clip is not None:  # rows 0 and 1: the minimum and maximum, as upstream reads them
            options["value_range"] = (np.asarray(clip)[0], np.asarray(clip)[1])
        return options

    def stitch(self, x_s: np.ndarray, x_d: np.ndarray) -> np.ndarray:
        """The stitching network's correction of x_d [T, 21, 3] against x_s, in fp32."""
        from models.ditto.keypoints import stitch

        with torch.inference_mode():
            out = stitch(
                torch.from_numpy(x_s).to(self.device, torch.float32),
                torch.from_numpy(x_d).to(self.device, torch.float32),
                self.nets["stitch"],
            )
        return out.float().cpu().numpy()

    # --- render --------------------------------------------------------------

    def render(
        self, avatar: DittoAvatar, plan: Plan, frames: range, sink: FrameSink
    ) -> RenderStats:
        if frames.step != 1 or frames.start < 0 or frames.stop > plan.frame_count:
            raise ValueError(f"frames {frames} are not a range inside 0..{plan.frame_count}")
        if plan.channels != X_D:
            raise PermanentError("this plan was not made by the ditto renderer")
        started = time.perf_counter()
        track = torch.from_numpy(np.ascontiguousarray(plan.track[frames.start : frames.stop]))
        track = track.to(self.device).reshape(-1, 21, 3)
        draw = self.drawer(avatar, plan.width, plan.height)
        writer = FrameWriter(self._living_eyes(avatar, plan, frames, sink), self.device)
        try:
            for first in range(0, len(frames), self.batch_size):
                writer.put(draw(track[first : first + self.batch_size]))
            writer.close()
        except BaseException:
            writer.abort()
            raise
        return RenderStats(len(frames), time.perf_counter() - started, str(self.device))

    def _living_eyes(
        self, avatar: DittoAvatar, plan: Plan, frames: range, sink: FrameSink
    ) -> FrameSink:
        """The sink, or where the plan has a gaze track and the avatar its eyes, a sink
        that first moves the irises of each frame on the host (models/ditto/gaze.py),
        in the writer thread, so the move overlaps the next batch's render."""
        gaze = plan.arrays.get("gaze")
        if gaze is None or avatar.eye_regions is None:
            return sink
        from models.ditto.gaze import GazeSink, letterbox_matrix, paste_matrix

        if len(gaze) != plan.frame_count:
            raise PermanentError("this plan's gaze track does not cover its frames")
        size = (plan.width, plan.height)
        # The same choice as drawer(): the whole photo, or the crop letterboxed.
        if size == avatar.photo_size and size != (CROP, CROP):
            to_frame = paste_matrix(avatar.m_c2o)
        else:
            to_frame = letterbox_matrix(*size)
        return GazeSink(
            sink,
            avatar.eye_regions,
            avatar.x_s,
            plan.track[frames.start : frames.stop],
            gaze[frames.start : frames.stop],
            to_frame,
        )

    def drawer(self, avatar: DittoAvatar, width: int, height: int) -> Any:
        """Driving keypoints [B, 21, 3] on the device -> uint8 frames [B, h, w, 3]."""
        f_s, x_s = self._source(avatar)
        if (width, height) == avatar.photo_size and (width, height) != (CROP, CROP):
            paste = self._paste(avatar)
            return lambda x_d: paste(self.crops(f_s, x_s, x_d))
        return lambda x_d: _letterbox(self.crops(f_s, x_s, x_d), width, height)

    @torch.inference_mode()
    def crops(self, f_s: torch.Tensor, x_s: torch.Tensor, x_d: torch.Tensor) -> torch.Tensor:
        """The 512 face crops, [B, 3, 512, 512] float in [0, 1] (warp -> decoder).

        On the CPU one frame at a time: oneDNN picks its convolution kernels by batch
        size, so a batched frame could differ in the last bits from the same frame
        rendered alone, and a frame must not depend on the chunk it falls in. On CUDA
        the batch runs as one, in fp16, for speed; on the TensorRT path, through the
        engine (models/ditto/export.py)."""
        if self.backend == "tensorrt" and (engine := self.engine()) is not None:
            return engine(f_s, x_s, x_d)
        if self.device.type == "cpu" and x_d.shape[0] > 1:
            return torch.cat([self.crops(f_s, x_s, x_d[i : i + 1]) for i in range(len(x_d))])
        n = x_d.shape[0]
        with torch.autocast(self.device.type, self.dtype, enabled=self.dtype == torch.float16):
            feature = self.nets["warp"](f_s.expand(n, -1, -1, -1, -1), x_s.expand(n, -1, -1), x_d)
            return self.nets["decoder"](feature).float().clamp(0, 1)

    def engine(self) -> Any:
        """The TensorRT engine of warp + decoder, from the cache or built now (minutes;
        once per machine): one per worker, the avatar is an input. None once that
        failed: TensorRT is an accelerator, not a requirement, so the worker renders on
        PyTorch CUDA for the rest of the process, and says why once."""
        if self._engine is None and self.backend == "tensorrt":
            from models.ditto.export import TensorRTRender

            try:
                self._engine = TensorRTRender.for_renderer(self)
            except Exception as exc:
                log.warning("ditto renderer: TensorRT failed (%s); using PyTorch CUDA", exc)
                self.backend, self.backend_reason = "cuda", f"TensorRT failed: {exc}"
        return self._engine

    def build_engines(
        self, avatars: list[DittoAvatar] | tuple[DittoAvatar, ...] = ()
    ) -> list[Path]:
        """`farm engines build`: the engine built now unless it is cached, and its path.
        `avatars` are not needed (one engine serves them all). PermanentError where this
        worker does not render with TensorRT, with the reason."""
        if self.backend != "tensorrt":
            reason = self.backend_reason
            raise PermanentError(f"TensorRT is not in use for ditto on this worker: {reason}")
        from models.ditto.export import TensorRTRender

        self._engine = TensorRTRender.for_renderer(self)
        return [self._engine.path]

    def _source(self, avatar: DittoAvatar) -> tuple[torch.Tensor, torch.Tensor]:
        key = ("source", str(self.device))
        if key not in avatar.cache:
            f_s = torch.from_numpy(avatar.f_s).to(self.device, torch.float32)[None]
            x_s = torch.from_numpy(avatar.x_s).to(self.device, torch.float32)[None]
            avatar.cache[key] = (f_s, x_s)
        return avatar.cache[key]

    def _paste(self, avatar: DittoAvatar) -> PasteBack:
        key = ("paste", str(self.device))
        if key not in avatar.cache:
            avatar.cache[key] = PasteBack.of(avatar, self.device)
        return avatar.cache[key]


class PasteBack:
    """Crops into the photo on the device: over the crop's footprint in the photo,
    each photo pixel samples the crop at M_o2c (bilinear, as cv2.warpAffine does with
    pixel centres) and blends it in by the feathered mask sampled the same way."""

    def __init__(self, photo: torch.Tensor, grid: torch.Tensor, alpha: torch.Tensor, box: tuple):
        self.photo, self.grid, self.alpha, self.box = photo, grid, alpha, box

    @classmethod
    def of(cls, avatar: DittoAvatar, device: torch.device) -> PasteBack:
        from models.ditto.crop import feather_mask

        h, w = avatar.photo.shape[:2]
        corners = np.array([[0, 0, 1], [CROP, 0, 1], [0, CROP, 1], [CROP, CROP, 1]], np.float64)
        placed = corners @ avatar.m_c2o.T
        x0 = int(max(0, math.floor(placed[:, 0].min())))
        x1 = int(min(w, math.ceil(placed[:, 0].max()) + 1))
        y0 = int(max(0, math.floor(placed[:, 1].min())))
        y1 = int(min(h, math.ceil(placed[:, 1].max()) + 1))
        if x1 <= x0 or y1 <= y0:
            raise PermanentError("the avatar's face crop lies outside its photo; add it again")
        ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float64)
        m_o2c = np.linalg.inv(avatar.m_c2o)
        cx = m_o2c[0, 0] * xs + m_o2c[0, 1] * ys + m_o2c[0, 2]
        cy = m_o2c[1, 0] * xs + m_o2c[1, 1] * ys + m_o2c[1, 2]
        grid = np.stack([(2 * cx + 1) / CROP - 1, (2 * cy + 1) / CROP - 1], -1)[None]
        grid_t = torch.from_numpy(grid.astype(np.float32)).to(device)
        mask = torch.from_numpy(feather_mask(CROP)).to(device)[None, None]
        alpha = F.grid_sample(
            mask, grid_t, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        photo = torch.from_numpy(avatar.photo[: avatar.photo_size[1], : avatar.photo_size[0]])
        return cls(
            photo.to(device), grid_t, alpha[0].permute(1, 2, 0).clamp(0, 1), (y0, y1, x0, x1)
        )

    def __call__(self, crops: torch.Tensor) -> torch.Tensor:
        n = crops.shape[0]
        y0, y1, x0, x1 = self.box
        face = F.grid_sample(
            crops * 255, self.grid.expand(n, -1, -1, -1), mode="bilinear", align_corners=False
        ).permute(0, 2, 3, 1)
        out = self.photo.expand(n, -1, -1, -1).clone()
        y1, x1 = min(y1, out.shape[1]), min(x1, out.shape[2])
        region = out[:, y0:y1, x0:x1].float()
        alpha = self.alpha[: y1 - y0, : x1 - x0]
        blended = face[:, : y1 - y0, : x1 - x0] * alpha + region * (1 - alpha)
        out[:, y0:y1, x0:x1] = blended.round().clamp(0, 255).to(torch.uint8)
        return out


def _letterbox(crops: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """[B, 3, 512, 512] in [0, 1] -> uint8 [B, height, width, 3]: the face scaled to
    the shorter side, centred on black."""
    side = min(width, height)
    if side != CROP:
        crops = F.interpolate(crops, size=(side, side), mode="bilinear", antialias=True)
    frames = (crops * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    if (width, height) == (side, side):
        return frames.contiguous()
    out = frames.new_zeros((frames.shape[0], height, width, 3))
    top, left = (height - side) // 2, (width - side) // 2
    out[:, top : top + side, left : left + side] = frames
    return out


def _to_chw256(face: np.ndarray) -> torch.Tensor:
    """A 512 crop (uint8 HWC) as the extractors take it: [1, 3, 256, 256] in [0, 1],
    resized with area averaging as upstream does."""
    import cv2

    small = cv2.resize(face, (256, 256), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(small.astype(np.float32) / 255.0).permute(2, 0, 1)[None]


def _fit(features: np.ndarray, frames: int) -> np.ndarray:
    """HuBERT features cut or padded (repeating the last) to exactly `frames` rows."""
    if len(features) >= frames:
        return features[:frames]
    pad = np.repeat(features[-1:], frames - len(features), 0)
    return np.concatenate([features, pad], 0)


def _eye_arrays(regions: EyeRegions) -> dict[str, np.ndarray]:
    """The avatar's eye regions as npz entries (`eyes_` + models/eyes.py's names)."""
    return {f"eyes_{k}": v for k, v in regions_to_arrays(regions).items()}
