r"""Tests for fgtutor.browsercheck, on a tiny hand-written site in a temporary folder.

They need a Chromium and Playwright (``make check-book`` installs both) and are skipped,
saying so, without them. Nothing leaves the machine: the site is served from 127.0.0.1 and
the one page that asks for another host has that request aborted.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest

from fgtutor import browsercheck as bc
from fgtutor import mathjax


def _chromium() -> str:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("Playwright is not installed (`make setup` installs it from requirements.txt)")
    try:
        return bc.find_chromium()
    except bc.BrowserCheckError as exc:
        pytest.skip(f"no usable Chromium ({exc})")


def png(width: int = 4, height: int = 3) -> bytes:
    """A tiny valid grey PNG."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + b"\x80" * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def html(body: str, head: str = "") -> str:
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>t</title>{head}</head>"
            f"<body><main style='width: 400px'>{body}</main></body></html>")


LONG = "x = " + " + ".join(f"value_{i}" for i in range(40))

SITE = {
    "index.html": html("<h1 id='top'>Clean</h1><p>Some text, $5 and 10$.</p><img src='_images/dot.png'>"
                       "<a href='bad.html#intro'>bad</a> <a href='#top'>up</a> <a href='sub/'>sub</a>"
                       "<a href='https://example.org/elsewhere'>outside (a link, not a request)</a>"
                       "<div class='highlight'><pre style='overflow: auto'>short = 1\n</pre></div>"),
    "sub/index.html": html("<p id='here'>A folder's page</p><a href='../index.html#top'>home</a>"),
    "bad.html": html(r"<h1 id='intro'>Bad</h1><p>Raw maths: <span class='math'>\(x^2\)</span></p>"
                     "<img src='missing.png'><a href='nowhere.html'>gone</a> <a href='index.html#nope'>no anchor</a>"
                     f"<div class='highlight'><pre style='overflow: auto'>ok = 1\n{LONG}\n</pre></div>"
                     "<script>undefinedFunction()</script>",
                     head="<script src='https://cdn.example.org/lib.js'></script>"),
}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("site")
    for name, text in SITE.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (root / "_images").mkdir()
    (root / "_images" / "dot.png").write_bytes(png())
    return root


@pytest.fixture(scope="module")
def reports(site) -> dict:
    chromium = _chromium()
    shots = site.parent / "shots"
    return {r.page: r for r in bc.check_site(site, shots=shots, chromium=chromium)}


def test_site_pages_skips_underscore_folders(site):
    assert bc.site_pages(site) == ["bad.html", "index.html", "sub/index.html"]


def test_a_clean_page_passes_and_gets_a_screenshot(reports, site):
    assert reports["index.html"].problems == []
    assert reports["sub/index.html"].problems == []
    shot = site.parent / "shots" / "index.png"
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (site.parent / "shots" / "sub" / "index.png").is_file()


def test_a_bad_page_reports_every_problem(reports):
    problems = "\n".join(reports["bad.html"].problems)
    assert r"raw TeX in the text (maths not typeset): '\\(x^2\\)'" in problems
    assert "maths not typeset (MathJax did not run)" in problems
    assert "image did not load: missing.png" in problems
    assert "HTTP 404 for missing.png" in problems
    assert "broken link 'nowhere.html': no file nowhere.html" in problems
    assert "broken link 'index.html#nope': index.html has no id 'nope'" in problems
    assert "request to another host blocked: https://cdn.example.org/lib.js" in problems
    assert "JavaScript error: " in problems and "undefinedFunction" in problems
    assert f"code line of {len(LONG)} characters overflows (" in problems and repr(LONG[:60] + "…") in problems
    assert "'ok = 1'" not in problems  # only the long line is named
    # a missing file is reported once, not again as a console error
    assert not any(p.startswith("console error") and "404" in p for p in reports["bad.html"].problems)


def test_the_report_lists_every_failure_and_the_exit_code_says_so(reports, site, capsys, monkeypatch):
    text = bc.format_report(list(reports.values()))
    assert "FAIL bad.html" in text and "ok   index.html" in text
    assert "problem(s) on 1 of 3 page(s)" in text
    asked = []

    def checked(site, pages=None, **kwargs):
        asked.append(pages)
        return [reports[p] for p in (pages or reports)]

    monkeypatch.setattr(bc, "check_site", checked)
    args = [str(site), "--config", str(site / "none.yml")]
    assert bc.main(args + ["--page", "index.html"]) == 0 and asked[-1] == ["index.html"]
    assert bc.main(args) == 1
    assert "  bad.html: broken link 'nowhere.html'" in capsys.readouterr().out


def test_an_allowed_overflow_is_not_a_failure(site):
    reports = bc.check_site(site, chromium=_chromium(), pages=["bad.html"], allowed=[("bad*", "x = value_0")])
    assert not any("overflows" in p for p in reports[0].problems)


def test_colab_button_must_open_the_chapters_notebook(tmp_path):
    colab = bc.Colab("https://colab.research.google.com", "fgtutor/fgtutor", "main")
    good = "https://colab.research.google.com/github/fgtutor/fgtutor/blob/main/book/mlp.ipynb"
    assert colab.expected("book/mlp") == good
    (tmp_path / "_sources" / "book").mkdir(parents=True)
    (tmp_path / "_sources" / "book" / "mlp.ipynb").write_text("{}")
    assert bc.colab_problems(tmp_path, "book/mlp.html", [("x", good)], colab) == []
    assert "no Colab button" in bc.colab_problems(tmp_path, "book/mlp.html", [], colab)[0]
    wrong = good.replace("mlp", "cost")
    assert "points at" in bc.colab_problems(tmp_path, "book/mlp.html", [("x", wrong), ("y", good)], colab)[0]
    assert bc.colab_problems(tmp_path, "book/intro.html", [], colab) == []  # not a notebook


def test_colab_settings_come_from_the_books_config():
    colab = bc.colab_from_config(Path(__file__).resolve().parents[1] / "_config.yml")
    assert colab is not None and colab.expected("book/mlp").endswith("/github/fgtutor/fgtutor/blob/main/book/mlp.ipynb")


def test_no_site_or_no_browser_says_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(bc.BrowserCheckError, match="make book"):
        bc.check_site(tmp_path, chromium="/bin/true")
    monkeypatch.setenv("FGTUTOR_CHROMIUM", str(tmp_path / "nothing"))
    with pytest.raises(bc.BrowserCheckError, match="FGTUTOR_CHROMIUM"):
        bc.find_chromium()


def test_local_mathjax_typesets_offline(tmp_path):
    """With the local MathJax (`make mathjax` caches it), maths is typeset with no network."""
    try:
        folder = mathjax.ensure_mathjax(allow_fetch=False)
    except mathjax.MathJaxUnavailableError:
        pytest.skip("no local MathJax cached (`make mathjax` fetches it)")
    chromium = _chromium()
    (tmp_path / "_static").mkdir()
    (tmp_path / "_static" / "mathjax").symlink_to(folder)
    (tmp_path / "index.html").write_text(html(
        r"<p>Inline <span class='math'>\(\sum_i x_i^2\)</span> and</p>"
        r"<div class='math'>\[\nabla f(\theta) \cdot v\]</div>",
        head="<script defer src='_static/mathjax/tex-mml-chtml.js'></script>"))
    [report] = bc.check_site(tmp_path, shots=tmp_path / "shots", chromium=chromium)
    (tmp_path.parent / "mathjax-offline.png").write_bytes((tmp_path / "shots" / "index.png").read_bytes())
    assert report.problems == []
    assert "2 maths (MathJax ran)" in report.summary
