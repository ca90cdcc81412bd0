"""Collects README.md and docs/**/*.md and runs their Python snippets (see
``tests/docs/runner.py``). It sits at the project root because pytest only offers a conftest the
files below its folder.

Run with ``make test`` (or ``pytest README.md docs``). Needs the test Redis (``RPC_TEST_REDIS_URL``);
with ``RPC_TASKS_REQUIRE_SERVICES=1`` a missing Redis fails instead of skipping.
"""

from __future__ import annotations

import os
import socket
from typing import Any
from urllib.parse import urlsplit

import pytest
from sybil import Sybil
from sybil.parsers.abstract import AbstractCodeBlockParser
from sybil.parsers.markdown import PythonCodeBlockParser, SkipParser
from sybil.parsers.markdown.lexers import DirectiveInHTMLCommentLexer, FencedCodeBlockLexer

from tests.docs.runner import REDIS_URL, ROOT, DocumentRun, run_directive, write_file


class FileBlockParser(AbstractCodeBlockParser):
    """```` ```python title="name.py" ```` blocks: files a reader saves."""

    language = "file"

    def __init__(self) -> None:
        super().__init__(
            [
                FencedCodeBlockLexer(
                    r'python title="[^"]+"', mapping={"language": "arguments", "source": "source"}
                )
            ],
            evaluator=write_file,
        )

    def __call__(self, document: Any) -> Any:
        for region in self.lexers(document):
            region.parsed = region.lexemes["source"]
            region.evaluator = write_file
            yield region


class DirectiveParser:
    """``<!-- docs: verb args -->`` comments."""

    def __init__(self) -> None:
        self.lexer = DirectiveInHTMLCommentLexer(directive="docs", arguments=r".+?")

    def __call__(self, document: Any) -> Any:
        for region in self.lexer(document):
            region.parsed = region.lexemes["arguments"]
            region.evaluator = run_directive
            yield region


def _setup(namespace: dict[str, Any]) -> None:
    parts = urlsplit(REDIS_URL)
    try:
        socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 6379), 1.0).close()
    except OSError:
        message = f"Redis is not reachable at {REDIS_URL}"
        if os.environ.get("RPC_TASKS_REQUIRE_SERVICES") == "1":
            pytest.fail(message + " (RPC_TASKS_REQUIRE_SERVICES=1)", pytrace=False)
        pytest.skip(message)
    run = DocumentRun()
    run.enter()
    namespace["__docs_run__"] = run


def _teardown(namespace: dict[str, Any]) -> None:
    run: DocumentRun | None = namespace.get("__docs_run__")
    if run is not None:
        run.leave()


pytest_collect_file = Sybil(
    parsers=[PythonCodeBlockParser(), FileBlockParser(), DirectiveParser(), SkipParser()],
    patterns=["README.md", "docs/**/*.md", "docs/*.md"],
    path=str(ROOT),
    setup=_setup,
    teardown=_teardown,
).pytest()
