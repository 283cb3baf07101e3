"""`farm live`: an avatar on air, idle until a job of the channel finishes, then talking.

The channel is one clock and one encoder. A feeder thread writes the programme frame by
frame at the channel's frame rate, raw YUV 4:2:0 video and PCM audio, into one
long-lived ffmpeg that encodes it (libx264 zerolatency, AAC) to MPEG-TS. The encoder
stamps frame k at k/fps whatever happens upstream or downstream, so the timestamps
advance by exactly one frame per frame and the audio is continuous (silence when idle).
A fan-out thread copies the TS to each output, an ffmpeg of its own that stream-copies
it to FLV over RTMP (`-copyts`: the timestamps are the encoder's) and, with `--hls`, to
an HLS playlist. An output that fails (the RTMP server dropped the connection, or is
down) is restarted, with backoff, at the live point: the channel keeps its clock and its
place, and the new connection's timestamps continue the old one's.

What goes on air:
- the idle loop, rendered once per (avatar, fps, size, seed) by the avatar's backend in a
  child process (`workers/live_idle.py`, the backend's `idle_plan`) and kept in memory as
  raw frames: replayed, never rendered again. It is seamless (its last frame leads into
  its first) and passes through the rest pose at its cut points.
- at a cut point, the next job that is ready, in message order per session: its MP4
  decoded to frames and PCM. Its first frame replaces the loop's cut frame and its last
  is dropped, because both are the rest pose (models/motion.py settle_ends): the loop
  goes on from that cut point, without a held frame.

Jobs render on the farm's workers as any job; the channel polls their state. A job that
fails is dropped (the channel stays idle) and reported. The queue of pending jobs is
bounded (FARM_LIVE_QUEUE_MAX). The channel's state is a JSON file under FARM_HOME/live/,
rewritten atomically every second: `farm live status` reads it.

Never imports torch: rendering happens in the child process and on the workers.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from farm import jobs, queries, states
from farm.context import Context
from farm.errors import FarmError, InvalidInput, PermanentError
from farm.media import ffmpeg_exe

RATE = 48_000  # Hz, mono s16le on air
TS_PACKET = 188
RECONNECT_SECONDS = (0.5, 1.0, 2.0, 4.0)  # backoff between output restarts, then the last
OUTPUT_BACKLOG = 200  # TS reads queued for one output before it counts as stalled
POLL_SECONDS = 0.05  # how often pending jobs' states are read (one indexed row each)
STATUS_SECONDS = 1.0
EDGE_FRAMES = 8  # a job's coding noise is faded to the loop's over this many frames
IDLE_VERSION = "2"  # bump when the idle loop's motion changes: cached loops are redone


class QueueFull(FarmError):
    """The channel already holds FARM_LIVE_QUEUE_MAX pending jobs."""


@dataclass(frozen=True)
class ChannelSpec:
    avatar: str
    rtmp: str
    fps: int
    size: tuple[int, int]
    seed: int = 0
    hls_dir: Path | None = None
    queue_max: int = 16
    name: str = ""  # the status file's name; default: the avatar's

    @property
    def key(self) -> str:
        return self.name or self.avatar


def status_path(home: Path, name: str) -> Path:
    jobs.check_avatar_name(name)  # the same rule keeps path characters out
    return home / "live" / f"{name}.json"


def show_url(url: str) -> str:
    """An RTMP URL without its stream key (the last path part is a secret)."""
    head, sep, _ = url.rpartition("/")
    return f"{head}/***" if sep and "://" in head else url


# --- clips: frames and audio, ready to go on air -----------------------------------------


@dataclass
class Clip:
    """Raw frames (YUV 4:2:0, the channel's size) and mono PCM at RATE, frame-aligned."""

    frames: list[bytes]
    audio: np.ndarray  # int16, at RATE, from the clip's first frame

    def samples(self, i: int, fps: int, count: int) -> bytes:
        start = i * RATE // fps
        chunk = self.audio[start : start + count]
        if chunk.size < count:
            chunk = np.concatenate([chunk, np.zeros(count - chunk.size, np.int16)])
        return chunk.tobytes()

    def first_voiced(self, fps: int) -> int:
        """The first frame with sound (above a tenth of the loud level), 0 if none."""
        n = len(self.frames)
        if self.audio.size == 0 or n == 0:
            return 0
        x = self.audio.astype(np.float64) / 32768.0
        per = [x[i * RATE // fps : (i + 1) * RATE // fps] for i in range(n)]
        rms = np.array([math.sqrt(float(np.mean(p**2))) if p.size else 0.0 for p in per])
        loud = float(np.percentile(rms, 95))
        above = np.flatnonzero(rms > 0.1 * loud) if loud > 0 else np.array([], int)
        return int(above[0]) if above.size else 0


def latency_parts(job: Pending, first_on_air: float, talking: float) -> dict[str, float]:
    """Where a job's latency went, in seconds: `job` (message to the job's row ended:
    submit, TTS, plan, render, mux, publish), `notice` (to the channel reading that),
    `decode` (fetching and decoding its MP4), `cut` (waiting for the loop's next cut
    point), `lead_in` (its first frame on air to its first talking frame)."""
    parts = {
        "job": job.finished - job.received,
        "notice": job.noticed - job.finished,
        "decode": job.ready - job.noticed,
        "cut": first_on_air - job.ready,
        "lead_in": talking - first_on_air,
    }
    return {name: round(value, 3) for name, value in parts.items()}


def match_edges(
    frames: list[bytes], rest: bytes, count: int, rest_out: bytes | None = None
) -> list[bytes]:
    """A job's frames with its first frame made the loop's rest frame exactly, and its
    last too, the difference faded out (and in) over `count` frames at each end.

    Both ends already show the rest pose (the plans guarantee it); what differs is the
    coding noise of the job's lossy MP4 against the loop's lossless one (about 1.8 grey
    levels at 128x128): switched at once, it is a flicker of texture at the cut."""
    n = len(frames)
    if n == 0:
        return frames
    out = list(frames)
    for end, index in (("start", 0), ("end", n - 1)):
        edge = rest if end == "start" or rest_out is None else rest_out
        ref = np.frombuffer(edge, np.uint8).astype(np.int16)
        offset = ref - np.frombuffer(frames[index], np.uint8).astype(np.int16)
        for step in range(min(count, n)):
            i = step if end == "start" else n - 1 - step
            weight = 0.5 + 0.5 * math.cos(math.pi * step / count)  # 1 at the edge, -> 0
            base = np.frombuffer(out[i], np.uint8).astype(np.int16)
            fixed = base + np.rint(weight * offset).astype(np.int16)
            out[i] = np.clip(fixed, 0, 255).astype(np.uint8).tobytes()
    return out


def frame_bytes(size: tuple[int, int]) -> int:
    width, height = size
    return width * height * 3 // 2


def decode_clip(path: Path, fps: int, size: tuple[int, int], audio: bool = True) -> Clip:
    """A video file as the channel's frames (scaled and resampled to its size and rate
    when they differ) and its audio as mono PCM at RATE (silence when it has none)."""
    exe = ffmpeg_exe()
    width, height = size
    video = subprocess.run(
        [exe, "-hide_banner", "-loglevel", "error", "-i", str(path), "-map", "0:v:0"]
        + ["-vf", f"scale={width}:{height},fps={fps}", "-pix_fmt", "yuv420p"]
        + ["-f", "rawvideo", "pipe:1"],
        capture_output=True,
    )
    if video.returncode != 0:
        raise PermanentError(f"cannot decode {path.name}: {_tail(video.stderr)}")
    step = frame_bytes(size)
    data = video.stdout
    frames = [data[i : i + step] for i in range(0, len(data) - step + 1, step)]
    pcm = np.zeros(0, np.int16)
    if audio:
        sound = subprocess.run(
            [exe, "-hide_banner", "-loglevel", "error", "-i", str(path), "-map", "0:a:0?"]
            + ["-ac", "1", "-ar", str(RATE), "-f", "s16le", "pipe:1"],
            capture_output=True,
        )
        if sound.returncode != 0:
            raise PermanentError(f"cannot decode the audio of {path.name}: {_tail(sound.stderr)}")
        pcm = np.frombuffer(sound.stdout, dtype="<i2").astype(np.int16)
    return Clip(frames, pcm)


def _tail(stderr: bytes) -> str:
    lines = [ln for ln in stderr.decode("utf-8", "replace").splitlines() if ln.strip()]
    return " | ".join(lines[-3:]) if lines else "no output"


# --- the idle loop --------------------------------------------------------------------------


@dataclass
class IdleLoop:
    clip: Clip  # the loop's frames, then its exits'
    cuts: frozenset[int]  # frames where a job may start (the rest pose)
    renderer: str
    loop: int = 0  # frames of the loop itself (0: all of clip)
    exits: dict[int, int] = field(default_factory=dict)  # loop frame -> its exit's first
    exit_frames: int = 0  # frames of each exit, the last one the rest pose

    def __post_init__(self) -> None:
        self.loop = self.loop or len(self.clip.frames)

    def next_cut(self, position: int) -> int:
        """The first cut point at or after `position` in the loop (cyclically)."""
        return min(self.cuts, key=lambda c: (c - position) % self.loop)


def idle_loop(ctx: Context, spec: ChannelSpec, say: Callable[[str], None]) -> IdleLoop:
    """The avatar's idle loop, from the cache under FARM_HOME/live/, else rendered now by
    its backend in a child process (the control plane never imports torch)."""
    with ctx.session() as s:
        row = queries.get_avatar(s, spec.avatar)
        artifact = row.artifact_key if row is not None else None
    if row is None and spec.avatar not in jobs.BUILTIN_AVATARS:
        raise InvalidInput(f"unknown avatar {spec.avatar!r}; add it with 'farm avatar add'")
    width, height = spec.size
    ident = f"{IDLE_VERSION}|{spec.avatar}|{artifact}|{spec.fps}|{width}x{height}|{spec.seed}"
    digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
    folder = ctx.settings.home / "live"
    folder.mkdir(parents=True, exist_ok=True)
    video, meta = folder / f"idle-{digest}.mp4", folder / f"idle-{digest}.json"
    if not (video.exists() and meta.exists()):
        say(f"rendering the idle loop of {spec.avatar} ({width}x{height}, {spec.fps} fps)")
        with tempfile.TemporaryDirectory(prefix="farm-idle-", dir=folder) as tmp:
            out = Path(tmp) / "idle.mp4"
            argv = [sys.executable, "-m", "workers.live_idle", spec.avatar, str(spec.fps)]
            argv += [str(width), str(height), str(spec.seed), str(out)]
            env = {**os.environ, **ctx.settings.as_env()}
            proc = subprocess.run(argv, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
                reason = lines[-1] if lines else f"exit status {proc.returncode}"
                raise PermanentError(f"the idle loop could not be rendered: {reason}")
            info = proc.stdout.strip().splitlines()[-1]
            os.replace(out, video)
            _atomic_write(meta, info)
    info = json.loads(meta.read_text())
    clip = decode_clip(video, spec.fps, spec.size, audio=False)
    if len(clip.frames) != info["frames"]:
        raise PermanentError(f"the idle loop has {len(clip.frames)} frames, not {info['frames']}")
    loop, length = int(info.get("loop", info["frames"])), int(info.get("exit_frames", 0))
    exits = {int(j): loop + i * length for i, j in enumerate(info.get("exits", []))}
    return IdleLoop(clip, frozenset(info["cuts"]), info["renderer"], loop, exits, length)


# --- the outputs ------------------------------------------------------------------------------


def encoder_argv(
    exe: str, fps: int, size: tuple[int, int], audio_fd: int, offset: float = 0.0
) -> list[str]:
    """Raw frames on stdin and PCM on `audio_fd` to MPEG-TS on stdout, stamped by count:
    frame k at k/fps. A keyframe every second, so an output that joins finds one soon."""
    width, height = size
    argv = [exe, "-hide_banner", "-nostats", "-loglevel", "error"]
    argv += ["-f", "rawvideo", "-pix_fmt", "yuv420p", "-s", f"{width}x{height}"]
    argv += ["-framerate", str(fps), "-i", "pipe:0"]
    argv += ["-f", "s16le", "-ar", str(RATE), "-ac", "1", "-i", f"pipe:{audio_fd}"]
    argv += ["-map", "0:v", "-map", "1:a", "-c:v", "libx264", "-preset", "ultrafast"]
    argv += ["-tune", "zerolatency", "-crf", "23", "-maxrate", "3M", "-bufsize", "3M"]
    argv += ["-g", str(fps), "-keyint_min", str(fps), "-sc_threshold", "0"]
    argv += ["-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", "128k"]
    if offset:
        argv += ["-output_ts_offset", f"{offset:.6f}"]
    argv += ["-flush_packets", "1", "-f", "mpegts", "pipe:1"]
    return argv


def _copy_input(exe: str) -> list[str]:
    return [
        exe, "-hide_banner", "-nostats", "-loglevel", "error",
        "-analyzeduration", "2000000", "-f", "mpegts", "-i", "pipe:0",
        "-map", "0", "-c", "copy", "-copyts",
    ]  # fmt: skip


def rtmp_argv(exe: str, url: str) -> list[str]:
    return _copy_input(exe) + ["-flvflags", "no_duration_filesize", "-f", "flv", url]


def hls_argv(exe: str, folder: Path) -> list[str]:
    """A live HLS playlist (index.m3u8) of 2-second segments, old ones deleted."""
    return _copy_input(exe) + [
        "-f", "hls", "-hls_time", "2", "-hls_list_size", "10",
        "-hls_flags", "delete_segments+independent_segments",
        "-hls_segment_filename", str(folder / "seg%06d.ts"), str(folder / "index.m3u8"),
    ]  # fmt: skip


class Output:
    """One ffmpeg that takes the channel's TS on stdin, restarted whenever it fails (a
    dropped RTMP connection, a server that is down, a stalled write), at the live point."""

    def __init__(self, name: str, argv: list[str], say: Callable[[str], None]) -> None:
        self.name, self.argv, self.say = name, argv, say
        self.queue: deque[bytes | None] = deque()
        self.ready = threading.Condition()
        self.connected = False
        self.restarts = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"live-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def put(self, data: bytes) -> None:
        with self.ready:
            if len(self.queue) >= OUTPUT_BACKLOG:
                self.queue.clear()  # stalled: the writer restarts it, from the live point
                if self.proc is not None:
                    self.proc.kill()
            self.queue.append(data)
            self.ready.notify()

    def stop(self) -> None:
        """End of input: ffmpeg finishes its stream or playlist and exits; one that does
        not within seconds is stopped."""
        with self.ready:
            self.queue.append(None)
            self.ready.notify()
        self._thread.join(timeout=8)
        self._stop.set()
        with self.ready:
            self.ready.notify()
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            started = time.monotonic()
            with self.ready:
                self.queue.clear()  # join at the live point
            log = tempfile.TemporaryFile()
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log
            )
            reason = self._pump(self.proc)
            self.connected = False
            if reason == "eof":
                break
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            if self._stop.is_set():
                break
            log.seek(0)
            detail = _tail(log.read()) if reason == "exited" else reason
            log.close()
            failures = 0 if time.monotonic() - started > 10 else failures + 1
            pause = RECONNECT_SECONDS[min(failures, len(RECONNECT_SECONDS) - 1)]
            self.restarts += 1
            self.say(f"{self.name}: output stopped ({detail}); restarting in {pause:.1f} s")
            self._stop.wait(pause)

    def _pump(self, proc: subprocess.Popen[bytes]) -> str:
        assert proc.stdin is not None
        while not self._stop.is_set():
            with self.ready:
                while not self.queue and not self._stop.is_set():
                    if proc.poll() is not None:
                        return "exited"
                    self.ready.wait(0.5)
                if self._stop.is_set():
                    return "stopped"
                data = self.queue.popleft()
            if data is None:  # the channel stopped: end of input
                try:
                    proc.stdin.close()
                    proc.wait(timeout=6)
                except (OSError, subprocess.TimeoutExpired):
                    pass
                return "eof"
            try:
                proc.stdin.write(data)
                proc.stdin.flush()
            except (BrokenPipeError, OSError, ValueError):
                return "exited"
            self.connected = proc.poll() is None
        return "stopped"


# --- the channel ------------------------------------------------------------------------------


@dataclass
class Pending:
    job_id: str
    session: str
    received: float  # time.time() when the message came
    state: str = "rendering"  # rendering | ready
    clip: Clip | None = None
    # time.time() of: the job's row ended (succeeded), the channel saw it, its clip ready
    finished: float = 0.0
    noticed: float = 0.0
    ready: float = 0.0


@dataclass
class Stats:
    started: float = field(default_factory=time.time)
    frames: int = 0  # frames on air since the start
    state: str = "starting"  # starting | idle | talking | stopped
    current: str | None = None
    aired: int = 0
    latencies: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=20))
    failures: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=20))
    idle_cpu: list[float] = field(default_factory=list)  # per-second samples while idle


