"""Ditto's auxiliary ONNX models, run through onnxruntime as upstream runs them.

Upstream's PyTorch configuration loads these from ditto_pytorch/aux_models/ and feeds them
as below (core/aux_models/modules/*.py); farm reproduces the preprocessing and decoding,
because the weights were trained and used that way:

- FaceDetector, det_10g.onnx (InsightFace SCRFD-10G): one NCHW float input (names read
  from the session), 9 outputs in the order scores x3, boxes x3, keypoints x3 for
  strides 8/16/32, 2 anchors per cell. The photo is letterboxed into 512x512 (top-left,
  aspect kept), normalised (x - 127.5) / 128 with the channels reversed.
- Landmarks106, 2d106det.onnx (InsightFace): input "data" [1,3,192,192], output "fc1"
  [1,212]. A 192 crop centred on the face box, side 1.5 x its long side, unnormalised
  0..255 with the channels reversed; points come back in [-1, 1] of the crop.
- Landmarks203, landmark203.onnx (LivePortrait's landmark model): input "input"
  [1,3,224,224] RGB in [0, 1]; upstream reads the third output, 203 (x, y) pairs in
  [0, 1] of the crop. The 224 crop comes from the 106 points (scale 1.5, vy -0.1).
- Hubert, hubert_streaming_fix_kv.onnx: input "input_values" [1, 6480] float32 16 kHz,
  output "encoding_out" [20, 1024] at 50 Hz. Windows of 6480 samples (3 past, 5 current,
  2 future frames of 640 samples, plus 80) every 3200 samples; of each window's 20
  outputs, [-14:-4] are averaged in pairs into the 5 current 25 fps frames.

"Channels reversed": upstream hands these models RGB photos through
cv2.dnn.blobFromImage(swapRB=True), so the detector and the 106 model see BGR; farm's
callers pass RGB uint8 [H, W, 3] like upstream's and get the same tensors.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from farm.errors import PermanentError

SAMPLE_RATE = 16000
FPS = 25
HOP = 640  # samples per 25 fps frame
CHUNK = (3, 5, 2)  # past, current, future frames per HuBERT window
WINDOW = int(sum(CHUNK) * 0.04 * SAMPLE_RATE) + 80  # 6480
STEP = CHUNK[1] * HOP  # 3200
FEATURE_DIM = 1024


def frame_count(samples: int) -> int:
    """Video frames for `samples` of 16 kHz audio, as upstream counts them:
    ceil(samples / 16000 * 25) in floating point (so 4480 samples give 8, not 7)."""
    return math.ceil(samples / SAMPLE_RATE * FPS)


def providers(device: str = "auto") -> list[str]:
    """onnxruntime providers: CUDA (then CPU) when asked for or "auto" and available."""
    import onnxruntime as ort

    if device != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _line(text: object) -> str:
    s = str(text).strip()
    return s.splitlines()[0][:240] if s else ""


def open_session(path: str | os.PathLike[str], device: str = "auto", optimize: bool = True) -> Any:
    """An InferenceSession; PermanentError naming the file if it is missing or unreadable.
    optimize=False skips graph optimisation (a quicker open, for checks)."""
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise PermanentError(f"{path}: missing")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(str(path), options, providers=providers(device))
    except Exception as e:
        msg = f"{path}: not a loadable ONNX model ({type(e).__name__}: {_line(e)})"
        raise PermanentError(msg) from e


def _static(dim: object) -> int | None:
    return dim if isinstance(dim, int) else None


class _OnnxModel:
    """A session plus the check of its inputs/outputs against what farm feeds it."""

    def __init__(self, path: str | os.PathLike[str], device: str = "auto"):
        self.path = Path(path)
        self.session = open_session(self.path, device)
        problems = self.io_problems(self.session)
        if problems:
            raise PermanentError(f"{self.path}: {problems[0]}")
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [o.name for o in self.session.get_outputs()]

    @classmethod
    def io_problems(cls, session: Any) -> list[str]:
        raise NotImplementedError

    @classmethod
    def problems(cls, path: str | os.PathLike[str]) -> list[str]:
        """Each mismatch of the file with what farm feeds it, one line each (CPU only)."""
        try:
            session = open_session(path, "cpu", optimize=False)
        except PermanentError as e:
            return [str(e)]
        return [f"{path}: {p}" for p in cls.io_problems(session)]


def _image_input_problems(session: Any, size: int | None, name: str | None = None) -> list[str]:
    inputs = session.get_inputs()
    if len(inputs) != 1:
        return [f"expected 1 input, found {len(inputs)}"]
    i = inputs[0]
    out = []
    if name is not None and i.name != name:
        out.append(f"input is named {i.name!r}, expected {name!r}")
    if len(i.shape) != 4 or _static(i.shape[1]) not in (3, None):
        out.append(f"input {i.name!r} has shape {i.shape}, expected [N, 3, H, W]")
    elif size is not None and any(_static(d) not in (size, None) for d in i.shape[2:]):
        out.append(f"input {i.name!r} has shape {i.shape}, expected [N, 3, {size}, {size}]")
    if "float" not in i.type:
        out.append(f"input {i.name!r} is {i.type}, expected float")
    return out


# ---------------------------------------------------------------------------------------
# Face detector


@dataclass(frozen=True)
class Faces:
    """Detections in photo pixels, best score first: boxes [N, 4] (x1, y1, x2, y2),
    scores [N], keypoints [N, 5, 2] (eyes, nose, mouth corners)."""

    boxes: np.ndarray
    scores: np.ndarray
    keypoints: np.ndarray

    def __len__(self) -> int:
        return len(self.scores)

    def largest(self) -> int:
        """Index of the largest box, the one upstream uses (source2info.py)."""
        if not len(self):
            raise PermanentError("no face found")
        area = (self.boxes[:, 2] - self.boxes[:, 0]) * (self.boxes[:, 3] - self.boxes[:, 1])
        return int(np.argmax(area))


class FaceDetector(_OnnxModel):
    """SCRFD (det_10g): score/box/keypoint heads at strides 8, 16, 32, 2 anchors per
    cell, boxes and keypoints as distances from the anchor centre in units of the stride;
    then greedy NMS. `__call__(rgb)` -> Faces."""

    STRIDES = (8, 16, 32)
    ANCHORS = 2
    SIZE = 512  # upstream's input size (the model's own is dynamic)
    MEAN, STD = 127.5, 128.0

    def __init__(
        self,
        path: str | os.PathLike[str],
        device: str = "auto",
        threshold: float = 0.5,
        nms_threshold: float = 0.4,
    ):
        super().__init__(path, device)
        self.threshold = threshold
        self.nms_threshold = nms_threshold
        h, w = self.session.get_inputs()[0].shape[2:]
        self.input_hw = (_static(h) or self.SIZE, _static(w) or self.SIZE)
        self._centers: dict[int, np.ndarray] = {}

    @classmethod
    def io_problems(cls, session: Any) -> list[str]:
        out = _image_input_problems(session, None)
        outputs = session.get_outputs()
        if len(outputs) != 9:
            return out + [f"expected 9 outputs (scores, boxes, keypoints x3), {len(outputs)}"]
        for o, width in zip(outputs, (1, 1, 1, 4, 4, 4, 10, 10, 10), strict=True):
            last = _static(o.shape[-1]) if o.shape else None
            if last not in (width, None):
                out.append(f"output {o.name!r} has shape {o.shape}, expected [..., {width}]")
        return out

    def _anchor_centers(self, stride: int) -> np.ndarray:
        if stride not in self._centers:
            h, w = self.input_hw[0] // stride, self.input_hw[1] // stride
            ys, xs = np.mgrid[:h, :w]
            xy = np.stack([xs, ys], -1).reshape(-1, 2).astype(np.float32) * stride
            self._centers[stride] = np.repeat(xy, self.ANCHORS, axis=0)  # cell-major
        return self._centers[stride]

    def blob(self, rgb: np.ndarray) -> tuple[np.ndarray, float]:
        """The letterboxed, normalised input [1, 3, H, W] and the photo-to-input scale."""
        import cv2

        ih, iw = self.input_hw
        h, w = rgb.shape[:2]
        if h / w > ih / iw:
            nh, nw = ih, int(ih / (h / w))
        else:
            nw, nh = iw, int(iw * (h / w))
        canvas = np.zeros((ih, iw, 3), np.uint8)
        canvas[:nh, :nw] = cv2.resize(rgb, (nw, nh))
        x = (canvas[..., ::-1].astype(np.float32) - self.MEAN) / self.STD
        return np.ascontiguousarray(x.transpose(2, 0, 1)[None]), nh / h

    def __call__(self, rgb: np.ndarray) -> Faces:
        blob, scale = self.blob(rgb)
        outs = self.session.run(None, {self.input_name: blob})
        scores, boxes, kps = [], [], []
        for i, stride in enumerate(self.STRIDES):
            centers = self._anchor_centers(stride)
            s = np.asarray(outs[i]).reshape(-1)
            d = np.asarray(outs[i + 3]).reshape(-1, 4) * stride
            k = np.asarray(outs[i + 6]).reshape(-1, 10) * stride
            if not (len(s) == len(d) == len(k) == len(centers)):
                raise PermanentError(
                    f"{self.path}: stride {stride} gives {len(s)} anchors, "
                    f"expected {len(centers)} for a {self.input_hw} input"
                )
            keep = s >= self.threshold
            c = centers[keep]
            scores.append(s[keep])
            boxes.append(np.concatenate([c - d[keep, :2], c + d[keep, 2:]], 1))
            kps.append((np.tile(c, 5) + k[keep]).reshape(-1, 5, 2))
        score = np.concatenate(scores).astype(np.float32)
        box = np.concatenate(boxes).astype(np.float32) / scale
        kp = np.concatenate(kps).astype(np.float32) / scale
        order = np.argsort(-score, kind="stable")
        keep = nms(box[order], score[order], self.nms_threshold)
        idx = order[keep]
        return Faces(boxes=box[idx], scores=score[idx], keypoints=kp[idx])


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> list[int]:
    """Greedy non-maximum suppression with InsightFace's +1 pixel areas; indices kept."""
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        order = rest[inter / (areas[i] + areas[rest] - inter) <= threshold]
    return keep


