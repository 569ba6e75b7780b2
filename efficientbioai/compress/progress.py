"""Progress messages of ``compress`` on stderr (silenced by ``--quiet``)."""

from __future__ import annotations

import sys


def log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)
