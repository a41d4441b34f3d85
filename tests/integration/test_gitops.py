"""GitOps, proven with a real Argo CD (hack/argocd.py; the version in hack/versions.env).

Argo CD's repo server and application controller run against the test plane; the project's
``argocd/juturna.io/Pipeline/health.lua`` is installed in ``argocd-cm`` as docs/argocd.md tells
users; Pipelines come from a local bare Git repository (``file://``, as Argo CD's own e2e tests
do) through an Application with automated sync, prune and self-heal. The operator runs as its
own process (engine inprocess) watching the test's namespace, except in the last test, where
the same Application installs the operator's chart as a pod on the real node.

Each push is followed by a hard refresh, as a webhook would do. The Application is watched from
the start: every state Argo CD wrote is kept, so a Synced → OutOfSync that no push caused (the
operator's status or finalizer writes read as drift) is seen in Argo CD's own record, not
guessed from timing.

Skips, saying why, where Argo CD cannot run: no Go, no Go module proxy, no redis-server.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from argocd import IN_CLUSTER, NAMESPACE, ArgoCD, ArgoCDUnavailable, ensure_argocd, redis_server
from kubernetes import client, watch

from support import (
    ARGOCD_HEALTH,
    CRD_NAME,
    EXAMPLE,
    REPO,
    Kubectl,
    Operator,
    Pipelines,
    assert_sole_operator,
    binaries,
    condition,
    install_crds,
    instance_folders,
    is_ready,
    wait_until,
)

# The timeout covers a cold build of Argo CD in the module's fixture (~6 min on 2 cores) where
# pytest runs without `make argocd` first.
pytestmark = [pytest.mark.cluster, pytest.mark.own_operator, pytest.mark.timeout(900)]

APP_GROUP, APP_VERSION, APP_PLURAL = "argoproj.io", "v1alpha1", "applications"
HEALTH_KEY = "resource.customizations.health.juturna.io_Pipeline"  # docs/argocd.md's key
TIMEOUT = 90.0  # one push to its outcome; Argo CD's part is seconds (docs/argocd.md: measured)


@pytest.fixture(scope="module")
def argocd(kubeconfig: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ArgoCD]:
    """Redis, the repo server and the application controller for this module's tests.

    Teardown stops them by PID and proves that no process and no folder is left."""
    try:
        build = ensure_argocd()
        redis_server()
    except ArgoCDUnavailable as err:
        pytest.skip(str(err))
    lua = (ARGOCD_HEALTH / "health.lua").read_text()
    started = ArgoCD(
        build,
        kubeconfig,
        binaries().kubectl,
        argocd_cm={HEALTH_KEY: lua},
        tools=(binaries().helm,),  # the repo server renders Helm charts with it
    ).start()
    root = started.root
    try:
        yield started
    finally:
        # Its logs outlive its folder: pytest's temporary folder keeps them for a look.
        logs = tmp_path_factory.mktemp("argocd-logs")
        shutil.copytree(root / "logs", logs, dirs_exist_ok=True)
        started.stop()
        left = started.leftovers()
        assert not left, f"Argo CD processes left behind after teardown: {left}"
        assert not root.exists(), f"Argo CD folder left behind: {root}"


class GitRepo:
    """A bare repository (what Argo CD reads, by file:// URL) and a clone that pushes to it."""

    def __init__(self, root: Path) -> None:
        self.bare, self.work = root / "pipelines.git", root / "work"
        self.env = {
            **os.environ,
            "HOME": str(root),  # no user or system git configuration
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_AUTHOR_NAME": "test",
            "GIT_AUTHOR_EMAIL": "test@example.invalid",
            "GIT_COMMITTER_NAME": "test",
            "GIT_COMMITTER_EMAIL": "test@example.invalid",
        }
        self.git("init", "--quiet", "--bare", "--initial-branch=main", str(self.bare))
        self.git("init", "--quiet", "--initial-branch=main", str(self.work))
        self.git("-C", str(self.work), "remote", "add", "origin", str(self.bare))
        self.commits: list[str] = []

    @property
    def url(self) -> str:
        return f"file://{self.bare}"

    def git(self, *args: str) -> str:
        proc = subprocess.run(
            ["git", *args], env=self.env, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, f"git {' '.join(args)} failed:\n{proc.stderr}"
        return proc.stdout.strip()

    def push(self, message: str, files: dict[str, dict[str, Any] | Path | None]) -> str:
        """Write (a manifest), copy (a folder) or delete (None) each path, commit, push; return
        the commit."""
        for name, body in files.items():
            path = self.work / name
            if body is None:
                path.unlink()
            elif isinstance(body, Path):
                shutil.copytree(body, path)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(yaml.safe_dump(body, sort_keys=False))
        self.git("-C", str(self.work), "add", "--all")
        self.git("-C", str(self.work), "commit", "--quiet", "-m", message)
        self.git("-C", str(self.work), "push", "--quiet", "origin", "HEAD:main")
        sha = self.git("-C", str(self.work), "rev-parse", "HEAD")
        self.commits.append(sha)
        return sha


@dataclass
class AppState:
    """What Argo CD wrote in one version of the Application."""

    at: float  # time.monotonic() when the watch delivered it
    sync: str
    revision: str
    health: str
    operation: str
    operation_revision: str
    resources: list[dict[str, Any]]
    conditions: list[dict[str, Any]]

    @classmethod
    def of(cls, app: dict[str, Any], at: float) -> AppState:
        status = app.get("status") or {}
        sync = status.get("sync") or {}
        op = status.get("operationState") or {}
        return cls(
            at=at,
            sync=sync.get("status", ""),
            revision=_revision(sync),
            health=(status.get("health") or {}).get("status", ""),
            operation=op.get("phase", ""),
            operation_revision=_revision(op.get("syncResult") or {}),
            resources=list(status.get("resources") or []),
            conditions=list(status.get("conditions") or []),
        )

    def resource(self, kind: str, name: str) -> dict[str, Any] | None:
        for res in self.resources:
            if res.get("kind") == kind and res.get("name") == name:
                return res
        return None


def _revision(part: dict[str, Any]) -> str:
    """The commit a sync status or result names: ``revision``, or with several sources
    (``revisions``, one each) their commit when all are the same one."""
    if "revisions" in part:
        return ",".join(sorted(set(part["revisions"])))
    return str(part.get("revision", ""))


@dataclass
class AppWatch:
    """Every version of one Application, from a watch: polling could miss a short OutOfSync."""

    objects: client.CustomObjectsApi
    name: str
    states: list[AppState] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None

    def start(self) -> AppWatch:
        self._thread = threading.Thread(target=self._run, name=f"watch-{self.name}", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        version: str | None = None
        while not self._stop.is_set():
            try:
                for event in watch.Watch().stream(
                    self.objects.list_namespaced_custom_object,
                    APP_GROUP,
                    APP_VERSION,
                    NAMESPACE,
                    APP_PLURAL,
                    field_selector=f"metadata.name={self.name}",
                    resource_version=version,
                    timeout_seconds=5,
                ):
                    obj = event["object"]
                    version = obj["metadata"]["resourceVersion"]
                    if event["type"] in ("ADDED", "MODIFIED"):
                        with self._lock:
                            self.states.append(AppState.of(obj, time.monotonic()))
                    if self._stop.is_set():
                        return
            except client.ApiException as err:
                if err.status == 410:  # too old: start over from the current version
                    version = None
                else:
                    time.sleep(0.5)
            except Exception:  # a dropped connection: watch again from the last version
                time.sleep(0.5)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=15)

    def snapshot(self) -> list[AppState]:
        with self._lock:
            return list(self.states)

    def first(self, check: Callable[[AppState], bool], since: float) -> AppState | None:
        return next((s for s in self.snapshot() if s.at >= since and check(s)), None)

    def unexplained_out_of_sync(self) -> list[tuple[str, str]]:
        """Each Synced → OutOfSync whose compared revision is the one already synced: a drift
        no push caused (a push's comparison is against the new commit)."""
        states = [s for s in self.snapshot() if s.sync]
        return [
            (a.revision, b.revision)
            for a, b in itertools.pairwise(states)
            if a.sync == "Synced" and b.sync == "OutOfSync" and a.revision == b.revision
        ]

    def pushed_out_of_sync(self) -> int:
        states = [s for s in self.snapshot() if s.sync]
        return sum(
            1
            for a, b in itertools.pairwise(states)
            if a.sync == "Synced" and b.sync == "OutOfSync" and a.revision != b.revision
        )


def application(name: str, url: str, path: str, namespace: str) -> dict[str, Any]:
    """An Application as a user writes one: automated sync with prune and self-heal."""
    return {
        "apiVersion": f"{APP_GROUP}/{APP_VERSION}",
        "kind": "Application",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "project": "default",
            "source": {"repoURL": url, "targetRevision": "main", "path": path},
            "destination": {"server": IN_CLUSTER, "namespace": namespace},
            "syncPolicy": {"automated": {"prune": True, "selfHeal": True}},
        },
    }


@dataclass
class GitOps:
    """One Application on one repository, with the helpers each step needs."""

    kubectl: Kubectl
    objects: client.CustomObjectsApi
    repo: GitRepo
    name: str
    watch: AppWatch
    ready_at: float | None = None

    def app(self) -> dict[str, Any]:
        return self.objects.get_namespaced_custom_object(
            APP_GROUP, APP_VERSION, NAMESPACE, APP_PLURAL, self.name
        )

    def hard_refresh(self) -> None:
        """What a webhook would trigger: read Git now, not at the next reconciliation."""
        self.kubectl(
            "-n",
            NAMESPACE,
            "annotate",
            "--overwrite",
            f"application/{self.name}",
            "argocd.argoproj.io/refresh=hard",
        )

    def push(
        self, message: str, files: dict[str, dict[str, Any] | Path | None]
    ) -> tuple[str, float]:
        sha = self.repo.push(message, files)
        pushed = time.monotonic()
        self.hard_refresh()
        return sha, pushed

    def wait(
        self,
        sha: str,
        health: str,
        since: float,
        what: str,
        ready: Callable[[], bool] | None = None,
        timeout: float = TIMEOUT,
    ) -> AppState:
        """Synced at ``sha`` (the pushed HEAD, by Argo CD's last sync too) with ``health``.

        ``ready``, polled meanwhile: when it first held is kept in ``ready_at`` (the
        Pipeline's Ready, to tell Argo CD's delay from the operator's deploy)."""
        self.ready_at = None

        def done(s: AppState) -> bool:
            return (
                s.sync == "Synced"
                and s.revision == sha
                and s.operation == "Succeeded"
                and s.operation_revision == sha
                and s.health == health
            )

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready is not None and self.ready_at is None and ready():
                self.ready_at = time.monotonic()
            found = self.watch.first(done, since)
            if found is not None:
                return found
            time.sleep(0.1)
        last = self.app().get("status", {})
        pytest.fail(
            f"{what}: not Synced at {sha[:8]} and {health} in {timeout:g} s; the Application's "
            f"status: {json.dumps(last, indent=1, default=str)[-4000:]}"
        )


@pytest.fixture
def gitops(
    argocd: ArgoCD,
    kubectl: Kubectl,
    objects: client.CustomObjectsApi,
    namespace: str,
    tmp_path: Path,
) -> Iterator[GitOps]:
    """An empty repository and an Application on it (created at the first push)."""
    name = f"pipelines-{namespace}"
    repo = GitRepo(tmp_path / "git")
    watcher = AppWatch(objects, name).start()
    ops = GitOps(kubectl, objects, repo, name, watcher)
    try:
        yield ops
    finally:
        watcher.stop()
        # No resources finalizer on the Application: deleting it leaves what it synced; the
        # operator's fixture, torn down next, deletes the Pipelines left.
        kubectl("-n", NAMESPACE, "delete", "application", name, "--ignore-not-found", check=False)


@pytest.fixture
def gitops_operator(
    crd: None,
    kubeconfig: Path,
    namespace: str,
    tmp_path: Path,
    objects: client.CustomObjectsApi,
    kubectl: Kubectl,
) -> Iterator[Operator]:
    """The operator as its own process (engine inprocess), watching only the test namespace.

    Set up before ``gitops``, so torn down after it: once the Application is gone (nothing
    syncs them back), the Pipelines a failed test left are deleted while the operator can
    still finish them; else the namespace would wait for their finalizer forever."""
    assert_sole_operator(kubeconfig)
    (tmp_path / "extra").mkdir()
    op = Operator(
        kubeconfig,
        tmp_path / "work",
        tmp_path / "operator.log",
        tmp_path / "extra",
        "inprocess",
        namespaces=(namespace,),
    )
    op.start()
    try:
        yield op
    finally:
        pipelines = Pipelines(objects, namespace, kubectl)
        left = pipelines.names()
        for name in left:
            pipelines.delete(name)
        try:
            for name in left:
                pipelines.wait_gone(name, timeout=30)
        finally:
            op.stop()
    assert not op.alive(), "the operator process is still alive"


def pipeline(**spec: Any) -> dict[str, Any]:
    """The example Pipeline (examples/pipeline.yaml) with spec fields overridden."""
    body = json.loads(json.dumps(EXAMPLE))
    body["spec"].update(spec)
    return body


def pipeline_in_wave(wave: str) -> dict[str, Any]:
    """The example Pipeline, applied by Argo CD in sync wave ``wave``."""
    body = pipeline()
    body["metadata"]["annotations"] = {"argocd.argoproj.io/sync-wave": wave}
    return body


def ready_now(pipelines: Pipelines, name: str) -> bool:
    """The Pipeline exists (Argo CD may not have applied it yet) and is Ready."""
    try:
        return is_ready(pipelines.get(name))
    except client.ApiException as err:
        if err.status == 404:
            return False
        raise


def health_of(resource: dict[str, Any]) -> tuple[str, str]:
    """A resource's health in the Application's status (--persist-resource-health): what
    health.lua returned, as Argo CD kept it."""
    health = resource.get("health") or {}
    return health.get("status", ""), health.get("message", "")


def marker_configmap() -> dict[str, Any]:
    """A second object, so that the path never goes empty when the Pipeline is deleted (an
    empty folder does not exist in Git, and Argo CD would report the path missing)."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "gitops-marker"},
        "data": {"purpose": "keeps the Application's path non-empty"},
    }


def test_argo_cd_syncs_pipelines_from_git_and_reports_the_operators_health(
    argocd: ArgoCD,
    gitops_operator: Operator,
    gitops: GitOps,
    objects: client.CustomObjectsApi,
    kubectl: Kubectl,
    namespace: str,
) -> None:
    """Push → Synced and Healthy; a broken push → Degraded with the operator's reason and
    message; a fixing push → Healthy; state Standby → Healthy (a warm standby); a deleting push →
    pruned, the finalizer done, the instance gone. Argo CD never sees drift of its own."""
    pipelines = Pipelines(objects, namespace, kubectl)
    name = EXAMPLE["metadata"]["name"]
    file = f"pipelines/{name}.yaml"
    marker = "pipelines/marker.yaml"
    report: dict[str, Any] = {}

    # 1. The example Pipeline: Synced at HEAD and Healthy, as the operator made it Ready.
    # The first push comes before the Application: nothing to refresh yet.
    sha = gitops.repo.push("the example", {file: pipeline(), marker: marker_configmap()})
    pushed = time.monotonic()
    app = application(gitops.name, gitops.repo.url, "pipelines", namespace)
    kubectl("apply", "-f", "-", input=json.dumps(app))
    healthy = gitops.wait(sha, "Healthy", pushed, "the example", lambda: ready_now(pipelines, name))
    report["first sync: Pipeline Ready → Argo CD Healthy (s)"] = _since(gitops.ready_at, healthy)
    body = pipelines.get(name)
    assert is_ready(body), f"Argo CD says Healthy, the Pipeline is not Ready: {body.get('status')}"
    res = healthy.resource("Pipeline", name)
    assert res is not None, f"the Pipeline is not among the Application's resources: {healthy}"
    assert health_of(res) == ("Healthy", condition(body, "Ready")["message"]), res
    report["first sync: apply → Healthy (s)"] = round(healthy.at - pushed, 2)
    # A quiet spell with the Pipeline running: two more reconciliations by Argo CD (its
    # metrics count them, each a fresh comparison with the live object), and no drift.
    _quiet_spell(argocd)
    assert not gitops.watch.unexplained_out_of_sync(), gitops.watch.unexplained_out_of_sync()
    assert gitops.app()["status"]["sync"]["status"] == "Synced"

    # 2. A mark no plugin provides: Degraded with the operator's reason and message.
    broken = pipeline()
    broken["spec"]["nodes"][1]["mark"] = "no_such_mark"  # valid to the CRD, unknown to plugins
    sha, pushed = gitops.push("a mark no plugin provides", {file: broken})
    degraded = gitops.wait(sha, "Degraded", pushed, "the broken push")
    failure = pipelines.get(name)["status"]["failure"]
    assert failure["reason"] == "PluginNotFound", failure
    res = degraded.resource("Pipeline", name)
    assert res is not None
    assert health_of(res) == ("Degraded", f"PluginNotFound: {failure['message']}"), res
    report["push → Degraded (s)"] = round(degraded.at - pushed, 2)

    # 3. The fix: Healthy again.
    sha, pushed = gitops.push("the fix", {file: pipeline()})
    fixed = gitops.wait(
        sha, "Healthy", pushed, "the fixing push", lambda: ready_now(pipelines, name)
    )
    assert is_ready(pipelines.get(name))
    report["push → Healthy (s)"] = round(fixed.at - pushed, 2)
    report["fix: Pipeline Ready → Argo CD Healthy (s)"] = _since(gitops.ready_at, fixed)

    # 4. A warm standby: Healthy, with the operator's message for it.
    sha, pushed = gitops.push("a warm standby", {file: pipeline(state="Standby")})
    standby = gitops.wait(sha, "Healthy", pushed, "state Standby")
    body = pipelines.get(name)
    assert body["status"]["phase"] == "Standby", body["status"]
    res = standby.resource("Pipeline", name)
    assert res is not None
    assert health_of(res) == ("Healthy", "the pipeline is Standby"), res
    report["push (state Standby) → Healthy (s)"] = round(standby.at - pushed, 2)

    # 5. Deleted from Git: pruned, the operator's finalizer done, the instance gone.
    sha, pushed = gitops.push("no more pipeline", {file: None})
    pruned = gitops.wait(sha, "Healthy", pushed, "the deleting push")
    pipelines.wait_gone(name, timeout=30)
    assert pruned.resource("Pipeline", name) is None or not pipelines.exists(name)
    assert not instance_folders(gitops_operator.workdir, body), "the instance's folder is left"
    report["push (delete) → pruned and gone (s)"] = round(time.monotonic() - pushed, 2)

    # Throughout: every Synced → OutOfSync came with a push's new revision.
    assert not gitops.watch.unexplained_out_of_sync(), (
        "Argo CD saw drift no push caused (Synced → OutOfSync at the same revision): "
        f"{gitops.watch.unexplained_out_of_sync()}"
    )
    assert gitops.watch.pushed_out_of_sync() <= len(gitops.repo.commits)
    report["Argo CD memory (MiB)"] = {k: round(v) for k, v in argocd.memory_mib().items()}
    report["Synced → OutOfSync, each by a push"] = gitops.watch.pushed_out_of_sync()

    # The check above can fail: a change behind Argo CD's back (no push) is drift in that
    # record, and self-heal undoes it.
    kubectl(
        "-n",
        namespace,
        "patch",
        "configmap",
        "gitops-marker",
        "--type=merge",
        "-p",
        json.dumps({"data": {"purpose": "changed by hand"}}),
    )
    wait_until(
        lambda: gitops.watch.unexplained_out_of_sync() == [(sha, sha)],
        60,
        "Argo CD seeing a change by hand as drift",
        gitops.watch.unexplained_out_of_sync,
    )
    purpose = "jsonpath={.data.purpose}"
    wait_until(
        lambda: (
            kubectl("-n", namespace, "get", "configmap/gitops-marker", "-o", purpose).stdout
            == marker_configmap()["data"]["purpose"]
        ),
        60,
        "self-heal undoing the change by hand",
    )
    print(f"\ngitops: {json.dumps(report)}")


def _since(start: float | None, state: AppState) -> float | None:
    """Seconds from ``start`` (a time.monotonic()) to when Argo CD wrote ``state``."""
    return None if start is None else round(state.at - start, 2)


def _quiet_spell(argocd: ArgoCD, reconciliations: int = 2, timeout: float = 60) -> None:
    """Wait, pushing nothing, until Argo CD has reconciled ``reconciliations`` more times."""
    start = _reconcile_count(argocd)
    deadline = time.monotonic() + timeout
    while _reconcile_count(argocd) < start + reconciliations:
        assert time.monotonic() < deadline, "Argo CD stopped reconciling"
        time.sleep(0.5)


def _reconcile_count(argocd: ArgoCD) -> float:
    """How many times the controller has reconciled Applications (argocd_app_reconcile)."""
    total = 0.0
    for line in argocd.metrics().splitlines():
        if line.startswith("argocd_app_reconcile_count"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_one_application_holding_the_crd_and_a_pipeline_syncs_in_waves(
    argocd: ArgoCD,
    gitops_operator: Operator,
    gitops: GitOps,
    objects: client.CustomObjectsApi,
    kubectl: Kubectl,
    namespace: str,
) -> None:
    """docs/argocd.md's sync-wave advice: the CRD in wave -1 and a Pipeline in wave 0, in one
    Application, sync to Synced and Healthy in one go (Argo CD applies the wave -1 CRD, waits
    for its health, then the Pipeline).

    The operator runs as a process and the CRD is already there; the chart's pod and a missing
    CRD are the next test's."""
    crd = yaml.safe_load((REPO / "crds" / "pipelines.juturna.io.yaml").read_text())
    crd["metadata"]["annotations"] = {
        "argocd.argoproj.io/sync-wave": "-1",
        # Never pruned or deleted with an Application: every Pipeline would go with it.
        "argocd.argoproj.io/sync-options": "Prune=false,Delete=false",
    }
    body = pipeline_in_wave("0")
    name = body["metadata"]["name"]
    sha = gitops.repo.push(
        "the CRD and a Pipeline, in waves", {"all/crd.yaml": crd, "all/pipeline.yaml": body}
    )
    pushed = time.monotonic()
    app = application(gitops.name, gitops.repo.url, "all", namespace)
    try:
        kubectl("apply", "-f", "-", input=json.dumps(app))
        healthy = gitops.wait(sha, "Healthy", pushed, "the CRD and the Pipeline")
        assert is_ready(Pipelines(objects, namespace, kubectl).get(name))
        synced = {(r.get("kind"), r.get("name")): r.get("status") for r in healthy.resources}
        assert synced == {
            ("CustomResourceDefinition", crd["metadata"]["name"]): "Synced",
            ("Pipeline", name): "Synced",
        }, healthy.resources
        assert not gitops.watch.unexplained_out_of_sync(), gitops.watch.unexplained_out_of_sync()
        print(f"\ngitops waves: apply → Healthy {healthy.at - pushed:.2f} s")
    finally:
        # The session's CRD goes back to what the other tests installed: no Argo CD marks.
        kubectl("delete", "application", "-n", NAMESPACE, gitops.name, "--ignore-not-found")
        kubectl(
            "annotate",
            f"crd/{crd['metadata']['name']}",
            "argocd.argoproj.io/sync-wave-",
            "argocd.argoproj.io/sync-options-",
            "argocd.argoproj.io/tracking-id-",
            "kubectl.kubernetes.io/last-applied-configuration-",
            check=False,
        )


CHART = REPO / "charts" / "juturna-operator"


def test_one_application_holding_the_operators_chart_and_a_pipeline_syncs_in_waves(
    argocd: ArgoCD,
    node_image: str,  # the operator's image on the real node (so a node runs)
    gitops: GitOps,
    objects: client.CustomObjectsApi,
    kubectl: Kubectl,
    kubeconfig: Path,
    namespace: str,
) -> None:
    """docs/argocd.md's sync advice, whole: one Application, two sources from one repository, the
    operator's chart (its CRD, RBAC and Deployment, rendered by Argo CD's repo server with
    helm) in wave 0 and a Pipeline in wave 1, on a plane where the CRD does not exist before
    the sync. Argo CD applies the CRD, runs the operator as a pod on the real node, waits for
    it to be available, then applies the Pipeline, which the operator runs in a pod of its own
    (the chart's default engine): Synced and Healthy in one go, with no drift."""
    assert_sole_operator(kubeconfig)
    left = kubectl("get", "pipelines.juturna.io", "-A", "-o", "name", check=False).stdout.strip()
    assert not left, (
        f"Pipelines of other tests still exist (deleting the CRD would take them): {left}"
    )
    kubectl("delete", "crd", CRD_NAME, "--ignore-not-found", "--wait=true", "--timeout=60s")
    assert not kubectl("get", "crd", CRD_NAME, check=False).stdout.strip()

    body = pipeline_in_wave("1")
    name = body["metadata"]["name"]
    sha = gitops.repo.push(
        "the operator's chart and a Pipeline", {"chart": CHART, "pipelines/pipeline.yaml": body}
    )
    pushed = time.monotonic()
    repository, tag = node_image.rsplit(":", 1)
    values = {"image": {"repository": repository, "tag": tag, "pullPolicy": "Never"}}
    app = application(gitops.name, gitops.repo.url, "", namespace)
    source = app["spec"].pop("source")
    app["spec"]["sources"] = [
        {**source, "path": "chart", "helm": {"valuesObject": values}},
        {**source, "path": "pipelines"},
    ]
    pipelines = Pipelines(objects, namespace, kubectl)
    try:
        kubectl("apply", "-f", "-", input=json.dumps(app))
        healthy = gitops.wait(
            sha,
            "Healthy",
            pushed,
            "the chart and the Pipeline",
            ready=lambda: ready_now(pipelines, name),
            timeout=300,  # the operator's pod, then the Pipeline's pod, on the real node
        )
        body = pipelines.get(name)
        assert is_ready(body), body.get("status")
        assert body["status"]["phase"] == "Running", body["status"]
        assert body["status"]["pod"]["node"], body["status"]  # its own pod, placed on the node
        synced = {(r.get("kind"), r.get("name")): r.get("status") for r in healthy.resources}
        assert synced[("CustomResourceDefinition", CRD_NAME)] == "Synced", synced
        assert synced[("Pipeline", name)] == "Synced", synced
        deployments = [k for k in synced if k[0] == "Deployment"]
        assert len(deployments) == 1, synced
        assert synced[deployments[0]] == "Synced", synced
        assert health_of(healthy.resource("Pipeline", name) or {}) == (
            "Healthy",
            "the pipeline is Running",
        ), healthy.resources
        # Wave 1 after wave 0: the Pipeline was created once the operator was available.
        deployment = json.loads(
            kubectl("get", "deployment", "-n", namespace, deployments[0][1], "-o", "json").stdout
        )
        available = condition(deployment, "Available")
        assert available.get("status") == "True", deployment["status"]
        created = body["metadata"]["creationTimestamp"]
        assert created >= available["lastTransitionTime"], (created, available)
        assert not gitops.watch.unexplained_out_of_sync(), gitops.watch.unexplained_out_of_sync()
        ready_s = None if gitops.ready_at is None else round(gitops.ready_at - pushed, 1)
        print(f"\ngitops chart: push → Ready {ready_s} s, → Healthy {healthy.at - pushed:.1f} s")
    finally:
        _remove_the_chart_and_restore_the_crd(gitops, pipelines, kubectl, namespace)


def _remove_the_chart_and_restore_the_crd(
    gitops: GitOps, pipelines: Pipelines, kubectl: Kubectl, namespace: str
) -> None:
    """Undo, in an order that finishes: the Application first (nothing syncs back), the
    Pipelines while their operator still runs (its finalizer), then the operator and its
    cluster-wide RBAC; last, the session's CRD as the other tests installed it."""
    kubectl("delete", "application", "-n", NAMESPACE, gitops.name, "--ignore-not-found")
    for left in pipelines.names():
        pipelines.delete(left)
    for left in pipelines.names():
        pipelines.wait_gone(left, timeout=60)
    instance = f"app.kubernetes.io/instance={gitops.name}"
    kubectl("delete", "deployment", "-n", namespace, "-l", instance, "--wait=true")
    kubectl("wait", "--for=delete", "pod", "-n", namespace, "-l", instance, "--timeout=60s")
    kubectl("delete", "clusterrole,clusterrolebinding", "-l", instance, "--ignore-not-found")
    kubectl("delete", "crd", CRD_NAME, "--ignore-not-found", "--wait=true", "--timeout=60s")
    install_crds(kubectl)
