"""Helper: a node with a helper thread of its own that raises, as plugins that run a thread
beside Juturna's (a poller, an uploader) do. The thread, ``helper-<node>``, is started in
``start()``, from the thread that starts the pipeline; it starts ``depth`` more helpers in a
chain (plain functions: only thread ancestry says whose they are), and the last raises after
``after`` seconds. Messages pass through."""

from __future__ import annotations

import threading
import time

from juturna.components import Message, Node


def _helper(node: str, after: float, depth: int) -> None:
    if depth > 0:
        threading.Thread(
            target=_helper, args=(node, after, depth - 1), name=f"helper-{node}", daemon=True
        ).start()
        return
    time.sleep(after)
    raise RuntimeError(f"helper of {node} failed")


class Helper(Node):
    def __init__(self, after: float, depth: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self._after = float(after)
        self._depth = int(depth)

    def start(self) -> None:
        threading.Thread(
            target=_helper,
            args=(self.name, self._after, self._depth),
            name=f"helper-{self.name}",
            daemon=True,
        ).start()
        super().start()

    def update(self, message: Message) -> None:
        self.transmit(message)
