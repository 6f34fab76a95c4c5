"""assistant.context: the context-window manager."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from assistant.context import build_context
from model.formats import fim_prompt

# -- random files ----------------------------------------------------------------------------
WORDS = ["x", "total", "name", "valeur_é", "数据", "item", "emoji_🙂", "k"]
word = st.sampled_from(WORDS)


@st.composite
def statement(draw, indent):
    kind = draw(st.integers(0, 4))
    w1, w2 = draw(word), draw(word)
    if kind == 0:
        return f"{indent}{w1} = {w2} + {draw(st.integers(0, 99))}"
    if kind == 1:
        return f"{indent}# note: {w1} {w2} ü"
    if kind == 2:
        return f'{indent}print("{w1} — {w2}")'
    if kind == 3:
        return ""
    return f"{indent}return {w1}"


@st.composite
def function(draw, indent="", name=None):
    name = name or draw(st.sampled_from(["f", "g", "helper", "compute", "load"])) + str(draw(st.integers(0, 9)))
    body = draw(st.lists(statement(indent + "    "), min_size=1, max_size=8))
    body = [b for b in body if b] or [indent + "    pass"]
    return [f"{indent}def {name}({draw(word) if draw(st.booleans()) else ''}):", *body]


@st.composite
def klass(draw):
    methods = draw(st.lists(function("    "), min_size=1, max_size=3))
    out = [f"class C{draw(st.integers(0, 9))}:"]
    for m in methods:
        out += m + [""]
    return out


@st.composite
def source(draw):
    lines = draw(st.lists(st.sampled_from(["import os", "from typing import Any", "import sys"]), max_size=3))
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.integers(0, 2))
        if kind == 0:
            lines += draw(function()) + [""]
        elif kind == 1:
            lines += draw(klass()) + [""]
        else:
            lines += [draw(statement(""))]
    return "\n".join(lines) + ("\n" if draw(st.booleans()) else "")


@st.composite
def case(draw):
    src = draw(source())
    lines = src.split("\n")
    line = draw(st.integers(0, len(lines) - 1))
    col = draw(st.integers(0, len(lines[line])))
    return src, line, col


def _check_lines_from_source(text: str, src_lines: list[str]) -> None:
    """Every line is a source line (in order) or a collapse placeholder."""
    pos = 0
    for ln in text.split("\n") if text else []:
        if ln.strip() == "...":
            continue
        try:
            pos = src_lines.index(ln, pos) + 1
        except ValueError:
            raise AssertionError(f"line not from the source (or out of order): {ln!r}") from None


FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(c=case(), extra=st.integers(0, 400))
def test_keeps_cursor_line_and_never_exceeds_budget(tiny_tokenizer, c, extra):
    tok = tiny_tokenizer
    src, line, col = c
    cur = src.split("\n")[line]
    budget = 3 + len(tok.encode(cur[:col])) + len(tok.encode(cur[col:])) + 2 + extra
    r = build_context(tok, src, line, col, budget=budget)
    assert len(r.prompt_ids) <= budget
    assert r.report.used_tokens == len(r.prompt_ids) and r.report.budget == budget
    assert r.prefix.endswith(cur[:col]) and r.suffix.startswith(cur[col:])
    assert r.prompt_ids == fim_prompt(tok, r.prefix, r.suffix)
    # never cuts inside a character: the prompt decodes cleanly; lines come from the source
    assert "\ufffd" not in tok.decode(r.prompt_ids)
    src_lines = src.split("\n")
    before = r.prefix.split("\n")[:-1]
    for ln in before:
        assert ln in src_lines[:line] or ln.strip() == "...", ln
    _check_lines_from_source("\n".join(before), src_lines[:line])
    after = r.suffix.split("\n")[1:]
    _check_lines_from_source("\n".join(after), src_lines[line + 1:])


@FAST
@given(c=case(), budget=st.integers(3, 60))
def test_tiny_budgets_never_exceeded(tiny_tokenizer, c, budget):
    src, line, col = c
    r = build_context(tiny_tokenizer, src, line, col, budget=budget)
    assert len(r.prompt_ids) <= budget
    cur = src.split("\n")[line]
    # whatever survives of the cursor line is the text right around the cursor
    assert cur[:col].endswith(r.prefix.split("\n")[-1]) or r.prefix.endswith(cur[:col])
    assert "\ufffd" not in tiny_tokenizer.decode(r.prompt_ids)


def test_whole_file_when_it_fits(tiny_tokenizer):
    src = "import os\n\n\ndef f(x):\n    return x + 1\n\n\nclass A:\n    def m(self):\n        return 2\n"
    r = build_context(tiny_tokenizer, src, 4, 12, budget=1000)
    assert r.prefix == "import os\n\n\ndef f(x):\n    return x"
    assert r.suffix == " + 1\n\n\nclass A:\n    def m(self):\n        return 2\n"
    assert r.report.trimmed == []
    assert r.prompt_ids == fim_prompt(tiny_tokenizer, r.prefix, r.suffix)


def test_budget_too_small_is_a_clear_error(tiny_tokenizer):
    with pytest.raises(ValueError, match="too small"):
        build_context(tiny_tokenizer, "x = 1\n", 0, 0, budget=2)


# -- trimming order --------------------------------------------------------------------------
ORDER_SRC = '''import os
import sys


def far_function(a):
    total = 0
    for i in range(a):
        total += i * 2
    return total


class FarClass:
    def method_one(self):
        return "one one one"

    def method_two(self):
        return "two two two"


def near_function(b):
    value = b * 3
    return value


class Here:
    def before(self):
        return 0

    def target(self, q):
        first = q + 1
        second = first * 2
        return second
'''
CURSOR = (30, 8)  # "second = first * 2", after the indentation


def _stage(r) -> tuple[bool, bool, bool, bool, bool]:
    p = r.prefix
    return (
        "total += i * 2" not in p,  # far function body collapsed (or dropped)
        "value = b * 3" not in p,  # nearer function body collapsed
        "method_one" not in p,  # far class collapsed to its name (or dropped)
        "def far_function" not in p,  # collapsed definitions dropped by distance
        "import os" not in p,  # imports kept longest
    )


def test_trimming_order(tiny_tokenizer):
    tok = tiny_tokenizer
    full = build_context(tok, ORDER_SRC, *CURSOR, budget=2000)
    assert full.report.trimmed == []
    seen = []
    for budget in range(full.report.used_tokens, 10, -3):
        r = build_context(tok, ORDER_SRC, *CURSOR, budget=budget)
        assert len(r.prompt_ids) <= budget
        seen.append(_stage(r))
        # the cursor line and the enclosing headers survive as long as imports do
        assert r.prefix.split("\n")[-1] == " " * 8  # the cursor line up to the cursor, always kept
        if "import os" in r.prefix:
            assert "class Here:" in r.prefix and "    def target(self, q):" in r.prefix
    # each stage happens no later than the ones after it: the flags switch on in order
    for flags in seen:
        assert list(flags) == sorted(flags, reverse=True), flags
    # and every stage is actually reached
    assert all(any(f[k] for f in seen) for k in range(5))


def test_collapse_shows_signature_and_ellipsis(tiny_tokenizer):
    tok = tiny_tokenizer
    full = build_context(tok, ORDER_SRC, *CURSOR, budget=2000).report.used_tokens
    for budget in range(full, 10, -1):
        r = build_context(tok, ORDER_SRC, *CURSOR, budget=budget)
        if "total += i * 2" not in r.prefix:
            assert "def far_function(a):\n    ...\n" in r.prefix
            assert "value = b * 3" in r.prefix  # nearer body still whole
            assert any("far_function" in t for t in r.report.trimmed)
            break
    else:
        raise AssertionError("far function never collapsed")
    for budget in range(full, 10, -1):
        r = build_context(tok, ORDER_SRC, *CURSOR, budget=budget)
        if "method_one" not in r.prefix and "class FarClass:" in r.prefix:
            assert "class FarClass:\n    ...\n" in r.prefix
            assert any("FarClass" in t for t in r.report.trimmed)
            break
    else:
        raise AssertionError("far class never collapsed to its name")


def test_enclosing_headers_and_imports_outlive_near_lines(tiny_tokenizer):
    tok = tiny_tokenizer
    cur_cost = len(tok.encode("        second = first * 2"))
    for budget in range(3 + cur_cost, 400):
        r = build_context(tok, ORDER_SRC, *CURSOR, budget=budget)
        if "import os" in r.prefix:
            # the whole chain of enclosing headers came first; near body lines come after imports
            assert "class Here:" in r.prefix and "    def target(self, q):" in r.prefix
            assert "def before" not in r.prefix and "near_function" not in r.prefix
            break
        if "first = q + 1" in r.prefix:
            raise AssertionError("a near line was kept before the imports")
    else:
        raise AssertionError("imports never kept")


def test_suffix_side_and_prefix_share(tiny_tokenizer):
    tok = tiny_tokenizer
    lines = [f"v{i} = {i} * {i}" for i in range(200)]
    src = "\n".join(lines)
    r = build_context(tok, src, 100, 0, budget=120)
    assert r.report.prefix_tokens > r.report.suffix_tokens > 0  # the prefix gets the larger share
    assert r.suffix.startswith("v100 = 100 * 100\nv101")
    assert r.prefix.endswith("v99 = 99 * 99\n")
    assert r.report.dropped_prefix_lines > 0 and r.report.dropped_suffix_lines > 0
    # at the end of the file the unused suffix budget goes to the prefix
    r_end = build_context(tok, src, 199, 0, budget=120)
    assert r_end.report.prefix_tokens > r.report.prefix_tokens


def test_related_files(tiny_tokenizer):
    tok = tiny_tokenizer
    src = "def f(x):\n    return helper(x)\n"
    rel = [("util.py", "def helper(y):\n    return y * 2\n")]
    r = build_context(tok, src, 1, 11, budget=200, related=rel)
    text = tok.decode(r.prompt_ids)
    assert "# util.py" in text and "def helper(y)" in text
    assert r.report.related_tokens > 0 and len(r.prompt_ids) <= 200
    sep = tok.special_id("file_sep")
    assert r.prompt_ids.count(sep) == 2
    # when the document alone fills the budget, related files go first
    tight = build_context(tok, src, 1, 11, budget=3 + len(tok.encode(src)) + 1, related=rel)
    assert len(tight.prompt_ids) <= 3 + len(tok.encode(src)) + 1
    assert sep not in tight.prompt_ids and tight.prefix == "def f(x):\n    return "
    assert any("util.py" in t for t in tight.report.trimmed)


def test_selection_is_kept_whole(tiny_tokenizer):
    tok = tiny_tokenizer
    src = "\n".join(f"a{i} = {i}" for i in range(100))
    r = build_context(tok, src, 40, budget=60, end_line=44)
    assert "a40 = 40\na41 = 41\na42 = 42\na43 = 43\na44 = 44" in r.prefix + r.suffix
    assert len(r.prompt_ids) <= 60


def test_ten_thousand_lines_is_planned_lazily(tiny_tokenizer):
    """Only lines near the cursor are tokenised (the speed is measured in assistant.bench)."""
    from assistant.context import line_counter

    tok = tiny_tokenizer
    parts = []
    for i in range(1000):
        parts.append(f"def func_{i}(a, b):\n    x = a + b * {i}\n    y = x - {i}\n    if y > 0:\n"
                     f"        return x\n    return y\n\n\n")
    src = "import os\n" + "".join(parts)
    assert src.count("\n") > 8000
    counter = line_counter(tok)
    before = counter.calls
    r = build_context(tok, src, 5000, 4, budget=200)
    assert len(r.prompt_ids) <= 200
    assert counter.calls - before < 1500


@FAST
@given(c=case(), span=st.integers(0, 4), extra=st.integers(0, 200))
def test_selection_kept_and_budget_respected(tiny_tokenizer, c, span, extra):
    tok = tiny_tokenizer
    src, line, _ = c
    lines = src.split("\n")
    end = min(line + span, len(lines) - 1)
    selection = "\n".join(lines[line:end + 1])
    budget = 3 + len(tok.encode(selection)) + end - line + 4 + extra
    r = build_context(tok, src, line, budget=budget, end_line=end)
    assert len(r.prompt_ids) <= budget
    assert r.prefix.endswith(selection)


def test_source_window_cuts_long_files_around_the_cursor(tiny_tokenizer):
    from assistant.context import WINDOW_CHARS_PER_TOKEN, source_window

    text = "\n".join(f"line{i:04d} a b" for i in range(100_000))  # 14 characters a line
    budget = 60
    window, k = source_window(text, 50_000, budget)
    lines = window.split("\n")
    assert lines[k] == "line50000 a b" and len(window) <= budget * WINDOW_CHARS_PER_TOKEN
    assert 0.7 < k / len(lines) < 0.8  # about 3/4 before the cursor line
    window, k = source_window(text, 2, budget)  # near the top: the suffix takes the rest
    assert k == 2 and len(window) > budget * WINDOW_CHARS_PER_TOKEN - 20
    window, k = source_window(text, 99_999, budget)
    assert window.split("\n")[k] == "line99999 a b" and k == len(window.split("\n")) - 1
    assert source_window("x = 1", 0, 1) == ("x = 1", 0)  # short: whole
    # the prompt for a 100,000-line file is built from the window, as fast as for a short file
    result = build_context(tiny_tokenizer, *source_window(text, 50_000, 200), budget=200)
    assert len(result.prompt_ids) <= 200 and result.prefix.endswith("line49999 a b\n")
    assert result.suffix.startswith("line50000 a b")
