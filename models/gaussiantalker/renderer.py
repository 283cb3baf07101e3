"""The `gaussiantalker` backend: a user's trained GaussianTalker model on farm's
plan/render split.

Avatar: the model's archive (models/gaussiantalker/archive.py), checked at
registration and unpacked once per machine; the deformation network (farm's module,
loaded strictly from `deformation.pth`, eval mode) and the canonical grid features of
all Gaussians are made once per process.

Plan (sequential, seeded): the audio features of the job's whole audio with the
extractor the model was trained with (FARM_GAUSSIANTALKER_AUDIO_MODEL; never cut to
the validation split's length, as upstream's script does), each frame's window; a
source-frame schedule that walks back and forth through the tracked frames from a
seeded start (pose and torso move on without jumps); blinks from farm's seeded model
instead of the training video's AU45; and a seeded gaze track for the living eyes.

Render, per frame: deformation (audio window, eye, the source frame's camera), by the
avatar's TensorRT engine on a GPU worker with tensorrt (models/gaussiantalker/export.py),
else by PyTorch -> SH colours -> rasterization (gsplat on CUDA, the pure-torch reference
on CPU) over the source frame's torso on the background, at the training video's
resolution (letterboxed to another size), then the irises moved by the gaze track where
the eyes were found (models/eyes.py). Each frame is a function of (avatar, plan, frame
index).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from farm.errors import FarmError, PermanentError
from models.base import FrameSink, Phone, Plan, RenderStats, Speech
from models.engines import backend_choice

log = logging.getLogger(__name__)

CHANNELS = ("source", "eye", "gaze_x", "gaze_y")
BLINK_GAP = (2.4, 4.0)  # seconds between blinks, drawn uniformly
BLINK_SECONDS = 0.24  # one blink, closed at its middle


@dataclass
class GaussianTalkerAvatar:
    archive: bytes  # the model, as registered (archive.py)
    cache: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    def to_bytes(self) -> bytes:
        return self.archive

    @property
    def model(self) -> Any:
        if "model" not in self.cache:
            from models.gaussiantalker.archive import unpack

            self.cache["model"] = unpack(self.archive)
        return self.cache["model"]

    @property
    def photo_size(self) -> tuple[int, int]:
        """The training video's resolution: whole-frame output (`--size photo`)."""
        return self.model.size

    @property
    def face_box(self) -> tuple[int, int, int]:
        """(x0, y0, side) of the head in output pixels (models/base.py): the model's
        Gaussians (the head only; the torso is the training frames') projected by the
        first source frame's camera, their middle 80 % on each axis. The frame's centre
        where nothing projects in front of the camera, or the head's centre falls
        outside the frame."""
        if "face_box" not in self.cache:
            self.cache["face_box"] = _head_box(self.model)
        return self.cache["face_box"]


