"""The portrait avatar: a square face crop of the user's photo and its landmarks, and
the whole photo (at most 1920 pixels on the long side) with where the crop lies in it,
for full-photo output."""

from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from farm.errors import InvalidInput, PermanentError

from .landmarks import CHIN, FOREHEAD_TOP, LANDMARK_COUNT, detect_landmarks

CROP_SIZE = 512
# 2 added the full photo and the crop box; 1 (crop only) still loads and renders the
# face crop, but cannot render the whole photo.
FORMAT_VERSION = 2
SUPPORTED_VERSIONS = (1, 2)
# Full-photo output is H.264 4:2:0 within the sizes jobs accept: even sides, <= 1920.
MAX_PHOTO_SIDE = 1920
# Crop side and centre in face heights (forehead top to chin): room for hair above
# and neck and shoulders below, so the output is not a floating face.
CROP_SIDE = 2.6
CROP_SHIFT_DOWN = 0.25


@dataclass(eq=False)
class PortraitAvatar:
    image: np.ndarray  # uint8 (512, 512, 3) RGB face crop
    landmarks: np.ndarray  # float32 (478, 2) pixel x, y in the crop
    # The whole photo, uint8 (H, W, 3) RGB with even sides <= MAX_PHOTO_SIDE, and the
    # crop's square in it: (x0, y0, side) in its pixels; it may overhang the photo,
    # where the crop was edge-padded. None for artifacts of format 1.
    photo: np.ndarray | None = None
    crop_box: tuple[int, int, int] | None = None
    # Per-(size, device, dtype) render tensors, built on first use: workers keep
    # avatars in an LRU, so the precomputation is paid once per avatar and process.
    cache: dict[Any, Any] = field(default_factory=dict, repr=False)

    @property
    def photo_size(self) -> tuple[int, int]:
        """(width, height) of the full-photo output: a plan of this size renders the
        whole photo with the animated crop pasted back (see renderer.py)."""
        if self.photo is None:
            raise PermanentError(
                "this avatar was registered before full-photo output existed; "
                "add it again from its photo to render the whole photo"
            )
        return int(self.photo.shape[1]), int(self.photo.shape[0])

    @property
    def face_box(self) -> tuple[int, int, int]:
        """(x0, y0, side): the square around the face's landmarks in the pixels of
        whole-photo output (models/base.py WholePhotoAvatar). A 512x512 photo renders as
        the crop itself (renderer.py), so there the box is in crop pixels."""
        points = self.landmarks.astype(np.float64)
        if self.photo_size != (CROP_SIZE, CROP_SIZE):
            assert self.crop_box is not None
            x0, y0, side = self.crop_box
            points = points * (side / CROP_SIZE) + np.array([x0, y0], dtype=np.float64)
        lo, hi = points.min(axis=0), points.max(axis=0)
        side = float((hi - lo).max())
        cx, cy = (lo + hi) / 2
        return int(round(cx - side / 2)), int(round(cy - side / 2)), max(int(round(side)), 1)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        extra: dict[str, np.ndarray] = {}
        if self.photo is not None and self.crop_box is not None:
            extra = {"photo": self.photo, "crop_box": np.array(self.crop_box, dtype=np.int64)}
        np.savez_compressed(
            buf,
            version=np.array(FORMAT_VERSION if extra else 1),
            image=self.image,
            landmarks=self.landmarks.astype(np.float32),
            **extra,
        )
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> PortraitAvatar:
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                version, image, landmarks = int(z["version"]), z["image"], z["landmarks"]
                photo = z["photo"] if version >= 2 else None
                box = z["crop_box"] if version >= 2 else None
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            raise PermanentError("not a portrait avatar artifact") from exc
        if version not in SUPPORTED_VERSIONS:
            raise PermanentError(f"portrait avatar format {version} is not supported")
        if image.shape != (CROP_SIZE, CROP_SIZE, 3) or landmarks.shape != (LANDMARK_COUNT, 2):
            raise PermanentError("portrait avatar artifact has unexpected shapes")
        crop_box = None
        if photo is not None and box is not None:
            if photo.ndim != 3 or photo.shape[2] != 3 or box.shape != (3,) or box[2] < 2:
                raise PermanentError("portrait avatar artifact has unexpected shapes")
            crop_box = (int(box[0]), int(box[1]), int(box[2]))
            photo = photo.astype(np.uint8)
        return cls(
            image=image.astype(np.uint8),
            landmarks=landmarks.astype(np.float32),
            photo=photo,
            crop_box=crop_box,
        )


