import pytest

from farm.config import Settings
from farm.errors import InvalidInput
from farm.jobs import check_avatar_name, chunk_ranges, parse_size


def test_chunk_ranges_cover_every_frame_once():
    ranges = chunk_ranges(251, 100)
    assert ranges == [(0, 100), (100, 200), (200, 251)]
    assert chunk_ranges(100, 100) == [(0, 100)]


@pytest.mark.parametrize("name", ["../x", "a/b", "", "x" * 65, "a\0b", ".hidden", "a b"])
def test_avatar_names_with_path_characters_are_refused(name):
    with pytest.raises(InvalidInput):
        check_avatar_name(name)


def test_good_avatar_names():
    assert check_avatar_name("roman_2-b") == "roman_2-b"


@pytest.mark.parametrize("text, size", [("512", (512, 512)), ("1280x720", (1280, 720))])
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["511", "0", "4000x100", "12x12", "abc", "512x"])
def test_bad_sizes(text):
    with pytest.raises(InvalidInput):
        parse_size(text)


def test_settings_from_env_and_dotenv(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("FARM_FPS=30\nFARM_RENDERER='portrait'\n# comment\nFARM_SIZE=256\n")
    s = Settings.from_env({"FARM_SIZE": "640", "FARM_HOME": str(tmp_path)}, dotenv=dotenv)
    assert (s.fps, s.size, s.home) == (30, 640, tmp_path)  # environment beats .env
    assert s.embedded and s.effective_broker_url.startswith("redis+socket://")
    assert s.effective_database_url == f"sqlite:///{tmp_path / 'farm.db'}"
    with pytest.raises(Exception, match="FARM_FPS"):
        Settings.from_env({"FARM_FPS": "fast"}, dotenv=tmp_path / "none")


def test_photo_size_is_resolved_later():
    from farm.jobs import PHOTO_SIZE

    assert parse_size("photo") == PHOTO_SIZE == (0, 0)


def test_audio_jobs_keep_the_users_timing():
    # Issue 14: an audio job's timeline is the recording as it is; a script's TTS gets
    # a lead-in and a tail.
    from farm import jobs

    assert jobs.padding(audio_job=True) == (0.0, 0.0)
    assert jobs.padding(audio_job=False) == (jobs.LEAD_IN_SECONDS, jobs.TAIL_SECONDS)
