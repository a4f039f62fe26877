"""Shared token prefixes: what both the log-likelihood packer (llamacpp_lm) and parallel generation (generation)
use to evaluate a prefix once for several requests. A module of its own so that neither imports the other for it."""
from __future__ import annotations

import numpy as np


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    if n == 0 or a[0] != b[0]:  # most pairs differ at once: skip the array conversion
        return 0
    diff = np.nonzero(np.asarray(a[:n]) != np.asarray(b[:n]))[0]
    return int(diff[0]) if len(diff) else n
