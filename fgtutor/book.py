"""What the chapters need besides the science: glue, and a checked runner.

``python -m fgtutor.book CHAPTER.ipynb [OUT.ipynb] -p epochs 50 -p lr 1e-3`` executes a
chapter with papermill, like ``papermill`` itself, but first rejects parameter names the
chapter does not declare (papermill only warns, and the run silently uses the default),
and writes the output notebook only when the run finished.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Optional

import yaml

from .utils import check_writable


def glue(name: str, value: Any, display: bool = False) -> Any:
    """``myst_nb.glue`` when the book is being built; a no-op elsewhere (Colab, scripts).

    Chapters glue every number their prose quotes, so the text always matches the run.
    NumPy and 0-d torch scalars are glued as Python numbers, so that ``{glue:text}`x:.3f```
    can format them.
    """
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        value = value.item()
    try:
        from myst_nb import glue as myst_glue
    except ImportError:
        return value
    myst_glue(name, value, display=display)
    return value


def chapter_parameters(notebook: str | Path) -> dict:
    """The parameters a chapter declares in its cell tagged ``parameters``: name -> default."""
    import papermill

    params = papermill.inspect_notebook(str(notebook))
    if not params:
        raise ValueError(f"{notebook} has no cell tagged 'parameters'.")
    return {name: info["default"] for name, info in params.items()}


def run_chapter(notebook: str | Path, output: str | Path | None = None, parameters: Optional[dict] = None,
                kernel: str = "python3", progress: bool = True, log_output: bool = False) -> Path:
    """Execute ``notebook`` with ``parameters`` into ``output`` (default ``runs/<name>-out.ipynb``).

    Unknown parameter names raise ``ValueError`` listing the chapter's parameters. The
    notebook is executed into a temporary file beside ``output`` and renamed on success;
    if a cell fails, the executed notebook is kept as ``<output>.failed.ipynb`` for
    inspection and the error is raised. ``log_output`` streams the cells' output to this
    process's stdout and stderr as they run.
    """
    import papermill

    notebook = Path(notebook)
    if not notebook.is_file():
        raise ValueError(f"notebook={str(notebook)!r} does not exist.")
    parameters = dict(parameters or {})
    declared = chapter_parameters(notebook)
    unknown = sorted(set(parameters) - set(declared))
    if unknown:
        allowed = ", ".join(f"{k} (default {v})" for k, v in declared.items())
        raise ValueError(f"{notebook.name} has no parameter named {', '.join(map(repr, unknown))}. "
                         f"Its parameters are: {allowed}.")
    output = check_writable("output", Path(output) if output else Path("runs") / f"{notebook.stem}-out.ipynb",
                            not_same_as=notebook)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.stem}.partial.ipynb")
    try:
        papermill.execute_notebook(str(notebook), str(partial), parameters=parameters, kernel_name=kernel,
                                   progress_bar=progress, cwd=str(notebook.parent), log_output=log_output,
                                   **({"stdout_file": sys.stdout, "stderr_file": sys.stderr} if log_output else {}))
    except BaseException:
        if partial.exists():
            os.replace(partial, output.with_name(f"{output.stem}.failed.ipynb"))
        raise
    os.replace(partial, output)
    return output


def parse_value(text: str) -> Any:
    """Read a command-line value: int, then float (``1e-3`` too, which YAML reads as a
    string), then YAML (``true``, ``null``, ``[1, 2]``), else the text itself. Inside a
    list or dict, strings that read as numbers (``[1e-4, 1e-3]``) become numbers too."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, list):
        return [parse_value(v) if isinstance(v, str) else v for v in value]
    if isinstance(value, dict):
        return {k: parse_value(v) if isinstance(v, str) else v for k, v in value.items()}
    return value


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fgtutor.book", description=__doc__.split("\n\n")[1])
    parser.add_argument("notebook", help="a chapter, e.g. book/mlp.ipynb")
    parser.add_argument("output", nargs="?", help="executed notebook (default runs/<chapter>-out.ipynb)")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="set a parameter: 50, 1e-3, true, [1, 2] and mlp are read as int, float, bool, list, text")
    parser.add_argument("--list", action="store_true", help="print the chapter's parameters and exit")
    args = parser.parse_args(argv)
    try:
        if args.list:
            for name, default in chapter_parameters(args.notebook).items():
                print(f"{name} = {default}")
            return 0
        params = {name: parse_value(value) for name, value in args.parameter}
        out = run_chapter(args.notebook, args.output, params)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # papermill's execution error carries the failing cell's message
        print(f"error: the chapter failed:\n{exc}", file=sys.stderr)
        return 1
    print(f"executed notebook: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
