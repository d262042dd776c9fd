"""The repository as a study guide: the files form a stack, and every file:function the README
and docs/equations.md point a reader at exists."""

import ast
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

import experiments
import ptft
from conftest import ROOT

# README's layout, bottom to top: each file imports only files before it (no import circles)
STACK = ["common", "fast", "model", "tokenizer", "toyworld", "data", "hf", "options", "parallel", "compress", "checkpoint",
         "evaluation", "schedule", "train", "images", "finetuning", "deploy", "bench", "verdicts", "experiments", "ptft"]


def top_level_imports(name):
    """The project modules a file imports at its top level (not inside `if __name__ == "__main__"`)."""
    tree = ast.parse(open(os.path.join(ROOT, f"{name}.py"), encoding="utf-8").read())
    found = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found & set(STACK)


def test_every_file_imports_only_files_below_it_in_the_stack():
    assert sorted(STACK) == sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))
    for position, name in enumerate(STACK):
        assert top_level_imports(name) <= set(STACK[:position]), (name, top_level_imports(name) - set(STACK[:position]))


def defined_names(name):
    """Top-level functions, classes and constants of a file, and Class.method for their methods."""
    tree = ast.parse(open(os.path.join(ROOT, f"{name}.py"), encoding="utf-8").read())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
            if isinstance(node, ast.ClassDef):
                names.update(f"{node.name}.{item.name}" for item in node.body if isinstance(item, ast.FunctionDef))
        elif isinstance(node, ast.Assign):
            names.update(target.id for target in node.targets if isinstance(target, ast.Name))
    return names


@pytest.mark.parametrize("page", ["README.md", "docs/equations.md"])
def test_every_file_and_function_a_page_points_at_exists(page):
    text = open(os.path.join(ROOT, page), encoding="utf-8").read()
    references = re.findall(r"`(\w+)\.py[:]\s?([A-Za-z_][\w.]*)`", text)
    references += re.findall(r"`(\w+)\.py`: `([A-Za-z_][\w.]*)`", text)
    assert len(references) >= 10, "the page names functions as file.py:function"
    for module, function in references:
        assert module in STACK and function in defined_names(module), f"{page}: {module}.py:{function}"


def test_readme_is_a_front_page():
    # the verdict cells are results/claims.json's, generated (verdicts.combine_groups bounds
    # them); the hand-written rest is what must stay a front page
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    claims = json.load(open(os.path.join(ROOT, "results", "claims.json"), encoding="utf-8"))
    generated = sum(len(entry["verdict"]) for entry in claims.values())
    generated += len(experiments.curve_sentence(claims))  # C1 along the compute curve
    assert len(text) - generated <= 10_500


def heading_anchors(path):
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces to hyphens."""
    anchors = set()
    for line in open(path, encoding="utf-8"):
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def test_every_link_between_the_pages_leads_somewhere():
    pages = ["README.md"] + [os.path.join("docs", name) for name in os.listdir(os.path.join(ROOT, "docs"))]
    for page in pages:
        text = open(os.path.join(ROOT, page), encoding="utf-8").read()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            resolved = os.path.normpath(os.path.join(ROOT, os.path.dirname(page), path)) if path else os.path.join(ROOT, page)
            assert os.path.exists(resolved), f"{page}: {target}"
            if anchor and resolved.endswith(".md"):
                assert anchor in heading_anchors(resolved), f"{page}: {target}"


def test_every_ptft_command_in_the_gpu_check_script_parses_and_the_script_is_valid_bash():
    # .ci/gpu-check runs once, on a GPU lent for minutes: a mistyped flag there would waste the run
    path = os.path.join(ROOT, ".ci", "gpu-check")
    assert subprocess.run(["bash", "-n", path]).returncode == 0
    script = open(path, encoding="utf-8").read().replace("\\\n", " ")
    commands = [line.split("python ptft.py", 1)[1] for line in script.splitlines()
                if "python ptft.py" in line and not line.lstrip().startswith("#")]
    assert len(commands) >= 5
    parser = ptft.build_parser()
    for command in commands:
        args = shlex.split(re.sub(r'\$[A-Z_]+', "x", command))  # $WORK, $OUT: any folder
        assert parser.parse_args(args).command == args[0], command


def functions_of(module):
    """name -> the ast node of every function defined in module.py (methods included)."""
    tree = ast.parse(open(os.path.join(ROOT, f"{module}.py"), encoding="utf-8").read())
    return {node.name: node for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}


def called_names(function):
    return {node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
            for node in ast.walk(function) if isinstance(node, ast.Call)}


def test_a_reader_reaches_the_mlm_loss_from_pretrain_in_two_jumps():
    # pretrain holds the loop and calls pretraining_step, which writes E4 (mlm_loss) and B3 out
    train_functions = functions_of("train")
    assert "pretraining_step" in called_names(train_functions["pretrain"])
    assert "mlm_loss" in called_names(train_functions["pretraining_step"])
    assert "mlm_loss" in functions_of("model")


def test_functions_fit_on_a_page_and_lines_in_a_window():
    """No function over 60 lines or with more than 8 parameters (self aside); at most 2% of the
    project's lines over 100 characters (ruff holds them to 100; tests are exempt)."""
    too_long, lines, wide = [], 0, 0
    for module in STACK:
        text = open(os.path.join(ROOT, f"{module}.py"), encoding="utf-8").read()
        lines += text.count("\n")
        wide += sum(len(line) > 100 for line in text.split("\n"))
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, ast.FunctionDef):
                continue
            arguments = node.args
            count = len(arguments.posonlyargs + arguments.args + arguments.kwonlyargs)
            count += bool(arguments.vararg) + bool(arguments.kwarg)
            count -= bool(arguments.args) and arguments.args[0].arg in ("self", "cls")
            if node.end_lineno - node.lineno + 1 > 60 or count > 8:
                too_long.append(f"{module}.{node.name}: {node.end_lineno - node.lineno + 1} lines, "
                                f"{count} parameters")
    assert not too_long, too_long
    assert wide <= 0.02 * lines


@pytest.mark.parametrize("module", ["model", "fast", "schedule", "compress", "verdicts"])
def test_a_file_that_checks_itself_passes_its_own_check(module):
    # README: `python model.py` (or fast.py, compress.py) checks itself -- a change that breaks the
    # check must not land with a green suite
    result = subprocess.run([sys.executable, f"{module}.py"], cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0 and "self-check passed" in result.stdout, result.stderr[-2000:]
