r"""Open every page of the built book in a real browser and check what a reader sees.

``python -m fgtutor.browsercheck _build/html`` (``make check-book``) serves the site from
127.0.0.1, opens each page in Debian's headless Chromium, driven by Playwright pointed at
that system browser (nothing is downloaded), and checks that

- the maths is typeset: no raw ``\(``, ``\[``, ``$$`` or ``$\cmd`` in the text outside
  code, a MathJax container in every ``.math`` element, no MathJax error;
- every image has loaded, and no local file the page asks for is missing;
- the console shows no error;
- every local link leads to an existing file and anchor;
- no request leaves the machine (those that try are aborted and reported);
- no code cell, output, table or equation overflows horizontally (a scroll bar); each
  overflowing line is reported with its first characters;
- a notebook chapter's Colab button opens that chapter's notebook.

It saves a full-page screenshot of every page as ``_build/screenshots/<page>.png``, prints
a report per page and exits 1 listing every failure.
"""

from __future__ import annotations

import argparse
import fnmatch
import functools
import http.server
import os
import shutil
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Set, Tuple
from urllib.parse import unquote, urljoin, urlsplit

#: Chromium executables tried in order after $FGTUTOR_CHROMIUM: Debian's real binaries
#: first (the /usr/bin names are shell wrappers around them)
CHROMIUM_CANDIDATES = (
    "/usr/lib/chromium/chromium-headless-shell",
    "chromium-headless-shell",
    "/usr/lib/chromium/chromium",
    "chromium",
    "chromium-browser",
    "google-chrome",
)
#: (page glob, start of the overflowing line) pairs accepted on purpose; keep it short
ALLOWED_OVERFLOWS: Tuple[Tuple[str, str], ...] = ()
#: a laptop screen: at 1280 px the book theme shows both sidebars, and its code column is at
#: its narrowest (about 77 characters; 85 at 1366 px, 89 from 1440 px)
VIEWPORT = {"width": 1280, "height": 800}
PAGE_TIMEOUT_MS = 120_000  # per step (open, screenshot): generous, for a busy machine

# Wait until MathJax has typeset the page (when it loaded), fonts are in and every image
# has loaded or failed; at most 30 s. Returns whether MathJax ran (null: still waiting).
_SETTLE_JS = """async () => {
  const settle = (async () => {
    const mj = window.MathJax;
    if (mj && mj.startup && mj.startup.promise) await mj.startup.promise;
    for (const img of document.images) img.loading = 'eager';
    await Promise.all([...document.images].map(img => img.complete ? null : new Promise(done => {
      img.addEventListener('load', done); img.addEventListener('error', done); })));
    if (document.fonts) await document.fonts.ready;
    return !!(mj && mj.startup);
  })();
  return Promise.race([settle, new Promise(done => setTimeout(() => done(null), 30000))]);
}"""

