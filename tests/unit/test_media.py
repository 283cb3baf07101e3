from pathlib import Path

import numpy as np
import pytest

from farm.errors import PermanentError
from farm.media import (
    FrameEncoder,
    VideoFormat,
    decode_argv,
    encode_argv,
    final_argv,
    join_and_encode,
)
from tests.probe import probe


def _opt(argv, name):
    return argv[argv.index(name) + 1]


def test_chunk_encoding_is_one_closed_gop_of_the_chunk_length():
    argv = encode_argv("ffmpeg", Path("/tmp/c.mp4"), VideoFormat(512, 512, 25), frames=100)
    assert argv[0] == "ffmpeg" and argv[-2:] == ["/tmp/c.mp4", "-y"]
    assert _opt(argv, "-g") == "100" and _opt(argv, "-keyint_min") == "100"
    assert _opt(argv, "-flags") == "+cgop" and _opt(argv, "-bf") == "0"
    assert _opt(argv, "-sc_threshold") == "0"
    assert _opt(argv, "-s") == "512x512" and _opt(argv, "-pix_fmt") == "rgb24"
    assert _opt(argv, "-vcodec") == "libx264"
    # every chunk shares one timescale so stream copy joins them exactly
    assert _opt(argv, "-video_track_timescale") == str(25 * 512)


def test_identical_settings_for_every_chunk_of_a_job():
    fmt = VideoFormat(640, 360, 30)
    a = encode_argv("ffmpeg", Path("a.mp4"), fmt, 90)
    b = encode_argv("ffmpeg", Path("b.mp4"), fmt, 90)
    assert a[:-2] == b[:-2]


def test_nvenc_uses_its_own_options():
    argv = encode_argv("ffmpeg", Path("x.mp4"), VideoFormat(64, 64, 25, codec="h264_nvenc"), 10)
    assert _opt(argv, "-vcodec") == "h264_nvenc" and "-crf" not in argv


def test_chunks_are_lossless_and_the_delivery_is_not():
    chunk = encode_argv("ffmpeg", Path("c.mp4"), VideoFormat.chunk(64, 64, 25), 10)
    assert _opt(chunk, "-crf") == "0" and _opt(chunk, "-preset") == "ultrafast"
    final = final_argv("ffmpeg", VideoFormat.delivery(64, 64, 25), Path("a.wav"), Path("o.mp4"))
    assert _opt(final, "-crf") == "20" and "-g" not in final  # the encoder places keyframes
    assert _opt(final, "-acodec") == "aac" and _opt(final, "-movflags") == "+faststart"
    assert _opt(final, "-pix_fmt") == "yuv420p" and final.count("-i") == 2
    assert decode_argv("ffmpeg", Path("c.mp4"))[-1] == "pipe:"


def test_lossless_nvenc_is_constant_qp_zero():
    opts = VideoFormat(64, 64, 25, codec="h264_nvenc", crf=0).codec_options(10)
    assert (opts["rc"], opts["qp"], opts["g"]) == ("constqp", 0, 10) and "crf" not in opts


def _gradient(n: int, size: int = 64) -> np.ndarray:
    """n frames whose brightness steps with the index, so the order can be read back."""
    base = np.linspace(0, 60, size, dtype=np.float32)[None, :, None]
    return np.stack(
        [np.broadcast_to(base + 8 * i, (size, size, 3)).astype(np.uint8) for i in range(n)]
    )


def _encode(path: Path, frames: np.ndarray, fmt: VideoFormat) -> Path:
    enc = FrameEncoder(path, fmt, len(frames))
    enc.write(frames)
    enc.close()
    return path


def _silence(path: Path, seconds: float) -> Path:
    import wave

    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\0\0" * int(16000 * seconds))
    return path


def test_join_decodes_chunks_of_different_encodings_in_order(tmp_path):
    # A lossless chunk and a lossy one (different H.264 profiles, as chunks from a
    # GPU and a CPU worker would be): the join must not depend on them matching.
    frames = _gradient(20)
    parts = [
        _encode(tmp_path / "0.mp4", frames[:8], VideoFormat(64, 64, 25, crf=0)),
        _encode(tmp_path / "1.mp4", frames[8:], VideoFormat(64, 64, 25, crf=18)),
    ]
    out = tmp_path / "out.mp4"
    join_and_encode(parts, _silence(tmp_path / "a.wav", 0.8), out, VideoFormat(64, 64, 25))
    got = probe(out)
    assert got.frame_count == 20 and got.audio_codec == "aac"
    brightness = got.frames[:, :, :, 0].mean(axis=(1, 2))
    assert np.all(np.diff(brightness) > 4), brightness  # every frame, in order
    assert np.abs(brightness - frames[:, :, :, 0].mean(axis=(1, 2))).max() < 3


def test_join_names_a_chunk_that_does_not_decode(tmp_path):
    good = _encode(tmp_path / "0.mp4", _gradient(5), VideoFormat(64, 64, 25, crf=0))
    bad = tmp_path / "00007.mp4"
    bad.write_bytes(b"not a video at all")
    out = tmp_path / "out.mp4"
    with pytest.raises(PermanentError, match="00007.mp4"):
        join_and_encode(
            [good, bad], _silence(tmp_path / "a.wav", 0.4), out, VideoFormat(64, 64, 25)
        )


def test_chunk_and_delivery_take_the_codec_they_are_given():
    fmt = VideoFormat.delivery(1280, 720, 25, "h264_nvenc")
    assert (fmt.width, fmt.height, fmt.fps, fmt.codec) == (1280, 720, 25, "h264_nvenc")
    assert VideoFormat.chunk(1280, 720, 25, "h264_nvenc").codec == "h264_nvenc"
    assert VideoFormat(64, 64, 25).codec == "libx264"  # the constructor never guesses
