"""Jsonl: a sink that appends every payload as one JSON line to a file."""

from __future__ import annotations

import json
import pathlib

from juturna.components import Message, Node
from juturna.payloads import ObjectPayload


class Jsonl(Node[ObjectPayload, None]):
    """Appends ``payload`` as JSON to ``<node folder>/<file>``, flushed per line."""

    def __init__(self, file: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self._file_name = pathlib.PurePath(str(file)).name  # never a path outside the folder
        self._out = None

    def warmup(self) -> None:
        self._out = open(pathlib.Path(self.pipe_path, self._file_name), "a", buffering=1)  # noqa: SIM115

    def update(self, message: Message[ObjectPayload]) -> None:
        self._out.write(json.dumps(dict(message.payload)) + "\n")

    def destroy(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None
