"""The house rules, read from the code's own imports (docs/architecture.md):

- the core (``alignkit/``) imports no stage and not the loop, not even inside a function;
- a stage (``sft/``, ``annotation/``, ``reward/``, ``rlhf/``, ``evals/``) imports the core and itself,
  never another stage: stages meet through run directories and the scoring API (core);
- the loop (``loop/``) sits above the stages and may import them all;
- everything is imported as ``alignkit.<part>``: the bare folder names (``evals`` is another
  project's name on PyPI) never appear in an import;
- no two files import each other, directly or round a longer circle;
- no source file is longer than ``MAX_LINES`` unless :data:`LONG_FILES` says why.

The core's CLI names the commands' modules as strings (``alignkit.cli.VERBS``) and imports only the
one being run; strings are not imports, and the last test checks every string names a real function.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("sft", "annotation", "reward", "rlhf", "evals")
PARTS = {"alignkit": "alignkit", **{s: f"alignkit.{s}" for s in STAGES}, "loop": "alignkit.loop"}
MAX_LINES = 500
LONG_FILES = {  # path -> why it may be longer
    "alignkit/demo/make_demo.py": "the demo set's generator: mostly data (topics, phrasings, constraint templates)",
}


def module_files() -> dict[str, Path]:
    """Import name -> file, for every module of ours."""
    modules = {}
    for folder, package in PARTS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            modules[".".join([package, *parts])] = path
    return modules


MODULES = module_files()


def part_of(module: str) -> str:
    """'core', a stage's name, or 'loop'."""
    pieces = module.split(".")
    if pieces[0] != "alignkit" or len(pieces) == 1:
        return "core"
    if pieces[1] in STAGES:
        return pieces[1]
    return "loop" if pieces[1] == "loop" else "core"


def imports_of(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, function-level ones included. For
    ``from X import Y`` the target is ``X.Y`` when that is a module of ours, else ``X``."""
    found = []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.append((node.lineno, target if target in MODULES else base))
    return found


def ours(name: str) -> bool:
    return name == "alignkit" or name.startswith("alignkit.")


def violations() -> list[str]:
    bad = []
    for module, path in MODULES.items():
        where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        mine = part_of(module)
        for line, target in imports_of(path, module):
            top = target.split(".")[0]
            if top in PARTS and top != "alignkit":
                bad.append(f"{where}:{line}: imports {target!r} by its folder name; use alignkit.{target}")
                continue
            if not ours(target):
                continue
            theirs = part_of(target)
            if mine == "core" and theirs != "core":
                bad.append(f"{where}:{line}: the core imports {target} ({theirs})")
            elif mine in STAGES and theirs not in ("core", mine):
                bad.append(f"{where}:{line}: stage {mine} imports {target} ({theirs})")
    return bad


def test_core_imports_no_stage_and_stages_import_no_other_stage():
    assert violations() == []


def test_the_rules_catch_a_stage_importing_another(tmp_path, monkeypatch):
    """The checker itself: a stage file importing another stage, and the core importing a stage."""
    stage_file = tmp_path / "bad_stage.py"
    stage_file.write_text("def f():\n    from alignkit.rlhf.dpo import train\n")
    core_file = tmp_path / "bad_core.py"
    core_file.write_text("import alignkit.sft.train\nfrom alignkit.evals import stats\n")
    monkeypatch.setitem(MODULES, "alignkit.reward.bad_stage", stage_file)
    monkeypatch.setitem(MODULES, "alignkit.bad_core", core_file)
    found = "\n".join(violations())
    assert "stage reward imports alignkit.rlhf.dpo (rlhf)" in found
    assert "the core imports alignkit.sft.train (sft)" in found
    assert "the core imports alignkit.evals.stats (evals)" in found


def import_graph() -> dict[str, set[str]]:
    return {m: {t for _, t in imports_of(p, m) if t in MODULES and t != m} for m, p in MODULES.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v), on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_between_files():
    assert cycles(import_graph()) == []
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the checker finds one


def test_no_file_is_longer_than_the_limit_without_a_reason():
    long = {str(p.relative_to(ROOT)): n for p in MODULES.values() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert set(long) <= set(LONG_FILES), {k: v for k, v in long.items() if k not in LONG_FILES}


@pytest.mark.parametrize("verb", sorted(importlib.import_module("alignkit.cli").VERBS))
def test_every_cli_verb_names_a_real_configure_function(verb):
    from alignkit.cli import VERBS

    module, function = VERBS[verb][0].split(":")
    assert callable(getattr(importlib.import_module(module), function))
