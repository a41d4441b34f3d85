"""Spill: passes messages through and appends a block to a file in its pipeline folder for
each, as a node that dumps a live stream to disk would; past the folder's size limit the
kubelet evicts its pod."""

from __future__ import annotations

import pathlib

from juturna.components import Message, Node


class Spill(Node):
    def __init__(self, mib_per_message: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self._block = b"x" * (int(mib_per_message) * 1024 * 1024)

    def update(self, message: Message) -> None:
        with open(pathlib.Path(self.pipe_path, "spill.bin"), "ab") as out:
            out.write(self._block)
        self.transmit(message)
