"""What runs on a worker: the stages of a job, in pipeline order (farm/pipeline.py).

prepare -> tts x S -> plan -> render x N -> mux -> publish. Each stage is a plain
function over a Context and its message's arguments: it does the stage's work, then
queues the next stage with ctx.dispatch on the lane the message came on (`bulk`). The
Celery tasks in workers/tasks.py only call these; tests/pipeline.py runs them in
process. Every stage is a guarded transition, so a redelivered message does nothing
twice.

Fan-in (the last segment moves the job to planning, the last chunk to muxing) is
counted in the database, here and only here (`_fan_in`), not with a chord, so a
failed or redelivered member cannot wedge the job.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from farm import (
    batches,
    captions,
    encoders,
    extras,
    jobs,
    markup,
    output,
    pipeline,
    queries,
    retention,
    states,
    webhooks,
)
from farm.context import Context
from farm.errors import Cancelled, InvalidInput, PermanentError
from farm.media import (
    EncodeFailed,
    FrameEncoder,
    VideoFormat,
    caption_ems,
    caption_font,
    count_frames,
    join_and_encode,
    make_poster,
    make_preview,
)
from farm.script import check_frames, split_script
from farm.stores import chunk_key, job_key
from models import tts
from models.base import Plan, Speech
from models.timeline import assemble_audio
from models.wav import read_wav, write_wav
from workers import compose
from workers.avatars import load_avatar, renderer_for
from workers.voices import voice_for

log = logging.getLogger("farm.render")


# --- prepare ----------------------------------------------------------------


def prepare(ctx: Context, job_id: str, bulk: bool = False) -> int:
    """Split the script into segment rows and queue one tts per segment. Returns how
    many (0 when a redelivered message finds the job past this stage)."""
    n = _insert_segments(ctx, job_id)
    for idx in range(n):
        ctx.dispatch.enqueue(pipeline.TTS, job_id, idx, bulk=bulk)
    return n


def _insert_segments(ctx: Context, job_id: str) -> int:
    with ctx.session() as s:
        job = queries.get_job(s, job_id)
        if job.state == states.QUEUED:
            queries.transition(s, job_id, states.PREPARING)
        elif job.state != states.PREPARING:
            return 0
        if job.audio_key:
            # One segment, spoken by the audio itself: tts runs speech recognition on
            # it instead of synthesis (_recognise).
            parts = [("", 0)]
        else:
            parts = split_script(
                job.script, ctx.settings.max_segment_chars, ctx.settings.segment_pause_ms
            )
        total = queries.insert_segments(s, job_id, parts)
        queries.set_job_fields(s, job_id, segments_total=total)
        queries.transition(s, job_id, states.SPEAKING)
        return total


# --- tts --------------------------------------------------------------------


def tts_segment(ctx: Context, job_id: str, idx: int, bulk: bool = False) -> float:
    """Speak one segment; the last one queues the plan. Returns its seconds."""
    if not jobs.is_active(ctx, job_id):
        return 0.0
    seconds = speak(ctx, job_id, idx)
    if segment_finished(ctx, job_id, idx, seconds):
        with ctx.session() as s:
            renderer = queries.get_job(s, job_id).renderer
        ctx.dispatch.enqueue(pipeline.for_renderer(pipeline.PLAN, renderer), job_id, bulk=bulk)
    return seconds


def speak(ctx: Context, job_id: str, idx: int) -> float:
    """Synthesise one segment to the store (WAV + phone timings); returns its seconds."""
    with ctx.session() as s:
        job = queries.get_job(s, job_id)
        seg = queries.get_segment(s, job_id, idx)
        text, voice, audio_key = seg.text, job.voice, job.audio_key
    if audio_key:
        speech = _recognise(ctx, job_id, audio_key)
    else:
        # A marked-up script's segment carries its rate and emphasis (farm/markup.py).
        words, rate, emphasis = markup.speech_of(text)
        # A registered voice's files come from the store (workers/voices.py).
        speech = tts.synthesize(words, voice_for(ctx, voice), rate, emphasis)
    wav = io.BytesIO()
    write_wav(speech, wav)
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

    samples, rate = read_wav(io.BytesIO(ctx.store.get_bytes(audio_key)))
    result = asr.recognise(samples, rate)
    words = result.words
    ctx.store.put_bytes(  # the captions' timings (plan gathers them into words.json)
        job_key(job_id, "audio", "0000.words.json"),
        json.dumps(captions.words_to_json(words)).encode(),
    )
    with ctx.session() as s:
        queries.set_transcript(s, job_id, result.transcript)
    return Speech(samples=samples, sample_rate=rate, phones=result.phones)


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


# --- plan -------------------------------------------------------------------


def plan(ctx: Context, job_id: str, bulk: bool = False) -> int:
    """Plan the whole job and queue one render per chunk. Returns how many chunks."""
    ranges = plan_motion(ctx, job_id)
    for idx, (start, stop) in enumerate(ranges):
        # The frame range rides along so Flower shows what each render task is.
        ctx.dispatch.enqueue(pipeline.RENDER, job_id, idx, start, stop, bulk=bulk)
    return len(ranges)


def plan_motion(ctx: Context, job_id: str) -> list[tuple[int, int]]:
    """The whole job's audio timeline and motion, cut into render chunks."""
    started = time.perf_counter()
    with ctx.session() as s:
        job = queries.get_job(s, job_id)
        if job.state != states.PLANNING:
            return []
        rows = queries.get_segments(s, job_id)
        segments = [(seg.idx, seg.pause_after_ms) for seg in rows]
        texts = [markup.speech_of(seg.text)[0] if seg.text else "" for seg in rows]
        avatar_name, renderer_name, options = job.avatar, job.renderer, job.options
        poster_at = (job.delivery or {}).get("poster_at")
        delivery = job.delivery
        fps, size, seed, chunk_frames = job.fps, (job.width, job.height), job.seed, job.chunk_frames
        lead_in, tail = jobs.padding(bool(job.audio_key))
    parts = [_stored_segment(ctx, job_id, idx, pause_ms) for idx, pause_ms in segments]
    samples, rate, phones = assemble_audio(parts, lead_in, tail)
    seconds = len(samples) / rate
    # Submission checked an estimate; the spoken length is exact. InvalidInput is a
    # PermanentError: the job fails at once, with this reason.
    check_frames(seconds, fps, ctx.settings.max_job_frames, "the speech", estimate=False)
    extras.check_poster_at(poster_at, seconds)
    words = _job_words(ctx, job_id, parts, texts, lead_in)
    ctx.store.put_bytes(
        job_key(job_id, extras.WORDS), json.dumps(captions.words_to_json(words)).encode()
    )
    speech = Speech(samples=samples, sample_rate=rate, phones=phones)
    wav = io.BytesIO()
    write_wav(speech, wav)
    ctx.store.put_bytes(job_key(job_id, "audio.wav"), wav.getvalue())

    renderer = renderer_for(ctx, renderer_name)
    avatar = load_avatar(ctx, avatar_name, renderer_name)
    # A composed job (workers/compose.py) may render the whole photo for another size.
    render_size, out_size = compose.plan_sizes(
        output.OutputSpec.from_json(delivery), size, avatar, renderer_name
    )
    motion = renderer.plan(avatar, seconds, phones, fps, render_size, seed, speech, options)
    if out_size == render_size:
        out_size = (motion.width, motion.height)
    if motion.frame_count != math.ceil(seconds * fps):
        raise InvalidInput(f"plan has {motion.frame_count} frames for {seconds:.3f} s")
    ctx.store.put_bytes(job_key(job_id, "plan.npz"), motion.to_bytes())
    ranges = jobs.chunk_ranges(motion.frame_count, chunk_frames)
    with ctx.session() as s:
        # The guarded transition first: a job cancelled (or planned by a duplicate
        # delivery) meanwhile gets no chunk rows.
        moved = queries.transition(s, job_id, states.RENDERING)
        if moved:
            queries.set_job_fields(
                s,
                job_id,
                audio_seconds=seconds,
                frame_count=motion.frame_count,
                width=out_size[0],
                height=out_size[1],
                chunks_total=queries.insert_chunks(s, job_id, ranges),
            )
            queries.record_timing(s, job_id, "plan", time.perf_counter() - started)
    if not moved:
        jobs.clean_if_cancelled(ctx, job_id)  # the audio and plan just written
        return []
    return ranges


