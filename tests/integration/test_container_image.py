"""The container image: built by podman from the Dockerfile, run against the local control
plane over the host network, non-root with a read-only root filesystem; a Pipeline gets Ready.

No registry is reachable here, so the base is made locally (hack/make-base-image.sh).
If containers cannot run on this machine, the test skips and says why.
"""

from __future__ import annotations

import shutil
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client
from processes import free_port

from support import LIMITS, Kubectl, Pipelines, assert_sole_operator, manifest, must, podman

pytestmark = [pytest.mark.cluster, pytest.mark.own_operator]


@pytest.fixture
def container_kubeconfig(kubectl: Kubectl, tmp_path: Path) -> Path:
    """The plane's kubeconfig with the certificates inlined, readable by the image's user."""
    path = tmp_path / "kubeconfig"
    path.write_text(kubectl("config", "view", "--raw", "--flatten").stdout)
    path.chmod(0o644)
    return path


@pytest.fixture
def container(
    operator_image: str, container_kubeconfig: Path, namespace: str, tmp_path: Path
) -> Iterator[tuple[str, int]]:
    """The operator's container, watching only the test's namespace; yields (name, liveness).
    No plugin volume: the example's plugin (tones) ships in the image."""
    name = f"jo-test-{uuid.uuid4().hex[:8]}"
    work = tmp_path / "work"
    work.mkdir()
    shutil.chown(work, 10001, 10001)
    liveness = free_port()
    run = podman(
        "run",
        "--detach",
        "--name",
        name,
        "--network=host",
        *LIMITS,
        "--read-only",
        "--cap-drop=ALL",
        "--security-opt=no-new-privileges",
        "--volume",
        f"{container_kubeconfig}:/etc/juturna-operator/kubeconfig:ro",
        "--volume",
        f"{work}:/var/lib/juturna-operator",
        "--env",
        "KUBECONFIG=/etc/juturna-operator/kubeconfig",
        "--env",
        f"JUTURNA_OPERATOR_METRICS_PORT={free_port()}",
        operator_image,
        "run",
        "-n",
        namespace,
        f"--liveness=http://127.0.0.1:{liveness}/healthz",
    )
    must(run, "podman run")
    try:
        yield name, liveness
    finally:
        podman("stop", "--time", "15", name, timeout=60)
        logs = podman("logs", name).stderr
        podman("rm", "--force", name, timeout=60)
        left = podman("ps", "--all", "--quiet", "--filter", f"name={name}").stdout.strip()
        assert not left, f"container {name} left behind"
        print(logs[-3000:])


@pytest.mark.reliability
@pytest.mark.timeout(1200)  # a cold build takes minutes: debootstrap, pip, ffmpeg
@pytest.mark.usefixtures("crd")
def test_the_image_runs_the_operator_and_a_pipeline_gets_ready(
    kubeconfig: Path,
    kubectl: Kubectl,
    objects: client.CustomObjectsApi,
    namespace: str,
    container: tuple[str, int],
) -> None:
    assert_sole_operator(kubeconfig)
    name, liveness = container

    def logs() -> str:
        return podman("logs", name).stderr[-3000:]

    pipelines = Pipelines(objects, namespace, kubectl)
    pipelines.apply(manifest("boxed"))
    body = pipelines.wait_ready("boxed", timeout=90)
    assert body["status"]["phase"] == "Running", logs()
    with urllib.request.urlopen(f"http://127.0.0.1:{liveness}/healthz", timeout=5) as reply:
        assert reply.status == 200

    # The promises of the image: a numeric non-root user and a read-only root filesystem
    # (writes go to the work folder volume: the pipeline's folder is there).
    assert must(podman("exec", name, "id", "-u"), "id").strip() == "10001"
    touch = podman("exec", name, "touch", "/opt/juturna-operator/x")
    assert "Read-only file system" in touch.stderr
    listed = must(podman("exec", name, "ls", "/var/lib/juturna-operator"), "ls")
    assert f"{namespace}__boxed__" in listed
    assert "ffmpeg version" in must(podman("exec", name, "ffmpeg", "-version"), "ffmpeg")

    # Round 3, item 11: orphans re-parented to PID 1 (workers whose zygote died, programs
    # their nodes left) are reaped: PID 1 is the image's init, not the operator.
    assert must(podman("exec", name, "cat", "/proc/1/comm"), "comm").strip() == "tini"
    must(podman("exec", name, "sh", "-c", "for i in 1 2 3; do (sleep 0.2 &); done"), "orphans")
    time.sleep(2)  # they have exited: reaped, or zombies of PID 1
    assert zombies(name) == [], logs()

    pipelines.delete("boxed")
    pipelines.wait_gone("boxed", timeout=60)
    assert "Traceback" not in logs()


ZOMBIES = (
    "import pathlib\n"
    "for stat in pathlib.Path('/proc').glob('[0-9]*/stat'):\n"
    "    try:\n"
    "        fields = stat.read_text().rsplit(')', 1)[1].split()\n"
    "    except OSError:\n"
    "        continue\n"
    "    if fields[0] == 'Z':\n"
    "        print(stat.parent.name, 'parent', fields[1])\n"
)


def zombies(container: str) -> list[str]:
    """The zombie processes in ``container``, with their parents."""
    return must(podman("exec", container, "python", "-c", ZOMBIES), "zombies").splitlines()
