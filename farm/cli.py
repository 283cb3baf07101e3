"""The `farm` command line. Never imports torch: heavy work happens in workers.

Every FarmError becomes one line on stderr and exit status 1.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from farm import jobs, queries, states
from farm.config import Settings, known_secrets, redact
from farm.context import Context
from farm.errors import FarmError, InvalidInput, NotFound, RetryableError
from farm.script import check_frames, check_script_frames, decode_script, read_limit


def one_line(text: str) -> str:
    """A message as one printable line: whitespace runs (newlines too) become one
    space, other control, bidi and escape characters are shown escaped, and every
    configured secret and URL password becomes ***."""
    text = redact(" ".join(str(text).split()), known_secrets())
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def _outage(exc: Exception) -> str | None:
    """One line for a database or broker that cannot be used, or None."""
    from kombu.exceptions import OperationalError as BrokerError
    from sqlalchemy import exc as sa_exc

    if isinstance(exc, sa_exc.ArgumentError | sa_exc.NoSuchModuleError):
        return f"FARM_DATABASE_URL is not a usable database URL: {exc}"
    if isinstance(exc, sa_exc.DBAPIError) and _missing_table(exc):
        return "the database has no farm tables yet: run 'farm db upgrade' first"
    if isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError):
        return f"the database is unavailable: {getattr(exc, 'orig', None) or exc}"
    if isinstance(exc, BrokerError):
        return f"the broker is unavailable: {exc}"
    return None


def _missing_table(exc: Exception) -> bool:
    """SQLite's 'no such table', Postgres's undefined_table (SQLSTATE 42P01)."""
    orig = getattr(exc, "orig", None)
    return "no such table" in str(orig) or getattr(orig, "sqlstate", None) == "42P01"


def _id_prefix(pattern: str, what: str) -> Callable[[Any, Any, str], str]:
    """A click callback: JOB and DELIVERY are ids or their first characters, nothing
    else (a '%' or '_' would match any id in SQL's LIKE; a NUL breaks Postgres)."""

    def check(_ctx: Any, _param: Any, value: str) -> str:
        if not re.fullmatch(pattern, value):
            raise click.BadParameter(f"{value[:40]!r} is not a {what} id or the start of one")
        return value

    return check


_JOB_ID = _id_prefix(r"[0-9a-f]{1,32}", "job")
_DELIVERY_ID = _id_prefix(r"(msg_)?[0-9a-f]{1,32}", "webhook delivery")


def fail_cleanly(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FarmError as exc:
            click.echo(f"farm: error: {one_line(str(exc))}", err=True)
            sys.exit(1)
        except Exception as exc:
            message = _outage(exc)
            if message is None:
                raise
            click.echo(f"farm: error: {one_line(message)}", err=True)
            sys.exit(1)

    return wrapper


def make_context() -> Context:
    """Settings read once; the dispatcher wired; the embedded default brought up on
    demand, when the first message is sent."""
    settings = Settings.from_env()
    # A dispatcher handed in as click's `obj` (`main(obj=...)`: a test, an embedding
    # program) is used as it is.
    given = click.get_current_context(silent=True)
    dispatcher = given.obj if given is not None and given.obj is not None else None
    ctx = Context(settings, dispatcher or _OnDemandDispatcher(settings))
    if not settings.database_url:  # the SQLite file under FARM_HOME is farm's own
        _ensure_schema(ctx)
    return ctx


class _OnDemandDispatcher:
    """The Celery dispatcher (workers/dispatch.py), made on first use: most commands
    send nothing, and so import no Celery and start no embedded runtime."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.inner: Any = None

    def __getattr__(self, name: str) -> Any:
        if self.settings.embedded:
            from farm import embedded

            # Every time, not once: a long-running command (`farm intake`) outlives an
            # embedded runtime that stopped when idle, and must start it again.
            embedded.ensure_running(self.settings)
        if self.inner is None:
            from workers.dispatch import CeleryDispatcher

            self.inner = CeleryDispatcher.for_settings(self.settings)
        return getattr(self.inner, name)


def _ensure_schema(ctx: Context) -> None:
    from farm import migrate

    url = ctx.settings.effective_database_url
    if not migrate.is_current(ctx.engine, url):
        migrate.upgrade(url)


class _OneLineError(click.ClickException):
    """A usage error shown like every other error: one line, no usage text."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"farm: error: {self.message}", err=True)


def _one_line_usage(exc: click.UsageError) -> _OneLineError:
    hint = f" (see '{exc.ctx.command_path} -h')" if exc.ctx is not None else ""
    return _OneLineError(one_line(exc.format_message()) + hint)


class _Main(click.Group):
    """The top-level group: bad options and unknown commands, at any level, are one line
    on stderr with exit status 2."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except click.UsageError as exc:
            raise _one_line_usage(exc) from exc

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            raise _one_line_usage(exc) from exc


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """farm: turn scripts into videos of an avatar speaking them.

    With no FARM_* services configured, farm runs on an embedded default: SQLite,
    an embedded Redis and local worker processes, all under FARM_HOME.
    """


def _output_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--fps, --size and --chunk-frames, shared by `submit` and `batch submit`."""
    fn = click.option(
        "--chunk-frames",
        type=int,
        default=None,
        help="Frames per render chunk [env FARM_CHUNK_FRAMES; 100].",
    )(fn)
    fn = click.option("--size", default=None, help="Output size, N or WxH [env FARM_SIZE; 512].")(
        fn
    )
    return click.option(
        "--fps", type=int, default=None, help="Frames per second [env FARM_FPS; 25]."
    )(fn)


def _spec_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--format, --aspect, --fit, --background, --captions, --draft: what a job delivers
    (farm/output.py), shared by `submit` and `batch submit`; unset: FARM_* defaults."""
    from farm.output import ASPECTS, FITS, FORMATS

    for option in reversed(
        [
            click.option(
                "--format",
                "output_format",
                type=click.Choice(FORMATS),
                default=None,
                help="mp4 (H.264), webm (VP9), webm-alpha (VP9 with alpha) or mov-prores "
                "(ProRes 4444 with alpha) [env FARM_OUTPUT_FORMAT; mp4].",
            ),
            click.option(
                "--aspect",
                type=click.Choice(ASPECTS),
                default=None,
                help="Frame the video at this aspect; --size N is then its short side "
                "[env FARM_ASPECT; none].",
            ),
            click.option(
                "--fit",
                type=click.Choice(FITS),
                default=None,
                help="With --aspect: the whole photo inside the frame (contain) or the "
                "frame filled (cover) [env FARM_FIT; contain].",
            ),
            click.option(
                "--background",
                default=None,
                metavar="COLOR|IMAGE|VIDEO",
                help="Replace the photo's background: #rrggbb, #rgb, a colour name, or an "
                "image or video file (uploaded with the job).",
            ),
            click.option(
                "--captions",
                type=click.Choice(["off", "file", "burn"]),
                default=None,
                help="SRT and WebVTT beside the video (file), also drawn into it (burn), or "
                "none (off) [env FARM_CAPTIONS; file].",
            ),
            click.option(
                "--draft",
                is_flag=True,
                default=None,
                help="A quick review render: half the size and frame rate, the fastest "
                "encoder settings, a DRAFT watermark.",
            ),
        ]
    ):
        fn = option(fn)
    return fn


# --- submit -----------------------------------------------------------------


def _read_script(source: str, settings: Settings) -> str:
    limit = read_limit(settings.max_script_chars)
    if source == "-":
        data = sys.stdin.buffer.read(limit)
    else:
        path = Path(source)
        if not path.exists():
            raise InvalidInput(f"no such script file: {source}")
        if not path.is_file():
            raise InvalidInput(f"script {source} is not a regular file")
        try:
            with path.open("rb") as fh:
                data = fh.read(limit)
        except OSError as exc:
            raise InvalidInput(f"script {source} cannot be read: {exc.strerror}") from exc
    return decode_script(data, settings.max_script_chars)


def _check_seed(seed: int | None) -> None:
    if seed is not None and not 0 <= seed < 2**31:
        raise InvalidInput(f"seed must be within 0..{2**31 - 1}, got {seed}")


@main.command()
@click.argument("script", metavar="[SCRIPT]", required=False)
@click.option(
    "--audio",
    "audio",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Animate this recording (wav, mp3, m4a, ...) instead of speaking a SCRIPT.",
)
@click.option("--avatar", default="demo", show_default=True, help="Avatar name.")
@click.option(
    "--voice",
    default="joe",
    show_default=True,
    help=f"TTS voice: {', '.join(jobs.VOICES)} or one added with 'farm voice add'.",
)
@_output_options
@click.option("--seed", type=int, default=None, help="Motion seed (random when unset).")
@click.option(
    "--renderer",
    default=None,
    help="Render with this backend [default: the avatar's, else env FARM_RENDERER].",
)
@click.option(
    "--ditto-steps",
    type=click.IntRange(1, 1000),
    default=None,
    help="ditto: diffusion (DDIM) steps; fewer is faster [default: the checkpoint's, 50].",
)
@click.option(
    "--eyes",
    type=click.Choice(["natural", "still"]),
    default=None,
    help="ditto, gaussiantalker: natural (the irises move: fixations and saccades) or "
    "still [default: natural].",
)
@click.option(
    "--emotion",
    default=None,
    metavar="NAME",
    help="ditto: angry, disgust, fear, happy, neutral, sad, surprise or contempt "
    "[default: the checkpoint's, neutral].",
)
@_spec_options
@click.option(
    "--poster-at",
    type=float,
    default=None,
    metavar="SECONDS",
    help="The poster's time [default: the first frame with open eyes after 1 s].",
)
@click.option("--wait", is_flag=True, help="Show progress and wait for the video.")
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="With --wait: copy the finished MP4 here (missing folders are created).",
)
@click.option(
    "--webhook",
    default=None,
    metavar="URL",
    help="POST a signed job.succeeded / job.failed event here "
    "[default: the avatar's webhook, else env FARM_WEBHOOK_URL].",
)
@fail_cleanly
def submit(
    script: str | None,
    audio: Path | None,
    avatar: str,
    voice: str,
    fps: int | None,
    size: str | None,
    chunk_frames: int | None,
    seed: int | None,
    renderer: str | None,
    ditto_steps: int | None,
    eyes: str | None,
    emotion: str | None,
    output_format: str | None,
    aspect: str | None,
    fit: str | None,
    background: str | None,
    captions: str | None,
    draft: bool | None,
    poster_at: float | None,
    wait: bool,
    output: Path | None,
    webhook: str | None,
) -> None:
    """Submit SCRIPT (a UTF-8 text file, or - for stdin) as a job; print its id.

    With --audio instead of SCRIPT, the avatar speaks that recording: the mouth
    follows the words speech recognition hears in it."""
    settings = Settings.from_env()
    if (script is None) == (audio is None):
        raise InvalidInput("give exactly one of SCRIPT or --audio FILE")
    if output is not None and not wait:
        raise InvalidInput(
            "--output needs --wait: without it farm does not stay to copy the video "
            "(use 'farm fetch JOB PATH' once the job has finished)"
        )
    _check_seed(seed)
    from farm import output as output_spec

    spec = output_spec.build(
        defaults=output_spec.defaults_from(settings),
        format=output_format,
        aspect=aspect,
        fit=fit,
        background=background,
        captions=captions,
        poster_at=poster_at,
        draft=draft,
    )
    if output is not None:
        output_spec.check_output_name(output.name, spec, "--output")
    fps = settings.fps if fps is None else fps
    padding = sum(jobs.padding(audio is not None))
    text, audio_wav = "", None
    if audio is not None:
        from farm import audio as audio_input

        samples = audio_input.decode(audio, settings.max_audio_seconds)
        seconds = samples.size / audio_input.SAMPLE_RATE + padding
        check_frames(seconds, fps, settings.max_job_frames, audio.name, estimate=False)
        audio_wav = audio_input.to_wav(samples)
    else:
        assert script is not None
        text = _read_script(script, settings)
        check_script_frames(text, fps, settings, padding)
    request = jobs.JobRequest(
        script=text,
        audio_wav=audio_wav,
        avatar=avatar,
        voice=voice,
        fps=fps,
        size=jobs.parse_size(size or str(settings.size)),
        chunk_frames=settings.chunk_frames if chunk_frames is None else chunk_frames,
        seed=seed,
        webhook=webhook,
        renderer=renderer,
        options=jobs.renderer_options(ditto_steps, emotion, eyes),
        output=spec,
    )
    ctx = make_context()
    job_id = jobs.submit(ctx, request)
    click.echo(job_id)
    if wait:
        _wait(ctx, job_id, output)


# How long `--wait` polls through a database outage before it gives up (the job goes
# on without it). A candidate for a setting; the workers' own patience is about 10 min.
WAIT_OUTAGE_SECONDS = 600.0


def _wait(ctx: Context, job_id: str, output: Path | None) -> None:
    from farm.db import OUTAGE_ERRORS

    bar = _ProgressLine(sys.stderr)
    last_check = time.monotonic()
    down_since: float | None = None
    while True:
        try:
            job, prog = jobs.progress(ctx, job_id)
        except OUTAGE_ERRORS as exc:
            # A database restart: keep polling, quietly, for a while.
            down_since = down_since or time.monotonic()
            if time.monotonic() - down_since > WAIT_OUTAGE_SECONDS:
                raise RetryableError(
                    f"the database has been unavailable for {WAIT_OUTAGE_SECONDS:.0f} s; "
                    f"job {job_id} goes on: see 'farm status {job_id}'"
                ) from exc
            time.sleep(1)
            continue
        down_since = None
        bar.show(prog)
        if prog.state in states.FINAL:
            break
        if ctx.settings.embedded and time.monotonic() - last_check > 5:
            # The runtime may have gone idle between our check and the submit.
            from farm import embedded

            embedded.ensure_running(ctx.settings)
            last_check = time.monotonic()
        time.sleep(0.3)
    bar.close()
    if job.state != states.SUCCEEDED:
        raise FarmError(f"job {job_id} {job.state}: {job.error or 'no reason recorded'}")
    assert job.output_key
    if output is not None:
        _save_output(ctx, job, output)
    else:
        click.echo(ctx.store.url(job.output_key))


def _save_output(ctx: Context, job: Any, dest: Path) -> None:
    """Copy a finished job's MP4 to DEST; the job keeps it whatever happens here."""
    from farm.stores import write_user_file

    try:
        write_user_file(dest, lambda path: ctx.store.get_file(job.output_key, path))
    except InvalidInput as exc:
        raise InvalidInput(f"{exc}; the video is kept: farm fetch {job.id} PATH") from exc
    click.echo(str(dest))


class _ProgressLine:
    """Stage, then chunks rendered / total: one redrawn line on a terminal,
    a line per change otherwise."""

    WIDTH = 30

    def __init__(self, stream: io.TextIOBase | Any) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.last = ""

    def show(self, prog: queries.Progress) -> None:
        filled = int(prog.fraction * self.WIDTH)
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        detail = prog.state
        if prog.state == states.SPEAKING:
            detail += f" {prog.segments_done}/{prog.segments_total} segments"
        elif prog.state == states.RENDERING:
            detail += f" {prog.chunks_done}/{prog.chunks_total} chunks"
        line = f"[{bar}] {detail}"
        if line == self.last:
            return
        self.last = line
        if self.tty:
            self.stream.write("\r" + line.ljust(70))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


# --- jobs -------------------------------------------------------------------


MAX_LISTED = 100_000  # `farm jobs --limit`: more is no longer a listing


def _fmt_seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


@main.command()
@click.argument("job_id", metavar="JOB", callback=_JOB_ID)
@fail_cleanly
def status(job_id: str) -> None:
    """Show a job's state, progress, timings and output (JOB may be an id prefix)."""
    ctx = make_context()
    job, prog, chunks = jobs.overview(ctx, job_id)
    click.echo(f"job       {job.id}")
    click.echo(f"state     {job.state} ({prog.fraction:.0%})")
    click.echo(
        f"avatar    {job.avatar}  voice {job.voice}  {job.width}x{job.height}@{job.fps}"
        f"  renderer {job.renderer}"
    )
    if job.delivery:
        from farm.output import OutputSpec, describe

        click.echo(f"delivers  {describe(OutputSpec.from_json(job.delivery))}")
    click.echo(f"segments  {prog.segments_done}/{prog.segments_total}")
    click.echo(f"chunks    {prog.chunks_done}/{prog.chunks_total}  frames {job.frame_count}")
    click.echo(f"audio     {_fmt_seconds(job.audio_seconds)}")
    if job.audio_key:
        heard = job.transcript if job.transcript is not None else "(not recognised yet)"
        click.echo(f"heard     {heard or '(no words)'}")
    click.echo(f"created   {job.created_at:%Y-%m-%d %H:%M:%S} UTC")
    if job.timings:
        timings = "  ".join(f"{k} {v:.2f}s" for k, v in sorted(job.timings.items()))
        click.echo(f"timings   {timings}")
    for chunk in chunks:
        if chunk.state == "failed":
            click.echo(f"chunk {chunk.idx} failed on {chunk.worker}: {chunk.error}")
    if job.error:
        click.echo(f"error     {job.error}")
    if job.output_key:
        click.echo(f"output    {ctx.store.url(job.output_key)}")
    if job.expired_at:
        click.echo(f"expired   {job.expired_at:%Y-%m-%d %H:%M:%S} UTC (FARM_RETENTION_DAYS)")
    from farm import extras

    for name, key in extras.artifact_keys(job).items():
        click.echo(f"{name:<9} {ctx.store.url(key)}")


@main.group(name="jobs", invoke_without_command=True)
@click.option("--limit", type=click.IntRange(1, MAX_LISTED), default=20, show_default=True)
@click.option(
    "--state",
    type=click.Choice(states.PIPELINE + (states.FAILED, states.CANCELLED)),
    default=None,
    help="Only jobs in this state.",
)
@click.pass_context
@fail_cleanly
def list_jobs(cctx: click.Context, limit: int, state: str | None) -> None:
    """List recent jobs, newest first (`farm jobs delete` removes jobs)."""
    if cctx.invoked_subcommand is not None:
        return
    listed = jobs.listing(make_context(), limit, state)
    click.echo(f"{'JOB':12}  {'STATE':10}  {'PROGRESS':>8}  {'AUDIO':>7}  {'WALL':>7}  AVATAR")
    for job, fraction in listed:
        wall = (job.timings or {}).get("total")
        click.echo(
            f"{job.id[:12]:12}  {job.state:10}  {fraction:>8.0%}  "
            f"{_fmt_seconds(job.audio_seconds):>7}  {_fmt_seconds(wall):>7}  {job.avatar}"
        )


def _job_ids(_ctx: Any, _param: Any, values: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(_JOB_ID(_ctx, _param, v) for v in values)


@list_jobs.command(name="delete")
@click.argument("job_ids", metavar="[JOB]...", nargs=-1, callback=_job_ids)
@click.option(
    "--avatar",
    default=None,
    metavar="NAME",
    help="Also every job of avatar NAME (to erase a person: then `farm avatar delete NAME`).",
)
@click.option("--cancel", is_flag=True, help="Cancel jobs that have not ended, then delete them.")
@fail_cleanly
def jobs_delete(job_ids: tuple[str, ...], avatar: str | None, cancel: bool) -> None:
    """Delete jobs for good: their rows, webhook records, video and every artifact in
    the store (JOB may be an id prefix). A running job needs --cancel. Store objects
    that cannot be deleted now are retried by the sweep; every deletion is recorded."""
    from farm import retention

    if not job_ids and avatar is None:
        raise InvalidInput("name at least one JOB, or --avatar NAME")
    ctx = make_context()
    names = list(job_ids) + (retention.jobs_of_avatar(ctx, avatar) if avatar else [])
    if not names:
        click.echo(f"avatar {avatar} has no jobs: nothing to delete")
    for done in retention.delete_jobs(ctx, names, cancel=cancel):
        click.echo(_deleted_line(done))


def _deleted_line(done: Any) -> str:
    what = f"{done.kind} {done.subject}"
    if done.already is not None:
        line = f"{what} was already deleted ({done.already:%Y-%m-%d %H:%M:%S} UTC)"
        return line + (f"; {done.engines} engine(s) removed here" if done.engines else "")
    if not done.registered:
        return f"{what} is built in and not registered: nothing to delete"
    line = f"deleted {what}: {done.rows} row(s), {done.objects} store object(s), {done.bytes} bytes"
    if done.engines:
        line += f", {done.engines} engine(s)"
    if done.pending:
        line += f"; {done.pending} store deletion(s) pending: the sweep retries them"
    return line


@main.command()
@click.argument("job_id", metavar="JOB", callback=_JOB_ID)
@fail_cleanly
def cancel(job_id: str) -> None:
    """Cancel a job: queued tasks never start, running chunks stop within a frame batch."""
    ctx = make_context()
    outcome = jobs.cancel(ctx, job_id)
    if outcome.not_revoked:
        click.echo(f"farm: warning: could not revoke queued tasks: {outcome.not_revoked}", err=True)
    click.echo(f"cancelled {outcome.job.id}")
    if outcome.batch is not None:
        click.echo(f"batch completed; report at {ctx.store.url(outcome.batch.report_key)}")


@main.command()
@click.argument("job_id", metavar="JOB", callback=_JOB_ID)
@fail_cleanly
def retry(job_id: str) -> None:
    """Re-run a failed job from where it failed: only its unfinished chunks (or stage)."""
    work = jobs.retry(make_context(), job_id)
    stage = work.stage.name
    what = f"{len(work.items)} {stage} task(s)" if work.items else stage
    click.echo(f"retrying {work.job_id}: {what}")


@main.command()
@click.option(
    "--stall-seconds",
    type=click.IntRange(min=0),
    default=None,
    help="Count work as stalled after this long without a sign of life "
    "(default FARM_STALL_SECONDS; 0 after the broker lost its data).",
)
@fail_cleanly
def sweep(stall_seconds: int | None) -> None:
    """Queue again the work of jobs whose messages were lost (beat does this every
    FARM_SWEEP_SECONDS). Safe at any time: every stage is idempotent."""
    from farm import sweep as lost

    ctx = make_context()
    if stall_seconds is not None:
        settings = dataclasses.replace(ctx.settings, stall_seconds=stall_seconds)
        ctx = Context(settings, ctx.dispatcher)
    n = lost.run(ctx)
    click.echo(f"{n} stalled job(s) queued again")


@main.command()
@click.option("--since", default=None, metavar="DATE", help="Jobs created from DATE (UTC).")
@click.option(
    "--by",
    type=click.Choice(["day", "avatar", "batch", "worker"]),
    default=None,
    help="One row per group (and a total).",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "csv", "json"]),
    default="table",
    show_default=True,
)
@fail_cleanly
def usage(since: str | None, by: str | None, fmt: str) -> None:
    """Jobs by state, audio seconds, frames rendered, render seconds per device kind and
    bytes stored, computed from the database."""
    from farm import usage as figures

    when = figures.parse_since(since)
    rows = figures.report(make_context(), when, by)
    click.echo(figures.render(rows, fmt, when, by))


# --- avatars ----------------------------------------------------------------


@main.group()
def avatar() -> None:
    """Register and inspect avatars."""


@avatar.command(name="add")
@click.argument("name")
@click.option(
    "--photo",
    default=None,
    type=click.Path(path_type=Path),
    help="A photo with one clearly visible face.",
)
@click.option(
    "--model",
    default=None,
    type=click.Path(path_type=Path),
    help="gaussiantalker: the trained model directory (cfg_args, point_cloud/) instead of a photo.",
)
@click.option(
    "--data",
    default=None,
    type=click.Path(path_type=Path),
    help="gaussiantalker: the training data directory [default: source_path in cfg_args].",
)
@click.option(
    "--timeout",
    type=float,
    default=300,
    show_default=True,
    help="Seconds to wait for registration.",
)
@click.option(
    "--webhook",
    default=None,
    metavar="URL",
    help="Default webhook of this avatar's jobs (submit --webhook overrides it).",
)
@click.option(
    "--backend",
    default=None,
    metavar="RENDERER",
    help="The renderer this avatar is prepared for and its jobs render with: portrait, "
    "ditto, gaussiantalker (with --model) [default: env FARM_RENDERER].",
)
@fail_cleanly
def avatar_add(
    name: str,
    photo: Path | None,
    model: Path | None,
    data: Path | None,
    timeout: float,
    webhook: str | None,
    backend: str | None,
) -> None:
    """Register NAME from a photo: face landmarks and caches, done by a worker."""
    from farm import avatars

    if photo is None and model is None:  # a usage error, as when --photo was required
        missing = "Missing option '--photo' (or '--model DIR' for a gaussiantalker model)."
        raise _one_line_usage(click.UsageError(missing, ctx=click.get_current_context()))
    ctx = make_context()
    key = avatars.add(ctx, name, photo, timeout, webhook, backend, model, data)
    click.echo(f"added avatar {name} ({key})")


@avatar.command(name="list")
@fail_cleanly
def avatar_list() -> None:
    """List registered avatars (built-in ones register on first use)."""
    from farm import avatars

    rows, unregistered = avatars.listing(make_context())
    for a in rows:
        click.echo(f"{a.name:20} {a.renderer:10} {a.width}x{a.height}")
    for name in unregistered:
        click.echo(f"{name:20} {'(built in, not yet registered)'}")


@avatar.command(name="show")
@click.argument("name")
@fail_cleanly
def avatar_show(name: str) -> None:
    """Show one avatar."""
    from farm import avatars

    ctx = make_context()
    row = avatars.find(ctx, name)
    if row is None and name in jobs.BUILTIN_AVATARS:
        click.echo(f"name      {name}\nrenderer  {ctx.settings.renderer}")
        click.echo("source    built in: registered by the first job that uses it")
        return
    if row is None:
        raise NotFound(f"unknown avatar {name!r}")
    click.echo(
        f"name      {row.name}\nrenderer  {row.renderer}\nphoto     {row.width}x{row.height}"
    )
    click.echo(f"source    {ctx.store.url(row.source_key)}\nartifact  {row.artifact_key}")
    click.echo(f"created   {row.created_at:%Y-%m-%d %H:%M:%S} UTC")
    if row.webhook_url:
        click.echo(f"webhook   {row.webhook_url}")


# --- voices -----------------------------------------------------------------


@main.group(name="voice")
def voice_group() -> None:
    """Register and inspect TTS voices (joe and espeak are built in)."""


@voice_group.command(name="add")
@click.argument("name")
@click.option(
    "--piper",
    "model",
    default=None,
    type=click.Path(path_type=Path),
    metavar="MODEL.onnx",
    help="A Piper voice model; its language is the espeak-ng voice its config names.",
)
@click.option(
    "--config",
    default=None,
    type=click.Path(path_type=Path),
    metavar="MODEL.onnx.json",
    help="The voice's Piper config [default: MODEL.onnx.json beside the model].",
)
@click.option(
    "--espeak",
    "language",
    default=None,
    metavar="LANG",
    help="Instead of --piper: espeak-ng speaking LANG (an espeak-ng voice: de, fr, pt-br).",
)
@fail_cleanly
def voice_add(name: str, model: Path | None, config: Path | None, language: str | None) -> None:
    """Register NAME from a Piper voice (checked: it loads and speaks, then stored) or
    an espeak-ng language."""
    from farm import voices

    if (model is None) == (language is None):
        missing = "give exactly one of --piper MODEL.onnx or --espeak LANG"
        raise _one_line_usage(click.UsageError(missing, ctx=click.get_current_context()))
    if config is not None and model is None:
        raise InvalidInput("--config goes with --piper (the Piper model's config)")
    ctx = make_context()
    if model is not None:
        row = voices.add(ctx, name, model, config)
    else:
        assert language is not None
        row = voices.add_espeak(ctx, name, language)
    click.echo(f"added voice {row.name} ({row.kind}, {row.language}, {row.sample_rate} Hz)")


@voice_group.command(name="list")
@fail_cleanly
def voice_list() -> None:
    """List the voices: the built-in ones, then the registered ones."""
    from farm import voices

    rows = voices.listing(make_context())
    for name, what in voices.BUILTIN_VOICES.items():
        click.echo(f"{name:20} built in: {what}")
    for row in rows:
        click.echo(f"{row.name:20} {row.kind}, {row.language} ({row.sample_rate} Hz)")


@voice_group.command(name="show")
@click.argument("name")
@fail_cleanly
def voice_show(name: str) -> None:
    """Show one voice."""
    from farm import voices

    if name in voices.BUILTIN_VOICES:
        click.echo(f"name      {name}\nsource    built in: {voices.BUILTIN_VOICES[name]}")
        return
    ctx = make_context()
    row = voices.find(ctx, name)
    if row is None:
        raise NotFound(f"unknown voice {name!r}")
    click.echo(f"name      {row.name}\nkind      {row.kind}\nlanguage  {row.language}")
    click.echo(f"rate      {row.sample_rate} Hz")
    if row.model_key:
        click.echo(f"model     {row.model_key} ({row.model_bytes} bytes)")
        click.echo(f"config    {row.config_key}\ndigest    {row.digest}")
    click.echo(f"created   {row.created_at:%Y-%m-%d %H:%M:%S} UTC")


@voice_group.command(name="remove")
@click.argument("name")
@fail_cleanly
def voice_remove(name: str) -> None:
    """Remove NAME: its row and files. Refused while queued or running jobs use it."""
    from farm import voices

    voices.remove(make_context(), name)
    click.echo(f"removed voice {name}")


@avatar.command(name="delete")
@click.argument("name")
@fail_cleanly
def avatar_delete(name: str) -> None:
    """Delete avatar NAME: its row, photo and artifacts in the store, and the TensorRT
    engines built for it on this machine. Refused while jobs that have not ended use it;
    its ended jobs stay (`farm jobs delete --avatar NAME` removes them). The built-in
    demo may be deleted: its next job registers it again."""
    from farm import retention

    click.echo(_deleted_line(retention.delete_avatar(make_context(), name)))


# --- webhooks ---------------------------------------------------------------


@main.group(name="webhooks")
def webhooks_group() -> None:
    """Signed webhook deliveries: inspect, redeliver, secrets."""


def _fmt_time(when: Any) -> str:
    return "-" if when is None else f"{when:%Y-%m-%d %H:%M:%S}"


@webhooks_group.command(name="list")
@click.argument("job_id", metavar="JOB", callback=_JOB_ID)
@fail_cleanly
def webhooks_list(job_id: str) -> None:
    """The webhook deliveries of JOB and every attempt of each."""
    from farm import webhooks

    ctx = make_context()
    full_id, views = webhooks.deliveries_of_job(ctx, job_id)
    if not views:
        click.echo(f"job {full_id} has no webhook deliveries")
        return
    click.echo(f"{'DELIVERY':36}  {'EVENT':14}  {'STATE':9}  {'ATTEMPTS':>8}  URL")
    for view in views:
        d = view.delivery
        click.echo(f"{d.id:36}  {d.event_type:14}  {d.state:9}  {d.attempts:>8}  {d.url}")
        for a in view.attempts:
            result = str(a.status_code) if a.status_code is not None else "-"
            line = f"  #{a.attempt:<3} {_fmt_time(a.started_at)}  {result:>4}"
            if a.error:
                line += f"  {a.error}"
            if a.next_attempt_at is not None:
                line += f"  (next {_fmt_time(a.next_attempt_at)})"
            click.echo(line)
        if d.state != "delivered" and d.last_error and not view.attempts:
            click.echo(f"  {d.last_error}")


@webhooks_group.command(name="redeliver")
@click.argument("delivery_id", metavar="DELIVERY", callback=_DELIVERY_ID)
@fail_cleanly
def webhooks_redeliver(delivery_id: str) -> None:
    """Queue a fresh attempt of DELIVERY (same webhook-id and body, new signature)."""
    from farm import webhooks

    ctx = make_context()
    delivery = webhooks.redeliver(ctx, delivery_id)
    click.echo(f"queued {delivery.id} to {delivery.url}")


@webhooks_group.command(name="enable")
@click.argument("url")
@fail_cleanly
def webhooks_enable(url: str) -> None:
    """Allow deliveries to URL again after it answered 410 Gone."""
    from farm import webhooks

    ctx = make_context()
    if not webhooks.enable_endpoint(ctx, url):
        raise NotFound(f"{url} is not disabled")
    click.echo(f"enabled {url}")


@webhooks_group.command(name="secret")
def webhooks_secret() -> None:
    """Print a new signing secret for FARM_WEBHOOK_SECRET."""
    from farm import webhooks

    click.echo(webhooks.new_secret())


# --- batches ----------------------------------------------------------------


@main.group()
def batch() -> None:
    """Bulk batches: many jobs from a manifest, at a lower priority than interactive jobs."""


@batch.command(name="submit")
@click.argument("manifest_path", metavar="MANIFEST", type=click.Path(path_type=Path))
@click.option("--name", required=True, help="Batch name; submitting it again adds only new rows.")
@click.option(
    "--skip-invalid",
    is_flag=True,
    help="Submit the valid rows even if some are invalid (they are reported and recorded).",
)
@click.option("--avatar", default="demo", show_default=True, help="For rows that name none.")
@click.option(
    "--voice", default="joe", show_default=True, help="For rows that name none (joe, espeak)."
)
@click.option(
    "--webhook",
    default=None,
    metavar="URL",
    help="batch.completed goes here, and job events of rows that name no webhook "
    "[default: env FARM_WEBHOOK_URL].",
)
@_output_options
@click.option("--seed", type=int, default=None, help="Motion seed (default: from each row).")
@click.option(
    "--template",
    "template_path",
    type=click.Path(path_type=Path),
    default=None,
    metavar="FILE",
    help="A script with {variables} for rows that name no script, text or template; "
    "the manifest's other columns are the variables.",
)
@_spec_options
@fail_cleanly
def batch_submit(
    manifest_path: Path,
    name: str,
    skip_invalid: bool,
    avatar: str,
    voice: str,
    webhook: str | None,
    fps: int | None,
    size: str | None,
    chunk_frames: int | None,
    seed: int | None,
    template_path: Path | None,
    output_format: str | None,
    aspect: str | None,
    fit: str | None,
    background: str | None,
    captions: str | None,
    draft: bool | None,
) -> None:
    """Submit every row of MANIFEST as a job of batch NAME.

    MANIFEST is a CSV file (a header line names the columns), a JSON Lines file, or a
    directory of .txt scripts. Columns: script (a path relative to the manifest's
    directory) or text (the script inline) or template (a script with {variables},
    whose values are the row's other columns), avatar, voice, webhook, output (where
    the video goes: batches/NAME/outputs/OUTPUT in the store; it ends with the format's
    suffix), and what it delivers: format, aspect, fit, background (a colour, or an
    image or video inside the manifest's directory), captions, poster_at, draft (the
    options below are their defaults). Every row is checked first; without
    --skip-invalid one bad row means nothing is submitted.
    """
    from farm import batches, templates
    from farm import output as output_spec
    from farm.manifest import Defaults

    settings = Settings.from_env()
    batches.check_name(name)
    _check_seed(seed)
    template = None
    if template_path is not None:
        template = templates.read(template_path, str(template_path), settings.max_script_chars)
    spec = output_spec.build(
        defaults=output_spec.defaults_from(settings),
        format=output_format,
        aspect=aspect,
        fit=fit,
        background=background,
        captions=captions,
        draft=draft,
    )
    asked = jobs.parse_size(size or str(settings.size))
    options = batches.Options(
        fps=settings.fps if fps is None else fps,
        size=asked,
        chunk_frames=settings.chunk_frames if chunk_frames is None else chunk_frames,
        seed=seed,
        defaults=Defaults(
            avatar=avatar,
            voice=voice,
            webhook=webhook,
            template=template,
            spec=spec,
            size=asked,
        ),
    )
    ctx = make_context()
    checked = batches.load(ctx, name, manifest_path, options)
    for problem in checked.problems:
        click.echo(one_line(f"{manifest_path}: {problem}"), err=True)
    if checked.problems and not skip_invalid:
        good = len(checked.rows)
        raise InvalidInput(
            f"{len(checked.problems)} invalid row(s) in {manifest_path}; nothing submitted "
            f"(--skip-invalid submits the other {good})"
        )
    if not checked.rows:
        raise InvalidInput(f"{manifest_path} has no valid rows to submit")
    result = batches.submit(ctx, name, checked, options, source=str(manifest_path), webhook=webhook)
    click.echo(
        f"batch {name}: {len(result.created)} job(s) submitted, {result.existing} already "
        f"submitted, {len(result.problems)} invalid row(s) skipped"
    )


@batch.command(name="status")
@click.argument("name")
@click.option("--wait", is_flag=True, help="Show progress until every job has ended.")
@fail_cleanly
def batch_status(name: str, wait: bool) -> None:
    """Jobs per state, failures with their reasons; --wait shows a progress bar."""
    from farm import batches

    batches.check_name(name)

    ctx = make_context()
    st = batches.status(ctx, name)
    if wait:
        bar = _BatchProgress(sys.stderr)
        last_check = time.monotonic()
        while st.finished < st.total:
            bar.show(st)
            if ctx.settings.embedded and time.monotonic() - last_check > 5:
                from farm import embedded

                embedded.ensure_running(ctx.settings)
                last_check = time.monotonic()
            time.sleep(0.5)
            st = batches.status(ctx, name)
        bar.show(st)
        bar.close()
    click.echo(f"batch     {st.name} ({st.id})")
    click.echo(f"state     {st.state} ({st.fraction:.0%}, {st.finished}/{st.total} jobs ended)")
    order = list(states.PIPELINE) + [states.FAILED, states.CANCELLED]
    counts = "  ".join(f"{s} {st.counts[s]}" for s in order if st.counts.get(s))
    click.echo(f"jobs      {counts or 'none'}")
    for f in st.failures:
        click.echo(f"{f.state:9} {f.row}  job {f.job_id}: {f.error}")
    for bad in st.invalid:
        click.echo(f"invalid   {bad['row']}: {bad['reason']}")
    if st.report_key:
        click.echo(f"report    {ctx.store.url(st.report_key)}")
    if wait and st.failures:
        raise FarmError(f"batch {name}: {len(st.failures)} of {st.total} job(s) did not succeed")


class _BatchProgress(_ProgressLine):
    def show(self, st: Any) -> None:  # type: ignore[override]
        filled = int(st.fraction * self.WIDTH)
        bar = "#" * filled + "-" * (self.WIDTH - filled)
        failed = f", {len(st.failures)} failed" if st.failures else ""
        self._write(f"[{bar}] {st.finished}/{st.total} jobs ended{failed}")

    def _write(self, line: str) -> None:
        if line == self.last:
            return
        self.last = line
        self.stream.write(("\r" + line.ljust(70)) if self.tty else line + "\n")
        self.stream.flush()


@batch.command(name="report")
@click.argument("name")
@click.option(
    "--format", "fmt", type=click.Choice(["csv", "json"]), default="csv", show_default=True
)
@click.option(
    "--output",
    "-o",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the report here instead of stdout.",
)
@fail_cleanly
def batch_report(name: str, fmt: str, output: Path | None) -> None:
    """Every job of batch NAME: row, output key, state, output URL, duration, error."""
    import json

    from farm import batches

    batches.check_name(name)

    ctx = make_context()
    report = batches.report(ctx, name)
    text = batches.report_csv(report) if fmt == "csv" else json.dumps(report, indent=2) + "\n"
    if output is None:
        click.echo(text, nl=False)
    else:
        from farm.stores import write_user_file

        write_user_file(output, lambda path: path.write_text(text, encoding="utf-8"))
        click.echo(str(output))


# --- intake -----------------------------------------------------------------


@main.command()
@click.argument("url", metavar="URL")
@click.option("--queue", required=True, help="The AMQP queue to take messages from.")
@click.option("--avatar", default="demo", show_default=True, help="For messages that name none.")
@click.option(
    "--voice",
    default="joe",
    show_default=True,
    help=f"TTS voice: {', '.join(jobs.VOICES)} or one added with 'farm voice add'.",
)
@click.option(
    "--results",
    default=None,
    metavar="QUEUE",
    help="Publish results here for messages without reply_to [env FARM_INTAKE_RESULTS].",
)
@click.option(
    "--dead-letter",
    default=None,
    metavar="QUEUE",
    help="Where invalid messages go [env FARM_INTAKE_DEAD_LETTER; default QUEUE.dead].",
)
@fail_cleanly
def intake(
    url: str, queue: str, avatar: str, voice: str, results: str | None, dead_letter: str | None
) -> None:
    """Make a job of every message of an AMQP queue (amqp://user:pass@host/vhost) until
    Ctrl-C or SIGTERM; invalid messages go to the dead-letter queue."""
    from farm import intake as intake_lib

    ctx = make_context()
    consumer = intake_lib.Consumer(
        ctx,
        url,
        queue,
        avatar=avatar,
        voice=voice,
        results=results,
        dead_letter=dead_letter,
        say=lambda line: click.echo(f"farm intake: {one_line(line)}", err=True),
    )
    consumer.check_defaults()
    intake_lib.stop_on_signals(consumer)
    consumer.run()


# --- operations -------------------------------------------------------------


@main.command()
@click.option(
    "--queues",
    "-Q",
    default="cpu,render",
    show_default=True,
    help="Comma-separated queues to consume: cpu, render. Each also brings its bulk "
    "lane (cpu_bulk, render_bulk), taken only when the interactive queues are empty.",
)
@click.option(
    "--bulk/--no-bulk",
    default=True,
    show_default=True,
    help="Also consume the bulk lanes of the queues (batch jobs), after them.",
)
@click.option(
    "--concurrency",
    "-c",
    type=int,
    default=1,
    show_default=True,
    help="Worker processes (ignored with --gpus: one per GPU).",
)
@click.option(
    "--gpus",
    default=None,
    help="'all' or GPU indices: one pinned worker process per GPU, concurrency 1.",
)
@click.option(
    "--per-gpu",
    type=click.IntRange(1, 16),
    default=1,
    show_default=True,
    help="With --gpus: worker processes per GPU, each rendering and encoding its own "
    "chunk (more encodes in flight where the CPU encoder is the limit).",
)
@click.option("--hostname", "-n", default=None, help="Worker name (default QUEUES@host).")
@click.option("--loglevel", default="INFO", show_default=True)
@fail_cleanly
def worker(
    queues: str,
    bulk: bool,
    concurrency: int,
    gpus: str | None,
    per_gpu: int,
    hostname: str | None,
    loglevel: str,
) -> None:
    """Run Celery workers on this machine against the configured broker."""
    from farm import embedded
    from farm import gpus as gpu

    embedded.worker_queues(queues, bulk)  # unknown names: refused before anything starts
    _require_broker()
    base = hostname or queues.replace(",", "+")
    if gpus is None:
        argv = embedded.worker_argv(queues, concurrency, f"{base}@%h", loglevel, bulk=bulk)
        os.execv(argv[0], argv)
    chosen = gpu.select_gpus(gpus, gpu.visible_gpus())
    names = gpu.gpu_worker_names(base, chosen, per_gpu)
    argvs = {n: embedded.worker_argv(queues, 1, n, loglevel, bulk=bulk) for n in names}
    envs = {n: gpu.gpu_worker_env(g) for n, g in names.items()}
    click.echo(f"starting {len(names)} worker(s): {', '.join(names)}", err=True)
    sys.exit(gpu.supervise(argvs, envs))


_ANSWER_TIMEOUT = click.option(
    "--timeout",
    type=click.FloatRange(0.2, 60),
    default=2.0,
    show_default=True,
    help="Seconds to wait for the workers' answers.",
)


def _answering(timeout: float) -> tuple[Any, list[Any]]:
    """The dispatcher and the workers that answer (farm/health.py). On the embedded
    default the runtime is started if need be, and a fresh one is given time for its
    workers to come up."""
    from farm import embedded

    ctx = make_context()
    settings, dispatch = ctx.settings, ctx.dispatch
    on_demand = isinstance(dispatch, _OnDemandDispatcher)
    started = on_demand and settings.embedded and embedded.ensure_running(settings)
    expected = len(embedded.Supervisor(settings).worker_specs()) if started else 0
    deadline = time.monotonic() + (embedded.READY_TIMEOUT if started else 0)
    while True:
        reports = dispatch.worker_health(timeout)
        if len(reports) >= max(expected, 1) or time.monotonic() > deadline:
            break
    if not reports:
        raise RetryableError(f"no worker answered within {timeout:g} s")
    return dispatch, reports


@main.group(name="workers", invoke_without_command=True)
@_ANSWER_TIMEOUT
@click.pass_context
@fail_cleanly
def workers_group(click_ctx: click.Context, timeout: float) -> None:
    """List the workers that answer: whether each takes render work, its failures in a
    row, queues, GPU, render path, encoder and last error. A render worker leaves
    rotation after FARM_WORKER_MAX_FAILURES failures in a row that are not the input's."""
    if click_ctx.invoked_subcommand is not None:
        return
    from farm import health

    _, reports = _answering(timeout)
    for line in health.table(reports):
        click.echo("    " + one_line(line) if line.startswith(" ") else line)


@workers_group.command(name="resume")
@click.argument("name")
@_ANSWER_TIMEOUT
@fail_cleanly
def workers_resume(name: str, timeout: float) -> None:
    """Put worker NAME (render1@host, or render1) back in rotation: it consumes the
    render queues again and its failure count starts from 0."""
    dispatch, _ = _answering(timeout)
    full, queues = dispatch.resume_worker(name, timeout)
    if queues:
        click.echo(f"{full} takes render work again ({', '.join(queues)})")
    else:
        click.echo(f"{full} was taking render work; its failure count starts from 0")


@main.command()
@click.option("--port", type=int, default=5555, show_default=True)
@click.option(
    "--address",
    default="127.0.0.1",
    show_default=True,
    help="Interface to listen on (0.0.0.0 inside a container).",
)
@fail_cleanly
def flower(port: int, address: str) -> None:
    """Start Flower, the live dashboard of queues, workers and tasks, on the broker."""
    from farm import embedded

    _require_broker()
    argv = embedded.celery_argv("flower", f"--port={port}", f"--address={address}")
    os.execv(argv[0], argv)


def _require_broker() -> None:
    """Workers and Flower need a broker: the configured one, or a running embedded one."""
    from farm import embedded

    settings = Settings.from_env()
    if settings.embedded and embedded.running_pid(settings) is None:
        raise InvalidInput(
            "no broker: set FARM_BROKER_URL (e.g. redis://host:6379/0), or start the "
            "embedded runtime by submitting a job"
        )


@main.command(name="config")
@fail_cleanly
def show_config() -> None:
    """Print the effective settings (passwords in URLs masked)."""
    for name, value in Settings.from_env().describe().items():
        click.echo(f"FARM_{name.upper():24} {value}")


@main.command()
@fail_cleanly
def doctor() -> None:
    """Check this machine and the configured services, one line each, with the fix.

    Exit status 1 when something the configuration needs is broken. Starts nothing."""
    from farm import doctor as checks

    results = checks.run(Settings.from_env())
    for result in results:
        click.echo(checks.line(result, one_line))
    broken = checks.broken(results)
    if broken:
        names = ", ".join(dict.fromkeys(r.name for r in broken))
        raise checks.Unhealthy(f"{len(broken)} needed check(s) failed: {names}")


@main.group()
def models() -> None:
    """Renderer weights: check what a backend would load."""


@models.command(name="check")
@click.argument("renderer", type=click.Choice(["ditto"]))
@fail_cleanly
def models_check(renderer: str) -> None:
    """Load and check every checkpoint file of RENDERER without rendering (in a child
    process: this one never imports torch). Exit status 1 on a problem."""
    import subprocess

    root = Settings.from_env().renderer_dir(renderer)
    proc = subprocess.run(
        [sys.executable, "-m", f"models.{renderer}.checkpoints", str(root)],
        capture_output=True,
        text=True,
    )
    for line in proc.stdout.splitlines():
        click.echo(one_line(line))
    if proc.returncode != 0:
        detail = proc.stderr.strip().splitlines()[-1:] if proc.returncode != 1 else []
        raise InvalidInput(
            f"{renderer} checkpoints at {root} are not usable"
            + (f": {detail[0]}" if detail else "")
        )


@main.group(name="engines")
def engines_group() -> None:
    """TensorRT engines of the neural backends (GPU workers with farm[tensorrt])."""


@engines_group.command(name="build")
@click.option(
    "--renderer", required=True, type=click.Choice(["ditto", "gaussiantalker"]), help="backend"
)
@click.option(
    "--avatar",
    "avatars",
    multiple=True,
    help="an avatar to build for (gaussiantalker's engines are per avatar); repeatable",
)
@fail_cleanly
def engines_build(renderer: str, avatars: tuple[str, ...]) -> None:
    """Build RENDERER's engines now, on this machine, instead of at a worker's first job
    (minutes each; kept under FARM_MODEL_DIR/engines). Prints each engine's path."""
    import subprocess

    if renderer == "gaussiantalker" and not avatars:
        raise InvalidInput("--renderer gaussiantalker needs --avatar NAME (one engine per avatar)")
    make_context()  # a fresh embedded home gets its schema here, as for every command
    proc = subprocess.run(
        [sys.executable, "-m", "workers.engines", renderer, *avatars],
        capture_output=True,
        text=True,
    )
    for line in proc.stdout.splitlines():
        click.echo(one_line(line))
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["the build process failed"])[-1]
        raise InvalidInput(last.removeprefix("farm: error: "))


