"""Dud: a source whose start fails (a camera that cannot be opened). Juturna starts sources
last, so the nodes downstream have started by then."""

from __future__ import annotations

from juturna.components import Node


class Dud(Node):
    def __init__(self, device: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self._device = device

    def start(self) -> None:
        raise OSError(f"cannot open {self._device}")