class Channel:
    """One avatar on air. `start()` renders (or loads) the idle loop and goes on air;
    `add(job_id, session)` queues a job of the channel; `stop()` ends the broadcast."""

    def __init__(
        self,
        ctx: Context,
        spec: ChannelSpec,
        say: Callable[[str], None] | None = None,
        on_failed: Callable[[str, str], None] | None = None,
    ) -> None:
        self.ctx, self.spec = ctx, spec
        self.say = say or (lambda line: print(f"farm live: {line}", file=sys.stderr, flush=True))
        self.on_failed = on_failed
        self.stats = Stats()
        self.pending: list[Pending] = []
        self.lock = threading.Lock()
        self.outputs: list[Output] = []
        self.idle: IdleLoop | None = None
        self.status_file = status_path(ctx.settings.home, spec.key)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._encoder: subprocess.Popen[bytes] | None = None
        self._audio: IO[bytes] | None = None
        self._busy_until = 0.0  # decoding a job: not an idle second for the CPU figure

    # --- queue ---------------------------------------------------------------------------

    def has_room(self) -> bool:
        with self.lock:
            return len(self.pending) < self.spec.queue_max

    def add(self, job_id: str, session: str = "", received: float | None = None) -> None:
        """Queue a job of this channel; QueueFull when FARM_LIVE_QUEUE_MAX are pending."""
        with self.lock:
            if len(self.pending) >= self.spec.queue_max:
                raise QueueFull(
                    f"the channel's queue is full ({self.spec.queue_max} pending jobs, "
                    f"FARM_LIVE_QUEUE_MAX): job {job_id} refused"
                )
            self.pending.append(Pending(job_id, session or "", received or time.time()))
        self.say(f"job {job_id} queued (session {session or '-'})")

    def _next_ready(self) -> Pending | None:
        """The first job that is ready and first of its session (message order)."""
        with self.lock:
            seen: set[str] = set()
            for item in self.pending:
                if item.session in seen:
                    continue
                seen.add(item.session)
                if item.state == "ready":
                    self.pending.remove(item)
                    return item
        return None

    # --- running -------------------------------------------------------------------------

    def start(self) -> None:
        self.idle = idle_loop(self.ctx, self.spec, self.say)
        self._start_encoder(0.0)
        exe = ffmpeg_exe()
        self.outputs.append(Output("rtmp", rtmp_argv(exe, self.spec.rtmp), self.say))
        if self.spec.hls_dir is not None:
            self.spec.hls_dir.mkdir(parents=True, exist_ok=True)
            self.outputs.append(Output("hls", hls_argv(exe, self.spec.hls_dir), self.say))
        for output in self.outputs:
            output.start()
        for target, name in (
            (self._feed, "feed"),
            (self._fan_out, "fan-out"),
            (self._watch, "watch"),
            (self._report, "status"),
        ):
            thread = threading.Thread(target=target, name=f"live-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        cuts = sorted(self.idle.cuts)
        self.say(
            f"on air: {show_url(self.spec.rtmp)} ({self.idle.renderer} idle loop of "
            f"{self.idle.loop} frames, a cut point every "
            f"{(cuts[1] - cuts[0]) if len(cuts) > 1 else self.idle.loop} frames, "
            f"{len(self.idle.exits)} exits of {self.idle.exit_frames} frames between them)"
        )

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            if thread.name in ("live-feed", "live-watch", "live-status"):
                thread.join(timeout=10)
        encoder = self._encoder
        if encoder is not None:
            feeding = any(t.name == "live-feed" and t.is_alive() for t in self._threads)
            if feeding:  # blocked in a write: closing its pipes would wait for the lock
                encoder.terminate()
            else:
                for pipe in (encoder.stdin, self._audio):
                    try:
                        pipe.close() if pipe else None
                    except OSError:
                        pass
            try:
                encoder.wait(timeout=5)
            except subprocess.TimeoutExpired:
                encoder.kill()
                encoder.wait()
        for thread in self._threads:
            thread.join(timeout=5)
        for output in self.outputs:
            output.stop()
        self.stats.state = "stopped"
        self._write_status()

    def wait(self) -> None:
        """Until stop() or SIGINT/SIGTERM (main thread)."""
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, lambda *_: self._stop.set())
        while not self._stop.wait(0.5):
            pass

    def _start_encoder(self, offset: float) -> None:
        read_fd, write_fd = os.pipe()
        self._encoder = subprocess.Popen(
            encoder_argv(ffmpeg_exe(), self.spec.fps, self.spec.size, read_fd, offset),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            pass_fds=(read_fd,),
        )
        os.close(read_fd)
        self._audio = open(write_fd, "wb")  # noqa: SIM115 (closed by stop)

    def _write_frame(self, frame: bytes, audio: bytes) -> None:
        """One frame and its audio to the encoder; an encoder that died is started again
        with its timestamps offset to the channel's clock (no jump on air)."""
        for _ in range(2):
            try:
                assert self._encoder is not None and self._encoder.stdin and self._audio
                self._audio.write(audio)
                self._audio.flush()
                self._encoder.stdin.write(frame)
                self._encoder.stdin.flush()
                return
            except (BrokenPipeError, OSError, ValueError):
                if self._stop.is_set():
                    return
                self.say("the encoder stopped; starting it again")
                self._start_encoder(self.stats.frames / self.spec.fps)
                thread = threading.Thread(target=self._fan_out, name="live-fan-out", daemon=True)
                thread.start()
                self._threads.append(thread)

    def _feed(self) -> None:
        """The clock: one frame every 1/fps, idle loop or job, never a gap."""
        assert self.idle is not None
        idle = self.idle.clip
        start = time.monotonic()
        position = 0  # in the idle loop
        self.stats.state = "idle"
        while not self._stop.is_set():
            if position in self.idle.cuts and (job := self._next_ready()) is not None:
                self._air(job, start, idle.frames[position], idle.frames[position])
                if self._stop.is_set():
                    break
            self._write_idle(start, idle.frames[position])
            if position in self.idle.exits and (job := self._next_ready()) is not None:
                # Out of the loop between its cut points: the exit eases it to the rest
                # pose; the job takes the place of the exit's last frame (rest), and the
                # loop goes on from its next cut point (rest) after the job.
                first = self.idle.exits[position]
                for index in range(first, first + self.idle.exit_frames - 1):
                    self._write_idle(start, idle.frames[index])
                position = self.idle.next_cut(position + 1)
                rest = idle.frames[first + self.idle.exit_frames - 1]
                self._air(job, start, rest, idle.frames[position])
                if self._stop.is_set():
                    break
                continue
            position = (position + 1) % self.idle.loop

    def _write_idle(self, start: float, frame: bytes) -> None:
        fps, k = self.spec.fps, self.stats.frames
        count = (k + 1) * RATE // fps - k * RATE // fps
        self._pace(start, k)
        self._write_frame(frame, bytes(2 * count))
        self.stats.frames += 1

    def _pace(self, start: float, k: int) -> None:
        delay = start + k / self.spec.fps - time.monotonic()
        if delay > 0:
            self._stop.wait(delay)

    def _air(self, job: Pending, start: float, rest_in: bytes, rest_out: bytes) -> None:
        assert job.clip is not None and self.idle is not None
        fps, clip = self.spec.fps, job.clip
        # The job's first frame is the rest pose the loop's cut frame shows (`rest_in`): it
        # takes its place. Its last is the rest pose again, and the loop's cut frame
        # (`rest_out`) follows: dropped.
        frames = match_edges(clip.frames, rest_in, EDGE_FRAMES, rest_out)
        frames = frames[:-1] if len(frames) > 1 else frames
        voiced = min(clip.first_voiced(fps), len(frames) - 1)
        first_on_air = 0.0
        self.stats.state, self.stats.current = "talking", job.job_id
        self.say(f"on air: job {job.job_id} ({len(frames)} frames)")
        for i, frame in enumerate(frames):
            if self._stop.is_set():
                return
            k = self.stats.frames
            count = (k + 1) * RATE // fps - k * RATE // fps
            self._pace(start, k)
            self._write_frame(frame, clip.samples(i, fps, count))
            self.stats.frames += 1
            if i == 0:
                first_on_air = time.time()
            if i == voiced:
                now = time.time()
                latency = now - job.received
                self.stats.latencies.append(
                    {
                        "job": job.job_id,
                        "seconds": round(latency, 3),
                        "frame": k,  # the first talking frame, on the channel's clock
                        "first_frame": k - i,  # the job's first frame
                        "frames": len(frames),
                        "parts": latency_parts(job, first_on_air, now),
                    }
                )
                self.say(f"job {job.job_id}: first talking frame on air {latency:.2f} s after")
        self.stats.aired += 1
        self.stats.state, self.stats.current = "idle", None

    def _fan_out(self) -> None:
        encoder = self._encoder
        assert encoder is not None and encoder.stdout is not None
        fd = encoder.stdout.fileno()
        rest = b""
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                break
            if not data:
                break
            data = rest + data
            cut = len(data) - len(data) % TS_PACKET
            rest = data[cut:]
            if cut:
                for output in self.outputs:
                    output.put(data[:cut])

    def _watch(self) -> None:
        """Jobs' states, every POLL_SECONDS: a finished one is fetched and decoded, a
        failed one dropped and reported."""
        while not self._stop.wait(POLL_SECONDS):
            with self.lock:
                waiting = [p for p in self.pending if p.state == "rendering"]
            for item in waiting:
                try:
                    self._check(item)
                except FarmError as exc:
                    self._drop(item, str(exc))
                except Exception as exc:  # an outage: try again at the next poll
                    self.say(f"job {item.job_id}: cannot read it now ({exc})")

    def _check(self, item: Pending) -> None:
        job = jobs.find(self.ctx, item.job_id)
        if job.state in (states.FAILED, states.CANCELLED):
            self._drop(item, f"{job.state}: {job.error or 'no reason recorded'}")
            return
        if job.state != states.SUCCEEDED:
            return
        assert job.output_key is not None
        item.noticed = time.time()
        item.finished = job.finished_at.timestamp() if job.finished_at else item.noticed
        self._busy_until = time.monotonic() + 3600
        try:
            with tempfile.TemporaryDirectory(prefix="farm-live-") as tmp:
                path = self.ctx.store.get_file(job.output_key, Path(tmp) / "job.mp4")
                clip = decode_clip(path, self.spec.fps, self.spec.size)
        finally:
            self._busy_until = time.monotonic() + STATUS_SECONDS
        if (job.width, job.height) != self.spec.size or job.fps != self.spec.fps:
            self.say(
                f"job {item.job_id} is {job.width}x{job.height} at {job.fps} fps, the channel "
                f"{self.spec.size[0]}x{self.spec.size[1]} at {self.spec.fps}: scaled"
            )
        if not clip.frames:
            raise PermanentError(f"job {item.job_id}'s video has no frames")
        item.clip, item.ready, item.state = clip, time.time(), "ready"

    def _drop(self, item: Pending, reason: str) -> None:
        with self.lock:
            if item in self.pending:
                self.pending.remove(item)
        self.stats.failures.append({"job": item.job_id, "error": reason[:500], "at": time.time()})
        self.say(f"job {item.job_id} failed, staying idle: {reason}")
        if self.on_failed is not None:
            try:
                self.on_failed(item.job_id, reason)
            except Exception as exc:
                self.say(f"could not publish the failure of job {item.job_id}: {exc}")

    # --- status ------------------------------------------------------------------------------

    def _report(self) -> None:
        import psutil

        me = psutil.Process()
        last_cpu, last_wall = None, time.monotonic()
        while not self._stop.wait(STATUS_SECONDS):
            cpu = _cpu_seconds(me)
            now = time.monotonic()
            idle = self.stats.state == "idle" and now > self._busy_until
            with self.lock:
                idle = idle and not any(p.state == "rendering" for p in self.pending)
            if last_cpu is not None and idle and now > last_wall:
                self.stats.idle_cpu.append(100.0 * (cpu - last_cpu) / (now - last_wall))
                del self.stats.idle_cpu[:-300]
            last_cpu, last_wall = cpu, now
            self._write_status()

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            pending = [
                {"job": p.job_id, "session": p.session, "state": p.state} for p in self.pending
            ]
        latencies = list(self.stats.latencies)
        idle_cpu = self.stats.idle_cpu
        return {
            "name": self.spec.key,
            "avatar": self.spec.avatar,
            "pid": os.getpid(),
            "state": self.stats.state,
            "current_job": self.stats.current,
            "pending": pending,
            "queue_max": self.spec.queue_max,
            "started_at": self.stats.started,
            "updated_at": time.time(),
            "uptime_seconds": round(time.time() - self.stats.started, 1),
            "frames_on_air": self.stats.frames,
            "fps": self.spec.fps,
            "size": list(self.spec.size),
            "jobs_aired": self.stats.aired,
            "rtmp": show_url(self.spec.rtmp),
            "outputs": {
                o.name: {"connected": o.connected, "restarts": o.restarts} for o in self.outputs
            },
            "hls": str(self.spec.hls_dir / "index.m3u8") if self.spec.hls_dir else None,
            "latency_seconds": latencies[-1]["seconds"] if latencies else None,
            "latencies": latencies,
            "failures": list(self.stats.failures),
            "idle_cpu_percent": round(float(np.median(idle_cpu)), 2) if idle_cpu else None,
        }

    def _write_status(self) -> None:
        try:
            _atomic_write(self.status_file, json.dumps(self.snapshot(), indent=1))
        except OSError as exc:
            self.say(f"cannot write {self.status_file}: {exc}")


