"""Jobs on the control plane: submit, cancel, the fan-in steps, mux and publish.

These functions never import torch; the stages that need models live in
models/stages.py. Celery tasks in workers/tasks.py are thin wrappers over both.
"""

from __future__ import annotations

import math
import re
import secrets
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session

from farm import encoders, queries, states, webhooks
from farm.context import Context
from farm.db import Job
from farm.errors import Cancelled, InvalidInput, PermanentError, RetryableError
from farm.media import EncodeFailed, VideoFormat, count_frames, join_and_encode
from farm.script import split_script
from farm.store import chunk_key, job_key

VOICES: tuple[str, ...] = ("joe", "espeak")
BUILTIN_AVATARS: tuple[str, ...] = ("demo",)
_AVATAR_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
LEAD_IN_SECONDS = 0.3  # silence before the first word, so the mouth starts closed
TAIL_SECONDS = 0.5
# Audio jobs get the same lead-in and tail (the plan adds them to every job's timeline),
# so the video of an audio job is the input plus LEAD_IN_SECONDS + TAIL_SECONDS.
INPUT_AUDIO = "input.wav"  # jobs/{id}/input.wav: an audio job's normalised input


def check_avatar_name(name: str) -> str:
    if not _AVATAR_NAME.fullmatch(name):
        raise InvalidInput(
            f"invalid avatar name {name[:80]!r}: use 1-64 letters, digits, '-' or '_'"
        )
    return name


PHOTO_SIZE = (0, 0)  # "the avatar's whole photo": resolved when the job is planned


def parse_size(text: str) -> tuple[int, int]:
    """'512', '640x360' or 'photo' to (width, height); H.264 4:2:0 needs even sides."""
    if text.strip().lower() == "photo":
        return PHOTO_SIZE
    m = re.fullmatch(r"(\d{1,4})(?:x(\d{1,4}))?", text.strip())
    if not m:
        raise InvalidInput(
            f"invalid size {text!r}: use N, WxH or photo, for example 512 or 1280x720"
        )
    w = int(m.group(1))
    h = int(m.group(2) or w)
    if not (64 <= w <= 1920 and 64 <= h <= 1920) or w % 2 or h % 2:
        raise InvalidInput(f"invalid size {text!r}: sides must be even and within 64..1920")
    return w, h


@dataclass(frozen=True)
class JobRequest:
    script: str
    avatar: str
    voice: str
    fps: int
    size: tuple[int, int]
    chunk_frames: int
    seed: int | None = None
    priority: int = 5
    renderer: str | None = None  # None: the configured default
    webhook: str | None = None  # None: the avatar's webhook, else FARM_WEBHOOK_URL
    # An audio-only job: the normalised input (farm.audio.to_wav), spoken instead of
    # `script` (then empty); motion comes from speech recognition on it.
    audio_wav: bytes | None = None


def validate(ctx: Context, req: JobRequest) -> None:
    check_avatar_name(req.avatar)
    if req.voice not in VOICES:
        raise InvalidInput(f"unknown voice {req.voice!r}; choose one of {', '.join(VOICES)}")
    if not 1 <= req.fps <= 60:
        raise InvalidInput(f"fps must be within 1..60, got {req.fps}")
    if not 1 <= req.chunk_frames <= 10_000:
        raise InvalidInput(f"chunk frames must be within 1..10000, got {req.chunk_frames}")
    if req.avatar not in BUILTIN_AVATARS:
        with ctx.session() as s:
            if queries.get_avatar(s, req.avatar) is None:
                raise InvalidInput(
                    f"unknown avatar {req.avatar!r}; add it with 'farm avatar add' "
                    f"(built in: {', '.join(BUILTIN_AVATARS)})"
                )
    webhooks.job_webhook(ctx, req.webhook, req.avatar)  # refused targets: before any row


def create(ctx: Context, req: JobRequest) -> str:
    """Validate and record a job; the caller enqueues it (and deletes it if that fails)."""
    validate(ctx, req)
    webhook_url = webhooks.job_webhook(ctx, req.webhook, req.avatar)
    job_id = uuid.uuid4().hex
    audio_key = None
    if req.audio_wav is not None:
        audio_key = job_key(job_id, INPUT_AUDIO)
        ctx.store.put_bytes(audio_key, req.audio_wav)
    with ctx.session() as s:
        queries.insert_job(
            s,
            id=job_id,
            avatar=req.avatar,
            renderer=req.renderer or ctx.settings.renderer,
            voice=req.voice,
            script=req.script,
            fps=req.fps,
            width=req.size[0],
            height=req.size[1],
            chunk_frames=req.chunk_frames,
            seed=req.seed if req.seed is not None else secrets.randbelow(2**31),
            priority=req.priority,
            webhook_url=webhook_url,
            audio_key=audio_key,
        )
    return job_id


