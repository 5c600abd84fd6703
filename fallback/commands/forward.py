"""The forward queue's flags, shared by `fallback up`, `fallback smtp` and `fallback worker`.

They are named after the Settings fields; whichever command is given
--forward-to also runs the forward worker (fallback.queues.forward).
"""

from __future__ import annotations

import argparse


def add_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("forward queue options (mail for users whose mailstore is not failed over)")
    g.add_argument("--forward-to", metavar="URL",
                   help="main system's next hop: smtp://HOST:PORT or lmtp://HOST:PORT "
                   "(FALLBACK_FORWARD_TO); unset: that mail waits in the forward queue")
    for name in ("forward-alert-age", "forward-retry-base", "forward-retry-max-interval", "forward-timeout",
                 "forward-dead-letter-after"):
        g.add_argument(f"--{name}", metavar="SECONDS")