def _cpu_seconds(me: Any) -> float:
    """CPU time of this process and its children alive now (encoder, outputs)."""
    import psutil

    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:
            pass
    return total


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# --- status, read by `farm live status` ---------------------------------------------------------


def read_status(home: Path, name: str | None = None) -> list[dict[str, Any]]:
    """The status of one channel, or of every channel under FARM_HOME/live/; a channel
    whose process is gone shows as stopped."""
    folder = home / "live"
    paths = [status_path(home, name)] if name else sorted(folder.glob("*.json"))
    found = []
    for path in paths:
        if path.name.startswith("idle-") or not path.exists():
            continue
        try:
            status = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if status.get("state") != "stopped" and not _alive(status.get("pid")):
            status["state"] = "stopped"
        found.append(status)
    if name and not found:
        raise InvalidInput(f"no live channel {name!r} under {folder}")
    return found


def _alive(pid: Any) -> bool:
    from farm.embedded import pid_alive

    return isinstance(pid, int) and pid > 0 and pid_alive(pid)


# --- sources of jobs ------------------------------------------------------------------------------


def submit_text(ctx: Context, channel: Channel, text: str, voice: str, session: str = "") -> str:
    """A line of text as a job of the channel (`farm live --stdin`): refused before any
    row exists when the channel's queue is full."""
    received = time.time()
    if not channel.has_room():
        raise QueueFull(f"the channel's queue is full ({channel.spec.queue_max} pending jobs)")
    s = ctx.settings
    request = jobs.JobRequest(
        script=text,
        avatar=channel.spec.avatar,
        voice=voice,
        fps=channel.spec.fps,
        size=channel.spec.size,
        chunk_frames=s.chunk_frames,
        seed=channel.spec.seed,
    )
    job_id = jobs.submit(ctx, request)
    channel.add(job_id, session, received)
    return job_id


