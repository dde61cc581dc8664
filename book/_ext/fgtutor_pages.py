"""Sphinx extension for the book's pages: they work offline and log no error in the console.

- MathJax comes from ``_static/mathjax``, a local copy that ``fgtutor.mathjax`` fetches
  with npm and verifies (``make mathjax``); without one the pages load it from the CDN,
  and the build says so in one line.
- Long code lines and printed output wrap instead of scrolling sideways
  (``static/fgtutor.css``).
- Each inline script is written once. Sphinx 7.4 adds an inline script registered after
  the builder started (sphinx-togglebutton's selector, sphinx-thebe's ``const
  THEBE_JS_URL``) a second time, and the second ``const`` is a SyntaxError in every page.

``_config.yml`` loads it with ``sphinx: local_extensions: {fgtutor_pages: book/_ext}``.
``make check-book`` (``fgtutor.browsercheck``) checks the pages in a browser.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

from sphinx.util import logging

from fgtutor import mathjax

logger = logging.getLogger(__name__)


def use_local_mathjax(app, config) -> None:
    """``config-inited``: serve the local MathJax from ``_static/mathjax``, or say in one
    line that the pages load it from the CDN."""
    try:
        folder = mathjax.ensure_mathjax()
    except mathjax.MathJaxUnavailableError as exc:
        # info, not warning: a build with -W still succeeds, with pages that need the internet
        reason = str(exc).split(". To place it")[0]
        logger.info(f"fgtutor_pages: {reason}; the pages load MathJax from the CDN ({mathjax.CDN_URL}) "
                    "and need the internet to show maths (`python -m fgtutor.mathjax` says more)")
        return
    config.html_static_path = [*config.html_static_path, str(folder.parent)]
    config.mathjax_path = f"{mathjax.STATIC_NAME}/{mathjax.ENTRY}"  # relative: under _static/
    logger.info(f"fgtutor_pages: the pages load the local MathJax {mathjax.VERSION} from "
                f"_static/{mathjax.STATIC_NAME} ({folder})")


def _key(script) -> tuple:
    return (script.filename or "", script.priority, tuple(sorted(script.attributes.items())))


def drop_repeated_scripts(app, pagename: str, templatename: str, context: Dict[str, Any], doctree) -> None:
    """``html-page-context``: keep the first of scripts that differ only in ``None`` vs ``""``."""
    scripts = context.get("script_files")
    if isinstance(scripts, list):
        seen: set = set()
        scripts[:] = [s for s in scripts if not (_key(s) in seen or seen.add(_key(s)))]


def add_stylesheet(app) -> None:
    """``builder-inited``: serve and load ``static/fgtutor.css``."""
    app.config.html_static_path = [*app.config.html_static_path, str(Path(__file__).parent / "static")]
    app.add_css_file("fgtutor.css")


def setup(app) -> Dict[str, Any]:
    """Sphinx entry point."""
    app.setup_extension("sphinx.ext.mathjax")
    app.connect("builder-inited", add_stylesheet)
    app.connect("config-inited", use_local_mathjax)
    app.connect("html-page-context", drop_repeated_scripts, priority=900)  # after the others add theirs
    return {"version": mathjax.VERSION, "parallel_read_safe": True, "parallel_write_safe": True}
