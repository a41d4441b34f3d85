"""How large a full shard's health answer is: what ``client.MAX_ANSWER_BYTES`` is sized from.

    python bench/health_size.py [--pipelines 32] [--nodes 8] [--words 400]

Starts the process engine on its own (no cluster), in a temporary folder, and deploys
``--pipelines`` pipelines into one shard (a worker of that many pipelines per process: full),
each a graph of ``--nodes`` nodes: a ticker feeding every other node, each of which is the
test plugin's crasher, raising at its first message with an exception message of about
``--words`` bytes. Once every crasher has died (a full crash list: every node thread that can
die has), it reads the shard's ``GET /operator/health`` answer as bytes and reports its size,
per pipeline and per node. Everything it starts is deleted; the shard ends with its last
pipeline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "hack"), str(REPO / "tests")]

from juturna_operator.api import PipelineSpec  # noqa: E402
from juturna_operator.domain import InstanceState, PipelineKey  # noqa: E402
from juturna_operator.engines.base import Plan  # noqa: E402
from juturna_operator.engines.process import ProcessEngine  # noqa: E402
from juturna_operator.settings import Settings  # noqa: E402
from support import PLUGIN_ROOTS  # noqa: E402

# Names a media pipeline's nodes have (a voice pipeline: detection, transcription,
# translation, notifications), for a realistic size of each node's entry.
NAMES = ("vad", "transcribe", "translate", "summarize", "notify-http", "notify-ws", "archive")


def config_of(key: PipelineKey, nodes: int, words: int) -> dict:
    names = [NAMES[i] if i < len(NAMES) else f"stage-{i}" for i in range(nodes - 1)]
    spec = PipelineSpec.model_validate(
        {
            "plugins": ["tones", "faulty"],
            "nodes": [
                {"name": "mic", "type": "source", "mark": "ticker", "configuration": {"rate": 2}},
                *(
                    {
                        "name": name,
                        "type": "proc",
                        "mark": "crasher",
                        "configuration": {"after": 0, "words": words},
                    }
                    for name in names
                ),
            ],
            "links": [{"from": "mic", "to": name} for name in names],
        }
    )
    return spec.to_juturna_config(key.juturna_name)


def health_bytes(port: int, token: str) -> bytes:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/operator/health", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return bytes(answer.read())


async def measure(pipelines: int, nodes: int, words: int) -> None:
    with tempfile.TemporaryDirectory(prefix="health-size-") as tmp:
        settings = Settings(
            plugin_roots=PLUGIN_ROOTS,
            workdir=Path(tmp),
            stop_timeout_s=2,
            pipelines_per_process=pipelines,
        )
        engine = ProcessEngine(settings)
        keys = [PipelineKey("bench", f"p{i:03d}", str(uuid.uuid4())) for i in range(pipelines)]
        try:
            running = Plan(until=InstanceState.Running)
            await asyncio.gather(
                *(engine.create(k, config_of(k, nodes, words), "r1", running) for k in keys)
            )
            (shard,) = engine._workers.values()
            want = pipelines * (nodes - 1)
            deadline = time.monotonic() + 120
            while True:
                body = await asyncio.to_thread(health_bytes, shard.record.port, shard.token)
                crashes = len(json.loads(body)["crashes"])
                if crashes >= want or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.5)
            print(
                f"{pipelines} pipeline(s) of {nodes} nodes, crash messages of ~{words} bytes: "
                f"{crashes}/{want} crashes; health answer {len(body)} bytes "
                f"({len(body) / 1024:.1f} KiB; {len(body) / pipelines:.0f} bytes per pipeline, "
                f"{len(body) / (pipelines * nodes):.0f} per node)"
            )
        finally:
            for k in keys:
                await engine.delete(k)
            await engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipelines", type=int, default=32)
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--words", type=int, default=400)
    args = parser.parse_args()
    asyncio.run(measure(args.pipelines, args.nodes, args.words))


if __name__ == "__main__":
    main()
