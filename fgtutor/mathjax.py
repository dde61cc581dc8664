"""MathJax 3 served with the book, so that its pages show maths without the internet.

Sphinx's pages load MathJax from a CDN; opened offline they show raw TeX. This module
fetches the browser build of MathJax the way ``fgtutor.mnist`` fetches MNIST: ``npm pack
mathjax@3.2.2``, the tarball checked against the integrity recorded here, the files the
pages need extracted into a staging folder and renamed into place in one step. The copy
lives in ``$FGTUTOR_DATA/mathjax-3.2.2/mathjax`` (default ``~/.cache/fgtutor``), with a
manifest of its files' sha256 that is checked before every use.

The book's Sphinx extension (``book/_ext/fgtutor_pages.py``) copies the local files into
``_static/mathjax`` and points ``mathjax_path`` at them. When no local copy can be had,
the pages keep the CDN and the build says so in one line.

Run ``python -m fgtutor.mathjax [--root DIR]`` to fetch and check it.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import re
import shutil
import time
import subprocess
import sys
import tarfile
from pathlib import Path, PurePosixPath
from typing import List, Optional, Union

from .utils import staging_dir

VERSION = "3.2.2"
NPM_PACKAGE = f"mathjax@{VERSION}"
NPM_TIMEOUT_S = 300
RETRY_AFTER_S = 600  # after a failed fetch, the next one within this time is not tried
#: the tarball ``npm pack mathjax@3.2.2`` gives: its npm integrity and its sha256
TARBALL_INTEGRITY = "sha512-Bt+SSVU8eBG27zChVewOicYs7Xsdt40qm4+UpHyX7k0/O9NliPc+x77k1/FEsPsjKPZGJvtRZM1vO+geW0OhGw=="
TARBALL_SHA256 = "1b9c0a1c44df864e915690558e72adb9cc5203360daefd385084ced3b6c64c09"
#: the component Sphinx loads by default (TeX and MathML in, CommonHTML out)
ENTRY = "tex-mml-chtml.js"
#: what the pages may load besides ENTRY: TeX extensions (autoloaded), the CHTML fonts,
#: the menu and its accessibility tools (speech rules in sre/)
KEEP_DIRS = ("input", "output", "ui", "a11y", "sre")
STATIC_NAME = "mathjax"  # the folder under _static
MANIFEST = "MANIFEST.sha256"
CDN_URL = f"https://cdn.jsdelivr.net/npm/mathjax@3/es5/{ENTRY}"  # Sphinx's default

PathLike = Union[str, "os.PathLike[str]"]


class MathJaxUnavailableError(RuntimeError):
    """No verified local copy of MathJax could be had; the message says why and what to do."""


def default_root() -> Path:
    """Return the cache root: ``$FGTUTOR_DATA`` if set, else ``~/.cache/fgtutor`` (as for MNIST)."""
    env = os.environ.get("FGTUTOR_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fgtutor"


def static_dir(root: PathLike) -> Path:
    """Return the folder for ``html_static_path``: it holds ``mathjax/``, the files the pages load."""
    return Path(root) / f"mathjax-{VERSION}"


def mathjax_dir(root: PathLike) -> Path:
    """Return ``<root>/mathjax-<version>/mathjax``, which holds ENTRY, its folders and MANIFEST."""
    return static_dir(root) / STATIC_NAME


# --------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------


def _digest(path: Path, name: str) -> bytes:
    h = hashlib.new(name)
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.digest()


def tarball_problem(path: PathLike) -> Optional[str]:
    """Return why ``path`` is not the recorded ``mathjax-3.2.2.tgz``, or None."""
    path = Path(path)
    if not path.is_file():
        return f"{path}: missing"
    sha512 = "sha512-" + base64.b64encode(_digest(path, "sha512")).decode()
    if sha512 != TARBALL_INTEGRITY:
        return f"{path}: integrity mismatch (expected {TARBALL_INTEGRITY}, got {sha512})"
    sha256 = _digest(path, "sha256").hex()
    if sha256 != TARBALL_SHA256:
        return f"{path}: sha256 mismatch (expected {TARBALL_SHA256}, got {sha256})"
    return None


def tree_problem(folder: PathLike) -> Optional[str]:
    """Return why ``folder`` is not a complete, unchanged local MathJax, or None.

    Every file its manifest lists must be there with that sha256 (about 10 MB: hashing it
    takes a few tens of milliseconds).
    """
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return f"{folder}: no local MathJax ({MANIFEST} missing)"
    lines = manifest.read_text().splitlines()
    if not any(line.endswith(f"  {ENTRY}") for line in lines):
        return f"{manifest}: does not list {ENTRY}"
    for line in lines:
        expected, _, name = line.partition("  ")
        path = folder / name
        if not path.is_file():
            return f"{path}: missing"
        if _digest(path, "sha256").hex() != expected:
            return f"{path}: changed since it was extracted (sha256 mismatch)"
    return None


# --------------------------------------------------------------------------
# Fetching: npm pack, verify, extract into a staging folder, rename into place
# --------------------------------------------------------------------------


def _wanted(member: tarfile.TarInfo) -> Optional[PurePosixPath]:
    """Return where a tarball member goes inside ``mathjax/``, or None to leave it out.

    Only regular files under ``package/es5/`` (ENTRY and KEEP_DIRS) and the licence are
    taken, at paths checked to stay inside the folder: a hostile archive cannot write
    elsewhere, and no link is ever made.
    """
    parts = PurePosixPath(member.name).parts
    if not member.isfile() or len(parts) < 2 or parts[0] != "package" or ".." in parts:
        return None
    if parts[1:] == ("LICENSE",):
        return PurePosixPath("LICENSE")
    if len(parts) < 3 or parts[1] != "es5":
        return None
    rel = PurePosixPath(*parts[2:])
    if rel == PurePosixPath(ENTRY) or (len(rel.parts) > 1 and rel.parts[0] in KEEP_DIRS):
        return rel
    return None


def extract(tgz: PathLike, dest: PathLike) -> int:
    """Extract the files the pages need from a verified tarball into the new folder ``dest``,
    and write its manifest. Returns the number of files."""
    dest = Path(dest)
    dest.mkdir(parents=True)
    lines: List[str] = []
    with tarfile.open(tgz, "r:gz") as tar:
        for member in tar:
            rel = _wanted(member)
            src = tar.extractfile(member) if rel is not None else None
            if src is None:
                continue
            out = dest.joinpath(*rel.parts)
            out.parent.mkdir(parents=True, exist_ok=True)
            with src, out.open("wb") as f:
                shutil.copyfileobj(src, f, 1 << 20)
            lines.append(f"{_digest(out, 'sha256').hex()}  {rel}")
    (dest / MANIFEST).write_text("\n".join(sorted(lines, key=lambda s: s[66:])) + "\n")
    return len(lines)


def _staging_dir(root: Path) -> Path:
    """A temporary folder in ``root``, so that the final rename is atomic
    (``fgtutor.utils.staging_dir``)."""
    return staging_dir(root, "mathjax")


def _npm_error(output: str) -> str:
    """The telling lines of npm's error output: its error code and what failed."""
    lines = [re.sub(r"^npm (error|ERR!)", "", line).strip() for line in output.splitlines()]
    code = [line for line in lines if line.startswith("code ")][:1]
    what = [line for line in lines if re.search(r"FetchError|reason:|^40\d |Not Found", line)][:1]
    return " | ".join(code + what) or " | ".join(line for line in lines if line)[-300:] or "no output"


