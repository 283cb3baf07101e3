"""Audio-only jobs: speech recognition on real recordings in three formats, one job
end to end through the embedded runtime, and bad audio refused at the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from farm import audio as audio_input
from farm.cli import main
from farm.media import ffmpeg_exe
from tests.conftest import job_rows
from tests.probe import probe

FIRST = "Bob bought a big blue balloon."
SECOND = "Maybe we should paint the boat purple."
LEAD, GAP, TAIL = 0.5, 1.0, 0.4  # seconds of silence around and between the sentences


def _words(text: str) -> list[str]:
    return [w.strip(".,!?").lower() for w in text.split() if w.strip(".,!?")]


def word_error_rate(reference: list[str], hypothesis: list[str]) -> float:
    d = list(range(len(hypothesis) + 1))
    for i, r in enumerate(reference, 1):
        prev, d[0] = d[0], i
        for j, h in enumerate(hypothesis, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (r != h))
    return d[-1] / len(reference)


@pytest.fixture(scope="module")
def recording(tmp_path_factory) -> dict[str, object]:
    """Two espeak sentences with silence around and between them, as 44.1 kHz stereo
    WAV, MP3 and M4A; and where the speech is (seconds)."""
    from models import tts, wav

    rate = wav.SAMPLE_RATE
    a = tts.synthesize(FIRST, "espeak").samples
    b = tts.synthesize(SECOND, "espeak").samples

    def silence(s: float) -> np.ndarray:
        return np.zeros(int(s * rate), np.int16)

    samples = np.concatenate([silence(LEAD), a, silence(GAP), b, silence(TAIL)])
    first = (LEAD, LEAD + a.size / rate)
    second = (first[1] + GAP, first[1] + GAP + b.size / rate)
    root = tmp_path_factory.mktemp("audio")
    mono = root / "mono.wav"
    wav.write_wav(tts.Speech(samples=samples, sample_rate=rate), mono)
    files = {}
    for name, codec in (("stereo.wav", "pcm_s16le"), ("speech.mp3", "libmp3lame"),
                        ("speech.m4a", "aac")):  # fmt: skip
        out = root / name
        subprocess.run(
            [ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", "-i", str(mono),
             "-ac", "2", "-ar", "44100", "-c:a", codec, str(out)],
            check=True,
        )  # fmt: skip
        files[name] = out
    with wave.open(str(files["stereo.wav"])) as w:
        assert (w.getnchannels(), w.getframerate()) == (2, 44100)
    return {"files": files, "seconds": samples.size / rate, "speech": [first, second]}


@pytest.mark.parametrize("name", ["stereo.wav", "speech.mp3", "speech.m4a"])
def test_recognised_words_and_times_match_the_audio(recording, name):
    from models import asr

    path = recording["files"][name]
    samples = audio_input.decode(path, 600)
    assert abs(samples.size / audio_input.SAMPLE_RATE - recording["seconds"]) < 0.1
    result = asr.recognise(samples, audio_input.SAMPLE_RATE)
    heard = [w.text.lower() for w in result.words]
    assert word_error_rate(_words(FIRST + " " + SECOND), heard) <= 0.25, heard
    (s1, e1), (s2, e2) = recording["speech"]
    slack = 0.15
    for w in result.words:  # every word lies inside a sentence, none in the silences
        assert (s1 - slack <= w.start and w.end <= e1 + slack) or (
            s2 - slack <= w.start and w.end <= e2 + slack
        ), (w, recording["speech"])
    assert result.words[0].start < s1 + 0.3 and result.words[-1].end > e2 - 0.3

    # the phones: closed mouth (pauses) over the silences, sounds over the speech
    def symbol_at(t: float) -> str:
        return next(p.symbol for p in result.phones if p.start <= t < p.end)

    for t in (LEAD / 2, (e1 + s2) / 2, recording["seconds"] - 0.1):
        assert symbol_at(t) == "_", t
    assert any(p.symbol in ("b", "p", "m") for p in result.phones)
    assert result.phones[-1].end == pytest.approx(recording["seconds"])


# --- end to end --------------------------------------------------------------


def farm(home: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "FARM_HOME": str(home),
        "FARM_EMBEDDED_IDLE_SECONDS": "600",
        "FARM_RENDERER": "null",
    }
    return subprocess.run(
        [sys.executable, "-m", "farm", *args], capture_output=True, env=env, timeout=timeout
    )


def test_audio_job_end_to_end(recording, tmp_path):
    home = tmp_path / "home"
    out = tmp_path / "out.mp4"
    try:
        proc = farm(
            home, "submit", "--audio", str(recording["files"]["speech.m4a"]), "--avatar",
            "demo", "--size", "128", "--wait", "--output", str(out),
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr.decode()
        job_id = proc.stdout.decode().split()[0]
        status = farm(home, "status", job_id)
    finally:
        farm(home, "stop")
    assert status.returncode == 0, status.stderr.decode()
    heard = next(ln for ln in status.stdout.decode().splitlines() if ln.startswith("heard"))
    assert "balloon" in heard.lower() and "purple" in heard.lower()
    p = probe(out)
    assert p.video_codec == "h264" and p.audio_codec == "aac"
    assert (p.width, p.height) == (128, 128)
    # Issue 14: the user's timing is kept. No lead-in or tail is added: the audio is the
    # input's (AAC adds at most its priming, which the edit list hides) and the video is
    # as long as the input to the frame (it used to be 0.8 s longer).
    expected = recording["seconds"]
    assert abs(p.audio_seconds - expected) < 0.03, (p.audio_seconds, expected)
    assert abs(p.video_seconds - expected) <= 1 / 25 + 1e-3, (p.video_seconds, expected)
    # Issue 16: captions timed by the recogniser's words (aligned to the sound): each cue
    # starts on speech, and none spans the 1 s gap between the sentences.
    import srt

    assert "captions_srt" in status.stdout.decode()
    cues = list(srt.parse((home / "artifacts" / "jobs" / job_id / "captions.srt").read_text()))
    (a0, a1), (b0, b1) = recording["speech"]
    assert abs(cues[0].start.total_seconds() - a0) < 0.1
    for cue in cues:
        start = cue.start.total_seconds()
        assert a0 - 0.1 < start < a1 or b0 - 0.1 < start < b1, (start, recording["speech"])
        assert not (start < a1 and cue.end.total_seconds() > b0 + 0.2), cue


# --- bad audio ---------------------------------------------------------------


def _wav(path: Path, samples: np.ndarray, rate: int = 22050) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.astype("<i2").tobytes())
    return path


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _tone(seconds: float, rate: int = 22050) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (8000 * np.sin(2 * np.pi * 220 * t)).astype(np.int16)


BAD_AUDIO = [
    ("text renamed .wav", lambda d: _bytes(d / "t.wav", b"hello, this is not audio\n"),
     "not a readable audio file"),
    ("empty", lambda d: _bytes(d / "e.wav", b""), "is empty"),
    ("no samples", lambda d: _wav(d / "n.wav", np.zeros(0, np.int16)), "no audio"),
    ("silence", lambda d: _wav(d / "s.wav", np.zeros(33075, np.int16)), "is silent"),
    ("too long", lambda d: _wav(d / "l.wav", _tone(3.0, 44100), 44100), "longer than the limit"),
    ("missing", lambda d: d / "nope.wav", "no such audio file"),
]  # fmt: skip


@pytest.mark.parametrize("label, make, message", BAD_AUDIO, ids=[c[0] for c in BAD_AUDIO])
def test_bad_audio_is_refused(tmp_path, monkeypatch, label, make, message):
    home = tmp_path / "home"
    monkeypatch.setenv("FARM_HOME", str(home))
    monkeypatch.setenv("FARM_MAX_AUDIO_SECONDS", "2")
    path = make(tmp_path)
    result = CliRunner().invoke(main, ["submit", "--audio", str(path)])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("farm: error:"), result.stderr
    assert message in lines[0]
    assert job_rows(home) == 0


@pytest.mark.parametrize("args", [[], ["s.txt", "--audio", "a.wav"]])
def test_script_or_audio_exactly_one(tmp_path, monkeypatch, args):
    monkeypatch.setenv("FARM_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.txt").write_text("Hello.")
    _wav(tmp_path / "a.wav", _tone(1.0))
    result = CliRunner().invoke(main, ["submit", *args])
    assert result.exit_code == 1
    assert "exactly one of SCRIPT or --audio" in result.stderr
    assert job_rows(tmp_path / "home") == 0


def test_audio_checks_are_pure():
    with pytest.raises(Exception, match="silent"):
        audio_input.check(np.full(22050, 20, np.int16), "x.wav", 10)
    audio_input.check(_tone(1.0), "x.wav", 10)
