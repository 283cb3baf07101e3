"""The built-in `portrait` renderer: animates one photo into a talking head.

Registration finds 478 face landmarks (mediapipe FaceMesh) and keeps a 512x512 face
crop; rendering warps that crop per frame by dense deformation fields blended from
the motion track, and paints a mouth interior where the lips part.

Signs of the signed channels, in image terms (at 1: about 4 degrees of head turn):
head_yaw > 0 moves the face toward the image's right; head_pitch > 0 nods down;
head_roll > 0 turns the head clockwise; gaze_x > 0 looks toward the image's right and
gaze_y > 0 looks down. blink_left is the subject's left eye (on the image's right).
Output sizes: 512x512 is the face crop; the avatar's `photo_size` (the whole photo,
at most 1920 on the long side, even sides) renders the whole photo with the animated
crop pasted back under a feathered border; other sizes are letterboxed: the square
face renders at min(width, height) pixels, centred on black.
"""

from .avatar import PortraitAvatar, demo_photo
from .renderer import PortraitRenderer

__all__ = ["PortraitAvatar", "PortraitRenderer", "demo_photo"]
