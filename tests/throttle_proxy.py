"""A *simulated* slow link for tests and benchmarks on one machine without network namespaces:
a TCP proxy on loopback that paces the bytes it forwards, each direction of each connection at
``rate_bps`` (a token bucket with a one-chunk burst). ``rate_bps = None``: forwarded as
fast as it comes. No added delay: only the bandwidth is shaped.

gRPC keeps one HTTP/2 connection, so its traffic shares one paced pipe per direction, as it
would share a real link. Not the kernel's tc/tbf: pacing in Python adds its own jitter
(a sleep is a scheduler's tick at best), which is why the figures it gives are named a
simulation wherever they are used.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

CHUNK = 512


class ThrottleProxy:
    """Forwards 127.0.0.1:<port> to ``upstream`` (HOST:PORT), paced."""

    def __init__(self, upstream: str, rate_bps: float | None = None) -> None:
        host, _, port = upstream.rpartition(":")
        self._upstream = (host, int(port))
        self.rate_bps = rate_bps
        """Bits per second each direction may carry; None: unshaped. Changeable any time."""
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name="throttle-accept", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self._upstream)
            except OSError:
                client.close()
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                if self._closed:
                    client.close()
                    server.close()
                    return
                self._sockets += [client, server]
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        free_at = time.monotonic()  # when the pipe has sent what it was given
        try:
            while data := src.recv(CHUNK):
                rate = self.rate_bps
                if rate is not None:
                    free_at = max(free_at, time.monotonic()) + len(data) * 8 / rate
                    pause = free_at - time.monotonic()
                    if pause > 0:
                        time.sleep(pause)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Stop accepting and cut every connection."""
        with self._lock:
            self._closed = True
            sockets, self._sockets = self._sockets, []
        self._listener.close()
        for s in sockets:
            with contextlib.suppress(OSError):
                s.close()
