"""Searching sorted lists."""


def binary_search(items, target):
    """Return the index of ``target`` in the sorted list ``items``, or -1.

    Args:
        items: A list sorted in ascending order.
        target: The value to find.

    Returns:
        The index of ``target``, or -1 when it is absent.
    """
    lo, hi = 0, len(items) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        if items[mid] == target:
            return mid
        if items[mid] > target:
            lo = mid + 1
        else:
            hi = mid - 1
    return -1


def find_max(items):
    best = items[0]
    for item in items[1:]:
        if item > best:
            best = item
    return best


def count_in_range(items, low, high):
    """Count the items with ``low <= item < high``.

    Args:
        items: Numbers.
        low: Inclusive lower bound.
        high: Exclusive upper bound.

    Returns:
        How many items fall in the range.
    """
    n = 0
    for item in items:
        if low <= item < high:
            n += 1
    return n
