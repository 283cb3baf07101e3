"""Face landmarks: detection with mediapipe's FaceMesh and the index sets the rig uses.

Indices follow mediapipe's 478-point canonical mesh (468 face points + 10 iris points
with `refine_landmarks=True`). "Left" and "right" are the subject's, as in mediapipe:
the subject's right eye is on the image's left.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from farm.errors import InvalidInput

LANDMARK_COUNT = 478

# Inner lip contours, each from the right mouth corner (image left) to the left one.
UPPER_INNER_LIP = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308)
LOWER_INNER_LIP = (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308)
UPPER_OUTER_LIP = (61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291)
LOWER_OUTER_LIP = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291)
MOUTH_CORNERS = (61, 291)

# Eyelid contours, corner to corner along the top and along the bottom.
RIGHT_EYE_UPPER = (33, 246, 161, 160, 159, 158, 157, 173, 133)
RIGHT_EYE_LOWER = (33, 7, 163, 144, 145, 153, 154, 155, 133)
LEFT_EYE_UPPER = (263, 466, 388, 387, 386, 385, 384, 398, 362)
LEFT_EYE_LOWER = (263, 249, 390, 373, 374, 380, 381, 382, 362)

# Iris centre and its horizontal extremes. The top and bottom iris points often lie
# under the eyelids, so they are left out of the mesh: moving them would fold the lids.
RIGHT_IRIS = (468, 469, 471)
LEFT_IRIS = (473, 474, 476)
HIDDEN_IRIS = (470, 472, 475, 477)

RIGHT_BROW = (46, 53, 52, 65, 55, 70, 63, 105, 66, 107)
LEFT_BROW = (276, 283, 282, 295, 285, 300, 293, 334, 296, 336)

FOREHEAD_TOP = 10
CHIN = 152
CHEEK_RIGHT = 234
CHEEK_LEFT = 454


def detect_landmarks(photo: np.ndarray) -> np.ndarray:
    """The 478 landmarks of the one face in an RGB uint8 photo, as (478, 2) pixel x, y."""
    # Imported here so render-only workers never load mediapipe (and its TFLite runtime).
    import mediapipe

    with mediapipe.solutions.face_mesh.FaceMesh(
        static_image_mode=True, refine_landmarks=True, max_num_faces=1
    ) as mesh:
        result = mesh.process(np.ascontiguousarray(photo))
    if not result.multi_face_landmarks:
        raise InvalidInput("no face found in the photo")
    points = result.multi_face_landmarks[0].landmark
    height, width = photo.shape[:2]
    return np.array([(p.x * width, p.y * height) for p in points], dtype=np.float32)


@dataclass(frozen=True)
class FaceFrame:
    """A face-aligned coordinate frame: `across` points to the image-right eye, `down`
    from brows to chin, so the rig works the same on a tilted head."""

    origin: np.ndarray  # (2,) pixel position of the mouth centre
    across: np.ndarray  # (2,) unit vector
    down: np.ndarray  # (2,) unit vector
    height: float  # forehead top to chin, pixels
    width: float  # cheek to cheek, pixels

    @classmethod
    def of(cls, landmarks: np.ndarray) -> FaceFrame:
        right_eye = landmarks[[33, 133]].mean(axis=0)
        left_eye = landmarks[[263, 362]].mean(axis=0)
        across = (left_eye - right_eye) / np.linalg.norm(left_eye - right_eye)
        down = np.array([-across[1], across[0]])
        return cls(
            origin=landmarks[list(MOUTH_CORNERS)].mean(axis=0).astype(np.float64),
            across=across.astype(np.float64),
            down=down.astype(np.float64),
            height=float(np.linalg.norm(landmarks[CHIN] - landmarks[FOREHEAD_TOP])),
            width=float(np.linalg.norm(landmarks[CHEEK_LEFT] - landmarks[CHEEK_RIGHT])),
        )

    def to_local(self, points: np.ndarray) -> np.ndarray:
        """(P, 2) pixels -> (P, 2) (u across, v down) pixels relative to the mouth."""
        rel = np.asarray(points, dtype=np.float64) - self.origin
        return np.stack([rel @ self.across, rel @ self.down], axis=-1)

    def to_image(self, local_vectors: np.ndarray) -> np.ndarray:
        """(P, 2) vectors in (u, v) -> (P, 2) vectors in image x, y."""
        return local_vectors[..., :1] * self.across + local_vectors[..., 1:] * self.down