def submit(ctx: Context, req: JobRequest, enqueue: Callable[[str, str], object]) -> str:
    """Record a job and queue its first stage with `enqueue(task name, job id)`. A job
    the broker refused is removed again: it was never accepted."""
    job_id = create(ctx, req)
    try:
        enqueue("farm.prepare", job_id)
    except Exception as exc:
        forget(ctx, job_id)
        raise RetryableError(f"could not queue the job: {exc}") from exc
    return job_id


def forget(ctx: Context, job_id: str) -> None:
    """Remove a job that was never accepted (it could not be enqueued)."""
    with ctx.session() as s:
        job = queries.get_job(s, job_id)
        audio_key = job.audio_key
        s.delete(job)
    if audio_key:
        ctx.store.delete_prefix(audio_key)


# --- stages -----------------------------------------------------------------


def prepare(ctx: Context, job_id: str) -> int:
    """Split the script into segment rows. Returns how many segments to speak
    (0 when a redelivered task finds the job already past this stage)."""
    with ctx.session() as s:
        job = queries.get_job(s, job_id)
        if job.state == states.QUEUED:
            queries.transition(s, job_id, states.PREPARING)
        elif job.state != states.PREPARING:
            return 0
        if job.audio_key:
            # One segment, spoken by the audio itself: the tts stage runs speech
            # recognition on it instead of synthesis (models.stages.speak).
            parts = [("", 0)]
        else:
            parts = split_script(
                job.script, ctx.settings.max_segment_chars, ctx.settings.segment_pause_ms
            )
        job.segments_total = queries.insert_segments(s, job_id, parts)
        queries.transition(s, job_id, states.SPEAKING)
        return job.segments_total


def segment_finished(ctx: Context, job_id: str, idx: int, seconds: float) -> bool:
    """Record a spoken segment. True for exactly one caller: the one that saw the last."""
    return _fan_in(
        ctx,
        job_id,
        lambda s: queries.finish_segment(s, job_id, idx, seconds),
        queries.count_done_segments,
        "segments_total",
        states.PLANNING,
    )


def chunk_finished(ctx: Context, job_id: str, idx: int, render_seconds: float) -> bool:
    """Record a rendered chunk. True for exactly one caller: the one that saw the last."""
    return _fan_in(
        ctx,
        job_id,
        lambda s: queries.finish_chunk(s, job_id, idx, render_seconds),
        queries.count_done_chunks,
        "chunks_total",
        states.MUXING,
    )


def _fan_in(
    ctx: Context,
    job_id: str,
    mark: Callable[[Session], object],
    count_done: Callable[[Session, str], int],
    total: str,
    target: str,
) -> bool:
    """Mark one member done and commit, then count in a new transaction: of N concurrent
    finishers the last to commit sees all N, and the guarded transition lets one win."""
    with ctx.session() as s:
        mark(s)
    with ctx.session() as s:
        job = queries.get_job(s, job_id)
        if count_done(s, job_id) < getattr(job, total):
            return False
        return queries.transition(s, job_id, target)


def chunk_ranges(frame_count: int, chunk_frames: int) -> list[tuple[int, int]]:
    n = math.ceil(frame_count / chunk_frames)
    return [(i * chunk_frames, min((i + 1) * chunk_frames, frame_count)) for i in range(n)]


def fail(ctx: Context, job_id: str, error: str) -> bool:
    """Fail the job; True if this call failed it. Only that call records the
    job.failed webhook, in the same transaction, so duplicate failures send none."""
    with ctx.session() as s:
        moved = queries.transition(s, job_id, states.FAILED, error=error[:2000])
        event = webhooks.record_job_event(s, ctx, job_id) if moved else None
    webhooks.dispatch(ctx, event)
    return moved


def cancel(ctx: Context, job_id_or_prefix: str) -> Job:
    """Mark a job cancelled (running tasks see the flag between frame batches) and
    remove its partial artifacts. InvalidInput if it had already ended."""
    with ctx.session() as s:
        job = queries.find_job_by_prefix(s, job_id_or_prefix)
        if not queries.transition(s, job.id, states.CANCELLED):
            raise InvalidInput(f"job {job.id} is already {job.state}")
    _remove_artifacts(ctx, job.id, job.target_key)
    return job


def clean_if_cancelled(ctx: Context, job_id: str, *written: str) -> bool:
    """For a stage that has just written to the store: if the job was cancelled
    meanwhile, remove its artifacts again and return True (the stage stops).

    Cancel commits the state before it deletes, and a stage asks after it writes, so
    one of the two always sees the other's work: nothing written survives a cancel."""
    with ctx.session() as s:
        if queries.job_state(s, job_id) != states.CANCELLED:
            return False
    _remove_artifacts(ctx, job_id, *written)
    return True