def _npm_pack(folder: Path) -> Path:
    """Run ``npm pack mathjax@3.2.2`` in ``folder`` and return the tarball it wrote."""
    npm = shutil.which("npm")
    if npm is None:
        raise MathJaxUnavailableError("npm not found on PATH")
    # --prefer-offline: a tarball already in npm's own cache needs no network
    result = subprocess.run([npm, "pack", "--prefer-offline", NPM_PACKAGE], cwd=folder,
                            capture_output=True, text=True, timeout=NPM_TIMEOUT_S)
    if result.returncode != 0:
        raise MathJaxUnavailableError(f"`npm pack {NPM_PACKAGE}` exited {result.returncode}: "
                                      f"{_npm_error(result.stderr or result.stdout)}")
    tarballs = sorted(folder.glob("*.tgz"))
    if not tarballs:
        raise MathJaxUnavailableError(f"`npm pack {NPM_PACKAGE}` produced no .tgz")
    return tarballs[0]


def fetch(root: PathLike, tarball: Optional[PathLike] = None) -> Path:
    """Put a verified MathJax into ``static_dir(root)`` and return ``mathjax_dir(root)``.

    ``tarball`` is a ``mathjax-3.2.2.tgz`` already at hand; by default ``npm pack`` gets
    it. Either way it must match the recorded integrity. The files are extracted into a
    staging folder beside the final one and renamed into place: a reader sees no copy or
    a complete one, never half of one. A broken copy already there is replaced.
    """
    root = Path(root)
    tmp = _staging_dir(root)
    try:
        tgz = Path(tarball) if tarball is not None else _npm_pack(tmp)
        problem = tarball_problem(tgz)
        if problem is not None:
            raise MathJaxUnavailableError(problem)
        extract(tgz, tmp / "new" / STATIC_NAME)
        final = static_dir(root)
        if final.exists():
            os.replace(final, tmp / "old")  # a broken copy: out of the way in one step
        try:
            os.replace(tmp / "new", final)
        except OSError:  # another process put its copy there first: use that one
            if tree_problem(mathjax_dir(root)) is not None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _failure_note(root).unlink(missing_ok=True)
    return mathjax_dir(root)