@main.command()
@fail_cleanly
def stop() -> None:
    """Stop the embedded runtime (workers finish their current task first)."""
    settings = Settings.from_env()
    from farm import embedded

    click.echo("stopped" if embedded.stop(settings) else "the embedded runtime is not running")


@main.group()
def db() -> None:
    """Database schema."""


@db.command(name="upgrade")
@click.option("--revision", default="head", show_default=True)
@fail_cleanly
def db_upgrade(revision: str) -> None:
    """Apply migrations (alembic upgrade) to the configured database."""
    from farm import migrate

    url = Settings.from_env().effective_database_url
    migrate.upgrade(url, revision)
    click.echo(f"database at {revision}")


@main.command()
@click.option(
    "--script",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Script to time (default: examples/bench.txt, ~30 s).",
)
@click.option("--runs", type=int, default=3, show_default=True, help="Runs per figure.")
@click.option("--sizes", default="512,1280x720", show_default=True, help="Output sizes.")
@click.option("--threads", default="1,2", show_default=True, help="Torch threads to try.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda.")
@click.option(
    "--batch",
    default="16",
    show_default=True,
    help="Frames per render batch to try, e.g. 16,64,256.",
)
@click.option(
    "--e2e/--no-e2e", default=True, show_default=True, help="Also time whole jobs through the farm."
)
@click.option(
    "--renderer",
    type=click.Choice(["portrait", "ditto", "gaussiantalker"]),
    default="portrait",
    show_default=True,
    help="ditto / gaussiantalker: plan s per audio s, render fps, peak memory (ditto: the "
    "checkpoints under FARM_DITTO_DIR; gaussiantalker: --model); no TTS or e2e figures.",
)
@click.option(
    "--model",
    type=click.Path(path_type=Path),
    default=None,
    help="With --renderer gaussiantalker: the trained model directory.",
)
@click.option(
    "--data",
    type=click.Path(path_type=Path),
    default=None,
    help="With --model: its training data directory [default: from cfg_args].",
)
@click.option(
    "--frames",
    type=click.IntRange(1, 100000),
    default=None,
    help="Frames rendered per figure [default: 250; with --renderer ditto on a CPU use few].",
)
@click.option(
    "--workers",
    default=None,
    help="Render worker counts to compare, e.g. 1,2 (needs FARM_BROKER_URL): "
    "chunk throughput and the farm's overhead per chunk.",
)
@click.option(
    "--frame-ms",
    default="0,40",
    show_default=True,
    help="With --workers: simulated render time per frame of the null renderer.",
)
@click.option(
    "--load",
    "load_jobs",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Submit N short jobs at once to workers of its own (needs FARM_BROKER_URL on "
    "Redis): jobs per minute, peak queue depth, memory per process, `farm jobs` latency.",
)
@click.option(
    "--quality",
    is_flag=True,
    default=False,
    help="Lip-sync quality instead of speed: render a fixed set (two Piper scripts and an "
    "audio-only espeak clip) through the farm and measure each MP4 with FaceMesh: sync "
    "correlation and lag, mouth closed in silence, video against audio duration.",
)
@click.option(
    "--outputs",
    is_flag=True,
    default=False,
    help="Deliverables instead: captions, burn-in, a background (segmentation), each "
    "format and drafts, against plain MP4 at 512 and 1080x1920 (whole jobs, --runs each).",
)
@click.option(
    "--json",
    "json_out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the figures as JSON here.",
)
@fail_cleanly
def bench(
    script: Path | None,
    runs: int,
    sizes: str,
    threads: str,
    device: str,
    batch: str,
    e2e: bool,
    renderer: str,
    model: Path | None,
    data: Path | None,
    frames: int | None,
    workers: str | None,
    frame_ms: str,
    load_jobs: int | None,
    quality: bool,
    outputs: bool,
    json_out: Path | None,
) -> None:
    """Measure TTS real-time factor, render and encode fps, and end-to-end wall/audio;
    with --renderer ditto, that backend's plan and render figures; with --workers,
    render-worker scaling and the per-chunk overhead instead; with --load, a farm under
    N jobs submitted at once; with --quality, lip-sync figures of a fixed set of jobs;
    with --outputs, what each deliverable costs against plain MP4."""

    from farm import bench as b

    if outputs:
        rows = b.outputs(make_context(), runs)
        click.echo(b.format_outputs(rows, runs))
        if json_out:
            _write_json(json_out, {"outputs": rows})
        return
    if quality:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="farm-quality-") as work:
            rows = b.quality(make_context(), Path(work))
        click.echo(b.format_quality(rows))
        if json_out:
            _write_json(json_out, {"quality": rows})
        return
    if load_jobs:
        result = b.load(make_context(), load_jobs)
        click.echo(b.format_load(result))
        if json_out:
            _write_json(json_out, {"load": result.figures()})
        return
    if workers:
        ctx, counts = make_context(), [int(v) for v in workers.split(",")]
        rows = [row for ms in frame_ms.split(",") for row in b.scaling(ctx, counts, int(ms))]
        click.echo(b.format_scaling(rows))
        if json_out:
            _write_json(json_out, {"scaling": rows})
        return

    script = script or b.DEFAULT_SCRIPT
    if renderer != "portrait":
        backend = ["--renderer", renderer]
        if renderer == "ditto":
            backend += ["--ditto-dir", str(Settings.from_env().renderer_dir("ditto"))]
        elif model is None:
            raise InvalidInput("--renderer gaussiantalker needs --model DIR (a trained model)")
        else:
            backend += ["--model", str(model)] + (["--data", str(data)] if data else [])
        stages = b.stage_figures(script, runs, sizes, threads, device, batch, backend, frames)
        click.echo(b.format_backend(stages))
        if json_out:
            _write_json(json_out, {"backend": stages})
        return
    stages = b.stage_figures(script, runs, sizes, threads, device, batch, frames=frames)
    e2e_row = None
    if e2e:
        ctx = make_context()
        text = script.read_text(encoding="utf-8")
        b.end_to_end(ctx, "Warm up the workers.", 1)
        e2e_row = b.end_to_end(ctx, text, runs)
    click.echo(b.format_report(stages, e2e_row))
    if json_out:
        _write_json(json_out, {"stages": stages, "e2e": e2e_row})


