"""Write operator/juturna_operator/kubernetes.json: Kubernetes' own OpenAPI schemas of the Pod
fields a Pipeline's spec.template takes (the types api.py names), as the pinned kube-apiserver
serves them at /openapi/v3/api/v1. `make kubernetes-schemas` runs it: it starts the local
control plane (not the node), reads the document, writes the file and stops the plane.
`make crds` then types those fields from the file, with no cluster.
"""

from __future__ import annotations

import sys

from controlplane import ControlPlane, ensure_binaries
from kubernetes import config

from juturna_operator import crd


def main() -> int:
    plane = ControlPlane(ensure_binaries()).start()
    try:
        client = config.new_client_from_config(config_file=str(plane.kubeconfig))
        text = crd.served_kubernetes_file_text(client)
    finally:
        plane.stop()
    crd.KUBERNETES_FILE.write_text(text)
    print(f"wrote {crd.KUBERNETES_FILE} ({len(text)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
