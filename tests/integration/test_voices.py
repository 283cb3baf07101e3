"""Registered voices (issue 17, item 1): `farm voice add/list/show/remove`, a job that
speaks with one, and what is refused.

The second Piper voice is the joe voice's own model file registered under a new name:
it must render a real job (the MP4 probed) and sound exactly like joe. The other
language is that same model with a config whose espeak.voice is "de": its phonemes
come from espeak-ng German. That tests the plumbing (language from the config, German
phonemes, mapped to joe's phoneme ids), not a German voice: joe is an English speaker.
"""

from __future__ import annotations

import io
import json
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from farm import jobs, migrate, pipeline, queries, states, voices
from farm.config import Settings
from farm.context import Context
from farm.dispatch import InMemoryDispatcher
from farm.errors import InvalidInput, NotFound
from farm.stores import job_key
from models import tts
from models.tts import piper
from models.wav import read_wav
from tests.pipeline import run_stages
from tests.probe import probe
from tests.services import aws_test_env, moto_s3
from workers.voices import voice_for

JOE = piper.joe()
TEXT = "Papa made a big apple pie."
GERMAN = "Guten Morgen, wie geht es dir?"


def config_with(tmp_path: Path, name: str, **changes: object) -> Path:
    """Joe's config with top-level or espeak/inference changes ("espeak.voice")."""
    doc = json.loads(JOE.config.read_text("utf-8"))
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        node = doc
        for part in parents:
            node = node[part]
        if value is None:
            del node[leaf]
        else:
            node[leaf] = value
    out = tmp_path / name
    out.write_text(json.dumps(doc), "utf-8")
    return out


def voice_keys(ctx: Context, name: str) -> list[str]:
    return ctx.store.list(voices.voice_key(name))


def voice_rows(ctx: Context) -> list[str]:
    with ctx.session() as s:
        return [v.name for v in queries.list_voices(s)]


@pytest.mark.parametrize("db_ctx", ["sqlite"], indirect=True)
def test_joes_model_under_a_new_name_renders_a_job_that_sounds_like_joe(db_ctx: Context):
    row = voices.add(db_ctx, "anchor", JOE.model, JOE.config)
    assert (row.kind, row.language, row.sample_rate) == ("piper", "en-us", 22050)
    assert sorted(voice_keys(db_ctx, "anchor")) == [
        "voices/anchor/config.json",
        "voices/anchor/model.onnx",
    ]

    job_id = jobs.submit(db_ctx, jobs.JobRequest(TEXT, "demo", "anchor", 10, (64, 64), 40))
    run_stages(db_ctx, until=pipeline.PLAN)
    # The segment's audio as the worker stored it (read before publish, which may drop
    # intermediates) is joe's own for the same text.
    wav = db_ctx.store.get_bytes(job_key(job_id, "audio", "0000.wav"))
    samples, rate = read_wav(io.BytesIO(wav))
    joe = tts.synthesize(TEXT, "joe")
    assert rate == joe.sample_rate
    assert np.array_equal(samples, joe.samples)
    run_stages(db_ctx)
    with db_ctx.session() as s:
        job = queries.get_job(s, job_id)
        assert job.state == states.SUCCEEDED, job.error
        output_key, frames = job.output_key, job.frame_count

    video = probe(db_ctx.settings.home / "artifacts" / output_key)
    assert video.audio_codec == "aac" and video.video_codec == "h264"
    assert video.frame_count == frames
    # The speech (about 1.7 s) with the plan's lead-in and tail around it.
    assert 1.5 + jobs.LEAD_IN_SECONDS < video.audio_seconds < 3.5
    assert abs(video.audio_seconds - video.video_seconds) < 0.2
    assert np.sqrt(np.mean(video.audio**2)) > 0.01  # not silence
    # Fetched from the store once, into the model directory, by the content's digest.
    assert (db_ctx.settings.model_dir / "voices" / row.digest / "model.onnx").is_file()


