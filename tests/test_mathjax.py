"""Tests for fgtutor.mathjax: offline, on a small fake mathjax tarball written here."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import io
import logging
import os
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from fgtutor import mathjax

KEPT = {
    "package/es5/tex-mml-chtml.js": b"window.MathJax = window.MathJax || {};",
    "package/es5/input/tex/extensions/ams.js": b"/* ams */",
    "package/es5/output/chtml/fonts/woff-v2/MathJax_Main-Regular.woff": b"wOFF" + bytes(20),
    "package/LICENSE": b"Apache License 2.0",
}
LEFT_OUT = {
    "package/es5/tex-svg.js": b"/* another entry point */",
    "package/README.md": b"# MathJax",
    "package/es5/../../escape.js": b"/* must not leave the folder */",
    "/etc/absolute.js": b"/* nor this */",
}


def make_tarball(path: Path, files: dict = None, *, link: bool = True) -> Path:
    """A gzipped tarball like npm's, with the given files and a symbolic link."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in (files if files is not None else {**KEPT, **LEFT_OUT}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo("package/es5/input/link.js")
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
    return path


@pytest.fixture
def tarball(tmp_path, monkeypatch) -> Path:
    """A fake mathjax-3.2.2.tgz, with the recorded checksums patched to its own."""
    path = make_tarball(tmp_path / "mathjax-3.2.2.tgz")
    data = path.read_bytes()
    integrity = "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()
    monkeypatch.setattr(mathjax, "TARBALL_INTEGRITY", integrity)
    monkeypatch.setattr(mathjax, "TARBALL_SHA256", hashlib.sha256(data).hexdigest())
    monkeypatch.delenv("FGTUTOR_DATA", raising=False)
    return path


@pytest.fixture
def no_npm(monkeypatch) -> list:
    """``npm pack`` records its calls and fails, as without a registry."""
    calls = []

    def refuse(folder):
        calls.append(folder)
        raise mathjax.MathJaxUnavailableError("`npm pack mathjax@3.2.2` exited 1: npm error network ENOTFOUND")

    monkeypatch.setattr(mathjax, "_npm_pack", refuse)
    return calls


def test_fetch_extracts_only_what_the_pages_need(tarball, tmp_path):
    folder = mathjax.fetch(tmp_path / "root", tarball)
    assert folder == tmp_path / "root" / "mathjax-3.2.2" / "mathjax"
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    assert files == ["LICENSE", "MANIFEST.sha256", "input/tex/extensions/ams.js",
                     "output/chtml/fonts/woff-v2/MathJax_Main-Regular.woff", "tex-mml-chtml.js"]
    assert (folder / "tex-mml-chtml.js").read_bytes() == KEPT["package/es5/tex-mml-chtml.js"]
    assert not (tmp_path / "escape.js").exists() and not (tmp_path / "root" / "escape.js").exists()
    assert mathjax.tree_problem(folder) is None
    assert not list((tmp_path / "root").glob(".fgtutor-mathjax-*"))  # the staging folder is gone


def test_a_changed_or_missing_file_is_noticed(tarball, tmp_path):
    folder = mathjax.fetch(tmp_path, tarball)
    (folder / "input/tex/extensions/ams.js").write_text("tampered")
    assert "changed since it was extracted" in mathjax.tree_problem(folder)
    (folder / "input/tex/extensions/ams.js").unlink()
    assert "missing" in mathjax.tree_problem(folder)
    assert "MANIFEST.sha256 missing" in mathjax.tree_problem(tmp_path / "nowhere")


def test_a_broken_copy_is_replaced_whole(tarball, tmp_path):
    folder = mathjax.fetch(tmp_path, tarball)
    (folder / "tex-mml-chtml.js").write_text("half a file")
    (folder / "stray.js").write_text("left from before")
    assert mathjax.fetch(tmp_path, tarball) == folder
    assert mathjax.tree_problem(folder) is None and not (folder / "stray.js").exists()


def test_a_tarball_that_is_not_the_recorded_one_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("FGTUTOR_DATA", str(tmp_path / "root"))
    other = make_tarball(tmp_path / "mathjax-3.2.2.tgz")  # real checksums, fake file
    assert "integrity mismatch" in mathjax.tarball_problem(other)
    with pytest.raises(mathjax.MathJaxUnavailableError, match="integrity mismatch"):
        mathjax.fetch(tmp_path / "root", other)
    assert not mathjax.static_dir(tmp_path / "root").exists()
    assert mathjax.main(["--tarball", str(other)]) == 1


def test_ensure_fetches_with_npm_once_then_uses_the_cache(tarball, tmp_path, monkeypatch, capsys):
    calls = []

    def pack(folder):
        calls.append(folder)
        return make_tarball(folder / "mathjax-3.2.2.tgz")

    monkeypatch.setattr(mathjax, "_npm_pack", pack)
    root = tmp_path / "root"
    assert mathjax.ensure_mathjax(root) == mathjax.mathjax_dir(root)
    assert mathjax.ensure_mathjax(root) == mathjax.mathjax_dir(root)
    assert len(calls) == 1
    assert "fetching mathjax@3.2.2 via npm" in capsys.readouterr().err


