from pathlib import Path

from farm.media import VideoFormat, concat_list, encode_argv, mux_argv, pick_codec


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


ENCODERS = """Encoders:
 V..... = Video
 ------
 V....D libx264              libx264 H.264 / AVC / MPEG-4 AVC / MPEG-4 part 10 (codec h264)
 V....D h264_nvenc           NVIDIA NVENC H.264 encoder (codec h264)
 A....D aac                  AAC (Advanced Audio Coding)
"""


def test_pick_codec_uses_nvenc_only_with_a_gpu_and_the_encoder():
    assert pick_codec(ENCODERS, gpu=True) == "h264_nvenc"
    assert pick_codec(ENCODERS, gpu=False) == "libx264"
    without = "\n".join(ln for ln in ENCODERS.splitlines() if "nvenc" not in ln)
    assert pick_codec(without, gpu=True) == "libx264"
    assert pick_codec("", gpu=True) == "libx264"
    # hevc_nvenc, or the name in a description, is not h264_nvenc
    other = " V....D hevc_nvenc   NVIDIA NVENC hevc encoder, not h264_nvenc (codec hevc)\n"
    assert pick_codec(other, gpu=True) == "libx264"


def test_for_output_takes_the_machines_codec(monkeypatch):
    import farm.media as media

    monkeypatch.setattr(media, "default_codec", lambda: "h264_nvenc")
    fmt = VideoFormat.for_output(1280, 720, 25)
    assert (fmt.width, fmt.height, fmt.fps, fmt.codec) == (1280, 720, 25, "h264_nvenc")
    assert VideoFormat(64, 64, 25).codec == "libx264"  # the constructor never guesses


def test_hidden_gpus_mean_no_gpu(monkeypatch):
    import farm.media as media

    media.gpu_present.cache_clear()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    try:
        assert media.gpu_present() is False
    finally:
        media.gpu_present.cache_clear()
