"""FrameWriter (models/frames.py): batches reach the sink in order and unchanged while
the next batch renders; a sink's error stops the render loop; nothing hangs."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from farm.errors import Cancelled
from models.frames import FrameWriter


class Collect:
    def __init__(self) -> None:
        self.batches: list[np.ndarray] = []

    def write(self, frames: np.ndarray) -> None:
        self.batches.append(np.array(frames))


class Blocking(Collect):
    """A sink whose writes wait until `release` is set: an encoder that is busy."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def write(self, frames: np.ndarray) -> None:
        self.release.wait(30)
        super().write(frames)


def batches(n: int, size: int = 8, seed: int = 0) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed)
    return [
        torch.from_numpy(rng.integers(0, 256, (4 - i % 2, size, size, 3), dtype=np.uint8))
        for i in range(n)
    ]


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_batches_arrive_in_order_and_unchanged(device):
    sink = Collect()
    writer = FrameWriter(sink, torch.device(device))
    sent = batches(9)
    for b in sent:
        writer.put(b.to(device))
    writer.close()
    assert len(sink.batches) == 9
    for got, want in zip(sink.batches, sent, strict=True):
        assert np.array_equal(got, want.numpy())


def test_rendering_goes_on_while_the_sink_is_busy():
    """With the sink stuck on batch 0, two more batches are accepted (depth 2); the
    fourth waits for a free buffer."""
    sink = Blocking()
    writer = FrameWriter(sink, torch.device("cpu"), depth=2)
    sent = batches(4)
    for b in sent[:3]:
        writer.put(b)  # returns although nothing was written yet
    assert sink.batches == []
    fourth = threading.Thread(target=writer.put, args=(sent[3],))
    fourth.start()
    fourth.join(0.5)
    assert fourth.is_alive()  # no free buffer until the sink moves
    sink.release.set()
    fourth.join(30)
    writer.close()
    assert [len(b) for b in sink.batches] == [len(b) for b in sent]


@pytest.mark.parametrize("error", [Cancelled("job x was cancelled"), OSError("pipe broke")])
def test_an_error_in_the_sink_stops_the_render_loop(error):
    class Fails(Collect):
        def write(self, frames):
            if self.batches:
                raise error
            super().write(frames)

    sink = Fails()
    writer = FrameWriter(sink, torch.device("cpu"))
    with pytest.raises(type(error)):
        for b in batches(50):
            writer.put(b)
        writer.close()
    writer.abort()  # what the render loop does next: returns, no hang
    assert len(sink.batches) == 1


def test_abort_drops_queued_batches_and_returns():
    sink = Blocking()
    writer = FrameWriter(sink, torch.device("cpu"))
    for b in batches(3):
        writer.put(b)
    sink.release.set()
    writer.abort()
    assert len(sink.batches) <= 1