def _job_words(
    ctx: Context, job_id: str, parts: list[tuple[Any, ...]], texts: list[str], lead_in: float
) -> list[captions.Word]:
    """Every word of the job on its timeline (the captions' timings): an audio job's from
    the recogniser, a script's spread over each segment's phones (farm/captions.py). The
    offsets are assemble_audio's."""
    words: list[captions.Word] = []
    offset = lead_in
    for (samples, rate, phones, pause_ms), text in zip(parts, texts, strict=True):
        key = job_key(job_id, "audio", "0000.words.json")
        if not text and ctx.store.exists(key):
            heard = captions.words_from_json(json.loads(ctx.store.get_bytes(key)))
            words += [captions.Word(w.text, w.start + offset, w.end + offset) for w in heard]
        else:
            words += captions.words_from_phones(text, phones, offset)
        offset += (len(samples) + int(pause_ms * rate / 1000)) / rate
    return words


def _stored_segment(ctx: Context, job_id: str, idx: int, pause_ms: int) -> tuple[Any, ...]:
    samples, rate = read_wav(
        io.BytesIO(ctx.store.get_bytes(job_key(job_id, "audio", f"{idx:04d}.wav")))
    )
    phones = tts.phones_from_json(
        json.loads(ctx.store.get_bytes(job_key(job_id, "audio", f"{idx:04d}.json")))
    )
    return samples, rate, phones, pause_ms


