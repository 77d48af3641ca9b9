"""A TCP relay between workers and PostgreSQL that can go half-open.

While stalled it keeps every socket open but forwards nothing in either direction and
answers no new connection: to both ends the peer looks alive and silent, as after a
NAT or firewall drops a flow without a reset. Plain sockets, two threads per connection.
"""

from __future__ import annotations

import socket
import threading


class Relay:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self._upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._forwarding = threading.Event()
        self._forwarding.set()
        self._closed = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self.connections = 0
        threading.Thread(target=self._accept, name="relay-accept", daemon=True).start()

    def stall(self) -> None:
        """Stop forwarding silently (sockets stay open)."""
        self._forwarding.clear()

    def resume(self) -> None:
        self._forwarding.set()

    def close(self) -> None:
        self._closed = True
        self._forwarding.set()
        self._listener.close()
        with self._lock:
            for s in self._sockets:
                try:
                    s.close()
                except OSError:
                    pass

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._open, args=(client,), daemon=True).start()

    def _open(self, client: socket.socket) -> None:
        with self._lock:
            self._sockets.append(client)
        self._forwarding.wait()  # a stalled relay answers no new connection either
        if self._closed:
            client.close()
            return
        try:
            server = socket.create_connection(self._upstream, timeout=10)
        except OSError:
            client.close()
            return
        with self._lock:
            self._sockets.append(server)
            self.connections += 1
        for src, dst in ((client, server), (server, client)):
            threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            # Inside the try: the other direction's pump may have closed both sockets
            # before this thread ran its first line.
            src.settimeout(0.1)
            while not self._closed:
                if not self._forwarding.is_set():
                    self._forwarding.wait(0.1)
                    continue
                try:
                    data = src.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    break
                self._forwarding.wait()  # read just before a stall: hold it until resumed
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            # Closed here too (closing twice is harmless): a socket this thread drops
            # unclosed would be a ResourceWarning, which the test run turns into an error.
            s.close()
