"""Docstrings, one module for the product and the task data.

- :func:`parse`: summary, free text, parameters, return and raised exceptions of a
  docstring in any style (Google, NumPy, reST, plain), by ``docstring_parser``.
- :func:`render`: a docstring literal in a file's style from those parts, with only what was
  written (no placeholders) and the function's real parameters, types and exceptions. Ours,
  not ``docstring_parser.compose``: the product's rules (drop undescribed entries, types from
  the signature, the file's indentation, one-line literals) are the point of it.
- :func:`target` / :func:`summary`: the docstring the comment task is trained to write (the
  summary paragraph and the Args/Returns/Raises sections, verbatim, within a length).
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field

MAX_ANSWER_CHARS = 300


@dataclass
class DocParts:
    summary: str = ""
    body: str = ""  # free text after the summary that is not a section
    params: dict[str, str] = field(default_factory=dict)
    returns: str = ""
    raises: dict[str, str] = field(default_factory=dict)


def strip_quotes(text: str) -> str:
    """The docstring's text from a literal (or a model's answer with stray quotes)."""
    t = text.strip()
    for q in ('"""', "'''", '"', "'"):
        if t.startswith(q):
            t = t[len(q):]
            break
    for q in ('"""', "'''"):
        if q in t:
            t = t[: t.index(q)]
    for q in ('"', "'"):
        if t.endswith(q):
            t = t[:-1]
    return inspect.cleandoc(t.strip("\n"))


def _flat(text: str | None) -> str:
    return " ".join((text or "").split())


def parse(text: str) -> DocParts:
    """The parts of a docstring in any style (best effort: unparseable text is the summary)."""
    import docstring_parser

    t = strip_quotes(text)
    try:
        doc = docstring_parser.parse(t)
    except docstring_parser.ParseError:
        doc = docstring_parser.parse(t.split("\n\n")[0])
    free = "\n".join(x for x in (doc.short_description, doc.long_description) if x)
    first, _, rest = free.partition("\n\n")  # the summary is the first paragraph
    parts = DocParts(summary=_flat(first), body=rest.strip())
    for p in doc.params:
        parts.params[p.arg_name.lstrip("*")] = _flat(p.description)
    if doc.returns is not None:
        parts.returns = _flat(doc.returns.description)
    for r in doc.raises:
        if r.type_name:
            parts.raises[r.type_name] = _flat(r.description)
    return parts


def _sentence(text: str, fallback: str) -> str:
    s = " ".join(text.split())
    if not s:
        s = fallback
    s = s[0].upper() + s[1:]
    return s if s.endswith((".", "!", "?", "...")) else s + "."


def render(parts: DocParts, style: str, indent: str, *, name: str | None = None, params: list[str] | None = None,
           types: dict[str, str] | None = None, raises: list[str] | None = None,
           returns_value: bool = True) -> str:
    """The full docstring literal in ``style`` with continuation lines indented by ``indent``.

    Only what the model wrote goes in: a parameter, return value or exception without a
    description from the model is left out, and a section with nothing in it is omitted
    (never a placeholder such as "TODO"). ``name``, ``params`` (their order), ``types``,
    ``raises`` and ``returns_value`` come from the function's real signature when known."""
    params = list(params) if params is not None else list(parts.params)
    types = types or {}
    pdesc = {k.lstrip("*"): " ".join(v.split()) for k, v in parts.params.items()}
    params = [p for p in params if pdesc.get(p.lstrip("*"))]
    raises = list(dict.fromkeys([*(raises or []), *parts.raises]))
    raises = [r for r in raises if " ".join(parts.raises.get(r, "").split())]
    returns = " ".join(parts.returns.split())
    if not returns_value:
        returns = ""
    fallback = name.replace("_", " ").strip().capitalize() if name else ""
    summary = _sentence(parts.summary, fallback or "Undocumented") if (parts.summary.strip() or fallback) else ""
    out: list[str] = [summary] if summary else []
    if parts.body:
        out += ["", parts.body] if out else [parts.body]

    def desc(name: str) -> str:
        return _sentence(pdesc[name.lstrip("*")], "")

    if style == "google":
        if params:
            out += ["", "Args:"] + [f"    {p}: {desc(p)}" for p in params]
        if returns:
            out += ["", "Returns:", f"    {_sentence(returns, '')}"]
        if raises:
            out += ["", "Raises:"] + [f"    {r}: {_sentence(parts.raises[r], '')}" for r in raises]
    elif style == "numpy":
        if params:
            out += ["", "Parameters", "----------"]
            for p in params:
                t = types.get(p)
                out += [f"{p} : {t}" if t else p, f"    {desc(p)}"]
        if returns:
            out += ["", "Returns", "-------", f"    {_sentence(returns, '')}"]
        if raises:
            out += ["", "Raises", "------"]
            for r in raises:
                out += [r, f"    {_sentence(parts.raises[r], '')}"]
    elif style == "rest":
        fields = [f":param {p.lstrip('*')}: {desc(p)}" for p in params]
        if returns:
            fields.append(f":returns: {_sentence(returns, '')}")
        fields += [f":raises {r}: {_sentence(parts.raises[r], '')}" for r in raises]
        if fields:
            out += [""] + fields
    if not out:
        out = ["Undocumented."]
    if out[0] == "":
        out = out[1:]
    if len(out) == 1:
        return f'"""{out[0]}"""'
    body = "\n".join((indent + ln) if ln else "" for ln in out[1:])
    return f'"""{out[0]}\n{body}\n{indent}"""'