# --- render -----------------------------------------------------------------


def render(
    ctx: Context,
    job_id: str,
    idx: int,
    start: int = 0,
    stop: int = 0,
    bulk: bool = False,
    worker: str = "?",
) -> bool:
    """Render one chunk; the last one queues the mux. True when it was the last.
    (`start`, `stop`: the chunk's frames, in the message for Flower; the row decides.)"""
    last = render_chunk(ctx, job_id, idx, worker)
    if last:
        ctx.dispatch.enqueue(pipeline.MUX, job_id, bulk=bulk)
    return last


def render_chunk(ctx: Context, job_id: str, idx: int, worker: str) -> bool:
    """Render one chunk to the store. True when this call finished the job's last chunk."""
    with ctx.session() as s:
        job = queries.get_job(s, job_id)
        if job.state != states.RENDERING:
            return False
        avatar_name, renderer_name = job.avatar, job.renderer
        spec, out_size = output.OutputSpec.from_json(job.delivery), (job.width, job.height)
        chunk = queries.get_chunk(s, job_id, idx)
        frames = range(chunk.start_frame, chunk.stop_frame)
        done = chunk.state == "done"
        seconds = chunk.render_seconds or 0.0
        if not done:
            queries.start_chunk(s, job_id, idx, worker)
    if not done:
        try:
            seconds = _render_frames(
                ctx, job_id, idx, frames, avatar_name, renderer_name, spec, out_size
            )
            # The path it rendered on, read after the render (a failed engine falls back
            # to cuda): `farm usage` sums render seconds per device kind.
            device = getattr(renderer_for(ctx, renderer_name), "backend", "cpu")
            with ctx.session() as s:
                queries.set_chunk_device(s, job_id, idx, device)
        except Cancelled:
            with ctx.session() as s:
                queries.stop_chunk(s, job_id, idx)
            raise
    # Counted even for a redelivered chunk that was already done: the first attempt
    # may have died between finishing and moving the job on.
    return chunk_finished(ctx, job_id, idx, seconds)


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


def _render_frames(
    ctx: Context,
    job_id: str,
    idx: int,
    frames: range,
    avatar_name: str,
    renderer_name: str,
    spec: output.OutputSpec,
    out_size: tuple[int, int],
) -> float:
    """Render and encode one chunk, then upload it. Returns the seconds spent rendering
    and encoding only: the rest (dispatch, state, store) is the farm's overhead, which
    `farm bench --workers` measures as the difference. `spec`, `out_size`: what the job
    delivers, and at what size (the job row's)."""
    motion = _cached_plan(ctx, job_id)
    renderer = renderer_for(ctx, renderer_name)
    avatar = load_avatar(ctx, avatar_name, renderer_name)
    setting = ctx.settings.video_encoder
    with tempfile.TemporaryDirectory(prefix="farm-chunk-") as tmp:
        # A composed job's frames go through its compositor (None for a plain job):
        # the chunk is then at the output size, RGBA where the output has alpha.
        composer = compose.chunk_compositor(
            ctx, spec, out_size, motion, avatar, renderer_name, frames.start, Path(tmp)
        )
        width, height = composer.size if composer else (motion.width, motion.height)
        alpha = bool(composer and composer.alpha)
        codec = encoders.codec_for(setting)
        fmt = VideoFormat.chunk(width, height, motion.fps, codec, alpha=alpha)
        out = Path(tmp) / f"{idx:05d}.mp4"
        started = time.perf_counter()
        encoder = FrameEncoder(out, fmt, len(frames))
        sink: Any = _CheckedSink(ctx, job_id, encoder)
        try:
            renderer.render(avatar, motion, frames, composer.sink(sink) if composer else sink)
            encoder.close()
        except EncodeFailed as exc:
            encoder.abort()
            raise encoders.died(setting, fmt.codec, str(exc)) from exc
        except BaseException:
            encoder.abort()
            raise
        finally:
            if composer:
                composer.close()
        seconds = time.perf_counter() - started
        ctx.store.put_file(chunk_key(job_id, idx), out)
    if jobs.clean_if_cancelled(ctx, job_id):  # cancelled while this chunk was uploading
        raise Cancelled(f"job {job_id} was cancelled")
    return seconds


