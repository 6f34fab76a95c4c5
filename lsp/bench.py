"""Completion latency of the language server: ``python -m lsp.bench``.

Starts the real server over stdio (``python -m assistant.cli lsp``) with the given model
(default: the shipped one), opens real Python files (stdlib modules), and times a
``textDocument/completion`` request at N cursor positions chosen mid-line in a statement,
where the assistant asks for a single-line completion. By default (``--mode typed``) each
line is first cut at the cursor with a ``didChange``, as if the user were typing it, and
the rest of the original line is the expected answer (exact-match rate reported);
``--mode inplace`` asks in the unchanged file (code follows the cursor); ``--mode keystrokes``
types the last ``KEYSTROKES`` characters before each cursor one at a time, a request after each
(what an editor does while the user types: successive prompts share all but their ends). The time is the
client's: request sent -> response parsed, the full editor path. Prints p50/p95 plus
machine, versions and date; ``--json FILE`` also writes the numbers. Diagnostics are
switched off during the run so only completion work is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

DEFAULT_MODULES = ["json/decoder.py", "json/encoder.py", "textwrap.py", "argparse.py", "csv.py", "shlex.py",
                   "fractions.py", "heapq.py", "bisect.py", "difflib.py", "string.py", "calendar.py"]


class BenchError(Exception):
    """A one-line reason the benchmark cannot run."""


def stdlib_files(names: list[str]) -> list[Path]:
    root = Path(os.__file__).parent
    return [root / n for n in names if (root / n).is_file()]


def workspace_files(root: Path, limit: int = 12) -> list[Path]:
    """Up to ``limit`` Python files of ``root`` with 50 lines or more (a seeded choice)."""
    got = sorted(p for p in root.rglob("*.py") if p.is_file()
                 and p.read_text(encoding="utf-8", errors="replace").count("\n") >= 50)
    random.Random(0).shuffle(got)
    return got[:limit]


def cursor_positions(files: list[Path], n: int, seed: int = 0) -> list[tuple[Path, int, int]]:
    """``n`` (file, line, column) cursors: inside a code line, after an identifier character
    or an operator, with code still following on the line (single-line territory)."""
    rng = random.Random(seed)
    candidates: list[tuple[Path, int, int]] = []
    for f in files:
        lines = f.read_text(encoding="utf-8").split("\n")
        for i, line in enumerate(lines):
            s = line.strip()
            if len(s) < 12 or s.startswith(("#", '"', "'", "@")) or line.isspace() or not line.isascii():
                continue
            indent = len(line) - len(line.lstrip())
            cols = [c for c in range(indent + 3, len(line) - 3)
                    if (line[c - 1].isalnum() or line[c - 1] in "_.=( ") and any(ch.isalnum() for ch in line[c:])]
            if cols:
                candidates.append((f, i, rng.choice(cols)))
    rng.shuffle(candidates)
    return sorted(candidates[:n], key=lambda t: (str(t[0]), t[1]))


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "-"


def machine() -> dict:
    from assistant.bench import cpu_name

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "torch": _version("torch"), "pygls": _version("pygls"),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg())}


KEYSTROKES = 6  # --mode keystrokes: characters typed before each cursor, one request each
TYPING = ("typed", "keystrokes")  # modes that cut the line at the cursor, as typed


def typed_text(text: str, line: int, col: int) -> tuple[str, str]:
    """The file with ``line`` cut at ``col`` (the user is typing it) and the cut-off rest."""
    lines = text.split("\n")
    rest = lines[line][col:]
    lines[line] = lines[line][:col]
    return "\n".join(lines), rest


async def run(model: str | None, n: int, max_tokens: int, warmup: int, files: list[Path],
              max_line_tokens: int = 32, context_tokens: int = 512, mode: str = "typed",
              workspace: Path | None = None, pause: float = 0.0, repo_context: bool = True,
              settle: float = 0.0) -> dict:
    from lsprotocol import types
    from pygls.lsp.client import LanguageClient

    positions = cursor_positions(files, n + warmup)
    if len(positions) < n + warmup:
        raise BenchError(f"only {len(positions)} cursor positions in the files")
    warm, timed = positions[:warmup], positions[warmup:]
    typing = mode in TYPING
    if mode == "keystrokes":  # each cursor reached by typing its last few characters
        timed = [(f, line, c) for f, line, col in timed for c in range(max(1, col - KEYSTROKES + 1), col + 1)]
    log = Path(tempfile.gettempdir()) / "moecoder-lsp-bench.log"
    args = ["-m", "assistant.cli", "lsp", "--log-file", str(log)] + (["--model", model] if model else [])
    client = LanguageClient("moecoder-bench", "1")
    errors: list[str] = []

    @client.feature(types.WINDOW_SHOW_MESSAGE)
    def show_message(params: types.ShowMessageParams) -> None:
        if params.type == types.MessageType.Error:
            errors.append(params.message)

    await client.start_io(sys.executable, *args)
    caps = types.ClientCapabilities(text_document=types.TextDocumentClientCapabilities(
        completion=types.CompletionClientCapabilities(), diagnostic=types.DiagnosticClientCapabilities()))
    t0 = time.perf_counter()
    await client.initialize_async(types.InitializeParams(
        capabilities=caps, root_uri=workspace.resolve().as_uri() if workspace is not None else None,
        initialization_options={"moecoder": {
            "maxTokens": max_tokens, "maxLineTokens": max_line_tokens, "contextTokens": context_tokens,
            "repositoryContext": workspace is not None and repo_context, "features": {"diagnostics": False}}}))
    client.initialized(types.InitializedParams())
    versions: dict[Path, int] = {}

    def open_file(f: Path, line: int, col: int) -> tuple[str, str]:
        uri = f.as_uri()
        text = f.read_text(encoding="utf-8")
        rest = ""
        if typing:
            text, rest = typed_text(text, line, col)
        if f not in versions:
            versions[f] = 1
            client.text_document_did_open(types.DidOpenTextDocumentParams(text_document=types.TextDocumentItem(
                uri=uri, language_id="python", version=1, text=text)))
        elif typing:
            versions[f] += 1
            client.text_document_did_change(types.DidChangeTextDocumentParams(
                text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=versions[f]),
                content_changes=[types.TextDocumentContentChangeWholeDocument(text=text)]))
        return uri, rest

    async def one(f: Path, line: int, col: int) -> tuple[float, int, str, str]:
        uri, rest = open_file(f, line, col)
        start = time.perf_counter()
        res = await client.text_document_completion_async(types.CompletionParams(
            text_document=types.TextDocumentIdentifier(uri=uri), position=types.Position(line, col)))
        dt = time.perf_counter() - start
        items = list(res.items) if res is not None else []
        inserted = ""
        if items:  # the text edit replaces the word before the cursor with word + completion
            edit = items[0].text_edit
            inserted = edit.new_text[col - edit.range.start.character:]
        return dt, len(items), inserted, rest

    first = None
    for f, line, col in warm:
        dt, _, _, _ = await one(f, line, col)
        first = first if first is not None else dt
    load_s = time.perf_counter() - t0
    if settle:  # quiet after the warm-up: the server reads the workspace (repositoryContext)
        await asyncio.sleep(settle)
    if errors:
        await client.shutdown_async(None)
        client.exit(None)
        await client.stop()
        raise BenchError(errors[0])
    from rich.console import Console
    from rich.progress import Progress

    times, nonempty, exact, samples = [], 0, 0, []
    bar = Progress(console=Console(stderr=True), transient=True, disable=not sys.stderr.isatty())
    task = bar.add_task("requests", total=len(timed))
    bar.start()
    for f, line, col in timed:
        if pause:  # the user stops typing: the server reads the workspace meanwhile (repositoryContext)
            await asyncio.sleep(pause)
        dt, count, text, rest = await one(f, line, col)
        times.append(dt)
        nonempty += count > 0
        exact += typing and bool(text.strip()) and text.rstrip() == rest.rstrip()
        if len(samples) < 5 and text:
            samples.append({"file": f.name, "line": line, "column": col, "text": text, "expected": rest})
        bar.advance(task)
    bar.stop()
    await client.shutdown_async(None)
    client.exit(None)
    await client.stop()
    return {
        "model": model or "(shipped model)", "mode": mode, "requests": len(times), "nonempty": nonempty,
        "exact_match": exact if typing else None,
        "max_tokens": max_tokens, "max_line_tokens": max_line_tokens, "context_tokens": context_tokens,
        "p50_ms": 1000 * statistics.median(times), "p95_ms": 1000 * percentile(times, 0.95),
        "mean_ms": 1000 * statistics.fmean(times), "max_ms": 1000 * max(times),
        "startup_and_warmup_s": load_s, "first_request_s": first, "files": [f.name for f in files],
        "workspace": str(workspace) if workspace is not None else None, "pause_s": pause,
        "repository_context": workspace is not None and repo_context, "settle_s": settle,
        "samples": samples, "machine": machine(), "positions": [(str(f), ln, c) for f, ln, c in timed],
    }


def engine_only(model: str | None, positions: list[tuple[str, int, int]], max_tokens: int,
                context_tokens: int = 512, mode: str = "typed") -> list[float]:
    """The same completions straight through ``Engine.run`` in this process (same context
    window as the server), to separate the model's time from the server's."""
    from assistant.engine import Engine
    from assistant.tasks import TaskRequest

    engine = Engine(model_dir=model)
    texts: dict[str, str] = {}
    times = []
    try:
        for i, (f, line, col) in enumerate([(positions[0][0], positions[0][1], positions[0][2])] + positions):
            text = texts.setdefault(f, Path(f).read_text(encoding="utf-8"))
            if mode in TYPING:
                text, _ = typed_text(text, line, col)
            start = time.perf_counter()
            engine.run(TaskRequest(task="complete", source=text, path=f, line=line, column=col,
                                   max_new_tokens=max_tokens, max_seconds=10.0, context_tokens=context_tokens))
            if i:  # the first is a warm-up
                times.append(time.perf_counter() - start)
    finally:
        engine.close()
    return times


def midword_positions(files: list[Path], n: int, seed: int = 0, typed: int = 3) -> list[tuple[Path, int, int, str]]:
    """``n`` (file, line, column, word) cursors in the middle of a name of 5+ characters in
    code (``tokenize`` NAME tokens: not in strings or comments), ``typed`` characters into it
    (``text.sp|lit()``); one per line at most."""
    import io
    import keyword
    import tokenize

    rng = random.Random(seed)
    out: list[tuple[Path, int, int, str]] = []
    for f in files:
        text = f.read_text(encoding="utf-8")
        per_line: dict[int, list[tuple[int, str]]] = {}
        for t in tokenize.generate_tokens(io.StringIO(text).readline):
            if t.type == tokenize.NAME and len(t.string) >= 5 and not keyword.iskeyword(t.string) and t.string.isascii():
                per_line.setdefault(t.start[0] - 1, []).append((t.start[1], t.string))
        for i, words in per_line.items():
            col, word = rng.choice(words)
            out.append((f, i, col + typed, word))
    rng.shuffle(out)
    return out[:n]


def midword(model: str | None, positions: list[tuple[Path, int, int, str]], max_tokens: int,
            context_tokens: int = 512) -> dict:
    """Mid-word completions (the line cut at the cursor, as typed) through ``Engine.run``, with
    and without token healing: how often the completion continues the word as the file does."""
    import re

    import assistant.tasks as tasks
    from assistant.engine import Engine
    from assistant.tasks import TaskRequest

    engine = Engine(model_dir=model)
    texts: dict[Path, str] = {}
    out: dict = {}
    try:
        for healing in (False, True):
            tasks.TOKEN_HEALING = healing
            hits, times, samples = 0, [], []
            for f, line, col, _word in positions:
                text, rest_of_line = typed_text(texts.setdefault(f, f.read_text(encoding="utf-8")), line, col)
                start = time.perf_counter()
                res = engine.run(TaskRequest(task="complete", source=text, path=str(f), line=line, column=col,
                                             max_new_tokens=max_tokens, max_seconds=10.0,
                                             context_tokens=context_tokens))
                times.append(time.perf_counter() - start)
                got = getattr(res, "text", "") or ""
                need = re.match(r"\w*", rest_of_line).group(0)  # the rest of the word in the file
                hit = bool(need) and got.startswith(need)
                hits += hit
                if len(samples) < 4:
                    samples.append((f"{f.name}:{line + 1}:{col + 1}", text.split(chr(10))[line][-12:], got, need))
            out["healing" if healing else "plain"] = {
                "continues_the_word": hits, "n": len(positions), "p50_ms": 1000 * statistics.median(times),
                "samples": samples}
    finally:
        tasks.TOKEN_HEALING = True
        engine.close()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lsp.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", metavar="DIR", help="model directory (default: the shipped model)")
    p.add_argument("-n", type=int, default=100, help="timed cursor positions (default 100)")
    p.add_argument("--warmup", type=int, default=3, help="untimed requests first (model load; default 3)")
    p.add_argument("--max-tokens", type=int, default=48, help="completion token limit (server setting maxTokens)")
    p.add_argument("--max-line-tokens", type=int, default=32,
                   help="limit where code follows the cursor (server setting maxLineTokens; all positions here)")
    p.add_argument("--mode", choices=["typed", "inplace", "midword", "keystrokes"], default="typed",
                   help="typed: cut each line at the cursor first (default); inplace: the unchanged file; "
                        "midword: N cursors 3 characters into an identifier, line cut there, through "
                        "Engine.run with and without token healing (does the completion continue the word?); "
                        f"keystrokes: the last {KEYSTROKES} characters before each of the N cursors typed one "
                        "at a time, a request after each (N x 6 timed requests)")
    p.add_argument("--context-tokens", type=int, default=512,
                   help="code around the cursor in the prompt (server setting contextTokens)")
    p.add_argument("--workspace", metavar="DIR",
                   help="open this project as the workspace, repositoryContext on (the server reads it into "
                        "the completion memory while idle), and complete in its own files (default: stdlib "
                        "files, no workspace)")
    p.add_argument("--no-repository-context", action="store_true",
                   help="with --workspace: repositoryContext off (the same files, no memory; for A/B runs)")
    p.add_argument("--settle", type=float, default=0.0,
                   help="seconds of quiet after the warm-up, before the timed requests (the idle reader reads "
                        "the workspace then)")
    p.add_argument("--pause", type=float, default=0.0,
                   help="seconds of quiet before each timed request (the idle reader works then)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--compare", action="store_true",
                   help="also time the same completions through Engine.run in-process (model time alone)")
    args = p.parse_args(argv)
    if args.model is not None and not Path(args.model).is_dir():
        print(f"lsp.bench: error: model directory not found: {args.model}", file=sys.stderr)
        return 2
    if args.n < 1 or args.warmup < 1:
        print("lsp.bench: error: -n and --warmup must be >= 1", file=sys.stderr)
        return 2
    files = stdlib_files(DEFAULT_MODULES)
    workspace = None
    if args.workspace is not None:
        workspace = Path(args.workspace)
        if not workspace.is_dir():
            print(f"lsp.bench: error: workspace not found: {args.workspace}", file=sys.stderr)
            return 2
        files = workspace_files(workspace)
        if not files:
            print(f"lsp.bench: error: no Python files of 50 lines or more in {args.workspace}", file=sys.stderr)
            return 2
    if args.pause < 0 or args.settle < 0:
        print("lsp.bench: error: --pause and --settle must be >= 0", file=sys.stderr)
        return 2
    if args.mode == "midword":
        positions = midword_positions(files, args.n)
        r = midword(args.model, positions, args.max_tokens, args.context_tokens)
        m = machine()
        print(f"moecoder mid-word completion ({len(positions)} cursors 3 characters into an identifier, "
              f"{len(files)} stdlib files, line cut at the cursor; Engine.run in-process)")
        for k in ("plain", "healing"):
            v = r[k]
            print(f"  {k:8} continues the word as the file does: {v['continues_the_word']}/{v['n']}   "
                  f"p50 {v['p50_ms']:.0f} ms")
            for where, typed, got, need in v["samples"]:
                print(f"    {where}: ...{typed!r} -> {got!r} (file: {need!r}...)")
        print(f"  machine: {m['cpu']}, {m['cores']} cores; {m['platform']}; load average {m['load_average']}")
        print(f"  python {m['python']}, torch {m['torch']}; {m['date']}")
        if args.json:
            Path(args.json).write_text(json.dumps(r, indent=2, default=str), encoding="utf-8")
        return 0
    try:
        r = asyncio.run(asyncio.wait_for(run(args.model, args.n, args.max_tokens, args.warmup, files, args.max_line_tokens,
                                      args.context_tokens, args.mode, workspace, args.pause,
                                      not args.no_repository_context, args.settle), 3600))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BenchError as e:
        print(f"lsp.bench: error: {e}", file=sys.stderr)
        return 2
    m = r["machine"]
    where = (f"files of the workspace {r['workspace']} (repositoryContext "
             f"{'on' if r['repository_context'] else 'off'})" if r["workspace"] else "stdlib files")
    print(f"moecoder LSP completion latency ({r['requests']} single-line requests over stdio, "
          f"{len(r['files'])} {where}, mode {r['mode']}" + (f", {r['pause_s']:g} s quiet before each" if r["pause_s"]
                                                             else "")
          + (f", {r['settle_s']:g} s quiet after the warm-up" if r["settle_s"] else "") + ")")
    print(f"  model: {r['model']}   maxTokens: {r['max_tokens']}   maxLineTokens: {r['max_line_tokens']}   contextTokens: {r['context_tokens']}   non-empty results: {r['nonempty']}/{r['requests']}"
          + (f"   exact line match: {r['exact_match']}/{r['requests']}" if r["exact_match"] is not None else ""))
    print(f"  p50 {r['p50_ms']:.0f} ms   p95 {r['p95_ms']:.0f} ms   mean {r['mean_ms']:.0f} ms   "
          f"max {r['max_ms']:.0f} ms   (start + {args.warmup} warm-up requests: {r['startup_and_warmup_s']:.1f} s)")
    print(f"  machine: {m['cpu']}, {m['cores']} cores; {m['platform']}; load average {m['load_average']}")
    print(f"  python {m['python']}, torch {m['torch']}, pygls {m['pygls']}; {m['date']}")
    if args.compare:
        cap = args.max_tokens if args.mode in TYPING else min(args.max_tokens, args.max_line_tokens)
        t = engine_only(args.model, r["positions"], cap, args.context_tokens, args.mode)
        r["engine_p50_ms"], r["engine_p95_ms"] = 1000 * statistics.median(t), 1000 * percentile(t, 0.95)
        print(f"  the same through Engine.run in this process (no server, no JSON-RPC): "
              f"p50 {r['engine_p50_ms']:.0f} ms   p95 {r['engine_p95_ms']:.0f} ms")
    for s in r["samples"][:3]:
        print(f"  e.g. {s['file']}:{s['line'] + 1}:{s['column']} -> {s['text']!r}"
              + (f" (file: {s['expected']!r})" if r["mode"] in TYPING else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
