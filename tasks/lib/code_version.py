"""Which code a stage's fingerprint covers: the code its output depends on, found by reading the imports.

A stage's code version hashes its own module, `tasks/<stage>.py`, whole, and every top-level definition of the
project (`tasks/`, `model/`) that it reaches: the functions, classes and constants it imports or names, then
those that they import or name, and so on, imports inside functions included. A module imported as a module
(`import model.chat`) counts whole, and so do the statements a module runs on import (and its packages'
`__init__.py`). Each definition is hashed as its syntax tree without docstrings, so an edit of comments,
docstrings or layout changes nothing, while a semantic edit of anything the stage reaches changes its version, its
fingerprint and those of every stage downstream. An edit of a definition the stage never reaches (another
stage's block in a shared module) leaves it alone.

No hand-kept list: what is covered is what the code imports. What it cannot see: code reached by name at run
time (`getattr`, `importlib`), which this project does not use for stage logic.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

PROJECT_PACKAGES = ("tasks", "model")
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def stage_code_version(stage: str, root: Path = PROJECT_ROOT) -> str:
    """Hash of the code that shapes `stage`'s output (module docstring); the same for the same code under any
    checkout directory."""
    return code_version(stage_code_parts(stage, root))


def code_version(parts: dict[str, str]) -> str:
    """One hash of `stage_code_parts`."""
    h = hashlib.sha256()
    for definition, digest in parts.items():
        h.update(f"{definition} {digest}\n".encode())
    return h.hexdigest()[:16]


def stage_code_parts(stage: str, root: Path = PROJECT_ROOT) -> dict[str, str]:
    """{"module:name": hash of its code} for every definition `stage` reaches, sorted: what `_artifact.json`
    records, so a plan can name the definitions that changed since an earlier build."""
    if module_file(f"tasks.{stage}", root) is None:
        raise KeyError(f"no stage module tasks.{stage}: a stage task's name must be its module's name")
    return {f"{module}:{name}": hashlib.sha256(code.encode()).hexdigest()[:12]
            for (module, name), code in sorted(reached_code(f"tasks.{stage}", root).items())}


def module_file(name: str, root: Path) -> Path | None:
    """The source file of a project module or package under `root`, or None if it is not one."""
    if name.split(".")[0] not in PROJECT_PACKAGES:
        return None
    base = root.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@dataclass(frozen=True)
class ModuleIndex:
    """One module's top level: what each name is defined as, and what each definition refers to."""

    code: dict[str, str]  # name -> its defining statements' syntax trees, docstrings removed
    refers: dict[str, frozenset[tuple[str, str | None]]]  # name -> (module, name or None for a whole module)
    on_import: tuple[str, frozenset[tuple[str, str | None]]]  # statements that define no name: code, references
    imports: dict[str, tuple[str, str | None]]  # name bound by an import -> (module, name or None)


def reached_code(start: str, root: Path) -> dict[tuple[str, str], str]:
    """{(module, name): code} of everything `start` (whole) reaches; name "<import>" is what a module runs on
    import."""
    reached: dict[tuple[str, str], str] = {}
    pending: list[tuple[str, str | None]] = [(start, None)]
    while pending:
        module, name = pending.pop()
        path = module_file(module, root)
        if path is None:
            continue
        index = module_index(module, path.read_text())
        if (module, "<import>") not in reached:
            reached[module, "<import>"] = index.on_import[0]
            pending += index.on_import[1]
            if "." in module:  # importing a.b runs a/__init__.py
                pending.append((module.rsplit(".", 1)[0], None))
        if name is None:
            names = list(index.code)
        elif name in index.code:
            names = [name]
        else:  # bound here by an import (a re-export), or a submodule (`from tasks.lib import blocks`)
            pending.append(index.imports.get(name, (f"{module}.{name}", None)))
            names = []
        for n in names:
            if (module, n) not in reached:
                reached[module, n] = index.code[n]
                pending += index.refers[n]
    return reached


@functools.lru_cache(maxsize=512)
def module_index(module: str, source: str) -> ModuleIndex:
    """Cached per source text: fingerprints are taken many times in a run, and parsing is the slow part."""
    tree = ast.parse(source)
    imported: dict[str, tuple[str, str | None]] = {}  # local name -> what it is bound to
    for node in tree.body:
        for local, target in import_bindings(node):
            imported[local] = target
    defined: dict[str, list[ast.stmt]] = {}
    on_import: list[ast.stmt] = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            continue  # the module docstring
        names = defined_names(node)
        for n in names:
            defined.setdefault(n, []).append(node)
        if not names:
            on_import.append(node)

    def references(nodes: list[ast.stmt]) -> frozenset[tuple[str, str | None]]:
        found = set()
        for node in nodes:
            for inner in ast.walk(node):
                if isinstance(inner, ast.Name):
                    if inner.id in defined:
                        found.add((module, inner.id))
                    elif inner.id in imported:
                        found.add(imported[inner.id])
                elif isinstance(inner, (ast.Import, ast.ImportFrom)):  # imports inside functions
                    found.update(target for _, target in import_bindings(inner))
        return frozenset(found)

    return ModuleIndex(code={n: normalised(nodes) for n, nodes in defined.items()},
                       refers={n: references(nodes) for n, nodes in defined.items()},
                       on_import=(normalised(on_import), references(on_import)), imports=imported)


def import_bindings(node: ast.stmt) -> list[tuple[str, tuple[str, str | None]]]:
    """(local name, (module, name or None)) for each name an import statement binds."""
    if isinstance(node, ast.Import):
        # `import a.b.c` binds `a` but loads a.b.c: count the module itself.
        return [(alias.asname or alias.name.split(".")[0], (alias.name, None)) for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        return [(alias.asname or alias.name, (node.module, alias.name)) for alias in node.names]
    return []


def defined_names(node: ast.stmt) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    targets = node.targets if isinstance(node, ast.Assign) else \
        [node.target] if isinstance(node, (ast.AnnAssign, ast.AugAssign)) else []
    return [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]


def normalised(nodes: list[ast.stmt]) -> str:
    """The statements' syntax trees without docstrings (comments and layout are not in a syntax tree)."""
    dumps = []
    for node in nodes:
        for inner in ast.walk(node):
            if isinstance(inner, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and inner.body:
                first = inner.body[0]
                if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                        and isinstance(first.value.value, str):
                    inner.body = inner.body[1:] or [ast.Pass()]
        dumps.append(ast.dump(node))
    return "\n".join(dumps)
