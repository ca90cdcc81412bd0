"""A small TCP proxy on loopback for fault tests: it forwards a client's bytes to Redis and, by
mode (which may change while connections are open), forwards the replies (``pass``), drops
the first reply after the client sent ``trigger`` and resets the client's connection
(``reset_after_reply``: the server ran the command, the client never learns it) or swallows
every reply (``blackhole``: a half-open connection)."""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Iterator


class FaultProxy:
    def __init__(self, target_port: int, mode: str = "pass", trigger: bytes = b"") -> None:
        self.target_port = target_port
        self.mode = mode
        self.trigger = trigger
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = int(self.listener.getsockname()[1])
        self.connections = 0
        self._sockets: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            server = socket.create_connection(("127.0.0.1", self.target_port))
            self._sockets += [client, server]
            armed = threading.Event()
            threading.Thread(target=self._pump, args=(client, server, False, armed), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True, armed), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, replies: bool, armed: threading.Event) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if not replies and self.trigger in data:
                    armed.set()
                if replies and self.mode == "blackhole":
                    continue
                if replies and self.mode == "reset_after_reply" and armed.is_set():
                    dst.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_RD)  # wakes the other pump's recv
                    dst.close()  # linger 0: RST, the reply is lost
                    src.close()
                    return
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._closed = True
        self.listener.close()
        for sock in self._sockets:
            with contextlib.suppress(OSError):
                sock.close()


@contextlib.contextmanager
def fault_proxy(target_port: int, mode: str, trigger: bytes = b"") -> Iterator[FaultProxy]:
    proxy = FaultProxy(target_port, mode, trigger)
    try:
        yield proxy
    finally:
        proxy.close()