# ---------------------------------------------------------------------------------------
# Landmarks


class Landmarks106(_OnnxModel):
    """InsightFace 2d106det: `__call__(rgb, box)` -> [106, 2] photo pixels.

    The crop: centre of the box, scale 192 / (1.5 x the box's long side), no rotation,
    bilinear, black outside. Points are taken from the last 106 pairs of the output,
    mapped (p + 1) x 96 into the crop, then back into the photo."""

    SIZE = 192
    POINTS = 106

    @classmethod
    def io_problems(cls, session: Any) -> list[str]:
        out = _image_input_problems(session, cls.SIZE)
        o = session.get_outputs()[0]
        last = _static(o.shape[-1]) if o.shape else None
        if last is not None and last < 2 * cls.POINTS:
            out.append(f"output {o.name!r} has shape {o.shape}, expected [N, 212]")
        return out

    def crop_matrix(self, box: np.ndarray) -> np.ndarray:
        """M (2x3): photo -> 192 crop."""
        x1, y1, x2, y2 = (float(v) for v in box[:4])
        s = self.SIZE / (max(x2 - x1, y2 - y1) * 1.5)
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        half = self.SIZE / 2
        return np.array([[s, 0.0, half - s * cx], [0.0, s, half - s * cy]])

    def __call__(self, rgb: np.ndarray, box: np.ndarray) -> np.ndarray:
        import cv2

        m = self.crop_matrix(box)
        crop = cv2.warpAffine(rgb, m, (self.SIZE, self.SIZE), borderValue=0.0)
        blob = np.ascontiguousarray(crop[..., ::-1].transpose(2, 0, 1)[None], np.float32)
        pred = np.asarray(self.session.run(None, {self.input_name: blob})[0], np.float32)
        pts = pred.reshape(-1, 2)[-self.POINTS :]
        pts = (pts + 1) * (self.SIZE // 2)
        inv = cv2.invertAffineTransform(m)
        return (pts @ inv[:, :2].T + inv[:, 2]).astype(np.float32)


class Landmarks203(_OnnxModel):
    """LivePortrait's 203-point model: `__call__(crop_rgb, m_c2o=None)` -> [203, 2].

    Input: the 224x224 RGB crop (upstream: crop_image(photo, lmk106, dsize=224,
    scale=1.5, vy_ratio=-0.1)) as [1, 3, 224, 224] in [0, 1]. Output: the third output
    (the only one in single-output exports), [1, 406] in [0, 1] of the crop, scaled by
    224 and mapped back with M_c2o (3x3 or 2x3) when given."""

    SIZE = 224
    POINTS = 203
    INPUT = "input"

    @classmethod
    def output_index(cls, session: Any) -> int:
        return 2 if len(session.get_outputs()) >= 3 else 0

    @classmethod
    def io_problems(cls, session: Any) -> list[str]:
        out = _image_input_problems(session, cls.SIZE, name=cls.INPUT)
        o = session.get_outputs()[cls.output_index(session)]
        last = _static(o.shape[-1]) if o.shape else None
        if last not in (2 * cls.POINTS, None):
            out.append(f"output {o.name!r} has shape {o.shape}, expected [N, 406]")
        return out

    def __call__(self, crop_rgb: np.ndarray, m_c2o: np.ndarray | None = None) -> np.ndarray:
        if crop_rgb.shape[:2] != (self.SIZE, self.SIZE):
            raise PermanentError(f"landmark203 takes a 224x224 crop, got {crop_rgb.shape}")
        x = (crop_rgb.astype(np.float32) / 255.0).transpose(2, 0, 1)[None]
        outs = self.session.run(None, {self.INPUT: np.ascontiguousarray(x)})
        pts = np.asarray(outs[self.output_index(self.session)], np.float32)[0].reshape(-1, 2)
        pts = pts * self.SIZE
        if m_c2o is not None:
            m = np.asarray(m_c2o, np.float64)
            pts = pts @ m[:2, :2].T + m[:2, 2]
        return pts.astype(np.float32)


# ---------------------------------------------------------------------------------------
# HuBERT


class Hubert(_OnnxModel):
    """The streaming HuBERT: `window(chunk)` runs one 6480-sample window -> [T, 1024]
    at 50 Hz (T = 20); `features(audio)` -> [frame_count(len(audio)), 1024] at 25 fps,
    upstream's offline procedure: pad 2000 zeros in front (so the first window's
    "current" part starts at sample 0) and one window of zeros behind, slide by 3200
    samples, keep outputs [-14:-4] of each window and average them in pairs."""

    INPUT = "input_values"
    PAD_FRONT = WINDOW - int(sum(CHUNK[1:]) * 0.04 * SAMPLE_RATE)  # 2000

    @classmethod
    def io_problems(cls, session: Any) -> list[str]:
        out = []
        inputs = session.get_inputs()
        if len(inputs) != 1 or inputs[0].name != cls.INPUT:
            out.append(f"inputs are {[i.name for i in inputs]}, expected ['{cls.INPUT}']")
        elif len(inputs[0].shape) != 2 or _static(inputs[0].shape[1]) not in (WINDOW, None):
            out.append(f"input has shape {inputs[0].shape}, expected [1, {WINDOW}]")
        o = session.get_outputs()[0]
        if len(o.shape) != 2 or _static(o.shape[1]) not in (FEATURE_DIM, None):
            out.append(f"output {o.name!r} has shape {o.shape}, expected [T, {FEATURE_DIM}]")
        return out

    def window(self, chunk: np.ndarray) -> np.ndarray:
        """One window of WINDOW samples -> the model's [T, 1024] 50 Hz output."""
        x = np.asarray(chunk, np.float32).reshape(1, -1)
        if x.shape[1] != WINDOW:
            raise PermanentError(f"HuBERT takes windows of {WINDOW} samples, got {x.shape[1]}")
        out = np.asarray(self.session.run(None, {self.INPUT: x})[0], np.float32)
        if out.ndim != 2 or out.shape[0] < 14 or out.shape[1] != FEATURE_DIM:
            raise PermanentError(f"{self.path}: output {out.shape}, expected [20, 1024]")
        return out

    def current(self, chunk: np.ndarray) -> np.ndarray:
        """One window's 5 current frames at 25 fps: [5, 1024]."""
        out = self.window(chunk)
        start, stop = -sum(CHUNK[1:]) * 2, -CHUNK[2] * 2  # -14, -4
        return out[start:stop].reshape(CHUNK[1], 2, FEATURE_DIM).mean(1)

    def features(self, audio: np.ndarray) -> np.ndarray:
        """25 fps features [frame_count(len(audio)), 1024] of mono 16 kHz float audio."""
        audio = np.asarray(audio, np.float32).reshape(-1)
        n = frame_count(len(audio))
        padded = np.concatenate(
            [np.zeros(self.PAD_FRONT, np.float32), audio, np.zeros(WINDOW, np.float32)]
        )
        feats = []
        for i in range(0, n, CHUNK[1]):
            start = int(i * 0.04 * SAMPLE_RATE)  # upstream's float arithmetic, kept exactly
            chunk = padded[start : start + WINDOW]
            if len(chunk) < WINDOW:
                chunk = np.pad(chunk, (0, WINDOW - len(chunk)))
            feats.append(self.current(chunk))
        if not feats:
            return np.zeros((0, FEATURE_DIM), np.float32)
        return np.concatenate(feats)[:n].astype(np.float32)


# The aux models by their role in checkpoints.FILES.
MODELS: dict[str, type[_OnnxModel]] = {
    "detector": FaceDetector,
    "landmark106": Landmarks106,
    "landmark203": Landmarks203,
    "hubert": Hubert,
}
