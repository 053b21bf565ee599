"""Fixed-length next-token windows over a flat token array."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["TokenWindows", "train_samples", "train_val_split"]


class TokenWindows:
    """Non-overlapping windows over ``tokens[start:stop]``.

    Sample ``i`` is ``tokens[start + i*seq_len : start + i*seq_len + seq_len + 1]``
    split into ``x = w[:-1]`` and ``y = w[1:]``. Consecutive windows share only
    the boundary token (one window's last target is the next one's first
    input), so every token is predicted at most once per epoch. Windows never
    read past ``stop``, which is what keeps train and validation ranges apart.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        *,
        start: int = 0,
        stop: int | None = None,
    ) -> None:
        n = len(tokens)
        stop = n if stop is None else stop
        if seq_len < 1:
            raise ValueError(f"TokenWindows: seq_len must be >= 1, got {seq_len}")
        if not 0 <= start <= stop <= n:
            raise ValueError(
                f"TokenWindows: need 0 <= start <= stop <= len(tokens)={n}, "
                f"got start={start} stop={stop}"
            )
        self.tokens = tokens
        self.seq_len = seq_len
        self.start = start
        self.stop = stop
        self._len = max(0, (stop - start - 1) // seq_len)

    def __len__(self) -> int:
        return self._len

    def _check(self, i: int) -> int:
        i = int(i)
        if not 0 <= i < self._len:
            raise IndexError(f"TokenWindows: index {i} out of range for {self._len} windows")
        return i

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = self._check(i)
        lo = self.start + i * self.seq_len
        w = torch.from_numpy(np.asarray(self.tokens[lo : lo + self.seq_len + 1], dtype=np.int64))
        return w[:-1], w[1:]

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stack windows ``indices`` into int64 ``(x, y)`` of shape ``[len(indices), seq_len]``."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self._len):
            bad = idx[(idx < 0) | (idx >= self._len)][0]
            raise IndexError(f"TokenWindows: index {int(bad)} out of range for {self._len} windows")
        # Fancy indexing on a memmap reads only the needed pages into one array.
        offs = self.start + idx[:, None] * self.seq_len + np.arange(self.seq_len + 1)
        w = torch.from_numpy(np.asarray(self.tokens[offs], dtype=np.int64))
        return w[:, :-1], w[:, 1:]

    def __repr__(self) -> str:
        return (
            f"TokenWindows(len={self._len}, seq_len={self.seq_len}, "
            f"start={self.start}, stop={self.stop})"
        )


def train_val_split(
    num_tokens: int, val_fraction: float, seq_len: int
) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((0, split), (split, num_tokens))``: validation is the last ``val_fraction`` of the stream.

    Held out at the end, contiguous, so no training window can contain a
    validation token (windows stop at their range's end).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"train_val_split: val_fraction must be in (0, 1), got {val_fraction}")
    if seq_len < 1:
        raise ValueError(f"train_val_split: seq_len must be >= 1, got {seq_len}")
    n_val = round(num_tokens * val_fraction)
    split = num_tokens - n_val
    need = seq_len + 1
    for name, size in (("train", split), ("validation", n_val)):
        if size < need:
            raise ValueError(
                f"train_val_split: the {name} range has {size} tokens but one window of "
                f"seq_len={seq_len} needs {need} "
                f"(num_tokens={num_tokens}, val_fraction={val_fraction}): "
                "use a larger corpus, a shorter seq_len, or adjust val_fraction"
            )
    return (0, split), (split, num_tokens)


def train_samples(num_tokens: int, val_fraction: float, seq_len: int) -> int:
    """How many training windows a stream of ``num_tokens`` has (``len`` of the trainers'
    training ``TokenWindows``), for sampling without the tokens at hand (the controller)."""
    (a, b), _ = train_val_split(num_tokens, val_fraction, seq_len)
    return len(TokenWindows(range(b), seq_len, start=a, stop=b))  # only the length is read
