"""Chunks of inputs that the execution engines read together."""


def largest_divisor(size, limit):
    """The largest divisor of `size` up to `limit`: the length of a chunk
    when `size` inputs are read in equal chunks of at most `limit`.

    >>> largest_divisor(3072, 64), largest_divisor(36, 8), largest_divisor(7, 8)
    (64, 6, 7)
    """
    return max(length for length in range(1, min(limit, size) + 1) if size % length == 0)
