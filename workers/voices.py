"""Voices on a worker: a job's voice name to what models/tts speaks with.

A built-in name (joe, espeak) is passed through; a registered espeak-ng language
becomes an EspeakVoice. A registered Piper voice's files come
from the store into FARM_MODEL_DIR/voices/{digest}/ once per machine and its Piper
session stays warm per process (models/tts/piper.py caches by those paths). The
folder is named by the content's digest, so a voice removed and added again under
the same name with other files is fetched and loaded afresh, never the old one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

from farm import queries, voices
from farm.context import Context
from farm.errors import NotFound, RetryableError
from models import tts


def voice_for(ctx: Context, name: str) -> str | tts.PiperModel | tts.EspeakVoice:
    if name in tts.VOICES:
        return name
    with ctx.session() as s:
        row = queries.get_voice(s, name)
        if row is None:
            raise NotFound(f"unknown voice {name!r}: it is not registered (farm voice list)")
        kind, language = row.kind, row.language
        keys = (row.model_key, row.config_key, row.digest)
    if kind == "espeak":
        return tts.EspeakVoice(language)
    model_key, config_key, digest = keys
    assert model_key and config_key and digest, f"voice {name!r} has no files"
    return _fetch(ctx, model_key, config_key, digest)


@lru_cache(maxsize=16)
def _fetch(ctx: Context, model_key: str, config_key: str, digest: str) -> tts.PiperModel:
    folder = ctx.settings.model_dir / "voices" / digest
    model, config = folder / "model.onnx", folder / "config.json"
    if not (model.is_file() and config.is_file()):
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=folder.parent))
        try:
            ctx.store.get_file(model_key, tmp / "model.onnx")
            ctx.store.get_file(config_key, tmp / "config.json")
            got = voices.digest_of(
                (tmp / "model.onnx").read_bytes(), (tmp / "config.json").read_bytes()
            )
            if got != digest:
                # Removed and added again while this worker read it: the retry reads
                # the new row.
                raise RetryableError(f"the files of voice {digest[:12]} changed while fetched")
            try:
                os.rename(tmp, folder)  # atomic: another process may have won the race
            except OSError:
                if not (model.is_file() and config.is_file()):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return tts.PiperModel(model, config)
