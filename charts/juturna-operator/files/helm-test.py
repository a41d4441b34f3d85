"""`helm test`: the operator answers on its health endpoint, and the API server serves the
Pipeline resource (it does so only once the CRD is Established).

It runs in the chart's test pod (the operator's image: Python's standard library only) as
the namespace's default ServiceAccount, which needs no rule of its own: API discovery is
open to every authenticated user. Exit 0 when both hold; otherwise exit 1, saying which
check failed and why.

    python3 helm-test.py HEALTH_URL GROUP/VERSION PLURAL
"""

from __future__ import annotations

import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

TIMEOUT_S = 10.0
PATIENCE_S = float(os.environ.get("JUTURNA_TEST_PATIENCE", "30"))  # for the health endpoint
# The in-cluster account; another folder (token, ca.crt) for a run outside a pod.
ACCOUNT = Path(
    os.environ.get("JUTURNA_TEST_ACCOUNT", "/var/run/secrets/kubernetes.io/serviceaccount")
)


class CheckFailed(Exception):
    """One check failed; the message says which and why."""


def api_server() -> str:
    """The API server's URL, from the variables the kubelet gives every container."""
    host = os.environ.get("KUBERNETES_SERVICE_HOST", "")
    port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
    if not host:
        raise CheckFailed("KUBERNETES_SERVICE_HOST is not set: not in a pod, no API server")
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


def served(group_version: str, plural: str) -> None:
    """The API server lists ``plural`` under ``/apis/<group_version>``."""
    url = f"{api_server()}/apis/{group_version}"
    try:
        token = (ACCOUNT / "token").read_text().strip()
    except OSError as err:
        raise CheckFailed(f"no ServiceAccount token to ask the API server with: {err}") from err
    context = ssl.create_default_context(cafile=str(ACCOUNT / "ca.crt"))
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S, context=context) as reply:
            resources = json.load(reply).get("resources", [])
    except urllib.error.HTTPError as err:
        if err.code == 404:
            crd = f"{plural}.{group_version.rpartition('/')[0]}"
            raise CheckFailed(
                f"the API server does not serve {group_version}: the CRD {crd} is missing or "
                f"not Established (kubectl get crd {crd})"
            ) from err
        raise CheckFailed(f"GET {url}: HTTP {err.code} {err.reason}") from err
    except (urllib.error.URLError, OSError) as err:
        raise CheckFailed(f"GET {url}: {err}") from err
    if plural not in {r.get("name") for r in resources}:
        raise CheckFailed(f"the API server serves {group_version} but not {plural}")
    print(f"ok: the API server serves {plural}.{group_version} (its CRD is Established)")


def answers(url: str) -> None:
    """The operator's health endpoint answers 200 within PATIENCE_S: right after an install
    its Service may lag its pod's readiness by a moment."""
    deadline = time.monotonic() + PATIENCE_S
    while True:
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT_S) as reply:
                reply.read()
            break
        except urllib.error.HTTPError as err:
            problem = CheckFailed(f"the operator answers {url} with HTTP {err.code}")
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            problem = CheckFailed(f"the operator does not answer {url}: {reason}")
        if time.monotonic() >= deadline:
            raise problem
        time.sleep(1)
    print(f"ok: the operator answers {url}")


def main(argv: list[str]) -> int:
    """Run both checks; each failure is printed, and any makes the exit status 1."""
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    url, group_version, plural = argv
    failed = False
    for check in (lambda: answers(url), lambda: served(group_version, plural)):
        try:
            check()
        except CheckFailed as err:
            print(f"FAIL: {err}", file=sys.stderr)
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
