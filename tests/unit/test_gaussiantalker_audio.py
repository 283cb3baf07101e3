"""GaussianTalker's audio features and per-frame windows (models/gaussiantalker/audio.py),
checked against upstream's arithmetic with tiny random models written at test time:
a wav2vec2 CTC model with 44 outputs and a HuBERT with hidden size 1024 (one layer)."""

from __future__ import annotations

import socket
import sys

import numpy as np
import pytest

from tests.gaussiantalker_fixture import write_tiny_hubert, write_tiny_wav2vec2

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from farm.errors import MissingDependency, PermanentError  # noqa: E402
from models.gaussiantalker.audio import (  # noqa: E402
    ENV_VAR,
    HubertHidden,
    Wav2Vec2Logits,
    extractor_for,
    frame_count,
    network_input,
)

# Several lengths, none a multiple of the 640-sample video frame or the 320-sample
# chunk except 16000; 36 000 makes more than one full streaming window (60 chunks).
LENGTHS = [1, 700, 16_000, 36_123, 57_777]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any connection attempt fails the test: the models load from disk only."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def wav2vec_dir(tmp_path_factory):
    return write_tiny_wav2vec2(tmp_path_factory.mktemp("wav2vec2"))


@pytest.fixture(scope="module")
def hubert_dir(tmp_path_factory):
    return write_tiny_hubert(tmp_path_factory.mktemp("hubert"))


@pytest.fixture(scope="module")
def wav2vec(wav2vec_dir):
    return extractor_for(44, wav2vec_dir)


@pytest.fixture(scope="module")
def hubert(hubert_dir):
    return extractor_for(1024, hubert_dir)


def _audio(n: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(n) * 0.1).astype(np.float32)


def _model_out(extractor, values: np.ndarray) -> np.ndarray:
    return extractor._run(extractor._normalised(values))


# upstream, verbatim but for names: wav2vec.py's save step, hubert.py's save step and
# scene/utils.py's get_audio_features(att_mode=2).
def _upstream_unfold(feats: np.ndarray) -> np.ndarray:
    c = feats.shape[1]
    f = torch.from_numpy(feats).permute(1, 0).contiguous().view(1, c, -1, 1)
    u = torch.nn.functional.unfold(f, kernel_size=(16, 1), padding=(8, 0), stride=(2, 1))
    return u.view(c, 16, -1).permute(2, 1, 0).contiguous().numpy()


def _upstream_hubert_windows(feats: np.ndarray) -> np.ndarray:
    if feats.shape[0] % 2 == 1:
        feats = feats[:-1]
    return feats.reshape(-1, 2, feats.shape[1])


def _upstream_att(features: torch.Tensor, index: int) -> torch.Tensor:
    left, right = index - 4, index + 4
    pad_left = pad_right = 0
    if left < 0:
        pad_left, left = -left, 0
    if right > features.shape[0]:
        pad_right, right = right - features.shape[0], features.shape[0]
    auds = features[left:right]
    if pad_left > 0:
        auds = torch.cat([torch.zeros_like(auds[:pad_left]), auds], dim=0)
    if pad_right > 0:
        auds = torch.cat([auds, torch.zeros_like(auds[:pad_right])], dim=0)
    return auds


def test_frame_count_is_ceil_of_the_duration():
    assert [frame_count(n) for n in (0, 1, 640, 641, 16_000, 16_001)] == [0, 1, 1, 2, 25, 26]
    assert frame_count(16_000, fps=30) == 30
    assert frame_count(8_001, fps=30) == 16


