"""One timeline for a job's audio: its segments end to end, with their pauses, a
lead-in and a tail, and every phone moved to its place on it."""

from __future__ import annotations

import numpy as np

from farm.errors import InvalidInput
from models.base import Phone


def assemble_audio(
    parts: list[tuple[np.ndarray, int, list[Phone], int]], lead_in: float, tail: float
) -> tuple[np.ndarray, int, list[Phone]]:
    """Concatenate segments (samples, rate, phones, pause_after_ms) on one timeline."""
    rate = parts[0][1]
    pieces = [np.zeros(int(lead_in * rate), np.int16)]
    phones: list[Phone] = []
    offset = lead_in
    for samples, seg_rate, seg_phones, pause_ms in parts:
        if seg_rate != rate:
            raise InvalidInput(f"segments disagree on sample rate ({seg_rate} vs {rate})")
        phones.extend(
            Phone(p.symbol, p.start + offset, p.end + offset, p.stress, p.emphasis)
            for p in seg_phones
        )
        silence = np.zeros(int(pause_ms * rate / 1000), np.int16)
        pieces += [samples.astype(np.int16), silence]
        offset += (len(samples) + len(silence)) / rate
    pieces.append(np.zeros(int(tail * rate), np.int16))
    return np.concatenate(pieces), rate, phones
