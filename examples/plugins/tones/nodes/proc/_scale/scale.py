"""Scale: a proc that multiplies the counter and labels the result."""

from __future__ import annotations

from juturna.components import Message, Node
from juturna.payloads import ObjectPayload


class Scale(Node[ObjectPayload, ObjectPayload]):
    """``{"count": n}`` in, ``{"count": n, "value": n * factor, "label": label}`` out."""

    def __init__(self, factor: float, label: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self._factor = factor
        self._label = str(label)

    def update(self, message: Message[ObjectPayload]) -> None:
        count = message.payload["count"]
        self.transmit(
            Message[ObjectPayload](
                creator=self.name,
                version=message.version,
                payload=ObjectPayload(count=count, value=count * self._factor, label=self._label),
            )
        )
