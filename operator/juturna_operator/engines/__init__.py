"""Engines: implementations of the PipelineManager port (``base.Engine``)."""

from __future__ import annotations

from juturna_operator.engines.base import Engine
from juturna_operator.settings import Settings

ENGINE_NAMES = ("inprocess",)


def make_engine(settings: Settings) -> Engine:
    """The engine named by ``settings.engine``."""
    if settings.engine == "inprocess":
        from juturna_operator.engines.inprocess import InProcessEngine

        return InProcessEngine(settings)
    raise ValueError(
        f"unknown engine {settings.engine!r}: JUTURNA_OPERATOR_ENGINE must be one of "
        f"{', '.join(ENGINE_NAMES)}"
    )