def prepare_avatar(photo: np.ndarray) -> PortraitAvatar:
    """Detect the face and cut a square crop around it, padded where the photo ends."""
    photo = _as_rgb_uint8(photo)
    landmarks = detect_landmarks(photo)
    x0, y0, side = _crop_square(landmarks, photo.shape[1], photo.shape[0])
    crop = _extract(photo, x0, y0, side)
    scale = CROP_SIZE / side
    interpolation = cv2.INTER_AREA if side > CROP_SIZE else cv2.INTER_CUBIC
    image = cv2.resize(crop, (CROP_SIZE, CROP_SIZE), interpolation=interpolation)
    local = (landmarks - np.array([x0, y0], dtype=np.float32)) * scale
    full, factor = fit_photo(photo)
    # Whole pixels in the stored photo, so the paste-back needs no resampling of the
    # photo; rounding moves the crop by under half an output pixel, which the feathered
    # border hides.
    box = (int(round(x0 * factor)), int(round(y0 * factor)), max(int(round(side * factor)), 2))
    return PortraitAvatar(image=image, landmarks=local.astype(np.float32), photo=full, crop_box=box)


def fit_photo(photo: np.ndarray) -> tuple[np.ndarray, float]:
    """The photo downscaled to at most MAX_PHOTO_SIDE on its long side, then trimmed by
    a pixel where a side is odd (trimming, unlike resizing, keeps pixels unchanged and
    the crop box exact); and the scale factor applied."""
    height, width = photo.shape[:2]
    factor = min(1.0, MAX_PHOTO_SIDE / max(height, width))
    if factor < 1.0:
        size = (max(int(round(width * factor)), 2), max(int(round(height * factor)), 2))
        photo = cv2.resize(photo, size, interpolation=cv2.INTER_AREA)
    height, width = photo.shape[:2]
    return np.ascontiguousarray(photo[: height - height % 2, : width - width % 2]), factor


def demo_photo() -> np.ndarray:
    """A public-domain NASA portrait shipped inside scikit-image."""
    from skimage.data import astronaut

    return astronaut()


def _as_rgb_uint8(photo: np.ndarray) -> np.ndarray:
    photo = np.asarray(photo)
    if photo.dtype == np.uint8 and photo.ndim == 2:
        photo = np.repeat(photo[:, :, None], 3, axis=2)
    elif photo.dtype == np.uint8 and photo.ndim == 3 and photo.shape[2] == 4:
        photo = photo[:, :, :3]  # alpha is dropped: the background stays as painted
    if photo.dtype != np.uint8 or photo.ndim != 3 or photo.shape[2] != 3:
        raise InvalidInput("the photo must be an RGB uint8 image (height, width, 3)")
    if min(photo.shape[:2]) < 64:
        raise InvalidInput("the photo is too small (at least 64x64 pixels)")
    return photo


def _crop_square(landmarks: np.ndarray, width: int, height: int) -> tuple[int, int, int]:
    """Top-left corner and side of the crop; shifted to stay inside the photo when
    it fits, else it overhangs and `_extract` pads."""
    top, chin = landmarks[FOREHEAD_TOP], landmarks[CHIN]
    face_height = float(np.linalg.norm(chin - top))
    side = max(int(round(CROP_SIDE * face_height)), 64)
    cx = float(landmarks[:, 0].min() + landmarks[:, 0].max()) / 2
    cy = float(top[1] + chin[1]) / 2 + CROP_SHIFT_DOWN * face_height

    def place(centre: float, extent: int) -> int:
        start = int(round(centre - side / 2))
        return min(max(start, 0), extent - side) if side <= extent else start

    return place(cx, width), place(cy, height), side


def _extract(photo: np.ndarray, x0: int, y0: int, side: int) -> np.ndarray:
    height, width = photo.shape[:2]
    pad = [
        (max(0, -y0), max(0, y0 + side - height)),
        (max(0, -x0), max(0, x0 + side - width)),
        (0, 0),
    ]
    padded = np.pad(photo, pad, mode="edge")
    ys, xs = y0 + pad[0][0], x0 + pad[1][0]
    return padded[ys : ys + side, xs : xs + side]
