"""Jobs on the control plane: what a job asks for, its row, submit, cancel, retry.

These functions never import torch. The stages a job goes through run on workers
(workers/stages.py); this module owns the job row (`new_row`, for single jobs and
batches alike) and the transitions the CLI asks for.
"""

from __future__ import annotations

import math
import re
import secrets
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import IntegrityError

from farm import output, pipeline, queries, states, webhooks
from farm.context import Context
from farm.db import Job
from farm.errors import InvalidInput, NotFound, RetryableError
from farm.stores import job_key

if TYPE_CHECKING:
    from farm.sweep import Stalled

VOICES: tuple[str, ...] = ("joe", "espeak")
BUILTIN_AVATARS: tuple[str, ...] = ("demo",)
_AVATAR_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
LEAD_IN_SECONDS = 0.3  # silence before the first word, so the mouth starts closed
TAIL_SECONDS = 0.5
# Audio jobs keep the user's timing (issue 14): no lead-in and no tail, so the video is
# exactly as long as the input (to the frame) and the audio is the input's, resampled
# and encoded as AAC, nothing added. Silence in the recording closes the mouth anyway.
INPUT_AUDIO = "input.wav"  # jobs/{id}/input.wav: an audio job's normalised input


def padding(audio_job: bool) -> tuple[float, float]:
    """(lead-in, tail) seconds of silence the plan puts around a job's speech: a script
    job's TTS gets both; an audio job's recording is used as it is."""
    return (0.0, 0.0) if audio_job else (LEAD_IN_SECONDS, TAIL_SECONDS)


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
    # The backend's own options (models/registry.py RENDERER_OPTIONS), e.g. Ditto's
    # {"steps": 10, "emotion": 3}; checked against the job's renderer at submit.
    options: dict[str, int] | None = None
    # What the job delivers (farm/output.py): format, aspect, fit, background, captions,
    # poster time, draft. `size` is the size asked: with an aspect a square is the short
    # side, and a draft halves it (output.frame_size, applied by new_row).
    output: output.OutputSpec = output.OutputSpec()


@dataclass(frozen=True)
class Validated:
    """What validation learnt on the way: the job's webhook URL (checked) and the
    renderer its avatar was registered for (None: a built-in not registered yet)."""

    webhook_url: str | None
    registered_for: str | None


def validate(ctx: Context, req: JobRequest) -> Validated:
    """Refuse what cannot run, before any row exists, reading the avatar once."""
    if req.renderer is not None and req.renderer not in renderer_names():
        raise InvalidInput(
            f"unknown renderer {req.renderer!r}; choose one of {', '.join(renderer_names())}"
        )
    check_avatar_name(req.avatar)
    from farm import voices

    if not voices.is_known(ctx, req.voice):
        raise InvalidInput(
            f"unknown voice {req.voice!r}; choose one of {', '.join(VOICES)} "
            "or a voice added with 'farm voice add'"
        )
    if not 1 <= req.fps <= 60:
        raise InvalidInput(f"fps must be within 1..60, got {req.fps}")
    if not 1 <= req.chunk_frames <= 10_000:
        raise InvalidInput(f"chunk frames must be within 1..10000, got {req.chunk_frames}")
    output.check(req.output, req.audio_wav)
    output.frame_size(req.size, req.output)  # an aspect the size cannot have is refused
    with ctx.session() as s:
        avatar = queries.get_avatar(s, req.avatar)
    if avatar is None and req.avatar not in BUILTIN_AVATARS:
        raise InvalidInput(
            f"unknown avatar {req.avatar!r}; add it with 'farm avatar add' "
            f"(built in: {', '.join(BUILTIN_AVATARS)})"
        )
    own_webhook = avatar.webhook_url if avatar is not None else None
    webhook_url = webhooks.job_webhook(ctx.settings, req.webhook, own_webhook)
    return Validated(webhook_url, avatar.renderer if avatar is not None else None)


