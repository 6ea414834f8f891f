"""The largest micro-batch or sequence that fits: a binary search, since memory grows with either.

`largest` is the search itself, over any increasing sizes (1..n, or the divisors of a batch); `largest_fitting`
asks it for the largest size whose estimate stays within a number of bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from memplan.estimator.phases import Estimate


def largest(fits: Callable[[int], bool], sizes: Sequence[int]) -> int | None:
    """The largest of `sizes` (increasing, memory growing with them) that fits; None if even the first does not.

    A binary search: about log2(len(sizes)) calls of `fits`, the first one on sizes[0].
    """
    if not sizes or not fits(sizes[0]):
        return None
    lo, hi = 0, len(sizes) - 1  # sizes[lo] fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(sizes[mid]):
            lo = mid
        else:
            hi = mid - 1
    return sizes[lo]


def largest_fitting(make: Callable[[int], Estimate], capacity: int, hi: int) -> int:
    """Largest n in [1, hi] whose estimate's total is within `capacity` bytes; 0 if even 1 is not."""
    return largest(lambda n: make(n).total <= capacity, range(1, hi + 1)) or 0
