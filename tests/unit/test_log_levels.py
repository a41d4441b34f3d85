"""kopf's per-event success lines become DEBUG: printed with -v, dropped at INFO (the
default). The operator's own log on the real control plane: tests/integration/test_logs.py."""

from __future__ import annotations

import io
import logging

import pytest

from juturna_operator.handlers import SuccessesAtDebug


@pytest.mark.parametrize("level", [logging.INFO, logging.DEBUG])
def test_kopfs_success_lines_are_debug(level: int) -> None:
    """At INFO (the default) they are not printed; with -v (DEBUG) they are, as DEBUG."""
    logger = logging.getLogger(f"test-successes-{level}")
    logger.setLevel(level)
    logger.propagate = False
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.addFilter(SuccessesAtDebug())
    logger.info("Handler 'pod_event' succeeded.")
    logger.info("Handler 'delete_pipeline' succeeded.")
    logger.info("Deletion is processed: 1 succeeded; 0 failed.")
    logger.info("Deletion is processed: 0 succeeded; 1 failed.")
    logger.info("[ns/tones] Started: pipeline started")
    logger.warning("Handler 'x' succeeded.")  # not kopf's INFO line: left alone
    shown = out.getvalue().splitlines()
    kept = [
        "INFO Deletion is processed: 0 succeeded; 1 failed.",
        "INFO [ns/tones] Started: pipeline started",
        "WARNING Handler 'x' succeeded.",
    ]
    if level == logging.DEBUG:
        kept = [
            "DEBUG Handler 'pod_event' succeeded.",
            "DEBUG Handler 'delete_pipeline' succeeded.",
            "DEBUG Deletion is processed: 1 succeeded; 0 failed.",
            *kept,
        ]
    assert shown == kept