_SECTION_WANTED = {"args", "arguments", "parameters", "params", "returns", "return", "raises", "yields"}
_GOOGLE_HEADER = re.compile(r"^([A-Za-z][A-Za-z ]*):\s*$")
_UNDERLINE = re.compile(r"^\s*(-{3,}|={3,})\s*$")


def target(doc: str, limit: int = MAX_ANSWER_CHARS) -> str:
    """The summary paragraph plus Args/Returns/Raises sections (Google, numpy or reST), <= ``limit``."""
    lines = inspect.cleandoc(doc).split("\n")
    summary_lines: list[str] = []
    i = 0
    while i < len(lines) and lines[i].strip():
        summary_lines.append(lines[i].strip())
        i += 1
    summary = " ".join(summary_lines)
    if len(summary) > limit:
        cut = summary[:limit].rsplit(" ", 1)[0]
        return cut.rstrip(",;:") + "..."
    # split the rest into sections by header
    sections: list[tuple[str, list[str]]] = []
    cur: tuple[str, list[str]] | None = None
    rest = lines[i:]
    j = 0
    while j < len(rest):
        line = rest[j]
        header = None
        m = _GOOGLE_HEADER.match(line)
        if m and not line.startswith(" "):
            header = m.group(1).strip().lower()
        elif (
            j + 1 < len(rest) and _UNDERLINE.match(rest[j + 1]) and line.strip() and not line.startswith(" ")
        ):
            header = line.strip().lower()
        elif line.lstrip().startswith((":param", ":return", ":raises", ":type", ":rtype")):
            if cur is None or cur[0] != "rest":
                cur = ("rest", [])
                sections.append(cur)
            if not line.lstrip().startswith((":type", ":rtype")):
                cur[1].append(line.strip())
            j += 1
            continue
        if header is not None:
            cur = (header, [line])
            sections.append(cur)
        elif cur is not None:
            cur[1].append(line)
        j += 1
    kept = []
    for name, body in sections:
        if name in _SECTION_WANTED or name == "rest":
            while body and not body[-1].strip():
                body.pop()
            if name == "rest":
                kept.append("\n".join(body))
            else:
                kept.append("\n".join(body))
    text = summary
    for sec in kept:
        candidate = text + "\n\n" + sec
        if len(candidate) <= limit:
            text = candidate
            continue
        # add as many whole lines of the section as fit
        partial = text + "\n"
        for line in sec.split("\n"):
            if len(partial) + 1 + len(line) > limit:
                break
            partial += "\n" + line
        if partial.count("\n") >= text.count("\n") + 3:  # header + at least one line
            text = partial
        break
    return text


def summary(doc: str, limit: int = 200) -> str:
    return target(doc, limit=limit).split("\n\n")[0]
