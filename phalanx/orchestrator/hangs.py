"""Hang attribution: which rank is not where the others wait.

When no step commits for `fault.hang_timeout_s` while every worker still sends heartbeats,
the controller sends SIGUSR1; each worker's faulthandler writes every thread's Python stack
into its log. The main thread's innermost frames say where each rank is: typically all but
one wait in the same collective (an all-reduce inside DDP's backward, a pipeline receive),
and the odd one out is somewhere else -- that is the rank to name and fence.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r'File "([^"]+)", line (\d+) in (\S+)')

__all__ = ["attribute", "main_thread_frames"]


def main_thread_frames(log_text: str, depth: int = 12) -> list[str]:
    """Innermost `depth` frames of the main thread in the log's last faulthandler dump, as
    "path:line function" (innermost first)."""
    start = max(log_text.rfind("Current thread"), log_text.rfind("Thread 0x"))
    if start < 0:
        return []
    # The main thread's block is the one faulthandler marks "Current thread" (the signal
    # handler runs on the main thread); take the last such block.
    cur = log_text.rfind("Current thread")
    block = log_text[cur if cur >= 0 else start:]
    end = block.find("\n\n")
    block = block if end < 0 else block[:end]
    return [f"{f}:{line} {func}" for f, line, func in _FRAME.findall(block)][:depth]


def _in_torch(frame: str) -> bool:
    return "/torch/" in frame.split(":")[0]


def _short(frame: str) -> str:
    path, rest = frame.split(":", 1)
    return f"{Path(path).name}:{rest}"


def attribute(stacks: dict[int, list[str]]) -> tuple[list[int], str]:
    """(ranks to blame, one-line explanation). A rank whose main thread is inside torch (a
    collective, a receive, a backward whose gradient hooks wait for an all-reduce) waits for
    a peer; a rank stuck in our own code or a user's is the one the others wait for. With
    every rank inside torch, the odd one out is the one not in the majority's frame."""
    if not stacks:
        return [], "no stacks"
    tops = {r: (f[0] if f else "?") for r, f in stacks.items()}
    waiting = {r for r, f in stacks.items() if f and _in_torch(f[0])}
    if waiting and len(waiting) < len(stacks):
        odd = sorted(set(stacks) - waiting)
    else:
        common, n = Counter(tops.values()).most_common(1)[0]
        odd = sorted(r for r, t in tops.items() if t != common) if n > len(tops) / 2 else []
    if not odd:
        return [], "no rank stands out: " + "; ".join(
            f"rank {r} in {_short(t) if t != '?' else t}" for r, t in sorted(tops.items()))
    wait = sorted({_short(tops[r]) for r in stacks if r not in odd and tops[r] != "?"})
    where = "; ".join(f"rank {r} in {_short(tops[r]) if tops[r] != '?' else '?'}" for r in odd)
    return odd, f"{len(stacks) - len(odd)} rank(s) wait in {', '.join(wait) or '?'}; {where}"