def _head_box(model: Any) -> tuple[int, int, int]:
    w, h = model.size
    fallback = (w // 2 - min(w, h) // 4, h // 2 - min(w, h) // 4, max(min(w, h) // 2, 1))
    if not model.frames or len(model.gaussians) == 0:
        return fallback
    cam = model.frames[0].camera
    view = model.gaussians.xyz.astype(np.float64) @ cam.R.astype(np.float64) + cam.T
    ahead = view[view[:, 2] > 1e-6]
    if len(ahead) == 0:
        return fallback
    (fx, fy) = model.focal
    u = fx * ahead[:, 0] / ahead[:, 2] + w / 2
    v = fy * ahead[:, 1] / ahead[:, 2] + h / 2
    (u0, u1), (v0, v1) = np.percentile(u, [10, 90]), np.percentile(v, [10, 90])
    side = float(max(u1 - u0, v1 - v0, 1.0))
    cx, cy = (u0 + u1) / 2, (v0 + v1) / 2
    if not (0 <= cx <= w and 0 <= cy <= h):  # a head outside its own frame: untrusted
        return fallback
    return int(round(cx - side / 2)), int(round(cy - side / 2)), int(round(side))


class GaussianTalkerRenderer:
    name = "gaussiantalker"

    def __init__(
        self,
        batch_size: int = 4,
        audio_model: str = "",
        eyes: str = "natural",
        engine_dir: str = "",
    ):
        self.batch_size = batch_size
        self.audio_model = audio_model  # FARM_GAUSSIANTALKER_AUDIO_MODEL
        self.eyes = eyes  # natural | still: the default of jobs that do not say
        self.device = torch.device("cpu")
        self.backend = "cpu"  # "tensorrt" | "cuda" | "cpu", see models/engines.py
        self.backend_reason = "the renderer is not loaded"
        self.engine_dir = Path(engine_dir) if engine_dir else None  # TensorRT engine cache
        self._extractors: dict[int, Any] = {}  # by feature width, loaded on first use

    def load(self, model_dir: Path, device: str = "auto") -> None:
        """Picks the path (TensorRT, PyTorch CUDA or CPU) and says which, once per worker
        process. TensorRT engines are cached under engine_dir (else model_dir/engines)."""
        choice = backend_choice(device)
        self.backend, self.backend_reason = choice.path, choice.reason
        self.device = torch.device(choice.device)
        if self.engine_dir is None:
            self.engine_dir = Path(model_dir) / "engines"
        log.info("gaussiantalker renderer: using %s (%s)", choice.path, choice.reason)

    # --- avatar --------------------------------------------------------------

    def prepare_avatar(self, photo: np.ndarray) -> GaussianTalkerAvatar:
        raise PermanentError(
            "a gaussiantalker avatar is a trained model, not a photo: "
            "farm avatar add NAME --backend gaussiantalker --model DIR"
        )

    def prepare_avatar_from_source(self, data: bytes) -> GaussianTalkerAvatar:
        """Registration: the archive is opened (every file checked again, here, on the
        worker), and the audio extractor the model needs must be configured."""
        avatar = GaussianTalkerAvatar(data)
        self._extractor(avatar.model.audio_dim)  # an unsupported width fails now
        return avatar

    def avatar_from_bytes(self, data: bytes) -> GaussianTalkerAvatar:
        return GaussianTalkerAvatar(data)

    def _extractor(self, width: int) -> Any:
        from models.gaussiantalker.audio import extractor_for

        if width not in self._extractors:
            model_dir = Path(self.audio_model) if self.audio_model else None
            self._extractors[width] = extractor_for(width, model_dir, device=self.device.type)
        return self._extractors[width]

    # --- plan ----------------------------------------------------------------

    def plan(
        self,
        avatar: GaussianTalkerAvatar,
        speech_seconds: float,
        phones: list[Phone],
        fps: int,
        size: tuple[int, int],
        seed: int,
        audio: Speech | None = None,
        options: dict[str, int] | None = None,
    ) -> Plan:
        from models.eyes import gaze_track
        from models.wav import resample

        if audio is None:
            raise PermanentError("the gaussiantalker renderer needs the job's audio to plan")
        model = avatar.model
        frames = math.ceil(speech_seconds * fps)
        extractor = self._extractor(model.audio_dim)
        samples16k = resample(audio.samples.astype(np.float32) / 32768.0, audio.sample_rate, 16000)
        windows = extractor.frame_windows(extractor.features(samples16k), frames, fps)
        rng = np.random.default_rng(seed)
        track = np.zeros((frames, len(CHANNELS)), np.float32)
        track[:, 0] = source_schedule(frames, len(model.frames), rng)
        track[:, 1] = blinks(frames, fps, rng, baseline=_open_eye(model))
        still = (options or {}).get("eyes", 1 if self.eyes == "natural" else 0) == 0
        if not still:
            track[:, 2:4] = gaze_track(frames, fps, seed)
        arrays = {"audio": windows.astype(np.float32)}
        return Plan(fps, size[0], size[1], seed, track, CHANNELS, arrays)

    # --- render --------------------------------------------------------------

    def render(
        self, avatar: GaussianTalkerAvatar, plan: Plan, frames: range, sink: FrameSink
    ) -> RenderStats:
        if frames.step != 1 or frames.start < 0 or frames.stop > plan.frame_count:
            raise ValueError(f"frames {frames} are not a range inside 0..{plan.frame_count}")
        if plan.channels != CHANNELS:
            raise PermanentError("this plan was not made by the gaussiantalker renderer")
        started = time.perf_counter()
        for first in range(frames.start, frames.stop, self.batch_size):
            batch = range(first, min(first + self.batch_size, frames.stop))
            sink.write(np.stack([self.frame(avatar, plan, i) for i in batch]))
        return RenderStats(len(frames), time.perf_counter() - started, str(self.device))

    @torch.inference_mode()
    def frame(self, avatar: GaussianTalkerAvatar, plan: Plan, i: int) -> np.ndarray:
        """Frame i: uint8 [plan.height, plan.width, 3]."""
        from models.eyes import move_irises
        from models.gaussiantalker.deformation import audio_window

        model = avatar.model
        row = plan.track[i]
        source = int(row[0])
        # Only this frame's window goes to the device, not the job's.
        audio = audio_window(torch.from_numpy(plan.arrays["audio"]), i)[None].to(self.device)
        rgb = self._draw(avatar, source, audio, float(row[1]))
        offset = row[2:4]
        if np.any(offset != 0):
            regions = self._eye_regions(avatar, source)
            if regions is not None:
                rgb = move_irises(rgb, regions, offset.astype(np.float32))
        return _letterbox(rgb, model.size, (plan.width, plan.height))

    def _draw(self, avatar: GaussianTalkerAvatar, source: int, audio: torch.Tensor, eye: float):
        """The source frame's head, deformed by audio [1, 8, W, C] and eye, over its
        torso and the background: uint8 [H, W, 3] at the model's resolution."""
        from models.gaussiantalker.raster import Camera, colors_from_sh, rasterize

        net, gs, features = self._network(avatar)
        frame = avatar.model.frames[source]
        cam = frame.camera
        camera12 = torch.from_numpy(np.concatenate([cam.R.reshape(9), cam.T.reshape(3)]))
        eye_t = torch.tensor([[eye]], dtype=torch.float32, device=self.device)
        camera_t = camera12[None].to(self.device, torch.float32)
        engine = self._engine(avatar, net, audio) if self.backend == "tensorrt" else None
        if engine is not None:
            raw = engine(audio, eye_t, camera_t)
        else:
            raw = net(
                gs["xyz"],
                gs["scale"],
                gs["rotation"],
                gs["opacity"],
                gs["sh"],
                audio,
                eye_t,
                camera_t,
                features,
            )
        out = raw.activated()
        w, h = avatar.model.size
        camera = Camera.from_fov(cam.R, cam.T, cam.fovx, cam.fovy, w, h)
        means = out.xyz[0]
        colors = colors_from_sh(means, out.shs[0], camera)
        image, _ = rasterize(
            means,
            out.rotations[0],  # (w, x, y, z), as 3DGS stores them and the rasterizer takes
            out.scales[0],
            out.opacity[0].reshape(-1),
            colors,
            camera,
            self._backdrop(avatar, source),
            device=self.device,
        )
        return (image.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()

    def _network(self, avatar: GaussianTalkerAvatar) -> tuple[Any, dict[str, torch.Tensor], Any]:
        key = ("network", str(self.device))
        if key not in avatar.cache:
            from models.gaussiantalker.deformation import Deformation

            model = avatar.model
            sd = torch.load(model.deformation_path, map_location="cpu", weights_only=True)
            sd = sd.get("state_dict", sd.get("model", sd)) if isinstance(sd, dict) else sd
            n_head = int(model.cfg.get("n_head", 2))
            net = Deformation.from_state_dict(sd, n_head=n_head).to(self.device)
            g = model.gaussians
            gs = {
                "xyz": torch.from_numpy(g.xyz),
                "scale": torch.from_numpy(g.scale),
                "rotation": torch.from_numpy(g.rotation),
                "opacity": torch.from_numpy(g.opacity).reshape(-1, 1),
                "sh": torch.from_numpy(g.sh()),
            }
            gs = {k: v.to(self.device, torch.float32) for k, v in gs.items()}
            avatar.cache[key] = (net, gs, net.canonical_features(gs["xyz"]))
        return avatar.cache[key]

    # --- TensorRT ------------------------------------------------------------

    def _engine(self, avatar: GaussianTalkerAvatar, net: Any, audio: torch.Tensor) -> Any:
        """The avatar's deformation engine for audio windows shaped like `audio`, built
        or found once per process; None (PyTorch CUDA) where it failed to."""
        net.check_audio(audio)  # a wrong width is the job's error, not TensorRT's
        rows, width = int(audio.shape[2]), int(audio.shape[3])
        key = self._engine_key(rows, width)
        if key not in avatar.cache:
            try:
                avatar.cache[key] = self._build_engine(avatar, rows)
            except Exception as exc:
                # TensorRT is an accelerator, not a requirement: an engine that does not
                # build or load must not fail every job of this avatar on the worker.
                log.warning(
                    "gaussiantalker renderer: TensorRT failed (%s); using PyTorch CUDA", exc
                )
                avatar.cache[key] = None
        return avatar.cache[key]

    def _engine_key(self, rows: int, width: int) -> tuple[Any, ...]:
        return ("tensorrt", rows, width, str(self.device), self.batch_size)

    def _build_engine(self, avatar: GaussianTalkerAvatar, rows: int) -> Any:
        from models.gaussiantalker.export import TensorRTDeformation

        net, gs, features = self._network(avatar)
        engine = TensorRTDeformation.for_network(
            net,
            gs,
            features,
            deformation_path=avatar.model.deformation_path,
            rows=rows,
            batch=self.batch_size,
            cache=self.engine_dir or Path("engines"),
        )
        from models.engines import note_owner

        note_owner(engine.path, avatar.cache.get("owner"))  # workers/avatars.py
        return engine

    def build_engines(self, avatars: Iterable[GaussianTalkerAvatar]) -> list[Path]:
        """Builds (or finds in the cache) the TensorRT engine of each loaded avatar, for
        the audio windows its extractor makes, ahead of its first render; their paths.
        PermanentError (one line) when this worker does not use TensorRT, or when a build
        fails (no fallback here: the caller asked for the engine)."""
        from models.gaussiantalker.export import window_rows

        if self.backend != "tensorrt":
            raise PermanentError(
                f"TensorRT is not in use for gaussiantalker on this worker: {self.backend_reason}"
            )
        paths = []
        for avatar in avatars:
            width = avatar.model.audio_dim
            rows = window_rows(width)
            try:
                engine = self._build_engine(avatar, rows)
            except FarmError:
                raise
            except Exception as exc:
                raise PermanentError(f"the gaussiantalker TensorRT engine failed: {exc}") from exc
            avatar.cache[self._engine_key(rows, width)] = engine
            paths.append(engine.path)
        return paths

    def _backdrop(self, avatar: GaussianTalkerAvatar, source: int) -> torch.Tensor:
        """The source frame's torso over the background, float [H, W, 3] in [0, 1]."""
        from PIL import Image

        key = ("backdrop", source, str(self.device))
        if key not in avatar.cache:
            model = avatar.model
            size = model.size
            bg = np.asarray(Image.open(model.background_path).convert("RGB").resize(size))
            torso = np.asarray(Image.open(model.frames[source].torso_path).convert("RGBA"))
            alpha = torso[..., 3:4].astype(np.float32) / 255
            mix = torso[..., :3].astype(np.float32) * alpha + bg.astype(np.float32) * (1 - alpha)
            avatar.cache[key] = torch.from_numpy(mix / 255).to(self.device, torch.float32)
        return avatar.cache[key]

    def _eye_regions(self, avatar: GaussianTalkerAvatar, source: int) -> Any:
        """The eyes of the source frame's canonical render (silent audio, eyes open),
        found once per process; None where the face mesh finds no face."""
        from models.eyes import detect_eye_regions

        key = ("eyes", source)
        if key not in avatar.cache:
            width = avatar.model.audio_dim
            rows = self._extractor(width).window  # 16 for wav2vec2 logits, 2 for HuBERT
            silent = torch.zeros((1, 8, rows, width), device=self.device)
            canonical = self._draw(avatar, source, silent, 0.0)
            avatar.cache[key] = detect_eye_regions(canonical)
            if avatar.cache[key] is None:
                log.info("gaussiantalker: no eyes found in source frame %d; gaze off there", source)
        return avatar.cache[key]


def source_schedule(frames: int, sources: int, rng: np.random.Generator) -> np.ndarray:
    """Per output frame, the tracked frame whose pose and torso it borrows: a walk back
    and forth through 0..sources-1 from a seeded start, one step per frame."""
    if sources <= 1:
        return np.zeros(frames, np.float32)
    period = 2 * (sources - 1)
    steps = (np.arange(frames) + int(rng.integers(period))) % period
    return np.where(steps < sources, steps, period - steps).astype(np.float32)


def blinks(frames: int, fps: int, rng: np.random.Generator, baseline: float) -> np.ndarray:
    """The eye input per frame (0 open .. 1 closed): the model's open-eye level with a
    blink every 2.4-4 s (seeded), each a raised-cosine closure of BLINK_SECONDS."""
    eye = np.full(frames, baseline, np.float32)
    length = max(3, round(BLINK_SECONDS * fps))
    shape = 0.5 - 0.5 * np.cos(2 * np.pi * (np.arange(length) + 0.5) / length)
    at = round(rng.uniform(*BLINK_GAP) * fps)
    while at < frames:
        stop = min(at + length, frames)
        eye[at:stop] = np.maximum(eye[at:stop], baseline + (1 - baseline) * shape[: stop - at])
        at += length + round(rng.uniform(*BLINK_GAP) * fps)
    return eye


def _open_eye(model: Any) -> float:
    """The training video's typical eye input between blinks (its lower quartile)."""
    values = np.array([f.eye for f in model.frames], np.float32)
    return float(np.percentile(values, 25)) if len(values) else 0.0


def _letterbox(rgb: np.ndarray, size: tuple[int, int], target: tuple[int, int]) -> np.ndarray:
    """The model's frame [H, W, 3] fitted into target (width, height) on black."""
    if tuple(size) == tuple(target):
        return rgb
    tw, th = target
    w, h = size
    k = min(tw / w, th / h)
    nw, nh = max(1, round(w * k)), max(1, round(h * k))
    t = torch.from_numpy(rgb).permute(2, 0, 1)[None].float()
    scaled = F.interpolate(t, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    out = np.zeros((th, tw, 3), np.uint8)
    top, left = (th - nh) // 2, (tw - nw) // 2
    out[top : top + nh, left : left + nw] = scaled[0].permute(1, 2, 0).round().clamp(0, 255).byte()
    return out
