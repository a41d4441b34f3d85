"""Hog: passes messages through and keeps a growing block of memory for each, as a node with
a leak would; under a memory limit its container is OOMKilled."""

from __future__ import annotations

from juturna.components import Message, Node


class Hog(Node):
    def __init__(self, mib_per_message: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self._step = int(mib_per_message) * 1024 * 1024
        self._kept: list[bytearray] = []

    def update(self, message: Message) -> None:
        block = bytearray(self._step)
        block[::4096] = b"x" * len(block[::4096])  # touch every page: resident, not reserved
        self._kept.append(block)
        self.transmit(message)
