"""Fake redis-py async connections for the unit tests of rpc_tasks.aio (no Redis I/O)."""

from __future__ import annotations

import asyncio
from typing import Any


class StuckConnection:
    """A connection whose writes never complete (the reader task just waits)."""

    def __init__(self, **kwargs: Any) -> None:
        self.encoder = None

    def pack_commands(self, commands: list[tuple[Any, ...]]) -> list[bytes]:
        return []

    async def send_packed_command(self, *args: Any, **kwargs: Any) -> None:
        await asyncio.Event().wait()

    async def disconnect(self, nowait: bool = False) -> None:
        return None


class EchoConnection(StuckConnection):
    """Writes go through; each command's reply is its last argument."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.replies: list[Any] = []

    def pack_commands(self, commands: list[tuple[Any, ...]]) -> list[bytes]:
        self.replies += [command[-1] for command in commands]
        return []

    async def send_packed_command(self, *args: Any, **kwargs: Any) -> None:
        return None

    async def read_response(self, timeout: float | None = None) -> Any:
        return self.replies.pop(0)
