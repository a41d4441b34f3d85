"""Slow: a proc whose warmup takes a while (a model load), then passes messages through."""

from __future__ import annotations

import time

from juturna.components import Message, Node


class Slow(Node):
    def __init__(self, seconds: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self._seconds = float(seconds)

    def warmup(self) -> None:
        time.sleep(self._seconds)

    def update(self, message: Message) -> None:
        self.transmit(message)
