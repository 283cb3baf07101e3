"""The stages that need models: speak a segment, plan a job, render a chunk, register
an avatar. Plain functions over a Context; the Celery tasks only call them."""

from __future__ import annotations

import io
import json
import logging
import math
import tempfile
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
from sqlalchemy.exc import IntegrityError

from farm import encoders, jobs, queries, states
from farm.avatars import photo_rgb
from farm.context import Context
from farm.errors import Cancelled, InvalidInput, NotFound
from farm.media import EncodeFailed, FrameEncoder, VideoFormat
from farm.script import check_frames
from farm.store import avatar_key, chunk_key, job_key
from models import tts
from models.base import AvatarArtifact, Phone, Plan, Renderer, Speech
from models.registry import get_renderer

log = logging.getLogger("farm.render")


def renderer_for(ctx: Context, name: str | None = None) -> Renderer:
    s = ctx.settings
    return get_renderer(name or s.renderer, s.model_dir, s.device, s.render_batch, s.render_threads)


# --- tts --------------------------------------------------------------------


def speak(ctx: Context, job_id: str, idx: int) -> float:
    """Synthesise one segment to the store (WAV + phone timings); returns its seconds."""
    with ctx.session() as s:
        job = queries.get_job(s, job_id)
        seg = queries.get_segment(s, job_id, idx)
        text, voice, audio_key = seg.text, job.voice, job.audio_key
    if audio_key:
        speech = _recognise(ctx, job_id, audio_key)
    else:
        speech = tts.synthesize(text, voice)
    wav = io.BytesIO()
    tts.write_wav(speech, wav)
    ctx.store.put_bytes(job_key(job_id, "audio", f"{idx:04d}.wav"), wav.getvalue())
    ctx.store.put_bytes(
        job_key(job_id, "audio", f"{idx:04d}.json"),
        json.dumps(tts.phones_to_json(speech.phones)).encode(),
    )
    if jobs.clean_if_cancelled(ctx, job_id):
        raise Cancelled(f"job {job_id} was cancelled")
    return speech.seconds


def _recognise(ctx: Context, job_id: str, audio_key: str) -> Speech:
    """An audio job's one segment: its input, with phones from speech recognition
    (models/asr.py); the transcript goes on the job for `farm status`."""
    from models import asr

    samples, rate = tts.read_wav(io.BytesIO(ctx.store.get_bytes(audio_key)))
    speech, transcript = asr.speech_from_audio(samples, rate)
    with ctx.session() as s:
        queries.set_transcript(s, job_id, transcript)
    return speech


# --- plan -------------------------------------------------------------------


def assemble_audio(
    parts: list[tuple[np.ndarray, int, list[Phone], int]], lead_in: float, tail: float
) -> tuple[np.ndarray, int, list[Phone]]:
    """Concatenate segments (samples, rate, phones, pause_after_ms) on one timeline."""
    rate = parts[0][1]
    pieces = [np.zeros(int(lead_in * rate), np.int16)]
    phones: list[Phone] = []
    offset = lead_in
    for samples, seg_rate, seg_phones, pause_ms in parts:
        if seg_rate != rate:
            raise InvalidInput(f"segments disagree on sample rate ({seg_rate} vs {rate})")
        phones.extend(
            Phone(p.symbol, p.start + offset, p.end + offset, p.stress) for p in seg_phones
        )
        silence = np.zeros(int(pause_ms * rate / 1000), np.int16)
        pieces += [samples.astype(np.int16), silence]
        offset += (len(samples) + len(silence)) / rate
    pieces.append(np.zeros(int(tail * rate), np.int16))
    return np.concatenate(pieces), rate, phones