# What a reader sees: maths, images, links, anchors, overflow.
_INSPECT_JS = r"""() => {
  const clip = (s, n) => { s = s.replace(/\s+/g, ' ').trim(); return s.length > n ? s.slice(0, n) + '…' : s; };
  const text = document.body.cloneNode(true);
  text.querySelectorAll('pre, code, script, style, textarea, noscript, mjx-container').forEach(e => e.remove());
  const flat = text.textContent;
  const raw = [];
  const closing = {'\\(': '\\)', '\\[': '\\]', '$$': '$$'};
  for (const m of flat.matchAll(/\\\(|\\\[|\$\$|\$\\[A-Za-z]+/g)) {
    const close = closing[m[0]] || '$', end = flat.indexOf(close, m.index + m[0].length);
    raw.push(clip(flat.slice(m.index, end < 0 ? m.index + 40 : end + close.length), 40));
  }
  const maths = [...document.querySelectorAll('span.math, div.math')];
  const untypeset = maths.filter(e => !e.querySelector('mjx-container')).map(e => clip(e.textContent, 40));
  const mathErrors = [...document.querySelectorAll('mjx-merror')].map(
    e => clip(e.getAttribute('data-mjx-error') || e.textContent, 60));
  const images = [...document.images].map(
    i => ({src: i.getAttribute('src') || '', ok: i.complete && i.naturalWidth > 0}));
  const links = [...document.querySelectorAll('a[href]')].map(a => [a.getAttribute('href'), a.href]);
  const preconnects = [...document.querySelectorAll('link[rel~=preconnect], link[rel~=dns-prefetch]')].map(l => l.href);
  // horizontal overflow: an element that scrolls sideways, innermost only
  const root = document.querySelector('main') || document.body;
  let wide = [...root.querySelectorAll('*')].filter(e => {
    if (e.clientWidth === 0 || e.scrollWidth <= e.clientWidth + 1) return false;
    const ox = getComputedStyle(e).overflowX;
    return ox === 'auto' || ox === 'scroll';
  });
  wide = wide.filter(e => !wide.some(o => o !== e && e.contains(o)));
  const ctx = document.createElement('canvas').getContext('2d');
  const overflows = wide.map(e => {
    const by = e.scrollWidth - e.clientWidth;
    const pre = e.matches('pre') ? e : e.querySelector('pre');
    const where = e.closest('.cell_output, .output') ? 'output' : 'code';
    if (pre) {  // each line too long, its length in characters, and how many fit
      const style = getComputedStyle(pre);
      ctx.font = style.font;
      const room = e.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
      const fit = Math.floor(room / ctx.measureText('0').width);
      const long = pre.textContent.split('\n').filter(l => ctx.measureText(l).width > room);
      const lines = (long.length ? long : [pre.textContent.split('\n')[0]]).map(
        l => ({text: l.trim().slice(0, 60) + (l.trim().length > 60 ? '…' : ''), chars: l.trimEnd().length}));
      return {kind: where, by, fit, lines};
    }
    const table = e.matches('table') ? e : e.querySelector('table');
    if (table) return {kind: where + ' table', by, lines: [{text: clip((table.rows[0] || table).textContent, 60)}]};
    const maths = e.closest('.math, mjx-container') || e.querySelector('mjx-container');
    const kind = maths ? 'equation' : e.tagName.toLowerCase();
    return {kind, by, lines: [{text: clip(e.textContent, 60)}]};
  });
  const pageWide = document.documentElement.scrollWidth - window.innerWidth;
  return {raw, maths: maths.length, untypeset, mathErrors, images, links, preconnects, overflows, pageWide};
}"""


class BrowserCheckError(RuntimeError):
    """The check could not run (no browser, no driver, no site); the message says what to do."""


@dataclass
class PageReport:
    """What one page showed: its problems (failures), and a one-line summary of what was seen."""

    page: str
    problems: List[str] = field(default_factory=list)
    summary: str = ""
    seconds: float = 0.0


# --------------------------------------------------------------------------
# The browser, the site, the server
# --------------------------------------------------------------------------


def find_chromium() -> str:
    """Return a Chromium executable: ``$FGTUTOR_CHROMIUM``, else Debian's, else one on PATH."""
    env = os.environ.get("FGTUTOR_CHROMIUM")
    if env:
        if shutil.which(env) is None:
            raise BrowserCheckError(f"FGTUTOR_CHROMIUM={env!r} is not an executable: point it at a Chromium binary.")
        return str(shutil.which(env))
    for name in CHROMIUM_CANDIDATES:
        path = shutil.which(name)
        if path is not None:
            return path
    raise BrowserCheckError(
        "no Chromium found: `make browser` installs Debian's (apt-get install chromium-headless-shell), "
        "or set FGTUTOR_CHROMIUM to a Chromium executable."
    )


def site_pages(site: Path) -> List[str]:
    """Return the site's pages: its .html files, relative, outside folders starting with ``_`` or ``.``."""
    pages = []
    for path in sorted(site.rglob("*.html")):
        rel = path.relative_to(site)
        if not any(part.startswith(("_", ".")) for part in rel.parts[:-1]):
            pages.append(rel.as_posix())
    return pages


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the base class's name)
        pass


