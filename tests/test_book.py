"""The book: chapter conventions, and every chapter executed through papermill with tiny
parameters (the full-size run is `make book`). These tests need MNIST: `make test` fetches it."""
import ast
import re
from pathlib import Path

import nbformat
import pandas as pd
import pytest
import yaml

from fgtutor.book import _rules, chapter_parameters, check_parameters, parse_value, run_chapter, table

ROOT = Path(__file__).resolve().parents[1]
TOC = yaml.safe_load((ROOT / "_toc.yml").read_text())
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
PAGES = [entry["file"] for entry in TOC["chapters"]]
CHAPTERS = [ROOT / f"{page}.ipynb" for page in PAGES if (ROOT / f"{page}.ipynb").exists()]  # the executable ones

# Small enough to run each chapter in seconds; every code path still runs.
TINY = {
    "testfns": {"beale_steps": 20, "rosenbrock_steps": 20, "sample_sizes": [5, 20], "n_arrows": 3},
    "mlp": {"epochs": 1, "n_train": 256, "seeds": [0, 1], "logreg_epochs": 1, "schedule_epochs": 1,
            "n_shuffles": 5, "strong_epochs": 1},
    "convnet": {"epochs": 1, "n_train": 128, "n_val": 500, "batch_size": 32, "seeds": [0, 1], "forward_lrs": [1e-3],
                "backprop_lrs": [0.1]},
    "lr_search": {"forward_lrs": [1e-4, 1e-3, 1e-2], "backprop_lrs": [1e-2, 1e-1, 1.0], "short_n_train": 128,
                  "search_n_train": 256, "search_epochs": 1, "final_epochs": 1, "seeds": [0, 1]},
    "cost": {"repeats": 2, "warmup": 1, "large_batch": 256, "loading_images": 2000},
    "beyond": {"epochs": 1, "n_train": 256, "seeds": [0, 1], "tangent_counts": [1, 4], "cosine_draws": 2,
               "warm_steps": 3, "num_tangents": 2,
               "grids": {"backprop": [["sgd", 0.1]], "FG-W": [["sgd", 1e-3], ["adam", 1e-4]], "FG-A": [["adam", 1e-3]],
                         "LG-FG-A": [["adam", 1e-3]], "backprop, local MLP": [["adam", 1e-3]]}},
    "recipe": {"epochs": 4, "n_train": 256, "lr_factors": [1.0]},
    "finals": {"fgw_epochs": 2, "fgw_search_epochs": 1, "fgw_lrs": [5e-4, 1.58e-3], "clip_lrs": [5e-4, 1.58e-3], "clipped_seeds": [0], "final_epochs": 2, "search_epochs": 1,
               "activity_lrs": [1e-4, 1e-3], "n_train": 256, "seeds": [0, 1]},
    "zeroth": {"epochs": 1, "search_epochs": 1, "n_train": 256, "n_val": 500, "seeds": [0, 1], "max_rates": 3,
               "eps_values": [1e-4, 1e-3, 1e-2], "eps_draws": 1, "cosine_draws": 2, "repeats": 2, "warmup": 1,
               "memory_batches": [64], "pretrain_n_train": 256, "finetune_epochs": 1,
               "finetune_forward_lrs": [1e-3, 1e-2], "finetune_backprop_lrs": [0.01, 0.1]},
    "rank1": {"models": ["mlp", "convnet"], "repeats": 2, "warmup": 1, "epochs": 1, "n_train": 256, "seeds": [0, 1]},
}
GLUE_REF = re.compile(r"\{glue(?::text)?\}`([A-Za-z0-9_]+)")
# the introduction quotes numbers glued in the chapters: {glue:text}`mlp.ipynb::name`
INTRO_REFS = set(re.findall(r"\{glue(?::text)?\}`([a-z0-9_]+\.ipynb)::([A-Za-z0-9_]+)", (ROOT / "book/intro.md").read_text()))
NUMREF = re.compile(r"\{numref\}`([^`<]+?)`|\{numref\}`[^`]*<([^>]+)>`")


def glued_names(nb) -> set:
    return {o["metadata"]["scrapbook"]["name"] for c in nb.cells if c.cell_type == "code"
            for o in c.get("outputs", []) if "scrapbook" in o.get("metadata", {})}


def referenced_names(nb) -> set:
    return {m for c in nb.cells if c.cell_type == "markdown" for m in GLUE_REF.findall(c.source)}


