"""The tests a user of ``examples/buggy`` would have written (for ``moecoder debug --run``).

Three of them fail on purpose: they catch the planted bugs (see ``examples/buggy/README.md``).
They live outside ``examples/buggy`` so that ``moecoder review examples/buggy`` reviews only the
package, and outside ``tests/`` so that the project's own test run does not collect them.
"""

from examples.buggy.search import binary_search, count_in_range, find_max
from examples.buggy.stats import clamp, mean, moving_average
from examples.buggy.text import title_case, truncate, word_lengths


def test_mean_of_a_few_numbers():
    assert mean([1, 2, 3]) == 2


def test_mean_of_one_number():
    assert mean([4]) == 4


def test_binary_search_finds_each_item():
    items = [1, 3, 5, 7, 9, 11]
    assert [binary_search(items, x) for x in items] == [0, 1, 2, 3, 4, 5]


def test_binary_search_middle_item():
    assert binary_search([1, 2, 3], 2) == 1


def test_binary_search_missing_item():
    assert binary_search([1, 3, 5], 4) == -1


def test_word_lengths_of_a_sentence():
    assert word_lengths("a bb ccc") == {"a": 1, "bb": 2, "ccc": 3}


def test_word_lengths_of_one_word():
    assert word_lengths("hello") == {"hello": 5}


def test_word_lengths_of_nothing():
    assert word_lengths("") == {}


def test_find_max():
    assert find_max([3, 9, 2]) == 9


def test_count_in_range():
    assert count_in_range([1, 2, 3, 4], 2, 4) == 2


def test_moving_average():
    assert moving_average([1, 2, 3, 4], 2) == [1.5, 2.5, 3.5]


def test_clamp():
    assert [clamp(x, 0, 10) for x in (-5, 5, 15)] == [0, 5, 10]


def test_title_case():
    assert title_case("hello WORLD") == "Hello World"


def test_truncate():
    assert truncate("abcdefgh", 6) == "abc..."
    assert truncate("abc", 6) == "abc"