def new_row(
    ctx: Context,
    req: JobRequest,
    webhook_url: str | None,
    registered_for: str | None = None,
    **batch_fields: Any,
) -> dict[str, Any]:
    """The one builder of a job row, for `farm submit` and for batches. The renderer
    is resolved here: the request's, else the one the avatar was registered for
    (`registered_for`), else the configured one; an unset seed is random."""
    return dict(
        id=uuid.uuid4().hex,
        avatar=req.avatar,
        renderer=req.renderer or _own(req.avatar, registered_for) or ctx.settings.renderer,
        voice=req.voice,
        script=req.script,
        fps=output.job_fps(req.fps, req.output),
        # the delivered size: an aspect's short side, a draft's half (farm/output.py)
        **dict(zip(("width", "height"), output.frame_size(req.size, req.output), strict=True)),
        chunk_frames=req.chunk_frames,
        seed=req.seed if req.seed is not None else secrets.randbelow(2**31),
        priority=req.priority,
        webhook_url=webhook_url,
        options=req.options or None,
        delivery=req.output.to_json(),
        **batch_fields,
    )


def renderer_options(
    steps: int | None, emotion: str | None, eyes: str | None = None
) -> dict[str, int] | None:
    """`submit --ditto-steps N --emotion NAME --eyes natural|still` as the job's
    options (None: none given)."""
    from models.registry import DITTO_EMOTIONS

    options: dict[str, int] = {}
    if steps is not None:
        options["steps"] = steps
    if emotion is not None:
        name = emotion.strip().lower()
        if name not in DITTO_EMOTIONS:
            raise InvalidInput(
                f"unknown emotion {emotion[:40]!r}; choose one of {', '.join(DITTO_EMOTIONS)}"
            )
        options["emotion"] = DITTO_EMOTIONS.index(name)
    if eyes is not None:
        options["eyes"] = 1 if eyes == "natural" else 0
    return options or None


def check_whole_photo(renderer: str, spec: output.OutputSpec) -> None:
    """An aspect ratio frames the avatar's whole photo (workers/compose.py): refused at
    submission for a backend that cannot render it."""
    from models.registry import WHOLE_PHOTO  # names only: no backend is imported

    if spec.aspect is not None and renderer not in WHOLE_PHOTO:
        raise InvalidInput(
            f"--aspect {spec.aspect} frames the avatar's whole photo, which the {renderer} "
            f"renderer cannot render (use {', '.join(sorted(WHOLE_PHOTO))})"
        )


def check_options(renderer: str, options: dict[str, int] | None) -> None:
    """Refuse options the job's renderer does not take, or out of their range."""
    from models.registry import RENDERER_OPTIONS

    allowed = RENDERER_OPTIONS.get(renderer, {})
    for name, value in (options or {}).items():
        if name not in allowed:
            flag = "--ditto-steps" if name == "steps" else f"--{name}"
            raise InvalidInput(f"{flag} does not apply to the {renderer} renderer")
        low, high = allowed[name]
        if not low <= value <= high:
            raise InvalidInput(f"{renderer} {name} must be within {low}..{high}, got {value}")


def _own(avatar: str, registered_for: str | None) -> str | None:
    # A built-in avatar registers on first use with whatever renderer that job had:
    # that is no choice of the user's, so its jobs keep the configured renderer.
    return None if avatar in BUILTIN_AVATARS else registered_for


def renderer_names() -> tuple[str, ...]:
    from models.registry import RENDERERS  # names only: no backend is imported

    return tuple(RENDERERS)