def test_a_remote_worker_gets_the_voice_from_s3(tmp_path, monkeypatch, postgres_url):
    """Added on one machine, spoken on another that shares only the database and the
    S3 store (moto over HTTP): the worker fetches the files into its own model dir."""
    import boto3

    for name, value in aws_test_env("test", "test").items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)
    migrate.upgrade(postgres_url)
    with moto_s3("farm-voices") as endpoint:

        def machine(name: str) -> Context:
            settings = Settings(
                home=tmp_path / name,
                model_dir=tmp_path / name / "models",
                database_url=postgres_url,
                store_url="s3://farm-voices/farm",
                s3_endpoint_url=endpoint,
                s3_region="us-east-1",
            )
            return Context(settings, InMemoryDispatcher())

        laptop, worker = machine("laptop"), machine("worker")
        row = voices.add(laptop, "remote", JOE.model, JOE.config)
        assert sorted(worker.store.list("voices")) == [row.config_key, row.model_key]
        model = voice_for(worker, "remote")
        assert model.model.is_relative_to(tmp_path / "worker" / "models")
        assert np.array_equal(tts.synthesize(TEXT, model).samples, tts.synthesize(TEXT).samples)

        voices.remove(laptop, "remote")
        assert worker.store.list("voices") == []
        for ctx in (laptop, worker):
            ctx.engine.dispose()


@pytest.mark.parametrize("db_ctx", ["sqlite"], indirect=True)
def test_a_voice_removed_and_added_again_speaks_with_its_new_files(db_ctx: Context, tmp_path):
    voices.add(db_ctx, "host", JOE.model, JOE.config)
    first = voice_for(db_ctx, "host")
    normal = tts.synthesize(TEXT, first)
    voices.remove(db_ctx, "host")
    with pytest.raises(NotFound):
        voice_for(db_ctx, "host")

    slow = config_with(tmp_path, "slow.json", inference__length_scale=1.5)
    voices.add(db_ctx, "host", JOE.model, slow)
    second = voice_for(db_ctx, "host")
    assert second != first  # another digest, another folder: not the warm old voice
    assert tts.synthesize(TEXT, second).seconds > 1.3 * normal.seconds


@pytest.mark.parametrize("db_ctx", ["sqlite"], indirect=True)
def test_a_german_espeak_voice_in_the_config_gives_espeak_ng_german_phonemes(
    db_ctx: Context, tmp_path
):
    from piper.phonemize_espeak import EspeakPhonemizer

    config = config_with(tmp_path, "de.json", espeak__voice="de")
    row = voices.add(db_ctx, "joe-de", JOE.model, config)
    assert row.language == "de"

    german = tts.synthesize(GERMAN, voice_for(db_ctx, "joe-de"))
    english = tts.synthesize(GERMAN, "joe")

    def sounds(speech: tts.Speech) -> str:
        return "".join(p.symbol for p in speech.phones if p.symbol != tts.SILENCE)

    def espeak_ng(language: str) -> str:
        chars = [c for s in EspeakPhonemizer().phonemize(language, GERMAN) for c in s]
        return unicodedata.normalize("NFC", "".join(c for c in chars if c not in "ˈˌ ,?"))

    # Each voice's phones are espeak-ng's phonemes for its own language, in order...
    assert sounds(german) == espeak_ng("de")
    assert sounds(english) == espeak_ng("en-us")
    # ... and they differ: "wie" is /viː/ in German, /waɪ/ read as English.
    assert sounds(german) != sounds(english)
    assert "v" in sounds(german) and "w" in sounds(english) and "w" not in sounds(german)
    assert german.seconds > 1.0


