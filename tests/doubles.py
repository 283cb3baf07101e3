"""Test doubles shared by more than one test module."""

from __future__ import annotations

import numpy as np


class ListSink:
    """A frame sink that keeps what a render call writes, as a worker's encoder
    would receive it: each batch a copy, in order."""

    def __init__(self) -> None:
        self.batches: list[np.ndarray] = []

    def write(self, frames: np.ndarray) -> None:
        self.batches.append(frames.copy())

    @property
    def frames(self) -> np.ndarray:
        return np.concatenate(self.batches)
