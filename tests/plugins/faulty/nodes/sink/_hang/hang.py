"""Hang: a sink whose update() never returns, so its queue fills and stop hangs."""

from __future__ import annotations

import threading

from juturna.components import Message, Node


class Hang(Node):
    def update(self, message: Message) -> None:
        threading.Event().wait()  # forever
