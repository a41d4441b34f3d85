"""Validation of a Pipeline spec before anything is deployed.

The API server's CEL rules already refuse duplicate names, dangling links, self-links,
unsafe names and absolute or ``..`` plugin folders. This module repeats those cheap
checks (``admission``: a cluster may run an older CRD) and adds what CEL cannot express:

* cycles (Juturna accepts them silently and never runs the cycle's nodes);
* plugin folders that resolve outside every configured root (symlinks included);
* node marks that no built-in and no plugin folder provides;
* built-ins and ``$JT_ENV_`` values the administrator did not allow where the pipeline
  runs (``settings.CodePolicy``; docs/juturna.md, pitfalls 11-12: both run or read as the
  process that runs the pipeline);
* configuration keys that the node's ``config.toml`` does not declare (Juturna drops
  them silently): these are warnings, not failures;
* two listeners on one port and protocol, or on the pipeline pod's own (``listening``);
* on engine pod, what ``spec.template`` may not give the pod (``podpolicy``).

The checks that read plugin files (``check_plugins``) run where the plugins are: in the
operator for the engines beside it, in the pipeline's pod for engine pod (whose runtime
image may hold other plugins than the operator's), through the worker, before warmup.

It mirrors Juturna's lookup: a plugin folder ``tones`` under root ``R`` is imported as
``tones.nodes.<type>._<mark>.<mark>`` with ``R`` on ``sys.path``; built-ins come first
and the last match wins. Nothing here imports plugin code.
"""

from __future__ import annotations

import tomllib
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import juturna.nodes

from juturna_operator import admission, listening, podpolicy
from juturna_operator.api import NodeSpec, PipelineSpec
from juturna_operator.reasons import FailureReason, PipelineFailure, Step
from juturna_operator.settings import ENV_PREFIX, CodePolicy, PodPolicy

BUILTIN_NODES = Path(juturna.nodes.__file__).parent
ENV_REFERENCE = "$JT_ENV_"  # Juturna's prefix (juturna.meta._constants)
TRUSTING = CodePolicy("any", builtins=None, env_references=True)  # no restriction


@dataclass(frozen=True)
class NodeImpl:
    """Where a node's implementation lives, and the arguments its config.toml declares."""

    folder: Path
    arguments: tuple[str, ...] | None  # None: no config.toml [arguments] table


@dataclass
class Validated:
    """A spec that passed validation, with what deploying it needs to know."""

    impls: dict[str, NodeImpl] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    listeners: list[listening.Listener] = field(default_factory=list)


def _fail(reason: FailureReason, message: str) -> PipelineFailure:
    return PipelineFailure(reason, Step.validate, message)


def find_cycle(nodes: Sequence[str], edges: Sequence[tuple[str, str]]) -> list[str] | None:
    """One cycle as a path ``[a, b, ..., a]``, or None if the graph is acyclic."""
    succ: dict[str, list[str]] = {n: [] for n in nodes}
    for a, b in edges:
        succ.setdefault(a, []).append(b)
    white, grey, black = 0, 1, 2
    color = dict.fromkeys(succ, white)
    parent: dict[str, str] = {}
    for root in succ:
        if color[root] != white:
            continue
        stack = [(root, iter(succ[root]))]
        color[root] = grey
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                color[node] = black
                stack.pop()
            elif color.get(child, white) == white:
                parent[child] = node
                color[child] = grey
                stack.append((child, iter(succ.get(child, []))))
            elif color[child] == grey:
                path = [node]  # walk back from node to child, then close the loop
                while path[-1] != child:
                    path.append(parent[path[-1]])
                return [*reversed(path), child]
    return None