def _failure_note(root: Path) -> Path:
    """Where the reason of the last failed fetch is kept (for RETRY_AFTER_S seconds)."""
    return Path(root) / f".mathjax-{VERSION}.failed"


def ensure_mathjax(root: Optional[PathLike] = None, *, allow_fetch: bool = True,
                   retry_failed: bool = False) -> Path:
    """Return the folder of a verified local MathJax (``mathjax_dir(root)``), fetching it if needed.

    A fetch that failed less than RETRY_AFTER_S ago is not tried again unless
    ``retry_failed``. Raises ``MathJaxUnavailableError`` saying why and how to place it by hand.
    """
    root = Path(root) if root is not None else default_root()
    problem = tree_problem(mathjax_dir(root))
    if problem is None:
        return mathjax_dir(root)
    failed = _failure_note(root)
    recent = failed.is_file() and time.time() - failed.stat().st_mtime < RETRY_AFTER_S
    if allow_fetch and recent and not retry_failed:
        # `make book` asks twice (make mathjax, then the build): an offline npm takes a minute
        problem = f"{failed.read_text().strip()} (a few minutes ago; delete {failed} to try again now)"
    elif allow_fetch:
        print(f"fgtutor.mathjax: fetching {NPM_PACKAGE} via npm into {static_dir(root)}", file=sys.stderr)
        try:
            fetch(root)
            problem = tree_problem(mathjax_dir(root))
        except (MathJaxUnavailableError, OSError, subprocess.SubprocessError, tarfile.TarError) as exc:
            problem = " ".join(str(exc).split()) or type(exc).__name__
        if problem is None:
            return mathjax_dir(root)
        failed.parent.mkdir(parents=True, exist_ok=True)
        failed.write_text(problem + "\n")
    raise MathJaxUnavailableError(
        f"no local MathJax {VERSION} under {static_dir(root)}: {problem}. To place it by hand: run "
        f"`npm pack {NPM_PACKAGE}` where the npm registry is reachable, then here "
        f"`python -m fgtutor.mathjax --tarball path/to/mathjax-{VERSION}.tgz`, or set FGTUTOR_DATA "
        f"to a folder that holds mathjax-{VERSION}/."
    )


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m fgtutor.mathjax``: fetch (if needed) and verify the local MathJax."""
    parser = argparse.ArgumentParser(description=f"Fetch and check a local MathJax {VERSION} for the book.")
    parser.add_argument("--root", type=Path, default=None,
                        help="cache root (default: $FGTUTOR_DATA or ~/.cache/fgtutor)")
    parser.add_argument("--tarball", type=Path, default=None,
                        help=f"use this mathjax-{VERSION}.tgz instead of running npm pack")
    args = parser.parse_args(argv)
    root = args.root if args.root is not None else default_root()
    try:
        if args.tarball is not None:
            fetch(root, args.tarball)
        folder = ensure_mathjax(root, retry_failed=True)
    except (MathJaxUnavailableError, OSError, tarfile.TarError) as exc:
        print(f"fgtutor.mathjax: {exc}", file=sys.stderr)
        print(f"fgtutor.mathjax: the book's pages will load MathJax from the CDN ({CDN_URL})", file=sys.stderr)
        return 1
    count = len((folder / MANIFEST).read_text().splitlines())
    print(f"MathJax {VERSION}: {count} files verified in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
