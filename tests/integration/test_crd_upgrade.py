"""The CRD upgrade path. Helm installs CRDs on first install and never upgrades them, so an
upgraded operator may meet an older CRD, which would refuse its new status values (or prune
new fields) on every write. The operator checks at start that the served CRD knows what it
writes, and otherwise exits with one line naming the command to apply; that command works on
a CRD another field manager created, as Helm does."""

from __future__ import annotations

import logging
import shlex
from pathlib import Path

import pytest
from controlplane import ControlPlane
from kubernetes import client
from operator_process import OperatorStartError
from processes import free_port

from juturna_operator import handlers
from support import (
    CRD_NAME,
    REPO,
    Kubectl,
    Operator,
    assert_sole_operator,
    install_crds,
)

# Run before the session's operator starts: the CRD is swapped while no operator serves it.
pytestmark = [pytest.mark.cluster, pytest.mark.own_operator]

OLD_CRD = REPO / "tests" / "data" / "crd-before-standby.yaml"
OLDER_THAN = (
    f"juturna-operator: the installed CRD {CRD_NAME} is older than this operator (status.phase "
    "refuses Standby; status.conditions[].type refuses Updating; status.lastStableRevision is "
    "unknown; and 1 more); apply this version's CRD first: kubectl apply --server-side "
    f"--force-conflicts -f crds/{CRD_NAME}.yaml"
)


def run_named_command(kubectl: Kubectl, line: str) -> None:
    """The kubectl command a message ends with, run from the repository's root."""
    words = shlex.split(line.rsplit(": ", 1)[1])
    assert words[0] == "kubectl", line
    args = [str(REPO / w) if w.startswith("crds/") else w for w in words[1:]]
    kubectl(*args)


def no_pipelines_left(kubectl: Kubectl) -> None:
    left = kubectl("get", "pipelines.juturna.io", "-A", "-o", "name", check=False).stdout.strip()
    assert not left, f"Pipelines of other tests still exist (the CRD is swapped here): {left}"


def test_an_older_crd_stops_the_operator_with_the_command_that_fixes_it(
    crd: None, kubectl: Kubectl, kubeconfig: Path, tmp_path: Path
) -> None:
    assert_sole_operator(kubeconfig)
    no_pipelines_left(kubectl)
    # Replaced, not applied: its fields belong to another manager, as after a Helm install.
    kubectl("replace", "-f", str(OLD_CRD))
    op = Operator(kubeconfig, tmp_path / "work", tmp_path / "operator.log", tmp_path, "inprocess")
    try:
        with pytest.raises(OperatorStartError):
            op.start()
        assert op.proc is not None
        assert op.proc.wait(timeout=10) == 2
        assert op.log_text().splitlines() == [OLDER_THAN]
        run_named_command(kubectl, OLDER_THAN)
        op.start()  # the same operator starts once the CRD is this version's
        assert op.alive()
    finally:
        op.stop()
        install_crds(kubectl)


def test_without_the_crd_the_operator_names_the_command_that_installs_it(
    crd: None, kubectl: Kubectl, kubeconfig: Path, api_client: client.ApiClient
) -> None:
    """No CRD served: the check waits a while (a Helm install or an Argo CD sync applies it
    moments before the operator starts), then says what to apply."""
    no_pipelines_left(kubectl)
    kubectl("delete", "crd", CRD_NAME, "--wait=true", "--timeout=60s")
    try:
        with pytest.raises(handlers.CrdNotUsable) as refused:
            handlers.check_crd(api_client, wait_s=2)
        assert str(refused.value) == (
            f"the CRD {CRD_NAME} is not installed; apply it: kubectl apply --server-side "
            f"--force-conflicts -f crds/{CRD_NAME}.yaml"
        )
    finally:
        install_crds(kubectl)
    handlers.check_crd(api_client, wait_s=10)  # installed again: nothing to say


def test_an_api_server_that_does_not_answer_is_an_outage_named_in_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Nobody listens: an outage, not a configuration error. After a short wait the start goes
    on unchecked (its watches retry), and a warning says what could not be read and why."""
    configuration = client.Configuration()
    configuration.host = f"https://127.0.0.1:{free_port()}"
    with caplog.at_level(logging.WARNING):
        handlers.check_crd(client.ApiClient(configuration), wait_s=1)
    (message,) = [r.getMessage() for r in caplog.records if "CRD's schema" in r.getMessage()]
    assert message.startswith(
        "cannot read the CRD's schema (/openapi/v3/apis/juturna.io/v1alpha1): "
    ), message
    assert "Connection refused" in message, message
    assert message.endswith("; starting without checking it"), message


def test_a_client_that_may_not_read_the_schema_starts_unchecked(
    control_plane: ControlPlane, caplog: pytest.LogCaptureFixture
) -> None:
    """An account the API server refuses the OpenAPI document (here: anonymous) cannot check
    the CRD; the operator says so and goes on, as before the check existed."""
    configuration = client.Configuration()
    configuration.host = control_plane.server
    configuration.ssl_ca_cert = str(control_plane.pki / "ca.crt")  # no client certificate
    with caplog.at_level(logging.WARNING, logger="juturna_operator.handlers"):
        handlers.check_crd(client.ApiClient(configuration), wait_s=1)
    assert caplog.messages == [
        "cannot read /openapi/v3/apis/juturna.io/v1alpha1 (403): the CRD is not checked"
    ]
