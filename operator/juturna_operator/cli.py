"""``juturna-operator``: run the operator, convert Juturna pipelines, print the CRD.

juturna-operator run [-n NS ... | -A] [--engine E] ...   (run --help: every setting)
juturna-operator convert FILE|- [--name NAME]
juturna-operator crd [--mkdir] [DIR ...]
juturna-operator --version

Exit codes: 0 done; 2 a usage, configuration or input error (one line on stderr says which).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from juturna_operator import __version__
from juturna_operator.settings import BOOLEAN, SETTINGS, Setting, Settings, SettingsError

USAGE_ERROR = 2  # argparse's own, for a bad flag; ours for bad settings and input too


def _help(setting: Setting) -> str:
    # argparse %-formats help texts.
    text = f"{setting.help} (default: {setting.shown_default}; env {setting.env})"
    return text.replace("%", "%%")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="juturna-operator", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="run the operator against the current kubeconfig context (or in its pod)",
        usage="%(prog)s [-n NS ... | -A] [SETTING ...] [--liveness URL] [-v]",
        description="Run the operator. Every setting is a flag and an environment variable; "
        "a flag wins over its variable, and both get the same checks.",
    )
    where = run.add_mutually_exclusive_group()
    where.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        metavar="NS",
        help="watch this namespace (repeatable; an exact name)",
    )
    where.add_argument(
        "-A", "--all-namespaces", action="store_true", help="watch every namespace (the default)"
    )
    group = run.add_argument_group("settings")
    for setting in SETTINGS:
        # default None: a flag not given leaves its variable (or the default) in force.
        if setting.choices == BOOLEAN:
            group.add_argument(
                setting.flag,
                dest=setting.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=_help(setting),
            )
        else:
            group.add_argument(
                setting.flag,
                dest=setting.name,
                choices=setting.choices,
                metavar=None if setting.choices else setting.metavar,
                default=None,
                help=_help(setting),
            )
    run.add_argument(
        "--liveness",
        default=None,
        metavar="URL",
        help="kopf's liveness endpoint, e.g. http://0.0.0.0:8080/healthz (default: none)",
    )
    run.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    conv = sub.add_parser(
        "convert",
        help="Juturna pipeline JSON <-> Pipeline manifest (direction from the file)",
        description="Convert Juturna's pipeline JSON to a Pipeline manifest, or back. A "
        "manifest the API server would refuse is refused (exit 2), naming the problem.",
    )
    conv.add_argument("file", metavar="FILE", help="the file to convert; - reads standard input")
    conv.add_argument("--name", help="metadata.name of the manifest (default: from the JSON)")
    crd = sub.add_parser("crd", help="print the CRD, or write it into each DIR")
    crd.add_argument("dirs", nargs="*", metavar="DIR", help="a directory to write the CRD into")
    crd.add_argument(
        "--mkdir", action="store_true", help="create a DIR that does not exist (with parents)"
    )
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    """The environment, overridden by the flags given; both checked the same way."""
    flags = {}
    for setting in SETTINGS:
        value = getattr(args, setting.name)
        if isinstance(value, bool):
            flags[setting.name] = "true" if value else "false"
        elif value is not None:
            flags[setting.name] = value
    return Settings.from_env(flags, args.namespace)


def _run(args: argparse.Namespace) -> int:
    settings = settings_from(args)  # before the heavy imports: a bad setting fails at once
    import kopf

    from juturna_operator import handlers

    try:
        handlers.load_cluster_configuration()
    except handlers.NoCluster as err:
        print(f"juturna-operator: {err}", file=sys.stderr)
        return USAGE_ERROR
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
    # Every watch event runs a handler; its success is not news (DEBUG, shown with -v).
    logging.getLogger("kopf.objects").addFilter(handlers.SuccessesAtDebug())
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
    """The ``juturna-operator`` command; returns its exit code."""
    args = _parser().parse_args(argv)
    if args.command == "convert":
        from juturna_operator import convert

        return convert.main(args.file, args.name)
    if args.command == "crd":
        from juturna_operator import crd

        return crd.main(args.dirs, mkdir=args.mkdir)
    from juturna_operator.handlers import CrdNotUsable

    try:
        return _run(args)
    except SettingsError as err:
        print(f"juturna-operator: configuration error: {err}", file=sys.stderr)
        return USAGE_ERROR
    except CrdNotUsable as err:
        print(f"juturna-operator: {err}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
