"""GaussianTalker's audio input: features at 50 Hz and the per-frame windows the network
takes, computed as upstream's preprocessing and render code compute them.

The feature width C is read by the caller from the trained model
(``audio_net.encoder_conv.0.weight`` is [32, C, 3]) and picks the extractor
(`extractor_for`); the extractor's weights are the user's, loaded with ``transformers``
from a local directory (``FARM_GAUSSIANTALKER_AUDIO_MODEL``), never downloaded.

Upstream (KU-CVLAB/GaussianTalker, commit 8ec613b), all at 16 kHz mono float32:

**C=44, wav2vec2 CTC logits** (``data_utils/wav2vec.py``, the ``cpierse/wav2vec2-large-
xlsr-53-esperanto`` model, run with ``--save_feats``; default ``-l 10 -m 50 -r 10``,
``--fps 50``). The audio is streamed in chunks of 320 samples (20 ms) after 10 chunks of
zeros. Whenever 70 chunks are held (left 10 + middle 50 + right 10), their concatenation
is normalised on its own by the feature extractor (zero mean, unit variance,
``do_normalize``), run through the model, and its logits ``[10 : T - 9]`` kept (T = the
output length: 69 rows for 70 chunks, so 50 kept); then only the last 20 chunks are
held. When the audio ends, the held chunks (20 + the rest, the last one possibly short)
are run once more and the logits ``[10:]`` kept. The concatenation is [M, 44]: M =
ceil(n / 320) - 1 for n samples, one row per 20 ms (one fewer when the last chunk is
shorter than 80 samples). `Wav2Vec2Logits.features` computes exactly this.

Saving, upstream unfolds the [M, 44] logits with ``F.unfold`` (kernel 16, padding 8,
stride 2) into windows [M // 2 + 1, 16, 44]: window j holds logit rows [2j - 8, 2j + 8),
zeros outside [0, M). With 25 fps video, window j is video frame j (centre 2j = j * 40 ms).

**C=1024, HuBERT hidden states** (``data_utils/hubert.py``, ``facebook/hubert-large-
ls960-ft`` loaded as ``HubertModel``): the whole audio is normalised once by the feature
extractor, cut into clips of 320 000 + 80 samples starting every 320 000 (a remainder
shorter than 400 samples is dropped), ``last_hidden_state`` of each clip concatenated
and padded with zero rows or cut to T = (n - 80) // 320 rows: [T, 1024] at 50 Hz. Saved
as [T // 2, 2, 1024] (an odd last row dropped): window j holds rows [2j, 2j + 2).

**Render** (``scene/talking_dataset_readers.py``, ``scene/utils.py``): the saved windows
are permuted to [L, C, W]; video frame i gets ``get_audio_features(auds, att_mode=2,
index=i)``: windows [i - 4, i + 4), whole windows of zeros outside [0, L), so the
network takes [8, C, W] per frame (W = 16 for wav2vec2, 2 for HuBERT; ``AudioNet``
slices ``x[:, :, 0:16]``, which keeps both whole; its four stride-2 convolutions take a
2-row window to one column as they take 16) and applies ``AudioNet`` to each of the 8
windows and ``AudioAttNet`` across them. `network_input` builds exactly that, in
upstream's [8, C, W] layout (the same values as [8, W, C] windows transposed).

What farm does differently, on purpose: upstream renders custom audio for as many frames
as the validation split has (``transforms_val.json``), cutting the audio short or padding
it with zero windows. Farm renders ``frames = ceil(seconds * fps)`` (`frame_count`) and
`frame_windows` returns exactly that many windows: upstream's array, followed by whole
windows of zeros past its end (as ``get_audio_features`` pads). For wav2vec2 upstream's
L = M // 2 + 1 equals `frame_count` at 25 fps (or is one less, when the last chunk is
under 80 samples); for HuBERT L = T // 2 is one or two less. Other frame rates than 25 place
window j at logit row floor(j * 50 / fps) by the same rules (upstream has no such case;
the network was trained at 25 fps).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from farm.errors import MissingDependency, PermanentError

SAMPLE_RATE = 16_000
FEATURE_RATE = 50  # feature rows per second (20 ms, a stride of 320 samples)
DEEPSPEECH_WIDTH = 29
WAV2VEC_WIDTH = 44  # cpierse/wav2vec2-large-xlsr-53-esperanto: 44 CTC tokens
HUBERT_WIDTH = 1024  # facebook/hubert-large-ls960-ft: hidden size
ATTENTION_FRAMES = 8  # windows [i - 4, i + 4) per video frame
ENV_VAR = "FARM_GAUSSIANTALKER_AUDIO_MODEL"
EXTRA_HINT = "pip install 'farm[gaussiantalker]' (transformers>=4.40,<6)"

# wav2vec.py's streaming: chunks of 320 samples, left/middle/right context in chunks.
_CHUNK = SAMPLE_RATE // FEATURE_RATE
_LEFT, _MIDDLE, _RIGHT = 10, 50, 10
_WAV2VEC_WINDOW = 16
# hubert.py: the conv stack is one kernel of 400 samples with a stride of 320.
_HUBERT_KERNEL, _HUBERT_STRIDE = 400, 320
_HUBERT_CLIP = _HUBERT_STRIDE * 1000
_HUBERT_WINDOW = 2
# Parameters a checkpoint may lack without changing inference (used only for masking
# in training).
_UNUSED_AT_INFERENCE = ("masked_spec_embed",)


def frame_count(samples: int, fps: int = 25) -> int:
    """ceil(seconds * fps) video frames for `samples` at 16 kHz, in exact integers."""
    if samples < 0 or fps <= 0:
        raise ValueError(f"bad audio length {samples} or frame rate {fps}")
    return -(-samples * fps // SAMPLE_RATE)


def _window_starts(frames: int, fps: int) -> np.ndarray:
    if fps <= 0:
        raise ValueError(f"bad frame rate {fps}")
    return np.arange(frames, dtype=np.int64) * FEATURE_RATE // fps


def _gather(features: np.ndarray, starts: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """[frames, len(offsets), C]: rows starts[j] + offsets, zeros outside the features."""
    rows = starts[:, None] + offsets[None, :]
    inside = (rows >= 0) & (rows < features.shape[0])
    out = np.zeros((len(starts), len(offsets), features.shape[1]), dtype=np.float32)
    out[inside] = features[rows[inside]]
    return out


def network_input(windows: np.ndarray, indices: np.ndarray | list[int] | int) -> np.ndarray:
    """What GaussianTalker's deformation network takes for the given video frames:
    [len(indices), 8, C, W] (a single int gives [8, C, W]) from `frame_windows`'s
    [frames, W, C], windows [i - 4, i + 4) with whole zero windows outside
    [0, frames), each transposed to [C, W] (upstream's ``att_mode=2``)."""
    single = np.ndim(indices) == 0
    idx = np.atleast_1d(np.asarray(indices, dtype=np.int64))
    half = ATTENTION_FRAMES // 2
    out = _gather(
        windows.reshape(windows.shape[0], -1),
        idx,
        np.arange(-half, ATTENTION_FRAMES - half, dtype=np.int64),
    )
    out = out.reshape(len(idx), ATTENTION_FRAMES, *windows.shape[1:]).transpose(0, 1, 3, 2)
    out = np.ascontiguousarray(out)
    return out[0] if single else out


class AudioFeatures:
    """A loaded extractor. `features` gives [T, C] at 50 Hz, `frame_windows` the
    per-video-frame windows [frames, W, C]."""

    width: int
    window: int
    name: str

    def __init__(self, model_dir: Path, feature_extractor, model, device: str) -> None:
        self.model_dir = model_dir
        self._fe = feature_extractor
        self._model = model
        self.device = device

    def features(self, samples16k: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def frame_windows(self, features: np.ndarray, frames: int, fps: int = 25) -> np.ndarray:
        raise NotImplementedError

    def _samples(self, samples16k: np.ndarray) -> np.ndarray:
        samples = np.asarray(samples16k, dtype=np.float32)
        if samples.ndim != 1:
            raise ValueError(f"expected mono 16 kHz samples [n], got shape {samples.shape}")
        return samples

    def _normalised(self, samples: np.ndarray) -> np.ndarray:
        """The feature extractor's input_values for one segment, [n] float32."""
        values = self._fe(samples, sampling_rate=SAMPLE_RATE, return_tensors="np")
        return np.asarray(values["input_values"][0], dtype=np.float32)

    def _run(self, values: np.ndarray) -> np.ndarray:
        """The model's per-20 ms output for one normalised segment: [T, C] float32."""
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(values))[None].to(self.device)
            return self._output(self._model(x))[0].float().cpu().numpy()

    def _output(self, out):
        raise NotImplementedError

    def _check_features(self, features: np.ndarray, frames: int) -> np.ndarray:
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[1] != self.width:
            raise ValueError(f"expected features [T, {self.width}], got {features.shape}")
        if frames < 0:
            raise ValueError(f"bad frame count {frames}")
        return features


class Wav2Vec2Logits(AudioFeatures):
    """CTC logits of a wav2vec2 model, streamed as upstream's wav2vec.py streams them;
    windows of 16 rows centred every 2 rows (W = 16)."""

    window = _WAV2VEC_WINDOW
    name = "wav2vec2"

    def __init__(self, model_dir, feature_extractor, model, device, width: int) -> None:
        super().__init__(model_dir, feature_extractor, model, device)
        self.width = width

    def _output(self, out):
        return out.logits

    def features(self, samples16k: np.ndarray) -> np.ndarray:
        samples = self._samples(samples16k)
        if samples.size == 0:
            return np.zeros((0, self.width), dtype=np.float32)
        held = [np.zeros(_CHUNK, dtype=np.float32)] * _LEFT
        parts: list[np.ndarray] = []
        for start in range(0, samples.size, _CHUNK):
            held.append(samples[start : start + _CHUNK])
            if len(held) < _LEFT + _MIDDLE + _RIGHT:
                continue
            logits = self._run(self._normalised(np.concatenate(held)))
            held = held[-(_LEFT + _RIGHT) :]
            parts.append(logits[_LEFT : logits.shape[0] - _RIGHT + 1])
        logits = self._run(self._normalised(np.concatenate(held)))
        parts.append(logits[_LEFT:])
        return np.concatenate(parts, axis=0)

    def frame_windows(self, features: np.ndarray, frames: int, fps: int = 25) -> np.ndarray:
        features = self._check_features(features, frames)
        starts = _window_starts(frames, fps)
        half = self.window // 2
        out = _gather(features, starts, np.arange(-half, half, dtype=np.int64))
        # F.unfold(padding 8, stride 2) makes M // 2 + 1 windows, centres 0..M; past
        # them get_audio_features pads whole windows of zeros.
        out[starts > features.shape[0]] = 0.0
        return out


class HubertHidden(AudioFeatures):
    """``last_hidden_state`` of a HuBERT model over clips as upstream's hubert.py cuts
    them; windows of 2 rows, every 2 rows (W = 2)."""

    window = _HUBERT_WINDOW
    name = "hubert"

    def __init__(self, model_dir, feature_extractor, model, device, width: int) -> None:
        super().__init__(model_dir, feature_extractor, model, device)
        self.width = width

    def _output(self, out):
        return out.last_hidden_state

    def features(self, samples16k: np.ndarray) -> np.ndarray:
        samples = self._samples(samples16k)
        expected = max(0, (samples.size - (_HUBERT_KERNEL - _HUBERT_STRIDE)) // _HUBERT_STRIDE)
        if samples.size == 0:
            return np.zeros((0, self.width), dtype=np.float32)
        values = self._normalised(samples)
        clip = _HUBERT_CLIP - _HUBERT_STRIDE + _HUBERT_KERNEL
        full = values.size // _HUBERT_CLIP
        parts = [self._run(values[i * _HUBERT_CLIP : i * _HUBERT_CLIP + clip]) for i in range(full)]
        rest = values[full * _HUBERT_CLIP :]
        if rest.size >= _HUBERT_KERNEL:
            parts.append(self._run(rest))
        out = np.zeros((expected, self.width), dtype=np.float32)
        if parts:
            hidden = np.concatenate(parts, axis=0)[:expected]
            out[: hidden.shape[0]] = hidden
        return out

    def frame_windows(self, features: np.ndarray, frames: int, fps: int = 25) -> np.ndarray:
        features = self._check_features(features, frames)
        starts = _window_starts(frames, fps)
        out = _gather(features, starts, np.arange(self.window, dtype=np.int64))
        # reshape(-1, 2, 1024) after dropping an odd last row: T // 2 whole windows.
        out[starts + self.window > features.shape[0]] = 0.0
        return out


def _unset(reason: str) -> PermanentError:
    return PermanentError(
        f"GaussianTalker audio features need the extractor the model was trained with: "
        f"{reason}; set {ENV_VAR} to a local directory holding it (config.json, "
        f"preprocessor_config.json and the weights, as save_pretrained writes them)"
    )


def extractor_for(width: int, model_dir: Path | None, *, device: str = "cpu") -> AudioFeatures:
    """The extractor for a GaussianTalker model whose audio input is `width` wide.

    1024: HuBERT hidden states (``HubertModel``); 29: DeepSpeech, not supported; any
    other width: the logits of a wav2vec2 CTC model (44: the esperanto XLSR model).
    `model_dir` is the user's local model directory (``FARM_GAUSSIANTALKER_AUDIO_MODEL``);
    nothing is ever downloaded. PermanentError when it is unset or missing, does not
    load, or outputs another width than `width`.
    """
    if width == DEEPSPEECH_WIDTH:
        raise PermanentError(
            "DeepSpeech features (29) are not supported: retrain with wav2vec2 features "
            "(cpierse/wav2vec2-large-xlsr-53-esperanto, 44) or HuBERT features "
            "(facebook/hubert-large-ls960-ft, 1024)"
        )
    if width <= 0:
        raise PermanentError(f"bad GaussianTalker audio width {width}")
    if model_dir is None or str(model_dir).strip() == "":
        raise _unset(f"{ENV_VAR} is not set")
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise _unset(f"{model_dir} is not a directory")
    if not (model_dir / "config.json").is_file():
        raise _unset(f"{model_dir} has no config.json")
    try:
        import transformers
    except ImportError as exc:
        raise MissingDependency(
            f"GaussianTalker audio features need transformers: {EXTRA_HINT}"
        ) from exc

    try:
        config = transformers.AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise PermanentError(f"cannot read the audio model config in {model_dir}: {exc}") from exc
    kind = getattr(config, "model_type", "?")
    if width == HUBERT_WIDTH:
        cls, found = HubertHidden, getattr(config, "hidden_size", None)
        loader = transformers.HubertModel
        if kind != "hubert":
            raise PermanentError(
                f"the GaussianTalker model takes HuBERT features ({width}) but the audio "
                f"model in {model_dir} is a {kind} model"
            )
    else:
        cls, found = Wav2Vec2Logits, getattr(config, "vocab_size", None)
        loader = transformers.AutoModelForCTC
    if found != width:
        raise PermanentError(
            f"the audio model in {model_dir} ({kind}) outputs {found}-wide features but "
            f"the GaussianTalker model was trained on {width}-wide ones"
        )
    try:
        fe = transformers.AutoFeatureExtractor.from_pretrained(model_dir, local_files_only=True)
        model, info = loader.from_pretrained(
            model_dir, local_files_only=True, output_loading_info=True
        )
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise PermanentError(f"cannot load the audio model in {model_dir}: {exc}") from exc
    if getattr(fe, "sampling_rate", SAMPLE_RATE) != SAMPLE_RATE:
        raise PermanentError(
            f"the audio model in {model_dir} expects {fe.sampling_rate} Hz audio, not 16 kHz"
        )
    missing = [k for k in info.get("missing_keys", ()) if not k.endswith(_UNUSED_AT_INFERENCE)]
    mismatched = list(info.get("mismatched_keys", ()))
    if missing or mismatched:
        bad = (missing + [str(m) for m in mismatched])[0]
        raise PermanentError(
            f"the audio model in {model_dir} lacks weights of {type(model).__name__} "
            f"(first: {bad}): it would run with random weights"
        )
    model.eval()
    model.to(device)
    return cls(model_dir, fe, model, device, width)
