"""Pitch: a proc that finds each audio block's dominant frequency (the peak of its FFT)."""

from __future__ import annotations

import numpy as np
from juturna.components import Message, Node
from juturna.payloads import AudioPayload, ObjectPayload


class Pitch(Node[AudioPayload, ObjectPayload]):
    """An ``AudioPayload`` block in; ``{"frequency": Hz, "level": RMS, "start": s, "end": s,
    "block": n}`` out, for every block louder than ``min_level``."""

    def __init__(self, min_level: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self._min_level = float(min_level)

    def update(self, message: Message[AudioPayload]) -> None:
        audio = np.asarray(message.payload.audio, dtype=np.float64).ravel()
        rate = int(message.payload.sampling_rate)
        if audio.size < 2 or rate <= 0:
            return
        level = float(np.sqrt(np.mean(audio**2)))
        if level < self._min_level:
            return
        # A Hann window keeps the peak of a steady tone in its own bin.
        spectrum = np.abs(np.fft.rfft(audio * np.hanning(audio.size)))
        spectrum[0] = 0.0  # no DC
        peak = int(np.argmax(spectrum))
        self.transmit(
            Message[ObjectPayload](
                creator=self.name,
                version=message.version,
                payload=ObjectPayload(
                    frequency=round(peak * rate / audio.size, 1),
                    level=round(level, 4),
                    start=message.payload.start,
                    end=message.payload.end,
                    block=message.version,
                ),
            )
        )
