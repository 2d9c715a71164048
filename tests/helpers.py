"""Small helpers shared by the test modules."""

from __future__ import annotations

import numpy as np


def tenth(rng: np.random.Generator, n: int) -> np.ndarray:
    """A random 10 % of n channels as a bool mask, exactly round(n / 10) of them: weights of one shape then
    pack to the same sub-matrix shapes, so a model's layers share their compiled programs (a draw per
    channel gave every layer its own shapes and its own compilations)."""
    mask = np.zeros(n, bool)
    mask[rng.permutation(n)[: round(n / 10)]] = True
    return mask