@pytest.mark.parametrize("db_ctx", ["sqlite"], indirect=True)
def test_an_espeak_ng_german_voice_speaks_german_in_a_job(db_ctx: Context):
    """`farm voice add NAME --espeak de`: espeak-ng's own German voice, a real one."""
    row = voices.add_espeak(db_ctx, "deutsch", "de")
    assert (row.kind, row.language, row.model_key) == ("espeak", "de", None)
    job_id = jobs.submit(db_ctx, jobs.JobRequest(GERMAN, "demo", "deutsch", 10, (64, 64), 40))
    run_stages(db_ctx, until=pipeline.PLAN)
    stored = json.loads(db_ctx.store.get_bytes(job_key(job_id, "audio", "0000.json")))
    german = [p["symbol"] for p in stored if p["symbol"] != tts.SILENCE]
    english = [p.symbol for p in tts.synthesize(GERMAN, "espeak").phones]
    assert german[:4] == ["ɡ", "uː", "t", "ə"] and "v" in german and "eː" in german
    assert "w" in english and "w" not in german
    run_stages(db_ctx)
    with db_ctx.session() as s:
        job = queries.get_job(s, job_id)
        assert job.state == states.SUCCEEDED, job.error
    video = probe(db_ctx.settings.home / "artifacts" / job.output_key)
    assert video.audio_codec == "aac" and video.audio_seconds > 1.2 + jobs.LEAD_IN_SECONDS
    with pytest.raises(InvalidInput, match="espeak-ng has no voice 'xx-nowhere'"):
        voices.add_espeak(db_ctx, "nowhere", "xx-nowhere")
    assert voice_rows(db_ctx) == ["deutsch"]


def test_emphasis_marks_the_same_phones_through_a_registered_piper_voice():
    """A registered Piper voice finds emphasised words with Piper's own phonemizer in
    its language; for joe's files that is the same words as joe's own path finds."""
    big = (TEXT.index("big"), TEXT.index("big") + 3)
    own = tts.synthesize(TEXT, "joe", emphasis=[big])
    copy = tts.synthesize(TEXT, piper.PiperModel(JOE.model, JOE.config), emphasis=[big])
    marked = [p.symbol for p in own.phones if p.emphasis]
    assert marked == ["b", "ɪ", "ɡ"]
    assert [p.symbol for p in copy.phones if p.emphasis] == marked


def bad_inputs(tmp_path: Path) -> dict[str, tuple[Path, Path | None, str]]:
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(bytes(range(256)) * 64)
    return {
        "missing model": (tmp_path / "nope.onnx", JOE.config, "no such voice model"),
        "missing default config": (junk, None, "no such voice config"),
        "not ONNX": (junk, JOE.config, "is not a Piper ONNX model"),
        "no phoneme map": (
            JOE.model,
            config_with(tmp_path, "nomap.json", phoneme_id_map=None),
            "has no phoneme_id_map",
        ),
        "no sample rate": (
            JOE.model,
            config_with(tmp_path, "norate.json", audio__sample_rate=None),
            "has no audio.sample_rate",
        ),
        "unknown espeak voice": (
            JOE.model,
            config_with(tmp_path, "xx.json", espeak__voice="xx-nowhere"),
            "espeak-ng has no voice 'xx-nowhere'",
        ),
        "config not JSON": (JOE.model, junk, "is not JSON"),
    }


def test_bad_voice_files_are_refused_with_one_line_and_leave_nothing(db_ctx: Context, tmp_path):
    for what, (model, config, message) in bad_inputs(tmp_path).items():
        with pytest.raises(InvalidInput, match=message) as caught:
            voices.add(db_ctx, "bad", model, config)
        assert "\n" not in str(caught.value), what
        assert voice_rows(db_ctx) == [], what
        assert db_ctx.store.list("voices") == [], what


