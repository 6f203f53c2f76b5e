#!/usr/bin/env python3
"""A TCP proxy that adds a fixed one-way delay, for benchmarks across a simulated network
round trip where netem is not available (no sch_netem in the kernel, or no privileges).

    python3 bench/delay_proxy.py --target 127.0.0.1:52000 [--delay-ms 5] [--port 0]

Listens on 127.0.0.1:PORT (0: a free port), prints the port it listens on on stdout once
it accepts connections, and forwards each connection to TARGET. Every chunk read in either
direction is written out DELAY_MS after it was read (5 ms each way: a 10 ms round trip).
Chunks are scheduled, not slept on one after another: the reader keeps reading while
earlier chunks wait, so the delay adds latency without capping bandwidth, and order is
kept (a constant delay keeps the deadlines in order). A half-close (EOF) is forwarded
after the same delay.

A new connection also pays for TCP's handshake, which the proxy's own socket answers at
once: what the client sends arrives no sooner than 3 x DELAY_MS after it connected (SYN,
SYN-ACK, then its data), as on a real path (--no-handshake-delay: DELAY_MS only). Not
simulated: slow start and window growth over the round trip (the proxy reads as fast as
the target sends and holds the delayed bytes, up to 64 MiB each way), losses, bandwidth.

Bytes pass untouched: TLS (mTLS) is end to end between the client and the target, so the
client still verifies the target's certificate name (klio: --server-name).

Exits 0 on SIGTERM or SIGINT, closing every connection, with a one-line summary (connections,
bytes each way) on stderr. Python 3 standard library only.
"""

import argparse
import asyncio
import signal
import socket
import sys

READ_SIZE = 256 * 1024
# Chunks waiting in one direction (at most READ_SIZE each): the buffer between a fast sender
# and a slow receiver is bounded, as a real path's would be.
QUEUE_CHUNKS = 256
STREAM_LIMIT = 4 * 1024 * 1024


class Stats:
    def __init__(self):
        self.connections = 0
        self.up = 0  # client -> target
        self.down = 0  # target -> client


def nodelay(writer):
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


async def pump(reader, writer, delay, stats, attr, not_before=0.0):
    """Copies reader to writer, each chunk written `delay` seconds after it was read, or
    after `not_before` (loop time) if that is later."""
    loop = asyncio.get_running_loop()
    queue = asyncio.Queue(QUEUE_CHUNKS)

    async def read_side():
        while True:
            try:
                data = await reader.read(READ_SIZE)
            except (ConnectionError, OSError):
                data = b""
            await queue.put((max(loop.time(), not_before) + delay, data))
            if not data:
                return

    async def write_side():
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            setattr(stats, attr, getattr(stats, attr) + len(data))
            await writer.drain()

    r = asyncio.ensure_future(read_side())
    try:
        await write_side()
    finally:
        r.cancel()
        try:
            await r
        except (asyncio.CancelledError, Exception):
            pass


async def handle(client_reader, client_writer, target, delay, handshake, stats, conns):
    accepted = asyncio.get_running_loop().time()
    task = asyncio.current_task()
    conns.add(task)
    stats.connections += 1
    server_writer = None
    try:
        host, port = target
        try:
            server_reader, server_writer = await asyncio.open_connection(
                host, port, limit=STREAM_LIMIT
            )
        except OSError as e:
            print(f"delay_proxy: connect to {host}:{port}: {e}", file=sys.stderr)
            return
        nodelay(client_writer)
        nodelay(server_writer)
        # The client's first bytes leave it one round trip (the TCP handshake) after connect().
        first = accepted + 2 * delay if handshake else 0.0
        up = asyncio.ensure_future(pump(client_reader, server_writer, delay, stats, "up", first))
        down = asyncio.ensure_future(pump(server_reader, client_writer, delay, stats, "down"))
        # A connection ends when both directions have ended, or when either fails.
        try:
            await asyncio.gather(up, down)
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            # Shutting down. Ends normally: asyncio's stream callback (3.11) logs a
            # traceback for a client handler that ends cancelled.
            pass
        finally:
            for t in (up, down):
                t.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
    finally:
        for w in (client_writer, server_writer):
            if w is not None:
                w.close()
        conns.discard(task)


def parse_target(s):
    host, sep, port = s.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {s!r}")
    return host.strip("[]"), int(port)


async def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", required=True, type=parse_target, help="HOST:PORT to forward to")
    p.add_argument("--delay-ms", type=float, default=5.0, help="one-way delay (default 5)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="port to listen on (default: a free one)")
    p.add_argument(
        "--no-handshake-delay",
        dest="handshake",
        action="store_false",
        help="do not add a round trip for TCP's handshake to each new connection",
    )
    args = p.parse_args()

    delay = args.delay_ms / 1000.0
    stats = Stats()
    conns = set()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    server = await asyncio.start_server(
        lambda r, w: handle(r, w, args.target, delay, args.handshake, stats, conns),
        args.host,
        args.port,
        limit=STREAM_LIMIT,
    )
    port = server.sockets[0].getsockname()[1]
    print(port, flush=True)

    await stop.wait()
    server.close()
    for t in list(conns):
        t.cancel()
    await asyncio.gather(*conns, return_exceptions=True)
    await server.wait_closed()
    print(
        f"delay_proxy: {stats.connections} connections, {stats.up} bytes up, "
        f"{stats.down} bytes down, {args.delay_ms:g} ms each way",
        file=sys.stderr,
    )


if __name__ == "__main__":
    asyncio.run(main())
