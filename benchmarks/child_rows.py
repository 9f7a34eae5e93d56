"""The CPU benchmarks measure each variant in a child process of its own, so that its peak resident memory is
its own: the child prints its row as JSON on its last line."""

from __future__ import annotations

import json
import signal
import subprocess


def child_row(command: list[str], may_be_killed: bool = False) -> dict | None:
    """The JSON row the child process prints last. None when the system killed it (SIGKILL: out of memory) and
    `may_be_killed`; any other failure ends the benchmark with the child's error."""
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if may_be_killed and done.returncode == -signal.SIGKILL:
        return None
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def killed_row(variant: str, width: int) -> dict:
    """The row of a variant the system killed, its line printed in a table whose first column is `width` wide."""
    print(f"{variant:>{width}}  killed by the system (SIGKILL: out of memory)", flush=True)
    return {"variant": variant, "killed": "SIGKILL (out of memory)"}
