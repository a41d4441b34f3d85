"""Counted: a slow warmup (a model load) that counts itself (and fails if told to), then
passes messages through.

Each warmup appends a line to ``warmups.log`` in its node folder, when it begins and when it
ends, with how many ``Counted`` nodes this process has built so far: a pipeline warmed up
twice in one worker shows two beginnings and two builds (the first set of nodes orphaned).
"""

from __future__ import annotations

import pathlib
import time

from juturna.components import Message, Node


class Counted(Node):
    built = 0  # one pipeline per worker process: the builds of this pipeline

    def __init__(self, seconds: float, fail: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self._seconds = float(seconds)
        self._fail = str(fail)
        Counted.built += 1

    def _note(self, what: str) -> None:
        with open(pathlib.Path(self.pipe_path, "warmups.log"), "a") as log:
            log.write(f"{what} built={Counted.built}\n")

    def warmup(self) -> None:
        self._note("begin")
        time.sleep(self._seconds)
        self._note("end")
        if self._fail:
            raise RuntimeError(self._fail)

    def update(self, message: Message) -> None:
        self.transmit(message)
