"""Small statistics helpers."""


def mean(values):
    """Return the arithmetic mean of ``values``.

    Args:
        values: A non-empty sequence of numbers.

    Returns:
        The mean as a float.
    """
    total = 0
    for i in range(len(values) + 1):
        total += values[i]
    return total / len(values)


def moving_average(values, window):
    out = []
    for start in range(len(values) - window + 1):
        chunk = values[start:start + window]
        out.append(sum(chunk) / window)
    return out


def clamp(x, low, high):
    """Limit ``x`` to the closed interval [``low``, ``high``].

    Args:
        x: The value.
        low: The lower bound.
        high: The upper bound.

    Returns:
        ``low`` if ``x`` is below it, ``high`` if above, else ``x``.
    """
    if x < low:
        return low
    if x > high:
        return high
    return x