@pytest.mark.parametrize("n", LENGTHS)
def test_shapes_and_frames(wav2vec, hubert, n):
    x = _audio(n)
    frames = frame_count(n)
    fw, fh = wav2vec.features(x), hubert.features(x)
    chunks = -(-n // 320)
    # one 50 Hz row per chunk but the last (one fewer again when it is under 80 samples)
    assert fw.shape == (max(0, chunks - 1 - (0 < n % 320 < 80)), 44)
    assert fh.shape == (max(0, (n - 80) // 320), 1024)
    assert fw.dtype == fh.dtype == np.float32
    ww, wh = wav2vec.frame_windows(fw, frames), hubert.frame_windows(fh, frames)
    assert ww.shape == (frames, 16, 44)
    assert wh.shape == (frames, 2, 1024)
    assert network_input(ww, np.arange(frames)).shape == (frames, 8, 44, 16)
    assert network_input(wh, frames - 1).shape == (8, 1024, 2)


def test_wav2vec_streams_as_upstream(wav2vec):
    n = 36_123  # 113 chunks: full windows at chunks 60 and 110, then the tail
    x = _audio(n, seed=3)
    feats = wav2vec.features(x)
    padded = np.concatenate([np.zeros(3200, np.float32), x])
    first = _model_out(wav2vec, padded[:22_400])  # 70 chunks, normalised alone
    second = _model_out(wav2vec, padded[16_000:38_400])
    tail = _model_out(wav2vec, padded[32_000:])
    assert first.shape[0] == 69
    np.testing.assert_array_equal(feats[:50], first[10:60])
    np.testing.assert_array_equal(feats[50:100], second[10:60])
    np.testing.assert_array_equal(feats[100:], tail[10:])
    # short audio: a single run over the zero prefix and the audio
    short = _audio(5_000, seed=4)
    ref = _model_out(wav2vec, np.concatenate([np.zeros(3200, np.float32), short]))[10:]
    np.testing.assert_array_equal(wav2vec.features(short), ref)


def test_hubert_normalises_once_and_cuts_clips_as_upstream(hubert):
    n = 320_000 + 5_000  # one clip of 320 080 samples, then the rest from 320 000
    x = _audio(n, seed=5)
    feats = hubert.features(x)
    assert feats.shape == ((n - 80) // 320, 1024)
    values = hubert._normalised(x)  # over the whole audio
    np.testing.assert_array_equal(feats[:1000], hubert._run(values[:320_080]))
    np.testing.assert_array_equal(feats[1000:], hubert._run(values[320_000:]))


@pytest.mark.parametrize("rows", [0, 1, 7, 48, 49, 50])
def test_wav2vec_windows_are_upstreams_unfold(wav2vec, rows):
    feats = np.random.default_rng(rows).standard_normal((rows, 44)).astype(np.float32)
    ref = _upstream_unfold(feats) if rows else np.zeros((1, 16, 44), np.float32)
    assert ref.shape[0] == rows // 2 + 1
    for frames in (ref.shape[0] - 1, ref.shape[0], ref.shape[0] + 3):
        got = wav2vec.frame_windows(feats, frames)
        k = min(frames, ref.shape[0])
        np.testing.assert_array_equal(got[:k], ref[:k])
        assert not got[k:].any()  # whole zero windows past upstream's array


@pytest.mark.parametrize("rows", [0, 1, 2, 49, 50])
def test_hubert_windows_are_upstreams_reshape(hubert, rows):
    feats = np.random.default_rng(rows).standard_normal((rows, 1024)).astype(np.float32)
    ref = _upstream_hubert_windows(feats)
    got = hubert.frame_windows(feats, ref.shape[0] + 2)
    np.testing.assert_array_equal(got[: ref.shape[0]], ref)
    assert not got[ref.shape[0] :].any()


def test_network_input_is_get_audio_features_att_mode_2():
    windows = np.random.default_rng(9).standard_normal((11, 16, 44)).astype(np.float32)
    auds = torch.from_numpy(windows).permute(0, 2, 1)  # upstream's load: [N, 44, 16]
    indices = [0, 1, 3, 4, 5, 7, 10]
    got = network_input(windows, indices)
    for row, i in zip(got, indices, strict=True):
        np.testing.assert_array_equal(row, _upstream_att(auds, i).numpy())
    np.testing.assert_array_equal(network_input(windows, 10), got[-1])


def test_other_frame_rates_sample_the_frame_time(wav2vec):
    feats = np.arange(100 * 44, dtype=np.float32).reshape(100, 44)
    got = wav2vec.frame_windows(feats, frame_count(32_000, fps=50), fps=50)
    assert got.shape == (100, 16, 44)
    np.testing.assert_array_equal(got[20, 8], feats[20])  # centre row = frame time


def test_deterministic(wav2vec_dir, hubert_dir):
    x = _audio(20_000, seed=7)
    for width, path in ((44, wav2vec_dir), (1024, hubert_dir)):
        a, b = extractor_for(width, path), extractor_for(width, path)
        first = a.features(x)
        np.testing.assert_array_equal(first, a.features(x))
        np.testing.assert_array_equal(first, b.features(x))


def test_extractor_kinds(wav2vec, hubert):
    assert isinstance(wav2vec, Wav2Vec2Logits) and (wav2vec.width, wav2vec.window) == (44, 16)
    assert isinstance(hubert, HubertHidden) and (hubert.width, hubert.window) == (1024, 2)


def test_deepspeech_is_refused(wav2vec_dir):
    with pytest.raises(PermanentError, match=r"DeepSpeech features \(29\) are not supported"):
        extractor_for(29, wav2vec_dir)


@pytest.mark.parametrize("where", [None, "", "missing", "cpierse/wav2vec2-large-xlsr-53-esperanto"])
def test_unset_or_missing_model_dir_names_the_setting(tmp_path, monkeypatch, where):
    monkeypatch.chdir(tmp_path)  # a hub id is a relative path that is not there
    model_dir = tmp_path / where if where == "missing" else where
    with pytest.raises(PermanentError, match=ENV_VAR):
        extractor_for(44, model_dir)


def test_dir_without_model_names_the_setting(tmp_path):
    with pytest.raises(PermanentError, match=ENV_VAR):
        extractor_for(1024, tmp_path)


def test_width_mismatch_says_both(wav2vec_dir, hubert_dir):
    with pytest.raises(PermanentError, match=r"outputs 44-wide .* trained on 32-wide"):
        extractor_for(32, wav2vec_dir)
    with pytest.raises(PermanentError, match=r"HuBERT features \(1024\).*wav2vec2"):
        extractor_for(1024, wav2vec_dir)
    with pytest.raises(PermanentError, match=r"trained on 44-wide"):
        extractor_for(44, hubert_dir)


def test_missing_weights_are_refused(wav2vec_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    for name in ("config.json", "preprocessor_config.json"):
        (tmp_path / name).write_bytes((wav2vec_dir / name).read_bytes())
    weights = load_file(wav2vec_dir / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(PermanentError, match="lm_head.weight"):
        extractor_for(44, tmp_path)


def test_without_transformers_names_the_extra(wav2vec_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(MissingDependency, match="gaussiantalker"):
        extractor_for(44, wav2vec_dir)
