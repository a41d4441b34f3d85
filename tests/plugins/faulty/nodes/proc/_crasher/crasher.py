"""Crasher: passes messages through, then raises in update() (a node crash at runtime)."""

from __future__ import annotations

from juturna.components import Message, Node


class Crasher(Node):
    def __init__(self, after: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self._left = int(after)

    def update(self, message: Message) -> None:
        if self._left <= 0:
            raise RuntimeError(f"kaboom in {self.name}")
        self._left -= 1
        self.transmit(message)
