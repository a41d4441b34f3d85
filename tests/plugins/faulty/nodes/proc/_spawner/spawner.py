"""Spawner: at start, runs a program (``sleep``) as ffmpeg-launching nodes do, and never ends
it: the program outlives its pipeline unless whoever ends the worker ends it too. Its PID
goes to ``child.pid`` in the node's folder. Messages pass through."""

from __future__ import annotations

import pathlib
import subprocess

from juturna.components import Message, Node


class Spawner(Node):
    def __init__(self, seconds: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self._seconds = int(seconds)

    def start(self) -> None:
        child = subprocess.Popen(["sleep", str(self._seconds)])
        pathlib.Path(self.pipe_path, "child.pid").write_text(str(child.pid))
        super().start()

    def update(self, message: Message) -> None:
        self.transmit(message)