class _QuietServer(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        """A tab closed while a file was still being sent is not a problem of the site."""
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


@contextmanager
def serve(site: Path) -> Iterator[str]:
    """Serve ``site`` on 127.0.0.1 (a free port) in a thread; yield its base URL."""
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = _QuietServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


# --------------------------------------------------------------------------
# Links and anchors (read from the files, not the network)
# --------------------------------------------------------------------------


class _Redirect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.target: Optional[str] = None

    def handle_starttag(self, tag: str, attrs: List[Tuple[str, Optional[str]]]) -> None:
        values = {k.lower(): v or "" for k, v in attrs}
        if tag == "meta" and values.get("http-equiv", "").lower() == "refresh":
            self.target = values.get("content", "").partition("url=")[2].strip() or None


def redirect_target(path: Path) -> Optional[str]:
    """Return where an HTML file sends the reader with ``<meta http-equiv="refresh">``, or None."""
    parser = _Redirect()
    parser.feed(path.read_text(errors="replace"))
    return parser.target


class _Anchors(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.names: Set[str] = set()

    def handle_starttag(self, tag: str, attrs: List[Tuple[str, Optional[str]]]) -> None:
        for key, value in attrs:
            if key == "id" or (tag == "a" and key == "name"):
                self.names.add(value or "")


@functools.lru_cache(maxsize=None)
def anchors(path: Path) -> frozenset:
    """Return the ids (and ``<a name>``) in an HTML file."""
    parser = _Anchors()
    parser.feed(path.read_text(errors="replace"))
    return frozenset(parser.names)


def link_problems(site: Path, links: Sequence[Tuple[str, str]], base: str) -> List[str]:
    """Check ``(href as written, resolved URL)`` pairs: a link to this server must lead to a
    file under ``site`` and, with ``#anchor``, to an element with that id."""
    host = urlsplit(base).netloc
    problems = []
    for written, resolved in links:
        url = urlsplit(resolved)
        if url.scheme not in ("http", "https") or url.netloc != host:
            continue
        target = site / unquote(url.path).lstrip("/")
        if url.path.endswith("/") or target.is_dir():
            target = target / "index.html"
        if not target.is_file():
            problems.append(f"broken link {written!r}: no file {target.relative_to(site).as_posix()}")
        elif url.fragment and target.suffix == ".html" and unquote(url.fragment) not in anchors(target):
            problems.append(f"broken link {written!r}: {target.relative_to(site).as_posix()} has no id "
                            f"{unquote(url.fragment)!r}")
    return sorted(set(problems))


@dataclass
class Colab:
    """Where a notebook chapter's Colab button must point:
    ``<colab_url>/github/<repo>/blob/<branch>/<path_to_book>/<page>.ipynb``."""

    colab_url: str
    repo: str
    branch: str
    path_to_book: str = ""

    def expected(self, page: str) -> str:
        book = self.path_to_book.strip("/")
        path = f"{book}/{page}" if book else page
        return f"{self.colab_url.rstrip('/')}/github/{self.repo}/blob/{self.branch}/{path}.ipynb"


def colab_from_config(path: Path) -> Optional[Colab]:
    """Read the Colab settings from Jupyter Book's ``_config.yml``; None without launch buttons."""
    import yaml

    config = yaml.safe_load(path.read_text()) or {}
    colab_url = (config.get("launch_buttons") or {}).get("colab_url")
    repository = config.get("repository") or {}
    if not colab_url or not repository.get("url"):
        return None
    repo = urlsplit(repository["url"]).path.strip("/").removesuffix(".git")
    return Colab(colab_url, repo, repository.get("branch", "main"), repository.get("path_to_book", ""))


def colab_problems(site: Path, page: str, links: Sequence[Tuple[str, str]], colab: Optional[Colab]) -> List[str]:
    """A page built from a notebook (``_sources/<page>.ipynb``) must have a Colab button that
    opens that notebook, and no page may point Colab at another one."""
    if colab is None:
        return []
    stem = page.removesuffix(".html")
    expected = colab.expected(stem)
    hrefs = [resolved for _, resolved in links if "colab.research.google.com" in resolved]
    problems = [f"Colab button points at {h}, not at {expected}" for h in sorted(set(hrefs)) if h != expected]
    if (site / "_sources" / f"{stem}.ipynb").is_file() and expected not in hrefs:
        problems.append(f"no Colab button for this notebook (expected a link to {expected})")
    return problems


# --------------------------------------------------------------------------
# One page
# --------------------------------------------------------------------------


def _allowed(page: str, line: str, allowed: Sequence[Tuple[str, str]]) -> bool:
    return any(fnmatch.fnmatch(page, glob) and line.startswith(start) for glob, start in allowed)


def _capped(what: str, snippets: Sequence[str], limit: int = 5) -> List[str]:
    """A problem line per snippet, at most ``limit`` of them, then how many more there are."""
    lines = [f"{what}: {snippet!r}" for snippet in snippets[:limit]]
    if len(snippets) > limit:
        lines.append(f"{what}: ... and {len(snippets) - limit} more")
    return lines


def inspection_problems(page: str, seen: Dict, mathjax_ran: Optional[bool],
                        allowed: Sequence[Tuple[str, str]] = ALLOWED_OVERFLOWS) -> List[str]:
    """Turn what ``_INSPECT_JS`` saw on ``page`` into problems, one line each."""
    problems = _capped("raw TeX in the text (maths not typeset)", seen["raw"])
    why = "MathJax did not run" if not mathjax_ran else "MathJax left them alone"
    problems += _capped(f"maths not typeset ({why})", seen["untypeset"])
    if mathjax_ran is None:
        problems.append("the page did not settle in 30 s (MathJax, fonts or images still loading)")
    problems += [f"MathJax error: {error}" for error in seen["mathErrors"]]
    problems += [f"image did not load: {image['src']}" for image in seen["images"] if not image["ok"]]
    problems += [f"preconnects to another host: {href}" for href in seen["preconnects"]]
    for wide in seen["overflows"]:
        for line in wide["lines"]:
            if _allowed(page, line["text"], allowed):
                continue
            if "chars" in line:
                problems.append(f"{wide['kind']} line of {line['chars']} characters overflows "
                                f"({wide['fit']} fit): {line['text']!r}")
            else:
                problems.append(f"{wide['kind']} overflows by {wide['by']} px: {line['text']!r}")
    if seen["pageWide"] > 1:
        problems.append(f"the page scrolls sideways by {seen['pageWide']} px")
    return problems


def check_page(context, base: str, site: Path, page: str, shots: Optional[Path],
               colab: Optional[Colab] = None, allowed: Sequence[Tuple[str, str]] = ALLOWED_OVERFLOWS) -> PageReport:
    """Open ``page`` in a new tab of ``context`` and check it; save its screenshot under ``shots``.

    A page that only redirects (Jupyter Book's top ``index.html``) is checked for its target."""
    start = time.perf_counter()
    report = PageReport(page)
    target = redirect_target(site / page)
    if target is not None:
        resolved = urljoin(base + page, target)
        report.problems = link_problems(site, [(target, resolved)], base)
        report.summary = f"redirects to {target}"
        return report
    host = urlsplit(base).netloc
    blocked: List[str] = []
    failed: Set[str] = set()

    def route(route) -> None:
        url = route.request.url
        if urlsplit(url).netloc == host:
            route.continue_()
        else:
            blocked.append(url)
            route.abort("blockedbyclient")

    def on_response(response) -> None:
        if response.status >= 400 and urlsplit(response.url).netloc == host:
            failed.add(response.url)
            report.problems.append(f"HTTP {response.status} for {response.url.removeprefix(base)}")

    def on_console(message) -> None:
        if message.type == "error":
            console.append(((message.location or {}).get("url", ""), " ".join(message.text.split())[:200]))

    console: List[Tuple[str, str]] = []
    tab = context.new_page()
    tab.route("**/*", route)
    tab.on("response", on_response)
    tab.on("console", on_console)
    tab.on("pageerror", lambda error: report.problems.append(f"JavaScript error: {error}"))
    try:
        tab.goto(base + page, wait_until="load")
        mathjax_ran = tab.evaluate(_SETTLE_JS)
        seen = tab.evaluate(_INSPECT_JS)
        if shots is not None:
            shot = shots / f"{page.removesuffix('.html')}.png"
            shot.parent.mkdir(parents=True, exist_ok=True)
            tab.screenshot(path=str(shot), full_page=True)
    except Exception as exc:  # a page that cannot be opened is a failure of that page only
        report.problems.append(f"could not check the page: {' '.join(str(exc).split())[:300]}")
        return report
    finally:
        tab.close()
        report.seconds = time.perf_counter() - start
    # a missing or blocked file also shows as a console error; it is reported once, above
    report.problems += [f"console error: {text}" for url, text in console if url not in failed and url not in blocked]
    report.problems += [f"request to another host blocked: {url}" for url in sorted(set(blocked))]
    report.problems += inspection_problems(page, seen, mathjax_ran, allowed)
    report.problems += link_problems(site, seen["links"], base)
    report.problems += colab_problems(site, page, seen["links"], colab)
    report.problems = list(dict.fromkeys(report.problems))  # each once, in order
    typeset = "MathJax ran" if mathjax_ran else "no MathJax"
    report.summary = (f"{seen['maths']} maths ({typeset}), {len(seen['images'])} images, "
                      f"{len(seen['links'])} links")
    return report


# --------------------------------------------------------------------------
# The whole site
# --------------------------------------------------------------------------


def _playwright():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        raise BrowserCheckError(f"Playwright is not installed ({exc}): `make setup` installs it from "
                                "requirements.txt (no `playwright install`: the system Chromium is used).") from None
    return sync_playwright


def check_site(site: Path, *, shots: Optional[Path] = None, chromium: Optional[str] = None,
               colab: Optional[Colab] = None, pages: Optional[Sequence[str]] = None,
               allowed: Sequence[Tuple[str, str]] = ALLOWED_OVERFLOWS,
               width: int = VIEWPORT["width"]) -> List[PageReport]:
    """Check every page of ``site`` (or ``pages``) in one headless Chromium; return the reports."""
    site = Path(site)
    if not (site / "index.html").is_file() and not pages:
        raise BrowserCheckError(f"{site}/index.html not found: build the book first (`make book`).")
    pages = list(pages) if pages else site_pages(site)
    chromium = chromium or find_chromium()
    sync_playwright = _playwright()
    anchors.cache_clear()
    with serve(site) as base, sync_playwright() as pw:
        try:
            browser = pw.chromium.launch(executable_path=chromium, headless=True)
        except Exception as exc:
            raise BrowserCheckError(f"could not start {chromium}: {' '.join(str(exc).split())[:300]}") from None
        try:
            context = browser.new_context(viewport={**VIEWPORT, "width": width}, service_workers="block")
            context.set_default_timeout(PAGE_TIMEOUT_MS)
            return [check_page(context, base, site, page, shots, colab, allowed) for page in pages]
        finally:
            browser.close()


def format_report(reports: Sequence[PageReport]) -> str:
    """A line per page, its problems indented below it, then every failure again in one list."""
    lines = []
    for r in reports:
        status = "FAIL" if r.problems else "ok  "
        lines.append(f"{status} {r.page}: {r.summary} ({r.seconds:.1f} s)")
        lines += [f"       - {p}" for p in r.problems]
    failures = [(r.page, p) for r in reports for p in r.problems]
    bad = sum(1 for r in reports if r.problems)
    if failures:
        lines.append(f"\nbrowsercheck: {len(failures)} problem(s) on {bad} of {len(reports)} page(s):")
        lines += [f"  {page}: {problem}" for page, problem in failures]
    else:
        lines.append(f"\nbrowsercheck: all {len(reports)} pages passed")
    return "\n".join(lines)


def _allow_arg(text: str) -> Tuple[str, str]:
    glob, sep, start = text.partition(":")
    if not sep or not glob or not start:
        raise argparse.ArgumentTypeError(f"{text!r}: use PAGE_GLOB:START_OF_LINE, e.g. 'book/cost.html:df = '")
    return glob, start


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m fgtutor.browsercheck [SITE]``: check every page, save screenshots, report."""
    parser = argparse.ArgumentParser(description="Check every page of the built book in headless Chromium.")
    parser.add_argument("site", nargs="?", type=Path, default=Path("_build/html"),
                        help="the built HTML (default: _build/html)")
    parser.add_argument("--screenshots", type=Path, default=None,
                        help="folder for the PNGs (default: screenshots/ beside SITE)")
    parser.add_argument("--config", type=Path, default=Path("_config.yml"),
                        help="Jupyter Book config giving the Colab button's target (default: _config.yml)")
    parser.add_argument("--page", action="append", default=None, help="check only this page (repeatable)")
    parser.add_argument("--width", type=int, default=VIEWPORT["width"],
                        help=f"browser window width in px (default: {VIEWPORT['width']})")
    parser.add_argument("--allow-overflow", action="append", type=_allow_arg, default=[],
                        metavar="PAGE_GLOB:START", help="accept an overflowing line on purpose (repeatable)")
    args = parser.parse_args(argv)
    shots = args.screenshots if args.screenshots is not None else args.site.parent / "screenshots"
    colab = colab_from_config(args.config) if args.config.is_file() else None
    start = time.perf_counter()
    try:
        reports = check_site(args.site, shots=shots, colab=colab, pages=args.page,
                             allowed=(*ALLOWED_OVERFLOWS, *args.allow_overflow), width=args.width)
    except BrowserCheckError as exc:
        print(f"browsercheck: {exc}", file=sys.stderr)
        return 2
    print(format_report(reports))
    print(f"screenshots: {shots}/ ({time.perf_counter() - start:.0f} s in all)")
    return 1 if any(r.problems for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())
