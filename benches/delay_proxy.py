#!/usr/bin/env python3
"""A TCP proxy that holds back the server's first byte for a known delay.

Used by `benches/run` (scenario 2, timing accuracy): each route listens on a
loopback port and forwards to an upstream server (a lab Dovecot), but sends
nothing to the client until `delay` after the connection was accepted. The
time it really held back (accept to first byte written) is printed per
connection, so the harness can tell the proxy's own lateness from the tool's.

    delay_proxy.py --upstream 127.0.0.10:143 --route 127.0.0.1:40001=0.1 ...

Prints `ready` once every route listens, then one line per connection:
`<port> <injected seconds> <seconds before the write> <seconds after it>`,
both counted from the accept.
"""

import argparse
import asyncio
import sys
import time


async def pipe(reader, writer):
    """Copies until EOF, then closes the writing side."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


def handler(upstream, delay, port):
    """A connection handler for one route."""

    async def handle(client_r, client_w):
        accepted = time.monotonic()
        try:
            up_r, up_w = await asyncio.open_connection(*upstream)
        except OSError:
            client_w.close()
            return
        first = await up_r.read(65536)
        # Sleep most of the way, then spin the last stretch: asyncio's timer
        # alone overshoots by up to a millisecond, which is the order of the
        # error being measured.
        remaining = accepted + delay - time.monotonic()
        if remaining > 0.002:
            await asyncio.sleep(remaining - 0.002)
        while (before := time.monotonic()) < accepted + delay:
            pass
        client_w.write(first)
        after = time.monotonic()
        # The byte left between `before` and `after`; a wide gap (the proxy
        # was preempted) makes the sample uncertain, and the harness drops it.
        print(f"{port} {delay} {before - accepted:.6f} {after - accepted:.6f}", flush=True)
        await asyncio.gather(pipe(client_r, up_w), pipe(up_r, client_w))

    return handle


async def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream", required=True, help="HOST:PORT of the real server")
    ap.add_argument("--route", action="append", required=True, help="HOST:PORT=DELAY_SECONDS")
    args = ap.parse_args()
    host, port = args.upstream.rsplit(":", 1)
    upstream = (host, int(port))
    servers = []
    for route in args.route:
        listen, delay = route.split("=")
        lhost, lport = listen.rsplit(":", 1)
        servers.append(await asyncio.start_server(handler(upstream, float(delay), lport), lhost, int(lport)))
    print("ready", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(0)