def test_every_chapter_in_the_toc_exists_and_has_tiny_parameters_here():
    assert (ROOT / f"{TOC['root']}.md").is_file()
    for page in PAGES:
        assert (ROOT / f"{page}.ipynb").is_file() or (ROOT / f"{page}.md").is_file(), page
    for path in CHAPTERS:
        assert path.stem in TINY, f"add tiny parameters for {path.stem} to TINY"


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_follows_the_conventions(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "commit chapters with outputs cleared"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    assert "What you will learn" in nb.cells[0].source
    # the Colab cell comes first, installs from the one repository URL in _config.yml
    assert "google.colab" in code[0].source and CONFIG["repository"]["url"] in code[0].source
    tagged = [i for i, c in enumerate(code) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell tagged 'parameters'"
    # the cell right after the parameters validates them in one call; set-up is collapsed
    assert "check_parameters(globals())" in code[tagged[0] + 1].source
    assert len(code[tagged[0] + 1].source.splitlines()) <= 3, "the checks are one helper call, not a dozen lines"
    assert "hide-cell" in code[0].metadata.get("tags", []) and "hide-input" in code[tagged[0] + 1].metadata["tags"]
    markdown = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    # roles are not expanded inside math: a glued number there would print as source
    math = re.findall(r"\$\$.*?\$\$|\$[^$]+\$", markdown, flags=re.S)
    assert not [m for m in math if "{glue" in m], "put {glue:text} outside $...$"
    assert "## Summary" in markdown and "## References" in markdown and "footbibliography" in markdown
    assert "Run it at full scale" in markdown
    # every figure has a name and a caption, and the prose refers to it by number
    figures = [c for c in code if re.search(r"\bplot_\w+\(", c.source)]
    names = [c.metadata.get("mystnb", {}).get("figure", {}).get("name") for c in figures]
    assert all(names) and all(c.metadata["mystnb"]["figure"].get("caption") for c in figures)
    referenced = {a or b for a, b in NUMREF.findall(markdown)}
    assert set(names) <= referenced, f"figures never referred to by number: {set(names) - referenced}"
    assert "title=" not in "".join(c.source for c in figures), "titles go in the caption, not the image"
    # two to four exercises, each with a solution hidden in a dropdown
    exercises = re.findall(r"```\{exercise\}\n:label: (\S+)", markdown)
    solutions = re.findall(r"```\{solution(?:-start)?\} (\S+)\n:class: dropdown", markdown)
    assert "## Exercises" in markdown and 2 <= len(exercises) <= 4 and sorted(solutions) == sorted(exercises)


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_runs_with_tiny_parameters_and_glues_every_number_its_prose_quotes(path, tmp_path):
    out = run_chapter(path, tmp_path / f"{path.stem}.ipynb", TINY[path.stem], progress=False)
    nb = nbformat.read(out, as_version=4)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    missing = referenced_names(nb) - glued_names(nb)
    assert referenced_names(nb) and not missing, f"prose refers to numbers that were not glued: {missing}"
    from_intro = {name for chapter, name in INTRO_REFS if chapter == path.name} - glued_names(nb)
    assert not from_intro, f"book/intro.md quotes numbers this chapter does not glue: {from_intro}"
    # glue numbers, write sentences: a glued string would be a fragment of prose
    texts = {o["metadata"]["scrapbook"]["name"]: o["data"][o["metadata"]["scrapbook"]["mime_prefix"] + "text/plain"]
             for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
             if "scrapbook" in o.get("metadata", {})}
    fragments = {k: v for k, v in texts.items() if v[:1] in "'\""}
    assert not fragments, f"glued text instead of numbers: {fragments}"
    assert not list(tmp_path.glob(".*partial*")), "no partial output left behind"
    # every table the chapter shows has a caption (fgtutor.book.table)
    tables = [o["data"]["text/html"] for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if "<table" in o.get("data", {}).get("text/html", "")]
    assert all("<caption>" in t for t in tables), "show tables with fgtutor.book.table(frame, caption)"


@pytest.mark.parametrize("params, message", [
    ({"lr": -1.0}, "lr=-1.0 is not allowed"),
    ({"model": "resnet"}, "model='resnet' is not allowed"),
    ({"device": "tpu"}, "device='tpu' is not allowed"),
])
def test_a_bad_parameter_value_fails_the_run_with_the_validation_message(params, message, tmp_path):
    with pytest.raises(Exception, match=re.escape(message)):
        run_chapter(ROOT / "book/mlp.ipynb", tmp_path / "out.ipynb", {"epochs": 1, "n_train": 64, "seeds": [0], **params},
                    progress=False)
    assert not (tmp_path / "out.ipynb").exists()
    assert (tmp_path / "out.failed.ipynb").exists(), "the failed run is kept for inspection"


def test_an_unknown_parameter_name_is_rejected_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="no parameter named 'epoch'.*epochs"):
        run_chapter(ROOT / "book/mlp.ipynb", tmp_path / "out.ipynb", {"epoch": 50})
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_every_assignment_in_the_parameters_cell_can_be_set(path):
    # papermill silently skips a line it cannot parse (e.g. a comment holding "="), which
    # would make a declared parameter impossible to override
    nb = nbformat.read(path, as_version=4)
    [cell] = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assigned = {t.id for node in ast.parse(cell.source).body if isinstance(node, ast.Assign)
                for t in node.targets if isinstance(t, ast.Name)}
    assert assigned == set(chapter_parameters(path))


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_every_chapter_parameter_has_a_check(path):
    unchecked = set(chapter_parameters(path)) - set(_rules())
    assert not unchecked, f"add a rule for {unchecked} to fgtutor.book._rules"


@pytest.mark.parametrize("namespace, message", [
    ({"epochs": 0}, "epochs=0 is not allowed: use a positive integer"),
    ({"lr": "fast"}, "lr='fast' is not allowed"),
    ({"seeds": [0, 0]}, "seeds=[0, 0] is not allowed"),
    ({"forward_lrs": []}, "forward_lrs=[] is not allowed: use a non-empty list"),
    ({"backprop_lrs": [0.1, -1]}, "backprop_lrs entry=-1 is not allowed"),
    ({"beale_start": [1.0]}, "beale_start=[1.0] is not allowed: use two numbers"),
    ({"sampler": "uniform"}, "sampler='uniform' is not allowed: use one of"),
    ({"retrain": "yes"}, "retrain='yes' is not allowed"),
    ({"n_train": 55_000, "n_val": 10_000}, "add up to more than MNIST's 60,000"),
    ({"device": "tpu"}, "device='tpu' is not allowed"),
])
def test_check_parameters_names_the_bad_parameter_and_what_is_allowed(namespace, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_parameters({"pd": object(), **namespace})  # other globals (imports) are ignored


def test_check_parameters_returns_the_device_and_accepts_good_values():
    assert check_parameters({"epochs": 2, "seeds": [0, 1], "forward_lrs": [1e-3], "device": "cpu"}).type == "cpu"
    assert check_parameters({"epochs": 2}) is None


def test_chapter_parameters_lists_the_parameters_cell():
    params = chapter_parameters(ROOT / "book/mlp.ipynb")
    assert {"epochs", "lr", "batch_size", "seeds", "device", "model", "retrain"} <= set(params)


@pytest.mark.parametrize("text, value", [("50", 50), ("1e-3", 1e-3), ("0.5", 0.5), ("true", True),
                                         ("[1, 2]", [1, 2]), ("mlp", "mlp"), ("null", None)])
def test_command_line_values_are_read_as_numbers_lists_booleans_or_text(text, value):
    assert parse_value(text) == value


def test_the_cli_rejects_an_unknown_parameter_with_exit_code_2(capsys):
    from fgtutor.book import main
    assert main([str(ROOT / "book/mlp.ipynb"), "-p", "epoch", "3"]) == 2
    assert "no parameter named 'epoch'" in capsys.readouterr().err


@pytest.mark.parametrize("output, message", [(".", "is a directory"), ("book/mlp.ipynb", "is the input itself")])
def test_a_bad_output_path_is_rejected_before_the_chapter_runs(output, message, monkeypatch):
    monkeypatch.chdir(ROOT)
    with pytest.raises(ValueError, match=message):
        run_chapter(ROOT / "book/mlp.ipynb", output, {"epochs": 1})
    assert not list(ROOT.glob(".*partial*")) and not list((ROOT / "book").glob(".*partial*"))


def test_lists_of_numbers_in_e_notation_are_numbers():
    assert parse_value("[1e-4, 1e-3]") == [1e-4, 1e-3]


def test_table_shows_a_caption_and_rounded_numbers():
    html = table(pd.DataFrame({"loss": [2.123456789, float("nan")]}), "Scores after training.", digits=2).to_html()
    assert "<caption>Scores after training.</caption>" in html and ">2.12<" in html and "2.1234" not in html


def test_a_table_without_a_caption_is_refused():
    with pytest.raises(ValueError, match="caption is empty"):
        table(pd.DataFrame({"a": [1]}), "")
