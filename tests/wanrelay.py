"""A delaying TCP relay: the round trip of a WAN in user space (no netem here).

    python tests/wanrelay.py LISTEN_HOST:PORT TARGET_HOST:PORT DELAY_SECONDS

Every connection accepted on LISTEN is joined to a new connection to
TARGET; each chunk read from either side is written to the other DELAY
seconds after it arrived (a delay line, not stop-and-wait: reading goes on
while earlier chunks wait, so throughput is kept and a request and its
answer take 2 x DELAY more). At most MAX_QUEUED bytes wait per direction.
Prints "ready" once listening. Ended by its PID (SIGTERM) by whoever started it.
"""

from __future__ import annotations

import collections
import socket
import sys
import threading
import time

CHUNK = 256 << 10
MAX_QUEUED = 64 << 20


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def _kill(*socks: socket.socket) -> None:
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def pump(src: socket.socket, dst: socket.socket, delay: float, done: threading.Semaphore) -> None:
    queue: collections.deque[tuple[float, bytes]] = collections.deque()
    cv = threading.Condition()
    queued = [0]

    def reader() -> None:
        while True:
            try:
                data = src.recv(CHUNK)
            except OSError:
                data = b""
            with cv:
                while queued[0] > MAX_QUEUED:
                    cv.wait()
                queue.append((time.monotonic() + delay, data))
                queued[0] += len(data)
                cv.notify_all()
            if not data:
                return

    def writer() -> None:
        try:
            while True:
                with cv:
                    while not queue:
                        cv.wait()
                    due, data = queue[0]
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                with cv:
                    queue.popleft()
                    queued[0] -= len(data)
                    cv.notify_all()
                if not data:
                    try:
                        dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    return
                try:
                    dst.sendall(data)
                except OSError:
                    _kill(src, dst)
                    return
        finally:
            done.release()

    threading.Thread(target=reader, daemon=True).start()
    threading.Thread(target=writer, daemon=True).start()


def serve(conn: socket.socket, target: tuple[str, int], delay: float) -> None:
    try:
        out = socket.create_connection(target, timeout=10)
    except OSError:
        conn.close()
        return
    out.settimeout(None)
    for s in (conn, out):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    done = threading.Semaphore(0)
    pump(conn, out, delay, done)
    pump(out, conn, delay, done)
    done.acquire()
    done.acquire()
    conn.close()
    out.close()


def main() -> None:
    listen, target, delay = _addr(sys.argv[1]), _addr(sys.argv[2]), float(sys.argv[3])
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(listen)
    server.listen(16)
    print("ready", flush=True)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=serve, args=(conn, target, delay), daemon=True).start()


if __name__ == "__main__":
    main()