def on_job_hook(ctx: Context, channel: Channel) -> Callable[[str, Any], None]:
    """farm/intake.py Consumer's `on_job(job_id, message)`: the job joins the channel in
    message order per session (`session_id`); with the queue full it is cancelled, and
    the consumer publishes that result to the message's reply queue."""

    def on_job(job_id: str, message: Any) -> None:
        session = getattr(message, "session_id", None) or ""
        try:
            channel.add(job_id, session, getattr(message, "received", None))
        except QueueFull as exc:
            channel.stats.failures.append({"job": job_id, "error": str(exc), "at": time.time()})
            channel.say(str(exc))
            try:
                jobs.cancel(ctx, job_id)
            except FarmError:
                pass

    return on_job


def run(
    ctx: Context,
    spec: ChannelSpec,
    say: Callable[[str], None],
    voice: str = "joe",
    amqp: str | None = None,
    queue: str | None = None,
    lines: IO[str] | None = None,
) -> None:
    """`farm live`: on air until Ctrl-C or SIGTERM, jobs from an AMQP queue (farm/intake.py
    Consumer, its `on_job` hook) and/or one job per line of `lines` (`--stdin`)."""
    consumer = None
    if amqp is not None:
        from farm import intake

        if not queue:
            raise InvalidInput("--amqp needs --queue NAME")
        consumer = intake.Consumer(
            ctx,
            amqp,
            queue,
            avatar=spec.avatar,
            voice=voice,
            say=say,
            on_job=None,
            fps=spec.fps,  # the channel's: jobs are not rendered at another size and scaled
            size=spec.size,
        )
        consumer.check_defaults()
    channel = Channel(ctx, spec, say)
    channel.start()
    threads = []
    if consumer is not None:
        consumer.on_job = on_job_hook(ctx, channel)
        threads.append(threading.Thread(target=consumer.run, name="live-intake", daemon=True))
    if lines is not None:

        def read_lines() -> None:
            for line in lines:
                if line.strip():
                    try:
                        job_id = submit_text(ctx, channel, line.strip(), voice)
                        say(f"job {job_id} submitted")
                    except FarmError as exc:
                        say(f"line refused: {exc}")

        threads.append(threading.Thread(target=read_lines, name="live-stdin", daemon=True))
    for thread in threads:
        thread.start()
    try:
        channel.wait()
    finally:
        if consumer is not None:
            consumer.stop()
        channel.stop()