def submit(ctx: Context, req: JobRequest, idempotency_key: str | None = None) -> str:
    """Check the request (once), record the job and queue its first stage. A job the
    broker refused is removed again: it was never accepted. With an `idempotency_key`
    another job holds, the insert fails (IntegrityError) and nothing is left behind."""
    checked = validate(ctx, req)
    ctx.store.check()  # a missing bucket or bad credentials: refuse now, not after TTS
    row = new_row(
        ctx, req, checked.webhook_url, checked.registered_for, idempotency_key=idempotency_key
    )
    check_options(row["renderer"], req.options)
    check_whole_photo(row["renderer"], req.output)
    job_id = row["id"]
    try:
        if req.audio_wav is not None:
            row["audio_key"] = job_key(job_id, INPUT_AUDIO)
            ctx.store.put_bytes(row["audio_key"], req.audio_wav)
        # A background file goes to jobs/{id}/background{ext}; the row keeps its key.
        spec = output.upload_background(ctx.store, job_id, req.output)
        row["delivery"] = spec.to_json()
        with ctx.session() as s:
            queries.insert_job(s, **row)
    except BaseException:
        # Nothing of a job that was never accepted stays: all it uploaded is in jobs/{id}/.
        ctx.store.delete_prefix(job_key(job_id))
        raise
    try:
        ctx.dispatch.enqueue(pipeline.PREPARE, job_id)
    except Exception as exc:
        forget(ctx, job_id)
        raise RetryableError(f"could not queue the job: {exc}") from exc
    return job_id


def submit_once(ctx: Context, req: JobRequest, idempotency_key: str) -> tuple[str, bool]:
    """`submit`, at most once per key: (the job's id, whether this call created it). Two
    callers racing on one key both get the one job (the key is unique in the table)."""
    existing = by_idempotency_key(ctx, idempotency_key)
    if existing is not None:
        return existing, False
    try:
        return submit(ctx, req, idempotency_key), True
    except IntegrityError:
        existing = by_idempotency_key(ctx, idempotency_key)
        if existing is None:  # some other constraint: not a race on the key
            raise
        return existing, False


def by_idempotency_key(ctx: Context, key: str) -> str | None:
    with ctx.session() as s:
        return queries.job_by_idempotency_key(s, key)


def ended(ctx: Context, job_ids: list[str]) -> list[Job]:
    """Those of the jobs that have reached a final state (succeeded, failed, cancelled)."""
    with ctx.session() as s:
        return list(queries.ended_jobs(s, job_ids))


def forget(ctx: Context, job_id: str) -> None:
    """Remove a job that was never accepted (it could not be enqueued)."""
    with ctx.session() as s:
        queries.get_job(s, job_id)
        queries.delete_jobs(s, [job_id])
    ctx.store.delete_prefix(job_key(job_id))  # its input audio, its background


def chunk_ranges(frame_count: int, chunk_frames: int) -> list[tuple[int, int]]:
    n = math.ceil(frame_count / chunk_frames)
    return [(i * chunk_frames, min((i + 1) * chunk_frames, frame_count)) for i in range(n)]


def fail(ctx: Context, job_id: str, error: str) -> bool:
    """Fail the job; True if this call failed it. Only that call records the
    job.failed webhook, in the same transaction, so duplicate failures send none."""
    with ctx.session() as s:
        moved = queries.transition(s, job_id, states.FAILED, error=error[:2000])
        event = webhooks.record_job_event(s, ctx, job_id) if moved else None
    webhooks.queue_first_attempt(ctx, event)
    return moved


@dataclass(frozen=True)
class CancelOutcome:
    job: Job
    not_revoked: str | None  # why queued tasks could not be revoked (the flag still works)
    batch: Any  # batches.Completion when this cancel completed the job's batch