def plan(ctx: Context, job_id: str) -> list[tuple[int, int]]:
    """The whole job's audio timeline and motion, cut into render chunks."""
    started = time.perf_counter()
    with ctx.session() as s:
        job = queries.get_job(s, job_id)
        if job.state != states.PLANNING:
            return []
        segments = [(seg.idx, seg.pause_after_ms) for seg in queries.get_segments(s, job_id)]
        avatar_name, renderer_name = job.avatar, job.renderer
        fps, size, seed, chunk_frames = job.fps, (job.width, job.height), job.seed, job.chunk_frames
    parts = []
    for idx, pause_ms in segments:
        samples, rate = tts.read_wav(
            io.BytesIO(ctx.store.get_bytes(job_key(job_id, "audio", f"{idx:04d}.wav")))
        )
        phones = tts.phones_from_json(
            json.loads(ctx.store.get_bytes(job_key(job_id, "audio", f"{idx:04d}.json")))
        )
        parts.append((samples, rate, phones, pause_ms))
    samples, rate, phones = assemble_audio(parts, jobs.LEAD_IN_SECONDS, jobs.TAIL_SECONDS)
    seconds = len(samples) / rate
    # Submission checked an estimate; the spoken length is exact. InvalidInput is a
    # PermanentError: the job fails at once, with this reason.
    check_frames(seconds, fps, ctx.settings.max_job_frames, "the speech", estimate=False)
    wav = io.BytesIO()
    tts.write_wav(tts.Speech(samples=samples, sample_rate=rate, phones=phones), wav)
    ctx.store.put_bytes(job_key(job_id, "audio.wav"), wav.getvalue())

    renderer = renderer_for(ctx, renderer_name)
    avatar = load_avatar(ctx, avatar_name, renderer_name)
    if size == jobs.PHOTO_SIZE:
        size = getattr(avatar, "photo_size", None)
        if size is None:
            raise InvalidInput(f"the {renderer_name} renderer has no whole-photo output")
    motion = renderer.plan(avatar, seconds, phones, fps, size, seed)
    if motion.frame_count != math.ceil(seconds * fps):
        raise InvalidInput(f"plan has {motion.frame_count} frames for {seconds:.3f} s")
    ctx.store.put_bytes(job_key(job_id, "plan.npz"), motion.to_bytes())
    ranges = jobs.chunk_ranges(motion.frame_count, chunk_frames)
    with ctx.session() as s:
        # The guarded transition first: a job cancelled (or planned by a duplicate
        # delivery) meanwhile gets no chunk rows.
        moved = queries.transition(s, job_id, states.RENDERING)
        if moved:
            job = queries.get_job(s, job_id)
            job.audio_seconds = seconds
            job.frame_count = motion.frame_count
            job.width, job.height = motion.width, motion.height
            job.chunks_total = queries.insert_chunks(s, job_id, ranges)
            queries.record_timing(s, job_id, "plan", time.perf_counter() - started)
    if not moved:
        jobs.clean_if_cancelled(ctx, job_id)  # the audio and plan just written
        return []
    return ranges


# --- render -----------------------------------------------------------------


@lru_cache(maxsize=4)
def _cached_plan(ctx: Context, job_id: str) -> Plan:
    return Plan.from_bytes(ctx.store.get_bytes(job_key(job_id, "plan.npz")))


class _CheckedSink:
    """Hands batches to the encoder; between batches, stops if the job was cancelled."""

    def __init__(self, ctx: Context, job_id: str, encoder: FrameEncoder) -> None:
        self.ctx, self.job_id, self.encoder = ctx, job_id, encoder

    def write(self, frames: np.ndarray) -> None:
        if not jobs.is_active(self.ctx, self.job_id):
            raise Cancelled(f"job {self.job_id} is no longer active")
        self.encoder.write(frames)


def render(ctx: Context, job_id: str, idx: int, worker: str) -> bool:
    """Render one chunk to the store. True when this call finished the job's last chunk."""
    with ctx.session() as s:
        job = queries.get_job(s, job_id)
        if job.state != states.RENDERING:
            return False
        avatar_name, renderer_name = job.avatar, job.renderer
        chunk = queries.get_chunk(s, job_id, idx)
        frames = range(chunk.start_frame, chunk.stop_frame)
        done = chunk.state == "done"
        seconds = chunk.render_seconds or 0.0
        if not done:
            queries.start_chunk(s, job_id, idx, worker)
    if not done:
        try:
            seconds = _render_frames(ctx, job_id, idx, frames, avatar_name, renderer_name)
        except Cancelled:
            with ctx.session() as s:
                queries.stop_chunk(s, job_id, idx)
            raise
    # Counted even for a redelivered chunk that was already done: the first attempt
    # may have died between finishing and moving the job on.
    return jobs.chunk_finished(ctx, job_id, idx, seconds)