def resolve_plugin(entry: str, roots: Sequence[Path]) -> Path:
    """The folder of plugin ``entry`` under the first root that has it.

    Raises ``PluginPathNotAllowed`` for absolute paths, ``..``, parts that are not Python
    identifiers (Juturna imports the folder by its path), and symlinks that leave the root;
    ``PluginNotFound`` when no root has the folder.
    """
    pure = PurePosixPath(entry)
    problem = admission.plugin_folder_problem(entry)
    if problem:
        raise _fail(FailureReason.PluginPathNotAllowed, problem)
    if not pure.parts or not all(part.isidentifier() for part in pure.parts):
        raise _fail(
            FailureReason.PluginPathNotAllowed,
            f'plugin folder "{entry}" cannot be imported by Juturna: each part of the path must '
            "be a Python identifier (letters, digits and '_')",
        )
    if not roots:
        raise _fail(
            FailureReason.PluginPathNotAllowed,
            f'plugin folder "{entry}" is not allowed: the operator has no plugin roots '
            "configured (JUTURNA_OPERATOR_PLUGIN_PATH)",
        )
    for root in roots:
        candidate = root / pure
        if not candidate.is_dir():
            continue
        real_root, real = root.resolve(), candidate.resolve()
        if not real.is_relative_to(real_root):
            raise _fail(
                FailureReason.PluginPathNotAllowed,
                f'plugin folder "{entry}" resolves to {real}, outside the plugin root {root}',
            )
        return candidate
    raise _fail(
        FailureReason.PluginNotFound,
        f'plugin folder "{entry}" not found under any plugin root '
        f"({', '.join(str(r) for r in roots)})",
    )


def _node_impl(base: Path, node_type: str, mark: str) -> NodeImpl | None:
    folder = base / node_type / f"_{mark}"
    if not (folder / f"{mark}.py").is_file():
        return None
    try:
        arguments = tomllib.loads((folder / "config.toml").read_text()).get("arguments")
    except (OSError, tomllib.TOMLDecodeError):
        arguments = None
    names = tuple(arguments) if isinstance(arguments, dict) else None
    return NodeImpl(folder=folder, arguments=names)


def _known_marks(bases: Sequence[Path], node_type: str) -> list[str]:
    marks: set[str] = set()
    for base in bases:
        type_dir = base / node_type
        if type_dir.is_dir():
            marks.update(
                p.name[1:]
                for p in type_dir.iterdir()
                if p.name.startswith("_") and (p / f"{p.name[1:]}.py").is_file()
            )
    return sorted(marks)


def check_runtime(runtime: str | None, runtimes: Collection[str]) -> None:
    """``spec.runtime`` must name a runtime the administrator configured (empty: default)."""
    if runtime and runtime not in runtimes:
        configured = ", ".join(sorted(runtimes)) or "none"
        raise _fail(
            FailureReason.UnknownRuntime,
            f'spec.runtime "{runtime}" names no configured runtime (configured: {configured}); '
            "leave it empty for the operator's default engine",
        )


def as_built(node: NodeSpec) -> NodeSpec:
    """The node Juturna builds where the pipeline runs. ``warped: true`` replaces it with the
    built-in ``proc/warp`` (gRPC to the host its ``warp_configuration`` names), whose
    configuration is ``warp_configuration`` plus the node's own as ``remote_config``
    (``components/_pipeline.py``): that is the code and the configuration to check."""
    if not node.warped:
        return node
    configuration = {**(node.warp_configuration or {}), "remote_config": node.configuration}
    return NodeSpec.model_validate(
        {"name": node.name, "type": "proc", "mark": "warp", "configuration": configuration}
    )


def check_code(
    node_name: str, impl: NodeImpl, node: NodeSpec, policy: CodePolicy, warped: bool = False
) -> None:
    """Refuse what would run or read more than the administrator allows where it runs
    (``node``: as built, see ``as_built``; ``warped``: the spec's node was warped)."""
    if impl.folder.is_relative_to(BUILTIN_NODES) and not policy.allows_builtin(
        node.type, node.mark
    ):
        allowed = ", ".join(sorted(policy.builtins or ())) or "none"
        why = " (warped: true runs the node as proc/warp)" if warped else ""
        raise _fail(
            FailureReason.BuiltinNotAllowed,
            f'node "{node_name}": Juturna\'s built-in {node.type}/{node.mark}{why} is not '
            f"allowed on engine '{policy.engine}' (built-ins can run commands and reach any "
            "address from their configuration); the administrator allows built-ins with "
            f"{ENV_PREFIX}ALLOWED_BUILTINS (allowed now: {allowed})",
        )
    if policy.env_references:
        return
    for key, value in node.configuration.items():
        if isinstance(value, str) and value.startswith(ENV_REFERENCE):
            raise _fail(
                FailureReason.EnvironmentNotAllowed,
                f'node "{node_name}": configuration key "{key}" reads an environment variable '
                f"(\"{value}\"); engine '{policy.engine}' runs nodes inside the operator, whose "
                f"environment this would expose; allowed only with "
                f"{ENV_PREFIX}ALLOW_ENV_REFERENCES=true",
            )