def _write_json(dest: Path, figures: dict[str, Any]) -> None:
    import json

    from farm.stores import write_user_file

    text = json.dumps(figures, indent=2)
    write_user_file(dest, lambda path: path.write_text(text, encoding="utf-8"))


@main.command(name="fetch")
@click.argument("job_id", metavar="JOB", callback=_JOB_ID)
@click.argument("dest", type=click.Path(dir_okay=False, path_type=Path))
@fail_cleanly
def fetch_output(job_id: str, dest: Path) -> None:
    """Copy a finished job's video (MP4, WebM or MOV, as its --format) to DEST."""
    ctx = make_context()
    job = jobs.find(ctx, job_id)
    if not job.output_key:
        raise InvalidInput(f"job {job.id} has no output (state {job.state})")
    _save_output(ctx, job, dest)


# --- live -------------------------------------------------------------------


@main.group(name="live", invoke_without_command=True)
@click.option("--avatar", default="demo", show_default=True, help="The avatar on air.")
@click.option("--rtmp", default=None, metavar="URL", help="rtmp://host/app/key to push to.")
@click.option("--amqp", default=None, metavar="URL", help="Take jobs from this AMQP broker.")
@click.option("--queue", default=None, help="The AMQP queue (with --amqp).")
@click.option("--stdin", "from_stdin", is_flag=True, help="One job per line of stdin.")
@click.option(
    "--hls",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    metavar="DIR",
    help="Also write an HLS playlist (DIR/index.m3u8).",
)
@click.option("--voice", default="joe", show_default=True, help="TTS voice of --stdin jobs.")
@click.option("--fps", type=int, default=None, help="[default: env FARM_FPS]")
@click.option("--size", default=None, metavar="N|WxH", help="[default: env FARM_SIZE]")
@click.option("--seed", type=int, default=0, show_default=True, help="Idle loop and jobs' seed.")
@click.pass_context
@fail_cleanly
def live(
    cctx: click.Context,
    avatar: str,
    rtmp: str | None,
    amqp: str | None,
    queue: str | None,
    from_stdin: bool,
    hls: Path | None,
    voice: str,
    fps: int | None,
    size: str | None,
    seed: int,
) -> None:
    """Put AVATAR on air at --rtmp: idle until a job of the channel finishes, then its
    video, then idle again. `farm live status` shows the channels."""
    if cctx.invoked_subcommand is not None:
        return
    from farm import live as live_lib

    if not rtmp or not rtmp.startswith(("rtmp://", "rtmps://")):
        raise InvalidInput("give --rtmp rtmp://host/app/key")
    _check_seed(seed)
    ctx = make_context()
    settings = ctx.settings
    dims = jobs.parse_size(size or str(settings.size))
    if dims == jobs.PHOTO_SIZE:
        raise InvalidInput("a live channel needs a fixed --size N or WxH")
    spec = live_lib.ChannelSpec(
        avatar, rtmp, fps or settings.fps, dims, seed, hls, settings.live_queue_max
    )
    say = lambda line: click.echo(f"farm live: {one_line(line)}", err=True)  # noqa: E731
    live_lib.run(ctx, spec, say, voice, amqp, queue, sys.stdin if from_stdin else None)


