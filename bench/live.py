"""Live pipelines on the local real node (``make bench-live``): how soon a Pipeline's address
takes input, how soon real audio comes out, and what the Services cost the node.

For each repetition, in a namespace of its own, with the operator (engine pod) running:

* **apply → address accepting input**: a knocker pod POSTs to the address a ``json_http``
  Pipeline will have (its Service's DNS name and the port the operator assigns) every 50 ms
  from before the apply; the time of its first accepted POST, less the time of the apply;
* **sender start → first result**: ``examples/live-audio.yaml`` Running, a sender pod starts
  ffmpeg (a 440 Hz tone, Opus over RTP, to the Service by DNS name); the first result at the
  receiver pod, less the sender's start (it prints the time just before it runs ffmpeg);
* **idle RSS** of kube-proxy and CoreDNS, with the node up and no Pipeline.

Pod and machine share one clock (the same kernel). Medians over the repetitions.

    make bench-live      (.venv/bin/python bench/live.py [--repetitions 3] [--out D])
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from kubernetes import client, config

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "hack"), str(REPO / "operator")]

from harness import PipelineWatch  # noqa: E402
from pods import (  # noqa: E402
    IMAGE,
    plane_and_node,
    pod_engine_operator,
    wait_default_service_account,
)
from processes import rss_kib  # noqa: E402

from juturna_operator.api import GROUP, PLURAL, VERSION, PipelineSpec  # noqa: E402
from juturna_operator.listening import listeners  # noqa: E402

TIMEOUT_S = 180.0

JSON_PIPELINE = yaml.safe_load((REPO / "examples" / "json-events.yaml").read_text())

KNOCKER = """
import time, urllib.request
url = {url!r}
while True:
    try:
        urllib.request.urlopen(urllib.request.Request(url, data=b'{{}}', method='POST',
            headers={{'Content-Type': 'application/json'}}), timeout=1).read()
        print(time.time(), flush=True)
        break
    except OSError:
        time.sleep(0.05)