def _render_frames(
    ctx: Context, job_id: str, idx: int, frames: range, avatar_name: str, renderer_name: str
) -> float:
    """Render and encode one chunk, then upload it. Returns the seconds spent rendering
    and encoding only: the rest (dispatch, state, store) is the farm's overhead, which
    `farm bench --workers` measures as the difference."""
    motion = _cached_plan(ctx, job_id)
    renderer = renderer_for(ctx, renderer_name)
    avatar = load_avatar(ctx, avatar_name, renderer_name)
    setting = ctx.settings.video_encoder
    fmt = VideoFormat.chunk(motion.width, motion.height, motion.fps, encoders.codec_for(setting))
    with tempfile.TemporaryDirectory(prefix="farm-chunk-") as tmp:
        out = Path(tmp) / f"{idx:05d}.mp4"
        started = time.perf_counter()
        encoder = FrameEncoder(out, fmt, len(frames))
        try:
            renderer.render(avatar, motion, frames, _CheckedSink(ctx, job_id, encoder))
            encoder.close()
        except EncodeFailed as exc:
            encoder.abort()
            raise encoders.died(setting, fmt.codec, str(exc)) from exc
        except BaseException:
            encoder.abort()
            raise
        seconds = time.perf_counter() - started
        ctx.store.put_file(chunk_key(job_id, idx), out)
    if jobs.clean_if_cancelled(ctx, job_id):  # cancelled while this chunk was uploading
        raise Cancelled(f"job {job_id} was cancelled")
    return seconds


# --- avatars ----------------------------------------------------------------


@lru_cache(maxsize=8)
def _avatar_from_store(ctx: Context, renderer_name: str, key: str) -> AvatarArtifact:
    return renderer_for(ctx, renderer_name).avatar_from_bytes(ctx.store.get_bytes(key))


def load_avatar(ctx: Context, name: str, renderer_name: str) -> AvatarArtifact:
    """An LRU of warm avatars per worker process; built-in avatars register on first use."""
    with ctx.session() as s:
        row = queries.get_avatar(s, name)
        key, registered_for, source = (
            (row.artifact_key, row.renderer, row.source_key) if row else (None, None, None)
        )
    if key is None:
        if name not in jobs.BUILTIN_AVATARS:
            raise NotFound(f"unknown avatar {name!r}")
        key, registered_for = register_avatar(ctx, name, None, renderer_name)
    if registered_for != renderer_name and source is not None:
        # A job on another backend than the avatar was registered for: prepare the
        # same photo for that backend, kept warm in this process only.
        return _avatar_from_photo(ctx, renderer_name, source)
    return _avatar_from_store(ctx, renderer_name, key)


@lru_cache(maxsize=4)
def _avatar_from_photo(ctx: Context, renderer_name: str, source_key: str) -> AvatarArtifact:
    return renderer_for(ctx, renderer_name).prepare_avatar(_read_photo(ctx, source_key))


def _read_photo(ctx: Context, source_key: str) -> np.ndarray:
    data = ctx.store.get_bytes(source_key)
    # The limit `farm avatar add` checked, not Pillow's own (which could be lower).
    return photo_rgb(data, ctx.settings.max_photo_pixels)


def register_avatar(
    ctx: Context, name: str, source_key: str | None, renderer_name: str | None = None
) -> tuple[str, str]:
    """Landmarks and caches for a photo in the store (None: the built-in demo photo).
    Returns (artifact key, renderer name)."""
    from PIL import Image

    jobs.check_avatar_name(name)
    renderer_name = renderer_name or ctx.settings.renderer
    renderer = renderer_for(ctx, renderer_name)
    if source_key is None:
        from models.portrait import demo_photo

        photo = demo_photo()
        source_key = avatar_key(name, "source.png")
        buf = io.BytesIO()
        Image.fromarray(photo).save(buf, format="PNG")
        ctx.store.put_bytes(source_key, buf.getvalue())
    else:
        photo = _read_photo(ctx, source_key)
    artifact = renderer.prepare_avatar(photo)
    key = avatar_key(name, f"{renderer_name}-{int(time.time() * 1000)}.npz")
    ctx.store.put_bytes(key, artifact.to_bytes())
    try:
        with ctx.session() as s:
            queries.upsert_avatar(
                s,
                name=name,
                renderer=renderer_name,
                artifact_key=key,
                source_key=source_key,
                width=photo.shape[1],
                height=photo.shape[0],
            )
    except IntegrityError:
        # Two workers registered the same built-in avatar at once: keep the first.
        with ctx.session() as s:
            row = queries.get_avatar(s, name)
            assert row is not None
            return row.artifact_key, row.renderer
    return key, renderer_name
