"""The person in a frame: mediapipe's selfie segmentation, from the installed wheel.

`mediapipe.solutions.selfie_segmentation` ships its models inside the mediapipe 0.10.21
wheel (modules/selfie_segmentation/*.tflite): nothing is downloaded. The general model
(256x256 input) is used; its graph has no temporal smoothing, so a frame's mask is a
function of that frame alone: chunks that start anywhere get the masks a whole-job run
would, and a chunk boundary shows no seam.

Per frame, not once per avatar. The photo does not move, but the head does: the plan
nods, turns and tilts it (and Ditto and GaussianTalker move it more), so a mask taken
once from the photo would cut into the moving head on one side and leave a halo of the
old background on the other. Per frame costs a few milliseconds (README, "Aspect ratios
and backgrounds"): the model sees 256x256 whatever the frame size, so frames are first
shrunk to at most `MAX_SIDE` pixels (the conversion to the model's input, not the
network, grows with the frame), and the mask is scaled to the size it is used at.

Soft edges: the model's confidence is mapped linearly from [`LOW`, `HIGH`] to [0, 1]
(low-confidence speckle in the background becomes 0, the person's interior 1) and
upscaled bilinearly, so the border blends over a few pixels instead of stair-stepping.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np

MAX_SIDE = 512  # frames are segmented at most this large (the model's input is 256x256)
LOW, HIGH = 0.2, 0.8  # model confidence mapped to alpha 0 and 1
MODEL = 0  # mediapipe's general selfie model (1: the landscape one, 144x256)


class PersonSegmenter:
    """One mediapipe graph; use from one thread at a time (a chunk's compositor)."""

    def __init__(self) -> None:
        self._graph: Any = None

    def mask(self, frame: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
        """float32 (height, width) in [0, 1]: 1 on the person. `frame`: uint8 RGB
        (h, w, 3); `size`: (width, height) of the mask, default the frame's."""
        h, w = frame.shape[:2]
        size = size or (w, h)
        alpha = self.small_mask(frame)
        if alpha.shape[::-1] != tuple(size):
            alpha = cv2.resize(alpha, tuple(size), interpolation=cv2.INTER_LINEAR)
        return alpha

    def small_mask(self, frame: np.ndarray) -> np.ndarray:
        """The mask at the resolution it was segmented at: the frame's, or at most
        MAX_SIDE on its long side (same aspect), for the caller to scale once."""
        h, w = frame.shape[:2]
        small = frame
        if max(h, w) > MAX_SIDE:
            f = MAX_SIDE / max(h, w)
            small = cv2.resize(
                frame, (max(round(w * f), 1), max(round(h * f), 1)), interpolation=cv2.INTER_AREA
            )
        raw = self._process(np.ascontiguousarray(small))
        return np.clip((raw - LOW) * (1.0 / (HIGH - LOW)), 0.0, 1.0)

    def _process(self, frame: np.ndarray) -> np.ndarray:
        if self._graph is None:
            from mediapipe.python.solutions.selfie_segmentation import SelfieSegmentation

            self._graph = SelfieSegmentation(model_selection=MODEL)
        result = self._graph.process(frame)
        return np.asarray(result.segmentation_mask, dtype=np.float32)

    def close(self) -> None:
        if self._graph is not None:
            self._graph.close()
            self._graph = None
