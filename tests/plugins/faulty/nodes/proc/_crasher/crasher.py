"""Crasher: passes messages through, then raises in update() (a node crash at runtime). Its
exception's message carries ``words`` bytes of filler: the worker's health route repeats it,
so a large one makes that answer as large (a real worker's oversized answer)."""

from __future__ import annotations

from juturna.components import Message, Node


class Crasher(Node):
    def __init__(self, after: int, words: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self._left = int(after)
        self._words = int(words)

    def update(self, message: Message) -> None:
        if self._left <= 0:
            raise RuntimeError(f"kaboom in {self.name}" + " blah" * (self._words // 5))
        self._left -= 1
        self.transmit(message)