# --- mux --------------------------------------------------------------------


def mux(ctx: Context, job_id: str, bulk: bool = False) -> None:
    """Join the chunks with the audio, then queue the publish."""
    join(ctx, job_id)
    ctx.dispatch.enqueue(pipeline.PUBLISH, job_id, bulk=bulk)


def join(ctx: Context, job_id: str) -> None:
    """Decode the chunks in order and encode the video once with the audio (no seams
    at chunk joins: farm/media.py), check the frame count against the plan, store."""
    started = time.perf_counter()
    with ctx.session() as s:
        job = queries.get_job(s, job_id)
        if job.state != states.MUXING:
            return
        expected, n_chunks = job.frame_count, job.chunks_total
        setting = ctx.settings.video_encoder
        # What the job delivers (farm/output.py): the format decides the encoder and
        # the suffix; alpha formats read RGBA chunks; a draft is fast and watermarked.
        spec = output.OutputSpec.from_json(job.delivery)
        codec = encoders.codec_for(setting) if spec.format == "mp4" else "libx264"
        fmt = VideoFormat.delivery(job.width, job.height, job.fps, codec, spec.format, spec.draft)
        final = job.target_key or job_key(job_id, "final" + spec.suffix)
        delivery = job.delivery
    if spec.draft:
        fmt = dataclasses.replace(fmt, fontsdir=caption_font())  # the watermark's font
    with tempfile.TemporaryDirectory(prefix="farm-mux-") as tmp:
        work = Path(tmp)
        ext = ".mkv" if spec.alpha else ".mp4"
        parts = [
            ctx.store.get_file(chunk_key(job_id, i), work / f"{i:05d}{ext}")
            for i in range(n_chunks)
        ]
        audio = ctx.store.get_file(job_key(job_id, "audio.wav"), work / "audio.wav")
        cues = _captions(ctx, job_id, delivery, expected / fmt.fps)
        if cues and delivery and delivery.get("captions") == "burn":
            ass = work / "captions.ass"
            script = captions.to_ass(cues, fmt.width, fmt.height, caption_ems)
            ass.write_text(script, encoding="utf-8")
            fmt = dataclasses.replace(fmt, subtitles=str(ass), fontsdir=caption_font())
        out = work / ("final" + spec.suffix)
        try:
            join_and_encode(parts, audio, out, fmt)
        except EncodeFailed as exc:
            raise encoders.died(setting, fmt.codec, str(exc)) from exc
        frames = count_frames(out)
        if frames != expected:
            raise PermanentError(f"the joined video has {frames} frames, the plan {expected}")
        if delivery:
            _poster_and_preview(ctx, job_id, out, delivery, expected, fmt.fps, work, fmt.width)
        ctx.store.put_file(final, out)
    if jobs.clean_if_cancelled(ctx, job_id, final):
        raise Cancelled(f"job {job_id} was cancelled")
    with ctx.session() as s:
        queries.record_timing(s, job_id, "mux", time.perf_counter() - started)
        queries.transition(s, job_id, states.PUBLISHING)


def _captions(
    ctx: Context, job_id: str, delivery: dict[str, Any] | None, seconds: float
) -> list[captions.Cue]:
    """Write the job's SRT and WebVTT (unless its captions are off) and return the cues.
    A job from before captions (no delivery) has none."""
    if not delivery or delivery.get("captions") == "off":
        return []
    key = job_key(job_id, extras.WORDS)
    words = captions.words_from_json(json.loads(ctx.store.get_bytes(key)))
    cues = captions.make_cues(words, total=seconds)
    ctx.store.put_bytes(job_key(job_id, extras.CAPTIONS_SRT), captions.to_srt(cues).encode())
    ctx.store.put_bytes(job_key(job_id, extras.CAPTIONS_VTT), captions.to_vtt(cues).encode())
    return cues


