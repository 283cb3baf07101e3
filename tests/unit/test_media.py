from pathlib import Path

from farm.media import VideoFormat, concat_list, encode_argv, mux_argv


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


def test_mux_copies_video_and_encodes_audio_once():
    argv = mux_argv("ffmpeg", Path("/w/list.txt"), Path("/w/a.wav"), Path("/w/o.mp4"))
    assert _opt(argv, "-f") == "concat" and _opt(argv, "-safe") == "0"
    assert _opt(argv, "-vcodec") == "copy" and _opt(argv, "-acodec") == "aac"
    assert _opt(argv, "-movflags") == "+faststart"
    assert argv.count("-i") == 2


def test_concat_list_escapes_quotes(tmp_path):
    p = tmp_path / "it's.mp4"
    text = concat_list([p])
    assert (
        text
        == f"file '{str(p.resolve()).replace(chr(39), chr(39) + chr(92) + chr(39) + chr(39))}'\n"
    )
