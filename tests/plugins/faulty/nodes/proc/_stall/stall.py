"""Stall: a proc whose warmup blocks (a model load stuck on a dead network share).

In-process tests reach this module (``faulty.nodes.proc._stall.stall``): ``STALLED`` holds the
folders of the warmups blocked now, and ``RELEASE.set()`` ends them all, so that a test can
leave no thread behind."""

from __future__ import annotations

import threading

from juturna.components import Message, Node

RELEASE = threading.Event()
STALLED: set[str] = set()


class Stall(Node):
    def __init__(self, seconds: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self._seconds = float(seconds)

    def warmup(self) -> None:
        STALLED.add(str(self.pipe_path))
        try:
            RELEASE.wait(self._seconds)
        finally:
            STALLED.discard(str(self.pipe_path))

    def update(self, message: Message) -> None:
        self.transmit(message)