def cancel(ctx: Context, job_id_or_prefix: str) -> CancelOutcome:
    """Mark a job cancelled (running tasks see the flag between frame batches), remove
    its partial artifacts, revoke its queued tasks; a batch whose last job this was
    completes and is reported here. InvalidInput if the job had already ended."""
    from farm import batches

    with ctx.session() as s:
        job = queries.find_job_by_prefix(s, job_id_or_prefix)
        if not queries.transition(s, job.id, states.CANCELLED):
            raise InvalidInput(f"job {job.id} is already {job.state}")
    _remove_artifacts(ctx, job.id, job.target_key)
    not_revoked = None
    try:
        ctx.dispatch.revoke(job.id, job.segments_total, job.chunks_total)
    except Exception as exc:  # the flag alone still stops every task that runs
        not_revoked = str(exc)
    return CancelOutcome(job, not_revoked, batches.job_ended(ctx, job.id, report_here=True))


def clean_if_cancelled(ctx: Context, job_id: str, *written: str) -> bool:
    """For a stage that has just written to the store: if the job was cancelled
    meanwhile, remove its artifacts again and return True (the stage stops).

    Cancel commits the state before it deletes, and a stage asks after it writes, so
    one of the two always sees the other's work: nothing written survives a cancel."""
    with ctx.session() as s:
        try:
            if queries.job_state(s, job_id) != states.CANCELLED:
                return False
        except NotFound:  # deleted (`farm jobs delete --cancel`): nothing it wrote stays
            pass
    _remove_artifacts(ctx, job_id, *written)
    return True


def _remove_artifacts(ctx: Context, job_id: str, *outside: str | None) -> None:
    """Everything under jobs/{id}/, and keys outside it (a batch row's output key)."""
    ctx.store.delete_prefix(job_key(job_id))
    for key in outside:
        if key:
            ctx.store.delete_prefix(key)


def retry(ctx: Context, job_id_or_prefix: str) -> Stalled:
    """Reopen a failed job at the stage it failed in, keeping everything it finished,
    and queue that stage's unfinished work."""
    from farm import batches, sweep

    with ctx.session() as s:
        job = queries.find_job_by_prefix(s, job_id_or_prefix)
        if job.state != states.FAILED:
            raise InvalidInput(f"job {job.id} is {job.state}; only failed jobs can be retried")
        chunks = queries.get_chunks(s, job.id)
        segments = queries.get_segments(s, job.id)
        stage = pipeline.restart_at(segments, chunks)
        items = pipeline.unfinished(stage, segments, chunks)
        if stage is pipeline.RENDER:
            queries.reset_failed_chunks(s, job.id)
        if not queries.reopen_job(s, job.id, stage.states[0]):
            raise InvalidInput(f"job {job.id} changed while it was being retried")
        stage = pipeline.for_renderer(stage, job.renderer)
        work = sweep.Stalled(job.id, stage, items, batches.is_bulk_priority(job.priority))
    sweep.resume(ctx, work)
    return work


def is_active(ctx: Context, job_id: str) -> bool:
    with ctx.session() as s:
        return queries.job_state(s, job_id) in states.ACTIVE


# --- reads for the CLI ------------------------------------------------------


def find(ctx: Context, job_id_or_prefix: str) -> Job:
    with ctx.session() as s:
        return queries.find_job_by_prefix(s, job_id_or_prefix)


def overview(ctx: Context, job_id_or_prefix: str) -> tuple[Job, queries.Progress, list[Any]]:
    """A job, its progress and its chunks (`farm status`)."""
    with ctx.session() as s:
        job = queries.find_job_by_prefix(s, job_id_or_prefix)
        return job, queries.progress(s, job.id), queries.get_chunks(s, job.id)


def progress(ctx: Context, job_id: str) -> tuple[Job, queries.Progress]:
    with ctx.session() as s:
        return queries.get_job(s, job_id), queries.progress(s, job_id)


def listing(ctx: Context, limit: int, state: str | None) -> list[tuple[Job, float]]:
    """Recent jobs, newest first, each with the fraction done (`farm jobs`)."""
    with ctx.session() as s:
        listed = queries.list_jobs(s, limit, state)
        done = queries.chunks_done_by_job(s, [j.id for j in listed])
    return [(j, states.progress(j.state, done.get(j.id, 0), j.chunks_total)) for j in listed]