def _remove_artifacts(ctx: Context, job_id: str, *outside: str | None) -> None:
    """Everything under jobs/{id}/, and keys outside it (a batch row's output key)."""
    ctx.store.delete_prefix(job_key(job_id))
    for key in outside:
        if key:
            ctx.store.delete_prefix(key)


def retry(ctx: Context, job_id_or_prefix: str) -> tuple[Job, str, list[tuple[int, ...]]]:
    """Reopen a failed job at the stage it failed in, keeping everything it finished:
    returns (job, stage, unfinished members) for the caller to queue."""
    with ctx.session() as s:
        job = queries.find_job_by_prefix(s, job_id_or_prefix)
        if job.state != states.FAILED:
            raise InvalidInput(f"job {job.id} is {job.state}; only failed jobs can be retried")
        chunks = queries.get_chunks(s, job.id)
        segments = queries.get_segments(s, job.id)
        if chunks and any(c.state != "done" for c in chunks):
            target, stage = states.RENDERING, "render"
            items = [(c.idx, c.start_frame, c.stop_frame) for c in chunks if c.state != "done"]
            queries.reset_failed_chunks(s, job.id)
        elif chunks:
            target, stage, items = states.MUXING, "mux", []
        elif segments and all(seg.state == "done" for seg in segments):
            target, stage, items = states.PLANNING, "plan", []
        elif segments:
            target, stage = states.SPEAKING, "tts"
            items = [(seg.idx,) for seg in segments if seg.state != "done"]
        else:
            target, stage, items = states.QUEUED, "prepare", []
        if not queries.reopen_job(s, job.id, target):
            raise InvalidInput(f"job {job.id} changed while it was being retried")
    return job, stage, items


def is_active(ctx: Context, job_id: str) -> bool:
    with ctx.session() as s:
        return queries.job_state(s, job_id) in states.ACTIVE


def mux(ctx: Context, job_id: str) -> None:
    """Decode the chunks in order and encode the video once with the audio (no seams
    at chunk joins: farm/media.py), check the frame count against the plan, store."""
    started = time.perf_counter()
    with ctx.session() as s:
        job = queries.get_job(s, job_id)
        if job.state != states.MUXING:
            return
        expected, n_chunks = job.frame_count, job.chunks_total
        setting = ctx.settings.video_encoder
        fmt = VideoFormat.delivery(job.width, job.height, job.fps, encoders.codec_for(setting))
        final = job.target_key or job_key(job_id, "final.mp4")
    with tempfile.TemporaryDirectory(prefix="farm-mux-") as tmp:
        work = Path(tmp)
        parts = [
            ctx.store.get_file(chunk_key(job_id, i), work / f"{i:05d}.mp4") for i in range(n_chunks)
        ]
        audio = ctx.store.get_file(job_key(job_id, "audio.wav"), work / "audio.wav")
        out = work / "final.mp4"
        try:
            join_and_encode(parts, audio, out, fmt)
        except EncodeFailed as exc:
            raise encoders.died(setting, fmt.codec, str(exc)) from exc
        frames = count_frames(out)
        if frames != expected:
            raise PermanentError(f"the joined video has {frames} frames, the plan {expected}")
        ctx.store.put_file(final, out)
    if clean_if_cancelled(ctx, job_id, final):
        raise Cancelled(f"job {job_id} was cancelled")
    with ctx.session() as s:
        queries.record_timing(s, job_id, "mux", time.perf_counter() - started)
        queries.transition(s, job_id, states.PUBLISHING)


def final_key(ctx: Context, job_id: str) -> str:
    """Where the video is published: a batch row's output key, else jobs/{id}/final.mp4."""
    with ctx.session() as s:
        return queries.job_target_key(s, job_id) or job_key(job_id, "final.mp4")


def publish(ctx: Context, job_id: str) -> bool:
    """Record where the video is; the job is done. True if this call finished it."""
    key = final_key(ctx, job_id)
    if not ctx.store.exists(key):
        raise PermanentError(f"the final video {key} is missing from the store")
    with ctx.session() as s:
        job = queries.get_job(s, job_id)
        total = time.time() - job.created_at.timestamp()
        done = queries.transition(s, job_id, states.SUCCEEDED, output_key=key)
        event = None
        if done:
            queries.record_timing(s, job_id, "total", total)
            # job.succeeded: recorded with the transition, queued after the commit
            event = webhooks.record_job_event(s, ctx, job_id)
    webhooks.dispatch(ctx, event)
    return done
