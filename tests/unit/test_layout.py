"""The package layout's promises: the top-level ``middleware`` package is only a re-export,
nothing in rpc-tasks imports it, and Dramatiq's internals are checked before use."""

from __future__ import annotations

import ast
import logging
from pathlib import Path

import pytest
from dramatiq.brokers import redis as dramatiq_redis
from dramatiq.brokers.redis import RedisBroker

import middleware
import rpc_tasks
import rpc_tasks.middleware
from rpc_tasks.contrib.django import dramatiq_broker_settings
from rpc_tasks.redis import broker as broker_module
from rpc_tasks.redis import internals

ROOT = Path(__file__).resolve().parents[2]


def test_top_level_middleware_package_reexports_the_same_classes() -> None:
    for name in middleware.__all__:
        assert getattr(middleware, name) is getattr(rpc_tasks.middleware, name)


def test_nothing_inside_rpc_tasks_imports_the_top_level_middleware_name() -> None:
    offenders = []
    for path in (ROOT / "rpc_tasks").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] == "middleware"]
    assert offenders == []


def test_middleware_paths_name_the_package_inside_rpc_tasks() -> None:
    paths = rpc_tasks.middleware_paths()
    ours = [p for p in paths if not p.startswith("dramatiq.")]
    assert ours == [
        "rpc_tasks.middleware.RPCReplies",
        "rpc_tasks.middleware.RPCRateLimits",
        "rpc_tasks.middleware.RPCIdempotency",
        "rpc_tasks.middleware.RPCRetries",
    ]
    assert dramatiq_broker_settings("redis://localhost:6379/0")["MIDDLEWARE"][: len(paths)] == paths


def test_installed_dramatiq_has_the_internals_the_blocking_broker_relies_on() -> None:
    assert broker_module.INTERNALS_PROBLEM is None
    assert dramatiq_broker_settings("redis://localhost:6379/0")["BROKER"] == (
        "rpc_tasks.redis.broker.BlockingRedisBroker"
    )


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda mp: mp.delattr(dramatiq_redis, "_RedisConsumer"), "_RedisConsumer is gone"),
        (lambda mp: mp.setattr(dramatiq_redis, "_scripts", {}), "_scripts['dispatch'] is gone"),
        (
            lambda mp: mp.setitem(dramatiq_redis._scripts, "dispatch", b"local command = ARGV[2]"),
            "dispatch.lua no longer has",
        ),
        (lambda mp: mp.delattr(RedisBroker, "_max_unpack_size"), "RedisBroker._max_unpack_size is gone"),
    ],
)
def test_changed_dramatiq_internals_are_detected(monkeypatch: pytest.MonkeyPatch, change, expected) -> None:  # type: ignore[no-untyped-def]
    change(monkeypatch)
    problem = internals.internals_problem()
    assert problem is not None and expected in problem


def test_setup_falls_back_to_plain_redis_broker_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(broker_module, "INTERNALS_PROBLEM", "RedisBroker._dispatch is gone")
    monkeypatch.setattr(broker_module, "_warned", False)
    caplog.set_level(logging.WARNING, logger="rpc_tasks.redis.broker")
    first = broker_module.redis_broker("redis://127.0.0.1:6379/9")
    second = rpc_tasks.setup_broker(broker_url="redis://127.0.0.1:6379/9", set_global=False)
    path = dramatiq_broker_settings("redis://localhost:6379/0")["BROKER"]
    assert type(first) is RedisBroker and type(second) is RedisBroker
    assert path == "dramatiq.brokers.redis.RedisBroker"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "RedisBroker._dispatch is gone" in warnings[0]
    with pytest.raises(RuntimeError, match="cannot run on Dramatiq"):
        broker_module.BlockingRedisBroker(url="redis://127.0.0.1:6379/9")


def _module_imports(package_dirs: list[Path]) -> dict[str, set[str]]:
    """Module name -> the in-tree modules it imports (function-level imports included)."""
    modules: dict[str, Path] = {}
    for top in package_dirs:
        for path in top.rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*anchor, *([base] if base else [])])
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    found.add(target)
        graph[name] = found
    return graph


def test_no_import_cycles_in_rpc_tasks_or_middleware() -> None:
    graph = _module_imports([ROOT / "rpc_tasks", ROOT / "middleware"])
    # A package's __init__ that only re-exports its children is not part of a cycle with them.
    for name, targets in graph.items():
        targets -= {t for t in targets if name.startswith(t + ".")}
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert cycles == []


def test_only_the_internals_module_touches_dramatiqs_private_names() -> None:
    """``from dramatiq... import _name`` or ``<dramatiq module alias>._name`` anywhere in
    rpc_tasks but rpc_tasks/redis/internals.py fails this test."""
    offenders = []
    for path in (ROOT / "rpc_tasks").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "dramatiq":
                for alias in node.names:
                    if alias.name.startswith("_"):
                        offenders.append(f"{path.relative_to(ROOT)}: imports {node.module}.{alias.name}")
                    aliases.add(alias.asname or alias.name)
            elif isinstance(node, ast.Import):
                aliases |= {
                    a.asname or a.name.split(".")[0] for a in node.names if a.name.startswith("dramatiq")
                }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
            ):
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value.id}.{node.attr}")
    assert [o for o in offenders if not o.startswith("rpc_tasks/redis/internals.py")] == []
