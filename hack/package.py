"""`make package`: the chart's .tgz, the operator's wheel and its image, all of one version.

    python hack/package.py [--out dist] [--no-image] [--container podman] [--base-image IMG]

The version is pyproject.toml's. The chart's `version` and `appVersion` must equal it (the
chart's default image tag is its appVersion), and CHANGELOG.md must have a section for it:
otherwise nothing is built and the exit status is 2, naming what differs. The image is
tagged `juturna-operator:<version>`, the name the chart's values default to.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml
from controlplane import ensure_binaries

REPO = Path(__file__).resolve().parents[1]
IMAGE = "juturna-operator"
# podman on machines like ours needs these for the build's RUN steps (docs: PLATFORM).
PODMAN_BUILD_FLAGS = [
    "--network=host",
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=1024:1024",
]


class PackageError(Exception):
    """Why nothing was built: a person's fix is in the message."""


def version(root: Path) -> str:
    """The one version, checked across pyproject.toml, the chart and the changelog."""
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"]
    chart = yaml.safe_load((root / "charts" / "juturna-operator" / "Chart.yaml").read_text())
    for field in ("version", "appVersion"):
        if str(chart.get(field)) != project:
            raise PackageError(
                f"charts/juturna-operator/Chart.yaml {field} is {chart.get(field)!r} but "
                f"pyproject.toml's version is {project!r}: the chart, the wheel and the image "
                "have one version; set both to the same"
            )
    changelog = (root / "CHANGELOG.md").read_text()
    if not re.search(rf"^## \[{re.escape(project)}\]", changelog, re.M):
        raise PackageError(
            f"CHANGELOG.md has no section for {project} (a heading `## [{project}] - <date>`): "
            "say what changed before packaging it"
        )
    return project


def run(command: list[str], what: str) -> None:
    """Run one build step, its output to the terminal; PackageError if it fails."""
    print(f"== {what}: {shlex.join(command)}", flush=True)
    proc = subprocess.run(command, check=False)
    if proc.returncode != 0:
        raise PackageError(f"{what} failed (exit {proc.returncode}); its output is above")


def package(root: Path, out: Path, image: bool, container: list[str], base_image: str) -> list[str]:
    """Build everything from ``root`` into ``out`` (the image into the container tool's
    store); returns what was made."""
    ver = version(root)
    out.mkdir(parents=True, exist_ok=True)
    made: list[str] = []
    helm = str(ensure_binaries().helm / "helm")
    run([helm, "package", str(root / "charts" / "juturna-operator"), "-d", str(out)], "the chart")
    made.append(str(out / f"juturna-operator-{ver}.tgz"))
    # No build isolation: the virtualenv's setuptools builds it, with no download.
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "-w",
            str(out),
            str(root),
        ],
        "the wheel",
    )
    made.append(str(out / f"juturna_operator-{ver}-py3-none-any.whl"))
    if image:
        flags = PODMAN_BUILD_FLAGS if Path(container[0]).name == "podman" else []
        tag = f"{IMAGE}:{ver}"
        run(
            [
                *container,
                "build",
                *flags,
                "--build-arg",
                f"BASE_IMAGE={base_image}",
                "-t",
                tag,
                str(root),
            ],
            "the image",
        )
        made.append(tag)
    for item in made:
        if not item.startswith(IMAGE + ":") and not Path(item).exists():
            raise PackageError(f"{item} was not made")
    return made


def main(argv: list[str] | None = None) -> int:
    """Check the version, then build; a PackageError is one line on stderr and exit 2."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=REPO, help="the repository to package")
    parser.add_argument("--out", type=Path, default=REPO / "dist")
    parser.add_argument("--no-image", action="store_true", help="the chart and the wheel only")
    parser.add_argument("--container", default="podman", help="podman (with its flags) or docker")
    parser.add_argument("--base-image", default="python:3.12-slim")
    parser.add_argument("--check", action="store_true", help="check the versions, build nothing")
    args = parser.parse_args(argv)
    try:
        if args.check:
            print(version(args.root))
            return 0
        container = shlex.split(args.container)
        made = package(args.root, args.out, not args.no_image, container, args.base_image)
    except PackageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("== made:\n" + "\n".join(f"   {item}" for item in made))
    return 0


if __name__ == "__main__":
    sys.exit(main())