"""

RECEIVER = """
import http.server, time
class Receiver(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        print(time.time(), flush=True)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", 8000), Receiver).serve_forever()
"""


def pod(name: str, namespace: str, command: list[str], labels: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "terminationGracePeriodSeconds": 1,
            "containers": [
                {
                    "name": "main",
                    "image": IMAGE,
                    "imagePullPolicy": "Never",
                    "command": command,
                }
            ],
        },
    }


def wait_for(check: Any, what: str, timeout: float = TIMEOUT_S) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.1)
    raise RuntimeError(f"{what}: not within {timeout:g} s")


def log_times(core: client.CoreV1Api, namespace: str, name: str) -> list[float]:
    try:
        text = core.read_namespaced_pod_log(name, namespace)
    except client.ApiException:
        return []
    return [float(word) for word in (text or "").split() if word.replace(".", "", 1).isdigit()]


def one_round(
    core: client.CoreV1Api, objects: client.CustomObjectsApi, namespace: str
) -> dict[str, float]:
    watch = PipelineWatch(objects, namespace)
    try:
        # The address, apply to first accepted POST.
        port = listeners(PipelineSpec.model_validate(JSON_PIPELINE["spec"]))[0].port
        url = f"http://json-in.{namespace}.svc:{port}/events"
        core.create_namespaced_pod(
            namespace, pod("knocker", namespace, ["python", "-c", KNOCKER.format(url=url)], {})
        )
        wait_for(
            lambda: core.read_namespaced_pod("knocker", namespace).status.phase == "Running",
            "the knocker running",
        )
        applied = time.time()
        objects.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, JSON_PIPELINE)
        accepted = wait_for(lambda: log_times(core, namespace, "knocker"), "a POST accepted")[0]

        # Real audio, sender start to first result.
        core.create_namespaced_pod(
            namespace,
            pod("receiver", namespace, ["python", "-c", RECEIVER], {"app": "receiver"}),
        )
        core.create_namespaced_service(
            namespace,
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "receiver"},
                "spec": {"selector": {"app": "receiver"}, "ports": [{"port": 8000}]},
            },
        )
        audio = yaml.safe_load((REPO / "examples" / "live-audio.yaml").read_text())
        audio_applied = time.monotonic()
        objects.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, audio)
        watch.wait(lambda: "live-audio" in watch.ready_at, TIMEOUT_S)
        ready_s = watch.ready_at["live-audio"] - audio_applied
        body = objects.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "live-audio")
        rtp = next(e for e in body["status"]["endpoints"] if e["name"] == "rtp")
        ffmpeg = (
            "python -c 'import time; print(time.time(), flush=True)'; exec ffmpeg -nostdin "
            "-loglevel error -re -f lavfi -i sine=frequency=440:sample_rate=48000 -t 30 -ac 2 "
            f"-c:a libopus -payload_type 97 -f rtp rtp://{rtp['host']}:{rtp['port']}"
        )
        core.create_namespaced_pod(namespace, pod("sender", namespace, ["sh", "-c", ffmpeg], {}))
        sent = wait_for(lambda: log_times(core, namespace, "sender"), "the sender's start")[0]
        first = wait_for(lambda: log_times(core, namespace, "receiver"), "a first result")[0]
    finally:
        watch.close()
    return {
        "apply_to_address_s": accepted - applied,
        "audio_apply_to_ready_s": ready_s,
        "sender_start_to_first_result_s": first - sent,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / ".state" / "bench")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    rows: list[dict[str, float]] = []
    with plane_and_node() as (plane, node):
        time.sleep(5)  # idle: no Service but the API's, nothing resolving
        idle = {
            c.name: rss_kib(c.pid) / 1024
            for c in node.components
            if c.name in ("kube-proxy", "coredns")
        }
        api = config.new_client_from_config(str(plane.kubeconfig))
        core, objects = client.CoreV1Api(api), client.CustomObjectsApi(api)
        for rep in range(args.repetitions):
            namespace = f"live-{rep}"
            node.kubectl("create", "namespace", namespace)
            wait_default_service_account(core, namespace)
            with tempfile.TemporaryDirectory() as base:
                op = pod_engine_operator(plane.kubeconfig, namespace, Path(base))
                op.start()
                try:
                    rows.append(one_round(core, objects, namespace))
                finally:
                    for name in ("json-in", "live-audio"):
                        with contextlib.suppress(client.ApiException):
                            objects.delete_namespaced_custom_object(
                                GROUP, VERSION, namespace, PLURAL, name
                            )
                    # The finalizer runs while the operator does.
                    wait_for(
                        lambda ns=namespace: (
                            not objects.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)[
                                "items"
                            ]
                        ),
                        "the Pipelines deleted",
                    )
                    op.stop()
            print(json.dumps(rows[-1]), flush=True)
    report = render(rows, idle)
    (args.out / "benchmarks-live.json").write_text(
        json.dumps({"rows": rows, "idle_rss_mib": idle}, indent=1) + "\n"
    )
    (args.out / "benchmarks-live.md").write_text(report)
    print(report)
    return 0


def render(rows: list[dict[str, float]], idle: dict[str, float]) -> str:
    def median(key: str) -> float:
        return statistics.median(r[key] for r in rows)

    def spread(key: str) -> str:
        return f"{min(r[key] for r in rows):.2f}-{max(r[key] for r in rows):.2f}"

    lines = [
        "# Live pipelines on the real node (bench/live.py)",
        "",
        f"Medians over {len(rows)} repetitions, and their range; the pod engine, one node, "
        "kube-proxy in iptables mode, CoreDNS.",
        "",
        "| what | median | range |",
        "|---|---|---|",
        f"| apply → the address accepts input (json_http, by DNS name) | "
        f"{median('apply_to_address_s'):.2f} s | {spread('apply_to_address_s')} s |",
        f"| apply → Ready (live-audio) | {median('audio_apply_to_ready_s'):.2f} s | "
        f"{spread('audio_apply_to_ready_s')} s |",
        f"| sender start → first result at the receiver (live-audio, 1 s blocks) | "
        f"{median('sender_start_to_first_result_s'):.2f} s | "
        f"{spread('sender_start_to_first_result_s')} s |",
    ]
    lines += [f"| idle RSS of {name} | {mib:.0f} MiB | |" for name, mib in sorted(idle.items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
