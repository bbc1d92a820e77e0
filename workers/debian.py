"""Files from Debian packages: found where the packages are installed, or fetched with
``apt-get download`` and unpacked with ``dpkg-deb -x`` into a cache folder, with the versions
they came in. The built-in ``austen`` and ``fortunes`` corpora come this way."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

VERSIONS_FILE = ".debian-versions.json"
"""Written beside the unpacked files: {package: version} of what was fetched."""


class DebianError(RuntimeError):
    """The packages are neither installed nor fetchable here; the message says what to do."""


@dataclass(frozen=True)
class DebianFiles:
    """Files of some Debian packages: the packages, and files (relative to the root of the
    file system) that exist once they are installed or unpacked."""

    packages: tuple[str, ...]
    marker_files: tuple[str, ...]


def package_root(spec: DebianFiles, root: Path, *, purpose: str) -> Path:
    """Where the package files lie: ``/`` if the packages are installed, else ``root``, where they
    are fetched and unpacked first if missing. `purpose` says what needs them, for errors."""
    if all((Path("/") / f).is_file() for f in spec.marker_files):
        return Path("/")
    if not all((root / f).is_file() for f in spec.marker_files):
        _fetch(spec, root, purpose)
    return root


def provenance(spec: DebianFiles, root: Path) -> str:
    """``debian:PACKAGE=VERSION,...``: the versions fetched into `root`, or those installed."""
    packages = spec.packages
    versions: dict[str, str] = {}
    stamp = root / VERSIONS_FILE
    if stamp.is_file():
        versions = json.loads(stamp.read_text())
    else:
        try:
            out = subprocess.run(
                ["dpkg-query", "-W", "-f", "${Package} ${Version}\\n", *packages],
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout
            versions = dict(line.split(" ", 1) for line in out.splitlines() if " " in line)
        except (OSError, subprocess.TimeoutExpired):
            pass
    return "debian:" + ",".join(f"{p}={versions[p]}" if p in versions else p for p in packages)


def _fetch(spec: DebianFiles, root: Path, purpose: str) -> None:
    """``apt-get download`` the packages and ``dpkg-deb -x`` them into ``root``, atomically."""
    hint = (
        f"{purpose} needs the Debian package(s) {', '.join(spec.packages)}: "
        f"install them (apt-get install {' '.join(spec.packages)}) or let featurescope fetch "
        "them with apt-get download (needs apt, dpkg-deb and fresh package lists: apt-get update)"
    )
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb")):
        raise DebianError(f"{hint}; apt-get or dpkg-deb is not available here")
    root.parent.mkdir(parents=True, exist_ok=True)
    log.info("fetching %s for %s into %s", ", ".join(spec.packages), purpose, root)
    with tempfile.TemporaryDirectory(dir=root.parent, prefix=".fetch-") as tmp:
        work = Path(tmp)
        _run(["apt-get", "download", *spec.packages], cwd=work, hint=hint)
        tree = work / "root"
        versions = {}
        for deb in sorted(work.glob("*.deb")):
            _run(["dpkg-deb", "-x", str(deb), str(tree)], cwd=work, hint=hint)
            pkg, _, rest = deb.name.partition("_")
            versions[pkg] = rest.partition("_")[0].replace("%3a", ":")
        missing = [f for f in spec.marker_files if not (tree / f).is_file()]
        if missing:
            raise DebianError(f"{hint}; the downloaded packages lack {', '.join(missing)}")
        (tree / VERSIONS_FILE).write_text(json.dumps(versions, sort_keys=True))
        try:
            os.replace(tree, root)
        except OSError:
            if not root.is_dir():  # else another process unpacked it first: keep theirs
                raise


def _run(cmd: list[str], *, cwd: Path, hint: str) -> None:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DebianError(f"{hint}; `{' '.join(cmd)}` failed: {exc}") from exc
    if proc.returncode != 0:
        err = (proc.stderr or proc.stdout).strip().splitlines()
        raise DebianError(f"{hint}; `{' '.join(cmd)}` failed: {' | '.join(err[-3:])}")
