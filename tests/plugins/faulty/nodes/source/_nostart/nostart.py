"""Nostart: a ticking source whose start() starts its threads, then raises, as a camera
source that cannot open its device would; with ``block_s``, the open hangs first. In a
pipeline it starts last (sources do), after every other node already runs.

In-process tests reach this module (``faulty.nodes.source._nostart.nostart``):
``RELEASE.set()`` ends every blocked start."""

from __future__ import annotations

import threading
import time

from juturna.components import Message, Node
from juturna.payloads import ObjectPayload

RELEASE = threading.Event()


class Nostart(Node[ObjectPayload, ObjectPayload]):
    def __init__(self, rate: float, block_s: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self._rate = float(rate)
        self._block_s = float(block_s)

    def configure(self) -> None:
        self.set_source(self._tick, by=1.0 / self._rate, mode="post")

    def _tick(self) -> Message[ObjectPayload]:
        return Message[ObjectPayload](creator=self.name, payload=ObjectPayload(time=time.time()))

    def start(self) -> None:
        super().start()
        if self._block_s > 0:
            RELEASE.wait(self._block_s)
        raise OSError(f"{self.name}: cannot open /dev/video9")

    def update(self, message: Message[ObjectPayload]) -> None:
        self.transmit(message)