def validate(
    spec: PipelineSpec,
    plugin_roots: Sequence[Path],
    runtimes: Collection[str] = (),
    policy: CodePolicy = TRUSTING,
    pod_policy: PodPolicy | None = None,
    plugins_here: bool = True,
) -> Validated:
    """Check ``spec``; raise a ``PipelineFailure`` naming the first problem found.

    ``policy``: what the engine that will run it allows (``Settings.code_policy``);
    ``pod_policy``: what its template may give its pod, on engine pod
    (``Settings.pod_policy``; None elsewhere: other engines ignore the template);
    ``plugins_here``: False where the plugins are elsewhere (engine pod): ``check_plugins``
    is then the engine's to run there."""
    try:
        admission.check(spec)
    except admission.Refused as refused:
        plugin = isinstance(refused, admission.PluginFolderRefused)
        reason = FailureReason.PluginPathNotAllowed if plugin else FailureReason.InvalidSpec
        raise _fail(reason, str(refused)) from None
    check_runtime(spec.runtime, runtimes)
    if pod_policy is not None:
        podpolicy.check_template(spec.template, pod_policy)
    cycle = find_cycle([n.name for n in spec.nodes], [(lk.from_, lk.to) for lk in spec.links])
    if cycle:
        raise _fail(
            FailureReason.InvalidGraph,
            f"links form a cycle: {' -> '.join(cycle)}; Juturna would never run these nodes",
        )
    result = check_plugins(spec, plugin_roots, policy) if plugins_here else Validated()
    result.listeners = listening.listeners(spec)  # two on one port: InvalidSpec
    return result


def check_plugins(
    spec: PipelineSpec, plugin_roots: Sequence[Path], policy: CodePolicy = TRUSTING
) -> Validated:
    """What depends on the plugin files under ``plugin_roots``: each plugin folder allowed and
    found, each node's type and mark found (built-ins first, the last match wins), the
    built-ins and ``$JT_ENV_`` values ``policy`` allows, and unknown configuration keys
    (warnings)."""
    plugin_bases = [resolve_plugin(p, plugin_roots) / "nodes" for p in spec.plugins]
    bases = [BUILTIN_NODES, *plugin_bases]
    result = Validated()
    for declared in spec.nodes:
        node = as_built(declared)
        impl = None
        for base in bases:  # the last match wins, as in Juturna
            impl = _node_impl(base, node.type, node.mark) or impl
        if impl is None:
            known = ", ".join(_known_marks(bases, node.type)) or "none"
            raise _fail(
                FailureReason.PluginNotFound,
                f'node "{node.name}": no plugin "{node.mark}" of type {node.type} in plugins '
                f"{_quoted_list(spec.plugins)} (known: {known})",
            )
        if impl.arguments is None:
            raise _fail(
                FailureReason.PluginNotFound,
                f'node "{node.name}": plugin "{node.mark}" has no config.toml with an '
                f"[arguments] table in {impl.folder}",
            )
        check_code(node.name, impl, node, policy, bool(declared.warped))
        result.impls[node.name] = impl
        for key in node.configuration:
            if key not in impl.arguments:
                known_keys = ", ".join(impl.arguments) or "none"
                result.warnings.append(
                    f'node "{node.name}": unknown configuration key "{key}" (known: {known_keys})'
                )
    return result


def _quoted_list(items: Sequence[str]) -> str:
    return "[" + ", ".join(f'"{i}"' for i in items) + "]"