def test_without_npm_or_registry_the_error_says_how_to_place_it(tmp_path, no_npm):
    with pytest.raises(mathjax.MathJaxUnavailableError) as err:
        mathjax.ensure_mathjax(tmp_path)
    message = str(err.value)
    assert "ENOTFOUND" in message and "npm pack mathjax@3.2.2" in message and "--tarball" in message
    with pytest.raises(mathjax.MathJaxUnavailableError):
        mathjax.ensure_mathjax(tmp_path, allow_fetch=False)
    assert len(no_npm) == 1  # allow_fetch=False does not try


def test_a_failed_fetch_is_not_tried_again_at_once(tmp_path, no_npm, tarball):
    for _ in range(2):  # `make mathjax`, then the build: one npm call, the same reason twice
        with pytest.raises(mathjax.MathJaxUnavailableError, match="ENOTFOUND"):
            mathjax.ensure_mathjax(tmp_path)
    assert len(no_npm) == 1
    with pytest.raises(mathjax.MathJaxUnavailableError, match="to try again now"):
        mathjax.ensure_mathjax(tmp_path)
    with pytest.raises(mathjax.MathJaxUnavailableError):
        mathjax.ensure_mathjax(tmp_path, retry_failed=True)  # what `python -m fgtutor.mathjax` does
    assert len(no_npm) == 2
    mathjax.fetch(tmp_path, tarball)  # a copy placed by hand clears the failure
    assert not mathjax._failure_note(tmp_path).exists()
    assert mathjax.ensure_mathjax(tmp_path) == mathjax.mathjax_dir(tmp_path)


def test_npm_errors_are_told_in_a_few_words():
    offline = """npm error code ENOTFOUND
npm error syscall getaddrinfo
npm error errno ENOTFOUND
npm error network request to https://registry.npmjs.org/mathjax failed, reason: getaddrinfo ENOTFOUND registry.npmjs.org
npm error network This is a problem related to network connectivity.
npm error A complete log of this run can be found in: /root/.npm/_logs/debug-0.log"""
    assert mathjax._npm_error(offline) == ("code ENOTFOUND | network request to https://registry.npmjs.org/mathjax "
                                           "failed, reason: getaddrinfo ENOTFOUND registry.npmjs.org")
    missing = "npm error code E404\nnpm error 404 Not Found - GET https://registry.npmjs.org/mathjax - Not found"
    assert mathjax._npm_error(missing) == ("code E404 | 404 Not Found - GET https://registry.npmjs.org/mathjax"
                                           " - Not found")
    assert mathjax._npm_error("something odd") == "something odd"


def test_npm_missing_is_said(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(mathjax.MathJaxUnavailableError, match="npm not found"):
        mathjax._npm_pack(tmp_path)


def test_staging_folders_of_dead_fetches_are_removed(tmp_path):
    dead = tmp_path / ".fgtutor-mathjax-999999999-abc"  # no such process
    mine = tmp_path / f".fgtutor-mathjax-{os.getpid()}-xyz"
    dead.mkdir()
    mine.mkdir()
    new = mathjax._staging_dir(tmp_path)
    assert not dead.exists() and mine.exists() and new.exists()


def test_the_cli_fetches_from_a_tarball_and_verifies(tarball, tmp_path, capsys):
    assert mathjax.main(["--root", str(tmp_path), "--tarball", str(tarball)]) == 0
    assert "4 files verified" in capsys.readouterr().out


def load_extension():
    """The book's Sphinx extension, book/_ext/fgtutor_pages.py (not a package module)."""
    path = Path(__file__).resolve().parents[1] / "book" / "_ext" / "fgtutor_pages.py"
    spec = importlib.util.spec_from_file_location("fgtutor_pages", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sphinx_hook_points_the_pages_at_the_local_copy(tarball, tmp_path, monkeypatch):
    monkeypatch.setenv("FGTUTOR_DATA", str(tmp_path))
    mathjax.fetch(tmp_path, tarball)
    config = SimpleNamespace(html_static_path=["_static"], mathjax_path=mathjax.CDN_URL)
    load_extension().use_local_mathjax(None, config)
    assert config.mathjax_path == "mathjax/tex-mml-chtml.js"
    assert config.html_static_path == ["_static", str(mathjax.static_dir(tmp_path))]


def test_sphinx_hook_keeps_the_cdn_and_says_so_in_one_line(tmp_path, monkeypatch, no_npm, caplog):
    monkeypatch.setenv("FGTUTOR_DATA", str(tmp_path))
    config = SimpleNamespace(html_static_path=["_static"], mathjax_path=mathjax.CDN_URL)
    with caplog.at_level(logging.INFO):
        load_extension().use_local_mathjax(None, config)
    assert config.mathjax_path == mathjax.CDN_URL and config.html_static_path == ["_static"]
    [line] = [r.getMessage() for r in caplog.records if "fgtutor_pages" in r.getMessage()]
    assert "\n" not in line and "load MathJax from the CDN" in line and "need the internet" in line


def test_each_inline_script_is_written_once():
    from sphinx.builders.html._assets import _JavaScript

    thebe = {"body": 'const THEBE_JS_URL = "..."'}
    scripts = [_JavaScript("_static/a.js"), _JavaScript(None, **thebe), _JavaScript("_static/b.js", defer="defer"),
               _JavaScript("", **thebe), _JavaScript("_static/a.js", priority=200)]
    context = {"script_files": scripts}
    load_extension().drop_repeated_scripts(None, "page", "page.html", context, None)
    assert context["script_files"] is scripts
    assert [(s.filename, s.priority) for s in scripts] == [("_static/a.js", 500), (None, 500),
                                                           ("_static/b.js", 500), ("_static/a.js", 200)]