@live.command(name="status")
@click.option("--name", default=None, help="One channel (default: every channel).")
@fail_cleanly
def live_status(name: str | None) -> None:
    """State (idle, talking), pending jobs, uptime and latency of the live channels."""
    from farm import live as live_lib

    channels = live_lib.read_status(Settings.from_env().home, name)
    if not channels:
        click.echo("no live channel")
    for ch in channels:
        latency = ch.get("latency_seconds")
        cpu = ch.get("idle_cpu_percent")
        click.echo(
            f"{ch['name']}: {ch['state']}, up {ch['uptime_seconds']:.0f} s, "
            f"{ch['frames_on_air']} frames on air, {ch['jobs_aired']} jobs aired"
        )
        if ch.get("current_job"):
            click.echo(f"  talking: job {ch['current_job']}")
        pending = ch.get("pending") or []
        click.echo(f"  pending: {len(pending)} of {ch['queue_max']}")
        for p in pending:
            click.echo(f"    {p['job']} ({p['state']}, session {p['session'] or '-'})")
        for out, st in (ch.get("outputs") or {}).items():
            link = "connected" if st["connected"] else "down"
            click.echo(f"  {out}: {link}, {st['restarts']} restarts")
        click.echo(
            "  last latency (message to first talking frame): "
            + ("-" if latency is None else f"{latency:.2f} s")
        )
        click.echo("  idle CPU: " + ("-" if cpu is None else f"{cpu:.1f}% of one core"))
        for f in (ch.get("failures") or [])[-3:]:
            click.echo(f"  failed: {f['job']}: {one_line(f['error'])}")


if __name__ == "__main__":
    main()
