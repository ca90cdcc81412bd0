"""Flag test functions that cannot fail because they assert nothing.

Usage: ``python tests/check_assertions.py [PATH ...]`` (default: ``tests``). Exits 1 and prints
``file:line: test_name ...`` for each test function (``test_*`` at module level or in a
``Test*`` class, in ``test_*.py`` files) whose own body has none of:

* an ``assert`` statement;
* ``pytest.raises`` / ``pytest.warns`` / ``pytest.fail`` (as a call or a ``with``);
* a call to a helper whose name starts with ``assert`` (``assert_...``, unittest's
  ``self.assertEqual``), ``expect_`` or ``check_`` (leading underscores ignored), unless that
  name was imported from ``rpc_tasks`` (a library function is not a test helper).

Code inside nested functions counts when the test calls them by name
(``asyncio.run(scenario())``) or hands them to a runner as a positional argument
(``run(scenario)``), but not when they go to a thread (``target=``, ``Thread(...)``,
``executor.submit(...)``): an ``assert`` there fails that thread, not the test. For the rare
test whose only check is that it returns (documented as such), put
``# no-assert-ok: <reason>`` on the ``def`` line or on the line above it (above its decorators
too); a marker without a reason is itself reported.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterator
from pathlib import Path

MARKER = "# no-assert-ok:"
HELPER_PREFIXES = ("assert", "expect_", "check_")
PYTEST_CHECKS = {"raises", "warns", "fail", "deprecated_call"}
_NESTED = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)
#: Calls whose function arguments run in another thread (their asserts cannot fail the test).
THREAD_STARTERS = {"Thread", "submit", "start_new_thread", "run_in_executor", "to_thread", "Timer"}


def _called_name(node: ast.Call) -> tuple[str | None, str | None]:
    """(owner, name) of a call: ``pytest.raises(...)`` -> ("pytest", "raises")."""
    func = node.func
    if isinstance(func, ast.Name):
        return None, func.id
    if isinstance(func, ast.Attribute):
        owner = func.value.id if isinstance(func.value, ast.Name) else None
        return owner, func.attr
    return None, None


def _own_nodes(body: list[ast.stmt]) -> Iterator[ast.AST]:
    """Every node of ``body``, not descending into nested functions, lambdas or classes."""
    stack: list[ast.AST] = [node for node in body if not isinstance(node, _NESTED)]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, _NESTED):
                stack.append(child)


def _library_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "rpc_tasks":
            names.update(alias.asname or alias.name for alias in node.names)
    return names


def has_assertion(func: ast.FunctionDef | ast.AsyncFunctionDef, library: set[str]) -> bool:
    """Whether the body of ``func`` checks something: its own statements, and those of the
    nested functions it calls by name (``asyncio.run(scenario())``), but not of nested
    functions it only passes on (a thread's ``target=``)."""
    nested = {
        node.name: node
        for node in ast.walk(func)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node is not func
    }
    todo: list[ast.FunctionDef | ast.AsyncFunctionDef] = [func]
    seen: set[str] = set()
    while todo:
        for node in _own_nodes(todo.pop().body):
            if isinstance(node, ast.Assert):
                return True
            if not isinstance(node, ast.Call):
                continue
            owner, name = _called_name(node)
            if name is None:
                continue
            if owner == "pytest" and name in PYTEST_CHECKS:
                return True
            if name.lstrip("_").startswith(HELPER_PREFIXES) and not (owner is None and name in library):
                return True
            if owner is None and name in nested and name not in seen:
                seen.add(name)
                todo.append(nested[name])
            if name in THREAD_STARTERS:
                continue
            for arg in node.args:  # run(scenario): a runner that calls it in this thread
                if isinstance(arg, ast.Name) and arg.id in nested and arg.id not in seen:
                    seen.add(arg.id)
                    todo.append(nested[arg.id])
    return False


def _test_functions(tree: ast.Module) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
            yield node
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name.startswith("test"):
                    yield item


def _marker(lines: list[str], func: ast.FunctionDef | ast.AsyncFunctionDef) -> str | None:
    """The allow-list marker's reason ('' when the marker has none), or None without one."""
    first = min([func.lineno, *(d.lineno for d in func.decorator_list)])
    for lineno in {first - 1, func.lineno}:
        if 1 <= lineno <= len(lines) and MARKER in lines[lineno - 1]:
            return lines[lineno - 1].split(MARKER, 1)[1].strip()
    return None


def check_file(path: Path) -> list[str]:
    """Problems in one test module, as ``path:line: message`` strings."""
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source, filename=str(path))
    lines = source.splitlines()
    library = _library_names(tree)
    problems: list[str] = []
    for func in _test_functions(tree):
        reason = _marker(lines, func)
        if reason is not None:
            if not reason:
                problems.append(f"{path}:{func.lineno}: {func.name}: '{MARKER}' needs a reason")
            continue
        if not has_assertion(func, library):
            problems.append(
                f"{path}:{func.lineno}: {func.name} has no assertion (assert, pytest.raises/warns/fail, "
                f"or an assert_/expect_/check_ helper); add one or '{MARKER} <reason>'"
            )
    return problems


def iter_test_files(paths: list[Path]) -> Iterator[Path]:
    """``test_*.py`` files under ``paths`` (files given directly are taken as they are)."""
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("test_*.py") if not re.search(r"/\.|/build/", str(p)))
        else:
            yield path


def main(argv: list[str] | None = None) -> int:
    """Check the given paths (default ``tests``); print problems; 1 if any, else 0."""
    args = sys.argv[1:] if argv is None else argv
    paths = [Path(a) for a in args] or [Path("tests")]
    problems: list[str] = []
    count = 0
    for path in iter_test_files(paths):
        count += 1
        problems.extend(check_file(path))
    for problem in problems:
        print(problem)
    if problems:
        print(f"check_assertions: {len(problems)} test(s) without an assertion in {count} file(s)")
        return 1
    print(f"check_assertions: every test function in {count} file(s) asserts something")
    return 0


if __name__ == "__main__":
    sys.exit(main())
