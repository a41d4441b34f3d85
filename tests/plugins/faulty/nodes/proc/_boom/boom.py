"""Boom: its constructor raises, as a node whose model file is missing would."""

from __future__ import annotations

from juturna.components import Node


class Boom(Node):
    def __init__(self, model: str, **kwargs) -> None:
        super().__init__(**kwargs)
        raise FileNotFoundError(f"model file {model} not found")
