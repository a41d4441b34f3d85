"""spec.template's Pod fields are typed with Kubernetes' own schemas, from a committed file
(operator/juturna_operator/kubernetes.json) that `make kubernetes-schemas` writes from the
pinned plane's /openapi/v3; `make crds` reads it, with no cluster. Here: the file is what the
plane serves, and the CRD that grows from it still fits a client-side apply."""

from __future__ import annotations

import json

import pytest
from kubernetes import client

from juturna_operator import crd
from support import REPO, Kubectl

pytestmark = pytest.mark.cluster


def test_the_committed_kubernetes_schemas_are_the_planes(api_client: client.ApiClient) -> None:
    assert crd.served_kubernetes_file_text(api_client) == crd.KUBERNETES_FILE.read_text(), (
        f"{crd.KUBERNETES_FILE.name} differs from what the pinned plane serves: run "
        "`make kubernetes-schemas`, then `make crds`"
    )


@pytest.mark.usefixtures("crd")
def test_a_client_side_apply_of_the_crd_fits_its_annotation(kubectl: Kubectl) -> None:
    """kubectl's client-side apply (and Argo CD's default sync) keeps the whole object in the
    last-applied-configuration annotation, and the API server refuses annotations over
    256 KiB in all; a server-side dry run checks the object it would store."""
    proc = kubectl("apply", "--dry-run=server", "-o", "json", "-f", str(REPO / "crds"))
    stored = json.loads(proc.stdout)
    annotation = stored["metadata"]["annotations"][
        "kubectl.kubernetes.io/last-applied-configuration"
    ]
    assert 100_000 < len(annotation) < 256 * 1024, len(annotation)  # typed Pod fields included