def _poster_and_preview(
    ctx: Context,
    job_id: str,
    video: Path,
    delivery: dict[str, Any],
    frame_count: int,
    fps: int,
    work: Path,
    width: int,
) -> None:
    """The poster (frame by rule, farm/extras.py) and the animated preview, to the store.
    `width`: the delivered video's (a composed job's plan is at the render's size)."""
    motion = _cached_plan(ctx, job_id)
    closed = None
    if "blink_left" in motion.channels and "blink_right" in motion.channels:
        closed = np.maximum(motion.channel("blink_left"), motion.channel("blink_right"))
    frame = extras.poster_frame(frame_count, fps, delivery.get("poster_at"), closed)
    at = frame / fps
    poster = make_poster(video, at, work / extras.POSTER)
    ctx.store.put_file(job_key(job_id, extras.POSTER), poster)
    start = extras.preview_start(at, frame_count / fps)
    preview = make_preview(
        video,
        start,
        extras.PREVIEW_SECONDS,
        extras.preview_width(width),
        extras.PREVIEW_FPS,
        work / extras.PREVIEW,
    )
    ctx.store.put_file(job_key(job_id, extras.PREVIEW), preview)


# --- publish ----------------------------------------------------------------


def publish(ctx: Context, job_id: str, bulk: bool = False) -> bool:
    """Record where the video is; the job is done, its job.succeeded webhook queued.
    True if this call finished it."""
    key = final_key(ctx, job_id)
    if not ctx.store.exists(key):
        raise PermanentError(f"the final video {key} is missing from the store")
    with ctx.session() as s:
        publishing = queries.job_state(s, job_id) == states.PUBLISHING
    if publishing:
        # Intermediates go (unless FARM_KEEP_INTERMEDIATES) and the bytes are measured
        # before the job reads succeeded: whoever sees it done sees the store as it stays.
        retention.after_publish(ctx, job_id)
    with ctx.session() as s:
        job = queries.get_job(s, job_id)
        total = time.time() - job.created_at.timestamp()
        done = queries.transition(s, job_id, states.SUCCEEDED, output_key=key)
        event = None
        if done:
            queries.record_timing(s, job_id, "total", total)
            # job.succeeded: recorded with the transition, queued after the commit
            event = webhooks.record_job_event(s, ctx, job_id)
    webhooks.queue_first_attempt(ctx, event)
    batches.job_ended(ctx, job_id)  # every time: a redelivered publish may be the one
    return done


def final_key(ctx: Context, job_id: str) -> str:
    """Where the video is published: a batch row's output key, else jobs/{id}/final.mp4
    (.webm, .mov: the suffix of the job's format)."""
    with ctx.session() as s:
        job = queries.get_job(s, job_id)
        suffix = output.OutputSpec.from_json(job.delivery).suffix
        return job.target_key or job_key(job_id, "final" + suffix)


# --- a stage that failed ----------------------------------------------------


def failed(ctx: Context, task: str, args: tuple[Any, ...], exc: BaseException) -> None:
    """A stage's task failed for good: fail its job (and its chunk), once, with the
    reason; the job's batch may complete with it."""
    job_id = args[0]
    stage = pipeline.BY_TASK[task]
    reason = str(exc) if isinstance(exc, PermanentError) else f"{type(exc).__name__}: {exc}"
    if stage is pipeline.RENDER and len(args) > 1:
        with ctx.session() as s:
            queries.fail_chunk(s, job_id, args[1], reason)
        reason = f"chunk {args[1]}: {reason}"
    jobs.fail(ctx, job_id, f"{stage.name}: {reason}")
    batches.job_ended(ctx, job_id)


# The function of each stage's task, by task name: what workers/tasks.py registers
# with Celery and tests/pipeline.py runs in process.
RUN: dict[str, Callable[..., Any]] = {
    pipeline.PREPARE.task: prepare,
    pipeline.TTS.task: tts_segment,
    pipeline.PLAN.task: plan,
    pipeline.RENDER.task: render,
    pipeline.MUX.task: mux,
    pipeline.PUBLISH.task: publish,
}
