"""What the chapters need besides the science: glue, and a checked runner.

``python -m fgtutor.book CHAPTER.ipynb [OUT.ipynb] -p epochs 50 -p lr 1e-3`` executes a
chapter with papermill, like ``papermill`` itself, but first rejects parameter names the
chapter does not declare (papermill only warns, and the run silently uses the default),
and writes the output notebook only when the run finished. The token after ``-p NAME``
is always its value, also when it starts with a minus (``-p beale_lr -1e-3``).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import yaml

from .utils import (DEVICES, check_choice, check_frame, check_positive, check_seeds, check_type, check_writable,
                    pick_device)


def glue(name: str, value: Any, display: bool = False) -> Any:
    """``myst_nb.glue`` when the book is being built; a no-op elsewhere (Colab, scripts).

    Chapters glue every number their prose quotes, so the text always matches the run.
    NumPy and 0-d torch scalars are glued as Python numbers, so that ``{glue:text}`x:.3f```
    can format them.
    """
    check_type("name", name, str, 'the name the prose refers to, e.g. "test_accuracy"')
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        value = value.item()
    try:
        from myst_nb import glue as myst_glue
    except ImportError:
        return value
    myst_glue(name, value, display=display)
    return value


def _positive_int(name: str, value) -> None:
    check_positive(name, value, integer=True)


def _non_negative_int(name: str, value) -> None:
    check_positive(name, value, allow_zero=True, integer=True)


def _non_negative(name: str, value) -> None:
    check_positive(name, value, allow_zero=True)


def _fraction(name: str, value) -> None:
    check_positive(name, value)
    if not value < 1:
        raise ValueError(f"{name}={value!r} is not allowed: use a fraction between 0 and 1, e.g. 0.9.")


def _list_of(check: Callable[[str, Any], None], example: str) -> Callable[[str, Any], None]:
    def check_list(name: str, value) -> None:
        if not isinstance(value, (list, tuple)) or not value:
            raise ValueError(f"{name}={value!r} is not allowed: use a non-empty list, e.g. {example}.")
        for item in value:
            check(f"{name} entry", item)
    return check_list


def _point(name: str, value) -> None:
    if not (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise ValueError(f"{name}={value!r} is not allowed: use two numbers [x, y].")


def _grids(name: str, value) -> None:
    """A dict of estimator → non-empty list of [optimizer, learning rate] candidates."""
    from .train import OPTIMIZERS

    example = "{'backprop': [['sgd', 0.1], ['adam', 0.001]]}"
    if not isinstance(value, dict) or not value:
        raise ValueError(f"{name}={value!r} is not allowed: use a dict of candidate lists, e.g. {example}.")
    for key, candidates in value.items():
        if not isinstance(candidates, (list, tuple)) or not candidates or not all(
                isinstance(c, (list, tuple)) and len(c) == 2 and c[0] in OPTIMIZERS
                and isinstance(c[1], (int, float)) and not isinstance(c[1], bool) and c[1] > 0 for c in candidates):
            raise ValueError(f"{name}[{key!r}]={candidates!r} is not allowed: use a non-empty list of "
                             f"[optimizer, learning rate] pairs, optimizer one of {', '.join(OPTIMIZERS)}, "
                             "e.g. [['sgd', 0.1], ['adam', 0.001]].")


def _one_of(*allowed) -> Callable[[str, Any], None]:
    return lambda name, value: check_choice(name, value, allowed)


def _rules() -> dict[str, Callable[[str, Any], None]]:
    """How every chapter parameter of the book is checked, by name."""
    from .models import MODELS
    from .tangents import SAMPLERS

    rules = {
        "model": _one_of(*MODELS), "models": _list_of(_one_of(*MODELS), "['mlp', 'convnet']"),
        "padding": _one_of(0, 1), "sampler": _one_of(*SAMPLERS), "retrain": _one_of(True, False),
        "decay": _non_negative, "warmup": _non_negative_int, "seed": _non_negative_int,
        "seeds": lambda name, value: check_seeds(name, value),
        "forward_lrs": _list_of(check_positive, "[1e-4, 1e-3]"),
        "backprop_lrs": _list_of(check_positive, "[0.01, 0.1]"),
        "recipe_forward_lrs": _list_of(check_positive, "[1e-5, 1e-4]"),
        "recipe_backprop_lrs": _list_of(check_positive, "[1e-4, 1e-3]"),
        "local_lrs": _list_of(check_positive, "[3e-4, 1e-3]"),
        "zeroth_lrs": _list_of(check_positive, "[1e-4, 3e-4]"),
        "finetune_forward_lrs": _list_of(check_positive, "[1e-3, 1e-2]"),
        "finetune_backprop_lrs": _list_of(check_positive, "[0.01, 0.1]"),
        "eps_grid": _list_of(check_positive, "[1e-4, 1e-3]"),
        "eps_values": _list_of(check_positive, "[1e-6, 1e-3]"),
        "memory_batches": _list_of(_positive_int, "[64, 4096]"),
        "sample_sizes": _list_of(_positive_int, "[10, 100, 1000]"),
        "device": _one_of(*DEVICES),
        "grids": _grids, "tangent_counts": _list_of(_positive_int, "[1, 4, 16]"),
        "lr_factors": _list_of(check_positive, "[0.316, 1.0, 3.16]"),
        "fgw_lrs": _list_of(check_positive, "[5e-4, 1.58e-3]"),
        "activity_lrs": _list_of(check_positive, "[1e-4, 1e-3]"),
        "clip_lrs": _list_of(check_positive, "[5e-4, 1.58e-3]"),
        "clipped_seeds": lambda name, value: check_seeds(name, value),
        "target_accuracy": _fraction,
    }
    rules.update(dict.fromkeys(("lr", "forward_lr", "backprop_lr", "pretrain_lr", "beale_lr", "rosenbrock_lr", "strong_lr"), check_positive))
    rules.update(dict.fromkeys(("beale_start", "rosenbrock_start", "sample_point"), _point))
    rules.update(dict.fromkeys((
        "epochs", "logreg_epochs", "schedule_epochs", "analysis_epochs", "short_epochs", "search_epochs",
        "final_epochs", "fgw_epochs", "pretrain_epochs", "finetune_epochs", "finetune_search_epochs", "pretrain_n_train", "fgw_search_epochs", "strong_epochs", "batch_size", "large_batch", "n_train", "short_n_train", "search_n_train", "n_val",
        "smooth", "max_rates", "eps_draws", "n_shuffles", "num_tangents", "cosine_draws", "warm_steps", "repeats", "loading_images", "beale_steps", "rosenbrock_steps", "n_arrows"),
        _positive_int))
    return rules


def check_parameters(namespace: dict) -> Any:
    """Check every chapter parameter found in ``namespace`` (a chapter passes ``globals()``)
    before any time is spent, raising ``ValueError`` that names the parameter and says what
    is allowed. Returns the device to use (``pick_device``) when there is a ``device``
    parameter, else None.

    Every parameter of the book is checked by its name (``_rules``), so chapters that
    share a parameter share its check; a test makes sure every chapter parameter has one.
    """
    if not isinstance(namespace, Mapping):
        raise ValueError(f"namespace={type(namespace).__name__} is not allowed: use a dict of parameter values; "
                         "a chapter passes globals().")
    rules = _rules()
    for name, check in rules.items():
        if name in namespace:
            check(name, namespace[name])
    n_val = namespace.get("n_val", 0)
    for name in ("n_train", "short_n_train", "search_n_train", "pretrain_n_train"):
        if name in namespace and namespace[name] + n_val > 60_000:
            raise ValueError(f"{name}={namespace[name]} and n_val={n_val} add up to more than MNIST's 60,000 "
                             "training images: lower one of them.")
    return pick_device(namespace["device"]) if "device" in namespace else None


def table(frame: Any, caption: str, digits: int = 3) -> Any:
    """A DataFrame as the book shows it: with a caption (above the table) and numbers
    rounded to ``digits`` decimals, where a bare DataFrame would print six. Returns a
    pandas ``Styler``, which a notebook displays as an HTML table."""
    check_frame("frame", frame, [], "a pandas DataFrame")
    check_type("caption", caption, str, "a sentence that says what the table shows")
    check_positive("digits", digits, allow_zero=True, integer=True)
    if not caption:
        raise ValueError("caption is empty: say what the table shows, in a sentence.")
    def label(value: Any) -> Any:  # row and column labels such as learning rates: 3 significant digits
        return f"{value:.3g}" if isinstance(value, float) else value

    return (frame.style.set_caption(caption).format(precision=digits, thousands=",", na_rep="–")
            .format_index(label, axis=0).format_index(label, axis=1))


def chapter_parameters(notebook: str | Path) -> dict:
    """The parameters a chapter declares in its cell tagged ``parameters``: name -> default."""
    import papermill

    params = papermill.inspect_notebook(str(_check_notebook(notebook)))
    if not params:
        raise ValueError(f"{notebook} has no cell tagged 'parameters'.")
    return {name: info["default"] for name, info in params.items()}


def _check_notebook(notebook: Union[str, Path]) -> Path:
    """The path of an existing notebook file, else ``ValueError`` naming it."""
    check_type("notebook", notebook, (str, os.PathLike), "the path of a chapter, e.g. 'book/mlp.ipynb'")
    if not Path(notebook).is_file():
        problem = "is a folder, not a notebook" if Path(notebook).is_dir() else "does not exist"
        raise ValueError(f"notebook={str(notebook)!r} {problem}: give a chapter, e.g. book/mlp.ipynb.")
    return Path(notebook)


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

    notebook = _check_notebook(notebook)
    if parameters is not None:
        check_type("parameters", parameters, dict, 'None or a dict of parameter values, e.g. {"epochs": 1}')
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
    check_type("text", text, str, "the text of a command-line value, e.g. '1e-3'")
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fgtutor.book", description=__doc__.split("\n\n")[1])
    parser.add_argument("notebook", help="a chapter, e.g. book/mlp.ipynb")
    parser.add_argument("output", nargs="?", help="executed notebook (default runs/<chapter>-out.ipynb)")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="set a parameter: 50, -1e-3, true, [1, 2] and mlp are read as int, float, bool, list, "
                             "text (the token after NAME is the value, even when it starts with -)")
    parser.add_argument("--list", action="store_true", help="print the chapter's parameters and exit")
    return parser


def _parameter_flag(token: str) -> Optional[list[str]]:
    """What a ``-p`` flag carries in the token itself: ``[]`` for ``-p``, ``--parameter``
    or an abbreviation of it (argparse accepts ``--param``), ``[NAME]`` for ``-pNAME``,
    ``-p=NAME`` or ``--parameter=NAME``; None when ``token`` is not a ``-p`` flag."""
    flag, equals, attached = token.partition("=")
    if len(flag) > 2 and "--parameter".startswith(flag):
        return [attached] if equals else []
    if token.startswith("-p"):
        rest = token[2:].removeprefix("=")
        return [rest] if rest else []
    return None


def _take_parameters(argv: list[str], parser: argparse.ArgumentParser) -> tuple[list[str], list[list[str]]]:
    """Pull every ``-p NAME VALUE`` out of ``argv`` before argparse reads it: argparse takes
    a value that starts with a minus for an option unless it looks like a negative number
    to it, and ``-1e-3`` or ``-inf`` do not (it knows only ``-2`` and ``-.5`` forms), so it
    would answer "expected 2 arguments". Here the two tokens after ``-p`` are NAME and
    VALUE, whatever they look like. Returns the other tokens and the pairs."""
    rest, pairs, i = [], [], 0
    while i < len(argv):
        if argv[i] == "--":  # everything after it is positional: leave it to argparse
            return rest + argv[i:], pairs
        carried = _parameter_flag(argv[i])
        if carried is None:
            rest.append(argv[i])
            i += 1
            continue
        needed = 2 - len(carried)  # tokens still to take after the flag
        pair = carried + argv[i + 1:i + 1 + needed]
        if len(pair) != 2:
            parser.error(f"{argv[i]} needs a NAME and a VALUE, e.g. -p epochs 50 or -p lr -1e-3.")
        pairs.append(pair)
        i += 1 + needed
    return rest, pairs


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The command line of ``python -m fgtutor.book``: ``notebook``, ``output``, ``list`` and
    ``parameter`` (the ``[NAME, VALUE]`` pairs of ``-p``, as text). Exits with status 2 and
    argparse's usage message when the command line is malformed."""
    parser = _parser()
    rest, pairs = _take_parameters(list(sys.argv[1:] if argv is None else argv), parser)
    args = parser.parse_args(rest)
    args.parameter = pairs
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
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
