"""``juturna-operator``: run the operator, or print the CRD it serves.

juturna-operator run [-n NS ... | -A] [--plugin-path P] [--workdir D] ...
juturna-operator crd [DIR ...]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from juturna_operator.registry import ENGINES
from juturna_operator.settings import FLAGS, Settings, SettingsError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="juturna-operator", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the operator against the current kubeconfig context")
    where = run.add_mutually_exclusive_group()
    where.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        metavar="NS",
        help="watch this namespace (repeatable)",
    )
    where.add_argument(
        "-A", "--all-namespaces", action="store_true", help="watch every namespace (the default)"
    )
    run.add_argument("--plugin-path", help=f"plugin roots, separated by {os.pathsep!r}")
    run.add_argument("--workdir", help="folder for pipeline folders")
    # Raw strings: Settings checks flags and environment alike (settings.FLAGS).
    run.add_argument(
        "--engine",
        help="where pipelines run: "
        + "; ".join(f"{name} ({e.summary})" for name, e in ENGINES.items()),
    )
    run.add_argument("--stop-timeout", help="seconds a stop may take")
    run.add_argument("--health-interval", help="seconds between health checks (≤ 5)")
    run.add_argument("--log-format", help="text or json")
    run.add_argument("--max-concurrency", help="threads for blocking Juturna calls")
    run.add_argument("--metrics-port", help="Prometheus endpoint port (0: off)")
    run.add_argument(
        "--liveness",
        default=None,
        metavar="URL",
        help="kopf liveness endpoint, e.g. http://0.0.0.0:8080/healthz",
    )
    run.add_argument("-v", "--verbose", action="store_true")
    conv = sub.add_parser(
        "convert", help="Juturna pipeline JSON <-> Pipeline manifest (direction from the file)"
    )
    conv.add_argument("file")
    conv.add_argument("--name", help="metadata.name of the manifest (default: from the JSON)")
    crd = sub.add_parser("crd", help="print the CRD, or write it into each DIR")
    crd.add_argument("dirs", nargs="*")
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    """The environment, overridden by the flags given; both checked the same way."""
    flags = {
        name: value
        for name, flag in FLAGS.items()
        if (value := getattr(args, flag.removeprefix("--").replace("-", "_"))) is not None
    }
    settings = Settings.from_env(flags)
    settings.namespaces = list(args.namespace)
    settings.all_namespaces = not args.namespace
    settings.check()
    return settings


def _run(args: argparse.Namespace) -> int:
    import kopf

    from juturna_operator import handlers

    settings = settings_from(args)
    handlers.check_crd(handlers.api_client())
    kopf.configure(
        verbose=args.verbose,
        log_format=kopf.LogFormat.JSON if settings.log_format == "json" else kopf.LogFormat.FULL,
        log_prefix=True,
    )
    logging.getLogger("jt").setLevel(logging.WARNING)  # Juturna logs every status read at INFO
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    # kopf's liveness endpoint: the kubelet's probe every few seconds is not news either.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # Every watch event runs the "enqueue" handler; its success is not news.
    logging.getLogger("kopf.objects").addFilter(
        lambda record: "Handler 'enqueue' succeeded" not in record.getMessage()
    )
    if settings.engine == "pod":
        # Pod changes queue their Pipeline through a watch on our labelled pods, not a poll.
        from juturna_operator.engines.pod import MANAGED_BY

        kopf.on.event("", "v1", "pods", labels=MANAGED_BY)(handlers.pod_event)
    sys.setswitchinterval(settings.gil_switch_interval_s)  # see Settings
    asyncio.run(
        kopf.operator(
            standalone=True,
            clusterwide=settings.all_namespaces,
            namespaces=settings.namespaces,
            liveness_endpoint=args.liveness,
            memo=handlers.memo_for(settings),
        )
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "convert":
        from juturna_operator import convert

        return convert.main(args.file, args.name)
    if args.command == "crd":
        from juturna_operator import crd

        return crd.main(args.dirs)
    from juturna_operator.handlers import CrdNotUsable

    try:
        return _run(args)
    except SettingsError as err:
        print(f"juturna-operator: configuration error: {err}", file=sys.stderr)
        return 2
    except CrdNotUsable as err:
        print(f"juturna-operator: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
