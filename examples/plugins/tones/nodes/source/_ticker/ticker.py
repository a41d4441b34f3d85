"""Ticker: a source that emits an increasing counter at a fixed rate."""

from __future__ import annotations

import time

from juturna.components import Message, Node
from juturna.payloads import ObjectPayload


class Ticker(Node[ObjectPayload, ObjectPayload]):
    """Emits ``{"count": n, "time": t}`` ``rate`` times per second."""

    def __init__(self, rate: float, start: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self._rate = float(rate)
        self._count = int(start)

    def configure(self) -> None:
        if self._rate <= 0:
            raise ValueError(f"rate must be positive, got {self._rate}")
        self.set_source(self._tick, by=1.0 / self._rate, mode="post")

    def _tick(self) -> Message[ObjectPayload]:
        message = Message[ObjectPayload](
            creator=self.name,
            version=self._count,
            payload=ObjectPayload(count=self._count, time=time.time()),
        )
        self._count += 1
        return message

    def update(self, message: Message[ObjectPayload]) -> None:
        # Juturna queues what the source function returns on this node; forward it.
        self.transmit(message)
