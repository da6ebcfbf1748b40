"""``python -m trawl.demo [--host H] [--port P]``: serve the demo site until Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import Sequence

from trawl.demo.site import DemoSite

__all__ = ["main", "serve"]


async def serve(host: str, port: int) -> None:
    """Serve the demo site forever, printing its base URL on one line once it listens."""
    async with DemoSite(host, port) as site:
        print(site.url, flush=True)
        await asyncio.Event().wait()


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and serve until interrupted; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m trawl.demo", description="Serve the trawl demo site until Ctrl-C.")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8080, help="port to bind; 0 picks a free one (default 8080)")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