def test_names_taken_or_built_in_are_refused_and_the_voice_is_kept(db_ctx: Context, tmp_path):
    voices.add(db_ctx, "narrator", JOE.model, JOE.config)
    before = voices.find(db_ctx, "narrator")
    other = config_with(tmp_path, "other.json", inference__length_scale=1.2)
    with pytest.raises(InvalidInput, match="already exists"):
        voices.add(db_ctx, "narrator", JOE.model, other)
    for name, message in [("joe", "built in"), ("espeak", "built in"), ("a/b", "invalid")]:
        with pytest.raises(InvalidInput, match=message):
            voices.add(db_ctx, name, JOE.model, JOE.config)
    for name in ("joe", "espeak"):
        with pytest.raises(InvalidInput, match="built in and cannot be removed"):
            voices.remove(db_ctx, name)
    after = voices.find(db_ctx, "narrator")
    assert after is not None and before is not None and after.digest == before.digest
    assert voice_rows(db_ctx) == ["narrator"]
    stored = voices.digest_of(
        db_ctx.store.get_bytes(after.model_key), db_ctx.store.get_bytes(after.config_key)
    )
    assert stored == after.digest


def test_a_voice_in_use_is_not_removed_until_its_jobs_end(db_ctx: Context):
    voices.add(db_ctx, "busy", JOE.model, JOE.config)
    job_id = jobs.submit(db_ctx, jobs.JobRequest(TEXT, "demo", "busy", 10, (64, 64), 40))
    with pytest.raises(InvalidInput, match="in use by queued or running jobs") as caught:
        voices.remove(db_ctx, "busy")
    assert voices.IN_USE_RULE in str(caught.value) and job_id[:12] in str(caught.value)
    assert voice_rows(db_ctx) == ["busy"] and len(voice_keys(db_ctx, "busy")) == 2

    jobs.cancel(db_ctx, job_id)
    voices.remove(db_ctx, "busy")
    assert voice_rows(db_ctx) == [] and db_ctx.store.list("voices") == []
    # A job cannot ask for it any more.
    with pytest.raises(InvalidInput, match="unknown voice 'busy'"):
        jobs.submit(db_ctx, jobs.JobRequest(TEXT, "demo", "busy", 10, (64, 64), 40))


def test_the_voice_commands(tmp_path, monkeypatch):
    from farm import cli

    home = tmp_path / "home"
    monkeypatch.setenv("FARM_HOME", str(home))
    monkeypatch.setenv("FARM_MODEL_DIR", str(tmp_path / "models"))
    runner = CliRunner()

    def farm(*args: str) -> tuple[int, str]:
        result = runner.invoke(cli.main, list(args))
        return result.exit_code, result.output

    model = tmp_path / "voice.onnx"  # the default config is beside it
    model.symlink_to(JOE.model)
    (tmp_path / "voice.onnx.json").symlink_to(JOE.config)
    assert farm("voice", "add", "anchor", "--piper", str(model)) == (
        0,
        "added voice anchor (piper, en-us, 22050 Hz)\n",
    )
    code, out = farm("voice", "list")
    assert code == 0
    assert [line.split()[0] for line in out.splitlines()] == ["joe", "espeak", "anchor"]
    assert "built in" in out.splitlines()[0] and "built in" not in out.splitlines()[2]
    code, out = farm("voice", "show", "anchor")
    assert code == 0 and "language  en-us" in out and "voices/anchor/model.onnx" in out

    code, out = farm("voice", "add", "anchor", "--piper", str(model))
    assert code == 1 and out == "farm: error: voice 'anchor' already exists " + (
        "(farm voice remove anchor first)\n"
    )
    code, out = farm("voice", "add", "x", "--piper", str(tmp_path / "none.onnx"))
    assert code == 1 and len(out.splitlines()) == 1 and "no such voice model" in out
    code, out = farm("voice", "remove", "joe")
    assert code == 1 and "built in" in out

    assert farm("voice", "remove", "anchor") == (0, "removed voice anchor\n")
    code, out = farm("voice", "show", "anchor")
    assert code == 1 and out == "farm: error: unknown voice 'anchor'\n"
    assert not any((home / "artifacts").rglob("*.*"))
