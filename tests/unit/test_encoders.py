"""The encoder is chosen by a real test encode (farm/encoders.py), on fake machines:
fake `nvidia-smi` and `ffmpeg` scripts first on PATH (tests/fakegpu.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from farm import encoders
from farm.errors import PermanentError
from farm.media import EncodeFailed, FrameEncoder, VideoFormat
from tests.fakegpu import fake_gpu, path_with


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """Call with the NVENC behaviour (None: no GPU at all); resets the process cache."""

    def make(nvenc: str | None, gpu: bool = True) -> None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        if gpu:
            monkeypatch.setenv("PATH", path_with(fake_gpu(tmp_path / "bin", nvenc)))
        else:
            monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no nvidia-smi, no ffmpeg
        encoders.reset()

    yield make
    encoders.reset()


def test_listed_but_refused_nvenc_falls_back_to_libx264_with_ffmpegs_reason(machine):
    machine("refused")
    choice = encoders.choose("auto")
    assert choice.codec == "libx264"
    nvenc, x264 = choice.probes
    assert not nvenc.ok and "required nvenc API version" in nvenc.reason
    assert "610.00 or newer" in choice.reason and x264.ok


def test_working_nvenc_is_taken_first(machine):
    machine("works")
    choice = encoders.choose("auto")
    assert choice.codec == "h264_nvenc" and [p.ok for p in choice.probes] == [True]


def test_no_gpu_never_asks_for_nvenc(machine):
    machine(None, gpu=False)
    choice = encoders.choose("auto")
    assert choice.codec == "libx264" and [p.codec for p in choice.probes] == ["libx264"]
    assert encoders.probe("h264_nvenc").reason.startswith("no NVIDIA GPU is visible")


def test_hidden_gpus_mean_no_gpu(machine, monkeypatch):
    machine("works")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    encoders.reset()
    assert encoders.gpu_present() is False and encoders.choose("auto").codec == "libx264"


def test_an_explicit_encoder_that_fails_its_probe_is_an_error(machine):
    machine("refused")
    with pytest.raises(encoders.EncoderError, match="h264_nvenc: .*required nvenc API"):
        encoders.choose("h264_nvenc")
    assert encoders.choose("libx264").codec == "libx264"


def test_the_choice_is_made_once_per_process(machine, monkeypatch):
    machine("works")
    calls = []
    real = encoders.probe
    monkeypatch.setattr(encoders, "probe", lambda c: calls.append(c) or real(c))
    for _ in range(3):
        assert encoders.codec_for("auto") == "h264_nvenc"
    assert calls == ["h264_nvenc"]


def test_probe_argv_uses_the_chunk_and_delivery_options():
    (chunk, gop), (delivery, none) = encoders.probe_formats("h264_nvenc")
    argv = encoders.probe_argv("ffmpeg", chunk, gop)
    assert argv[argv.index("-rc") + 1] == "constqp" and argv[argv.index("-qp") + 1] == "0"
    assert argv[argv.index("-f", argv.index("-i")) + 1] == "null" and argv[-1] == "-"
    assert argv[argv.index("-vframes") + 1] == str(encoders.PROBE_FRAMES)
    assert none is None and "-g" not in encoders.probe_argv("ffmpeg", delivery, none)


def test_an_encoder_that_dies_mid_chunk_is_not_used_again(machine, tmp_path):
    """A card that opens NVENC but dies during a chunk: the chunk's error is retryable
    and names the next encoder; the process's next choice is libx264; and if libx264
    dies too, the error is permanent (no retrying forever)."""
    machine("dies")
    assert encoders.codec_for("auto") == "h264_nvenc"  # its probe passes
    enc = FrameEncoder(tmp_path / "c.mp4", VideoFormat.chunk(64, 64, 25, "h264_nvenc"), 32)
    with pytest.raises(EncodeFailed) as died:
        for _ in range(32):
            enc.write(np.zeros((1, 64, 64, 3), np.uint8))
        enc.close()
    enc.abort()
    error = encoders.died("auto", "h264_nvenc", str(died.value))
    assert isinstance(error, encoders.EncoderDied) and "the retry encodes with libx264" in str(
        error
    )
    assert encoders.codec_for("auto") == "libx264"
    last = encoders.died("auto", "libx264", "it died too")
    assert isinstance(last, PermanentError) and not isinstance(last, encoders.EncoderDied)


def test_an_explicit_encoder_that_dies_is_permanent(machine):
    machine("dies")
    error = encoders.died("h264_nvenc", "h264_nvenc", "boom")
    assert isinstance(error, PermanentError)


def test_a_job_chunk_encoded_by_the_fake_working_nvenc_decodes(machine, tmp_path: Path):
    machine("works")
    fmt = VideoFormat.chunk(64, 64, 25, encoders.codec_for("auto"))
    enc = FrameEncoder(tmp_path / "c.mp4", fmt, 10)
    enc.write(np.full((10, 64, 64, 3), 90, np.uint8))
    enc.close()
    assert (tmp_path / "c.mp4").stat().st_size > 0


def test_a_formats_own_encoder_failing_is_permanent_and_marks_no_h264_encoder_broken():
    encoders.reset()
    for codec in ("ffv1", "libvpx-vp9", "prores_ks"):
        error = encoders.died("auto", codec, "it died")
        assert isinstance(error, encoders.EncoderError) and codec in str(error)
    assert encoders._broken == {}  # the H.264 choice is untouched
