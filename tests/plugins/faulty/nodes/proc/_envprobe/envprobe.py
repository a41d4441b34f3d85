"""Envprobe: a proc that leaks its ``value`` everywhere it can (its folder, its log, its
output), as a hostile node would leak a variable read with ``$JT_ENV_<NAME>``."""

from __future__ import annotations

import pathlib

from juturna.components import Message, Node
from juturna.payloads import ObjectPayload


class Envprobe(Node):
    def __init__(self, value: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self._value = str(value)
        print(f"envprobe read {self._value!r}", flush=True)

    def warmup(self) -> None:
        pathlib.Path(self.pipe_path, "leaked.txt").write_text(self._value)

    def update(self, message: Message) -> None:
        self.transmit(
            Message[ObjectPayload](
                creator=self.name,
                version=message.version,
                payload=ObjectPayload(leaked=self._value),
            )
        )
