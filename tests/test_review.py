"""assistant.review: the batch review CLI (text / JSON / SARIF, bad input, exit codes)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from assistant_fakes import ScriptedBackend

from assistant.engine import Engine
from assistant.review import Report, main, parse_diff
from tests.shared_data import require_shared

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "buggy"
SARIF_SCHEMA = ROOT.parent / "shared" / "schemas" / "sarif-schema-2.1.0.json"
JSON_SCHEMA = ROOT / "docs" / "review-json-schema.json"

@pytest.fixture(autouse=True)
def _no_user_config(tmp_path, monkeypatch):
    """Tests never read the developer's ~/.config/moecoder/config.toml."""
    monkeypatch.setenv("MOECODER_CONFIG", str(tmp_path / "no-config.toml"))


PLANTED = {  # marker in the code -> (hint, fix)
    "range(len(values) + 1)": ("off-by-one: reads past the end", "for i in range(len(values)):"),
    "items[mid] > target": ("wrong comparison", "if items[mid] < target:"),
    "len(sentence)": ("variable misuse: should be the word", "lengths[word] = len(word)"),
}


def script(task, code):
    if task == "debug":
        for line in code.split("\n"):
            for marker, (hint, fix) in PLANTED.items():
                if marker in line:
                    n = int(line.split("|", 1)[0])
                    return f"Line {n} looks wrong: {hint}.", f"line {n}: {hint}\nfix: {fix}"
        return "Each line does what the docstring says.", "no issue"
    if task == "comment":
        return "It computes something.", "Compute something.\n\nArgs:\n    x: a value."
    return "", ""


@pytest.fixture
def fake_engine(tiny_tokenizer):
    return Engine.from_loaded(backend=ScriptedBackend(tiny_tokenizer, script, context_length=4096))


def run(argv, engine, capsys):
    """main() with every hint kept (``--min-confidence 0``) unless the test sets a threshold."""
    if argv and "--min-confidence" not in argv:
        argv = [*argv, "--min-confidence", "0"]
    code = main(argv, engine=engine)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_example_dir_findings_and_exit_codes(fake_engine, capsys):
    code, out, err = run([str(EXAMPLES), "--format", "json"], fake_engine, capsys)
    assert code == 1 and err == ""  # warnings found; no progress bar when not on a terminal
    rep = Report.from_json(out)
    bugs = {(Path(f.path).name, f.line, f.function) for f in rep.findings if f.rule == "MC001"}
    assert bugs == {("stats.py", 14, "mean"), ("search.py", 19, "binary_search"), ("text.py", 15, "word_lengths")}
    docs = {f.function for f in rep.findings if f.rule == "MC002"}
    assert docs == {"moving_average", "find_max", "title_case"}
    assert rep.files_reviewed == 4 and rep.functions_reviewed == 9 and not rep.skipped
    fix = next(f for f in rep.findings if f.function == "mean" and f.rule == "MC001")
    assert fix.code == "    for i in range(len(values) + 1):" and fix.fix == "    for i in range(len(values)):"
    assert run([str(EXAMPLES), "--fail-on", "error"], fake_engine, capsys)[0] == 0
    assert run([str(EXAMPLES), "--fail-on", "none"], fake_engine, capsys)[0] == 0
    # above every hint's confidence only the docstring notes remain: below the default fail-on
    code, out, _ = run([str(EXAMPLES), "--min-confidence", "0.999", "--format", "json"], fake_engine, capsys)
    assert code == 0 and {f.rule for f in Report.from_json(out).findings} == {"MC002"}
    assert run([str(EXAMPLES), "--min-confidence", "0.999", "--fail-on", "note"], fake_engine, capsys)[0] == 1


def test_json_round_trips_and_matches_its_schema(fake_engine, capsys):
    jsonschema = pytest.importorskip("jsonschema")
    _, out, _ = run([str(EXAMPLES), "--format", "json"], fake_engine, capsys)
    data = json.loads(out)
    jsonschema.Draft202012Validator(json.loads(JSON_SCHEMA.read_text())).validate(data)
    rep = Report.from_json(out)
    assert rep.to_json() == out
    assert Report.from_dict(rep.to_dict()) == rep
    with pytest.raises(ValueError):
        Report.from_json('{"findings": []}')


def _sarif_validator():
    jsonschema = pytest.importorskip("jsonschema")
    require_shared(SARIF_SCHEMA, "the SARIF schema")
    return jsonschema.Draft4Validator(json.loads(SARIF_SCHEMA.read_text()))


def test_sarif_is_valid_with_rules_levels_regions_fixes_fingerprints(fake_engine, capsys, tmp_path):
    validator = _sarif_validator()
    out_file = tmp_path / "review.sarif"
    code, out, _ = run([str(EXAMPLES), "--format", "sarif", "--output", str(out_file)], fake_engine, capsys)
    assert code == 1 and out == ""
    sarif = json.loads(out_file.read_text())
    errors = sorted(validator.iter_errors(sarif), key=str)
    assert not errors, errors[0]
    run_ = sarif["runs"][0]
    assert [r["id"] for r in run_["tool"]["driver"]["rules"]] == ["MC001", "MC002"]
    results = run_["results"]
    assert {r["level"] for r in results} == {"warning", "note"}
    bug = next(r for r in results if r["ruleId"] == "MC001" and "stats.py" in
               r["locations"][0]["physicalLocation"]["artifactLocation"]["uri"])
    region = bug["locations"][0]["physicalLocation"]["region"]
    assert region["startLine"] == 14 and region["snippet"]["text"].strip().startswith("for i in range")
    rep = bug["fixes"][0]["artifactChanges"][0]["replacements"][0]
    assert rep["insertedContent"]["text"] == "    for i in range(len(values)):"
    assert rep["deletedRegion"]["startLine"] == 14
    fps = {r["partialFingerprints"]["moecoderFindingHash/v1"] for r in results}
    assert len(fps) == len(results)
    doc = next(r for r in results if r["ruleId"] == "MC002")
    assert doc["fixes"][0]["artifactChanges"][0]["replacements"][0]["insertedContent"]["text"].lstrip().startswith('"""')


def test_fingerprints_survive_line_shifts(fake_engine, capsys, tmp_path):
    src = (EXAMPLES / "stats.py").read_text()
    (tmp_path / "stats.py").write_text(src)
    _, a, _ = run([str(tmp_path), "--format", "sarif"], fake_engine, capsys)
    (tmp_path / "stats.py").write_text("# a new comment\n\n" + src)
    _, b, _ = run([str(tmp_path), "--format", "sarif"], fake_engine, capsys)

    def prints(text):
        return {(r["ruleId"], r["partialFingerprints"]["moecoderFindingHash/v1"],
                 r["locations"][0]["physicalLocation"]["region"]["startLine"]) for r in json.loads(text)["runs"][0]["results"]}

    pa, pb = prints(a), prints(b)
    assert {p[:2] for p in pa} == {p[:2] for p in pb} and {p[2] + 2 for p in pa} == {p[2] for p in pb}


def test_text_output_shows_reasoning_before_the_finding_and_the_code_line(fake_engine, capsys):
    _, out, _ = run([str(EXAMPLES / "stats.py")], fake_engine, capsys)
    lines = out.split("\n")
    k = next(i for i, ln in enumerate(lines) if ":14: warning:" in ln)
    assert "Line 14 looks wrong" in lines[k - 1]  # the file's numbering, as the finding (model said 11)
    assert lines[k + 1].strip() == "14 |     for i in range(len(values) + 1):"
    assert "fix: for i in range(len(values)):" in lines[k + 2]
    _, quiet, _ = run([str(EXAMPLES / "stats.py"), "--no-reasoning"], fake_engine, capsys)
    assert "looks wrong" not in quiet and ":14: warning:" in quiet
    assert "\x1b[" not in out  # no colour when piped


def _bad_tree(tmp_path: Path) -> Path:
    d = tmp_path / "proj"
    d.mkdir()
    shutil.copy(EXAMPLES / "stats.py", d / "good.py")
    (d / "binary.py").write_bytes(b"\x7fELF\x00\x00\x01\x02")
    (d / "latin1.py").write_bytes("x = 'caf\xe9'\n".encode("latin-1"))
    (d / "broken.py").write_text("def f(:\n    return\n")
    (d / "bom.py").write_bytes(b"\xef\xbb\xbfdef with_bom(x):\n    return x\n")  # valid: reviewed
    (d / "huge.py").write_text("x = 1\n" * 200_000)
    (d / "locked").mkdir()
    (d / "locked" / "secret.py").write_text("def s():\n    return 1\n")
    return d


def test_bad_input_is_reported_and_skipped(fake_engine, capsys, tmp_path, monkeypatch):
    d = _bad_tree(tmp_path)
    locked = d / "locked"
    if os.geteuid() == 0:  # root reads everything: make the walker see what a user would
        import assistant.files

        real = os.scandir
        monkeypatch.setattr(assistant.files.os, "scandir", lambda p: (_ for _ in ()).throw(
            PermissionError(13, "Permission denied", str(p))) if Path(p) == locked else real(p))
    locked.chmod(0)
    try:
        out_file = tmp_path / "r.json"
        code, _, err = run([str(d), str(tmp_path / "missing.py"), "--format", "json", "--output", str(out_file)],
                           fake_engine, capsys)
    finally:
        locked.chmod(0o755)
    rep = Report.from_json(out_file.read_text())
    reasons = {Path(s.path).name: s.reason for s in rep.skipped}
    assert reasons["binary.py"] == "binary file"
    assert reasons["latin1.py"].startswith("not valid UTF-8")
    assert reasons["broken.py"].startswith("does not parse")
    assert reasons["huge.py"].startswith("too many lines")
    assert reasons["locked"] == "permission denied"
    assert reasons["missing.py"] == "no such file or directory"
    # the rest was reviewed, the results were written, and a missing PATH makes it exit 2
    assert rep.files_reviewed == 2 and any(f.function == "mean" for f in rep.findings)
    assert any(f.function == "with_bom" for f in rep.findings)
    assert code == 2 and "missing.py" in err and "Traceback" not in err
    # without the missing path: findings decide the exit code
    code, out, _ = run([str(d), "--format", "json"], fake_engine, capsys)
    assert code == 1 and Report.from_json(out).files_reviewed == 2


def test_fifo_dev_zero_and_locked_subdirectory_are_one_line_each(fake_engine, capsys, tmp_path, monkeypatch):
    """A named pipe, a symlink to /dev/zero and a mode-000 subdirectory are skipped with one line
    each (no hang, no unbounded read, no traceback) and the rest of the tree is reviewed."""
    import signal

    d = tmp_path / "proj"
    (d / "sub" / "locked").mkdir(parents=True)
    shutil.copy(EXAMPLES / "stats.py", d / "sub" / "good.py")
    os.mkfifo(d / "fifo.py")
    (d / "zero.py").symlink_to("/dev/zero")
    (d / "sub" / "locked" / "secret.py").write_text("def s():\n    return 1\n")
    locked = d / "sub" / "locked"
    if os.geteuid() == 0:  # root reads everything: make the walker see what a user would
        import assistant.files

        real = os.scandir
        monkeypatch.setattr(assistant.files.os, "scandir", lambda p: (_ for _ in ()).throw(
            PermissionError(13, "Permission denied", str(p))) if Path(p) == locked else real(p))

    def hung(*_):
        raise TimeoutError("the review blocked")

    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    locked.chmod(0)
    try:
        code, out, err = run([str(d), "--format", "json"], fake_engine, capsys)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        locked.chmod(0o755)
    rep = Report.from_json(out)
    reasons = {Path(s.path).name: s.reason for s in rep.skipped}
    assert reasons == {
        "fifo.py": "not a regular file (a named pipe)",
        "zero.py": "not a regular file (a character device, via a symlink to /dev/zero)",
        "locked": "permission denied",
    }
    assert code == 1 and rep.files_reviewed == 1 and any(f.function == "mean" for f in rep.findings)
    assert "Traceback" not in err
    # on the text report each is one line
    code, out, _ = run([str(d)], fake_engine, capsys)
    skipped_lines = [ln for ln in out.splitlines() if ln.startswith("skipped:")]
    assert len(skipped_lines) == 3 and sum("fifo.py: not a regular file" in ln for ln in skipped_lines) == 1, out


def test_ctrl_c_midway_writes_partial_results(tiny_tokenizer, capsys, tmp_path):
    backend = ScriptedBackend(tiny_tokenizer, script, context_length=4096, interrupt_after_batches=2)
    engine = Engine.from_loaded(backend=backend)
    out_file = tmp_path / "partial.json"
    code, _, err = run([str(EXAMPLES), "--jobs", "1", "--format", "json", "--output", str(out_file)], engine, capsys)
    assert code == 130 and "interrupted" in err
    rep = Report.from_json(out_file.read_text())
    assert rep.interrupted and 0 < len(rep.findings) < 6 and rep.functions_reviewed < 9
    _, text, _ = run([str(EXAMPLES), "--jobs", "1"],
                     Engine.from_loaded(backend=ScriptedBackend(tiny_tokenizer, script, context_length=4096, interrupt_after_batches=1)),
                     capsys)
    assert "INTERRUPTED" in text


def test_gitignore_and_vcs_dirs_are_respected(fake_engine, capsys, tmp_path):
    (tmp_path / ".gitignore").write_text("ignored/\nskip_*.py\n")
    for rel in ("keep.py", "skip_me.py", "ignored/a.py", ".git/hook.py", "venv/lib.py", "sub/b.py"):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("def f(x):\n    return x\n")
    (tmp_path / "venv" / "pyvenv.cfg").write_text("home = /usr\n")
    (tmp_path / "sub" / ".gitignore").write_text("b.py\n")
    _, out, _ = run([str(tmp_path), "--format", "json"], fake_engine, capsys)
    rep = Report.from_json(out)
    assert rep.files_reviewed == 1
    assert {Path(f.path).name for f in rep.findings} == {"keep.py"}


def test_parse_diff_hunks():
    diff = ("diff --git a/x.py b/x.py\n--- a/x.py\n+++ b/x.py\n@@ -3,0 +4,2 @@\n+a\n+b\n@@ -10 +12 @@\n-c\n+d\n"
            "@@ -20,3 +22,0 @@\n-e\n--- a/gone.py\n+++ /dev/null\n@@ -1 +0,0 @@\n-x\n")
    assert parse_diff(diff) == {"x.py": {3, 4, 11, 21}}


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_diff_reviews_only_touched_functions(tiny_tokenizer, capsys, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    src = "def one(x):\n    return x + 1\n\n\ndef two(y):\n    return y * 2\n\n\ndef three(z):\n    return z\n"
    (repo / "m.py").write_text(src)
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["init", "-q"], ["add", "m.py"], ["commit", "-q", "-m", "init"]):
        subprocess.run(["git", *cmd], cwd=repo, check=True, env=env)
    (repo / "m.py").write_text(src.replace("return y * 2", "return y * 3"))
    monkeypatch.chdir(repo)
    backend = ScriptedBackend(tiny_tokenizer, script, context_length=4096)
    code, out, _ = run([".", "--diff", "HEAD", "--format", "json"], Engine.from_loaded(backend=backend), capsys)
    rep = Report.from_json(out)
    assert rep.functions_reviewed == 1 and rep.diff == "HEAD" and code == 0
    prompts = [tiny_tokenizer.decode(p) for p in backend.prompts]
    assert prompts and all("def two" in p and "def one" not in p for p in prompts)
    code, _, err = run([".", "--diff", "no-such-rev"], Engine.from_loaded(backend=backend), capsys)
    assert code == 2 and "no-such-rev" in err and "Traceback" not in err
    # without a PATH: the current repository
    code, out, _ = run(["--diff", "HEAD", "--format", "json"], Engine.from_loaded(backend=backend), capsys)
    assert code == 0 and Report.from_json(out).functions_reviewed == 1
    # from another directory (outside any repository): git runs in PATH's repository
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, out, err = run([str(repo), "--diff", "HEAD", "--format", "json"], Engine.from_loaded(backend=backend), capsys)
    rep = Report.from_json(out)
    assert code == 0 and rep.functions_reviewed == 1, err
    assert [f.function for f in rep.findings if f.rule == "MC002"] == ["two"]
    code, _, err = run(["--diff", "HEAD"], Engine.from_loaded(backend=backend), capsys)
    assert code == 2 and "is not inside a git repository" in err


def test_output_never_clobbers_foreign_files(fake_engine, capsys, tmp_path):
    precious = tmp_path / "notes.txt"
    precious.write_text("my notes\n")
    code, _, err = run([str(EXAMPLES / "text.py"), "--output", str(precious)], fake_engine, capsys)
    assert code == 2 and "exists" in err and precious.read_text() == "my notes\n"
    assert run([str(EXAMPLES / "text.py"), "--output", str(precious), "--force"], fake_engine, capsys)[0] == 1
    assert precious.read_text().startswith("# moecoder review")
    # our own earlier report is overwritten without --force
    assert run([str(EXAMPLES / "text.py"), "--output", str(precious), "--format", "json"], fake_engine, capsys)[0] == 1
    assert json.loads(precious.read_text())["tool"]["name"] == "moecoder"


@pytest.mark.parametrize("argv, needle", [
    (["--jobs", "0", "x.py"], "--jobs"),
    (["--min-confidence", "2", "x.py"], "--min-confidence"),
    (["--format", "xml", "x.py"], ""),
    ([], ""),
])
def test_usage_errors_exit_2(fake_engine, capsys, argv, needle):
    code, _, err = run(argv, fake_engine, capsys)
    assert code == 2 and needle in err and "Traceback" not in err


def test_tiny_model_end_to_end_sarif(tiny_model_dir, capsys, tmp_path):
    validator = _sarif_validator()
    out_file = tmp_path / "tiny.sarif"
    code = main([str(EXAMPLES), "--model", str(tiny_model_dir), "--format", "sarif", "--output", str(out_file),
                 "--max-tokens", "6", "--jobs", "8", "--min-confidence", "0"])
    assert code in (0, 1)
    sarif = json.loads(out_file.read_text())
    assert not list(validator.iter_errors(sarif))
    assert sarif["runs"][0]["properties"]["functionsReviewed"] == 9
    assert re.search(r"MC00[12]", out_file.read_text())


SIGINT_SCRIPT = r'''
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from assistant_fakes import ScriptedBackend
from model.tokenizer import Tokenizer
from assistant.engine import Engine
from assistant.review import main

marker = Path(sys.argv[3])

def script(task, code):
    if task == "debug":
        return "r", "line 2: suspicious\nfix: pass"
    return "r", "Doc."

class Blocking(ScriptedBackend):
    def generate_batch(self, prompts, params, cancel=None):
        self.batches += 1
        if self.batches > 1:  # the second batch hangs until cancelled, like a long generation
            marker.write_text("waiting")
            while not (cancel is not None and cancel.cancelled):
                time.sleep(0.02)
            marker.write_text("cancelled")
        return super().generate_batch(prompts, params, cancel)

engine = Engine.from_loaded(backend=Blocking(Tokenizer.load(sys.argv[2]), script, context_length=4096))
code = main(sys.argv[4:], engine=engine)
engine.close()  # waits for the worker, as the CLI does with its own engine
sys.exit(code)
'''


def test_sigint_midway_exits_130_with_partial_results(tiny_tokenizer_path, tmp_path):
    import signal
    import sys
    import time

    marker = tmp_path / "marker"
    out_file = tmp_path / "partial.json"
    proc = subprocess.Popen(
        [sys.executable, "-c", SIGINT_SCRIPT, str(Path(__file__).parent), str(tiny_tokenizer_path), str(marker),
         str(EXAMPLES), "--jobs", "2", "--format", "json", "--output", str(out_file), "--min-confidence", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # pytest run as a background job ignores SIGINT and children inherit that: restore the default
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for _ in range(6000):  # wait (up to minutes on a loaded box) until the second batch is running
            if marker.exists() or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert marker.exists(), proc.communicate()[1]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    assert marker.read_text() == "cancelled"  # the running batch saw the cancel
    rep = Report.from_json(out_file.read_text())
    assert rep.interrupted and len(rep.findings) >= 1


def test_sigterm_writes_the_partial_report_like_ctrl_c(tiny_tokenizer_path, tmp_path):
    import signal
    import sys
    import time

    marker = tmp_path / "marker"
    out_file = tmp_path / "partial.json"
    proc = subprocess.Popen(
        [sys.executable, "-c", SIGINT_SCRIPT, str(Path(__file__).parent), str(tiny_tokenizer_path), str(marker),
         str(EXAMPLES), "--jobs", "1", "--format", "json", "--output", str(out_file), "--min-confidence", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(6000):
            if marker.exists() or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert marker.exists(), proc.communicate()[1]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "terminated; partial results written" in err
    rep = Report.from_json(out_file.read_text())
    assert rep.interrupted and len(rep.findings) >= 1
    # the counters agree with the findings: every function with a finding is counted
    assert rep.functions_reviewed >= len({(f.path, f.function) for f in rep.findings}) > 0


def test_default_min_confidence_drops_weak_hints(fake_engine, capsys, tmp_path, monkeypatch):
    _, out, _ = run([str(EXAMPLES), "--format", "json", "--min-confidence", "0"], fake_engine, capsys)
    weak = [f for f in Report.from_json(out).findings if f.rule == "MC001" and f.confidence < 0.5]
    assert weak  # the scripted answers are lukewarm
    code = main([str(EXAMPLES), "--format", "json"], engine=fake_engine)
    kept = Report.from_json(capsys.readouterr().out).findings
    assert all(f.confidence >= 0.5 for f in kept if f.rule == "MC001")
    assert not any(f.line == w.line and f.path == w.path for w in weak for f in kept if f.rule == "MC001")
    cfg = tmp_path / "c.toml"
    cfg.write_text("[review]\nmin_confidence = 0.0\n")
    monkeypatch.setenv("MOECODER_CONFIG", str(cfg))
    main([str(EXAMPLES), "--format", "json"], engine=fake_engine)
    assert len(Report.from_json(capsys.readouterr().out).findings) > len(kept)
    assert code in (0, 1)


def test_nothing_to_review_and_text_files_are_errors_printed_once(fake_engine, capsys, tmp_path):
    empty = tmp_path / "emptydir"
    empty.mkdir()
    code, out, err = run([str(empty)], fake_engine, capsys)
    assert code == 2 and err.strip().splitlines() == [f"moecoder review: error: nothing to review: no Python files under {empty}"]
    notes = tmp_path / "notes.txt"
    notes.write_text("remember\n")  # parses as Python (a name), but is not a Python file
    code, out, err = run([str(notes), str(EXAMPLES / "stats.py")], fake_engine, capsys)
    assert code == 2
    assert "1 file" in out.splitlines()[0] and out.count("notes.txt: not a Python file") == 1
    assert "notes.txt" not in err  # the text report on stdout has it: not twice
    script_file = tmp_path / "tool"
    script_file.write_text("#!/usr/bin/env python3\ndef main():\n    return 1\n")
    code, out, err = run([str(script_file), "--format", "json"], fake_engine, capsys)
    assert Report.from_json(out).files_reviewed == 1 and code in (0, 1)
    code, out, err = run([str(notes), "--format", "json"], fake_engine, capsys)
    assert code == 2 and err.count("notes.txt: not a Python file") == 1  # JSON on stdout: said on stderr once
    code, out, err = run([str(notes)], fake_engine, capsys)  # alone: the text report says why, stderr what
    assert code == 2 and out.count("notes.txt: not a Python file") == 1
    assert err.strip().splitlines() == [f"moecoder review: error: nothing reviewed: no file under {notes} could be "
                                        "reviewed (1 skipped)"]


def test_reasoning_is_labelled(fake_engine, capsys):
    _, out, _ = run([str(EXAMPLES / "stats.py")], fake_engine, capsys)
    assert "  why: Line 14 looks wrong: off-by-one" in out


@pytest.mark.slow
def test_jobs_runs_worker_processes(tiny_model_dir, capsys, tmp_path, monkeypatch):
    """--jobs 2: two worker processes, each with its own model, give the same report as one."""
    import assistant.review as review_mod
    import assistant.workers as workers_mod

    monkeypatch.setattr(review_mod, "REQUESTS_PER_WORKER", 1)
    monkeypatch.setattr(workers_mod, "default_workers", lambda jobs, adaptive=False: jobs)  # CI may have 1 CPU
    pids = []
    real_run = workers_mod.WorkerPool.run

    def spy_run(self, requests, batch_size=4):
        yield from real_run(self, requests, batch_size)
        pids.extend(self._pool._pool)

    monkeypatch.setattr(workers_mod.WorkerPool, "run", spy_run)
    common = [str(EXAMPLES / "stats.py"), str(EXAMPLES / "text.py"), "--model", str(tiny_model_dir),
              "--max-tokens", "3", "--format", "json", "--min-confidence", "0"]
    code1, out1, err1 = run([*common, "--jobs", "1"], None, capsys)
    assert not pids
    code2, out2, err2 = run([*common, "--jobs", "2"], None, capsys)
    assert len(pids) == 2, err2
    one, two = Report.from_json(out1), Report.from_json(out2)
    assert one.functions_reviewed == two.functions_reviewed > 0 and not two.skipped, two.skipped
    assert {(f.path, f.function) for f in one.findings if f.rule == "MC002"} == \
        {(f.path, f.function) for f in two.findings if f.rule == "MC002"}


def test_default_workers_follow_the_cpus_and_the_load(monkeypatch):
    import assistant.workers as w

    monkeypatch.setattr(w, "_cpus", lambda: 2)
    monkeypatch.setattr(w.os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    assert w.default_workers(4) == 2 and w.default_workers(1) == 1
    assert w.default_workers(4, adaptive=True) == 2  # an idle machine: both cores
    monkeypatch.setattr(w.os, "getloadavg", lambda: (16.0, 0.0, 0.0))
    assert w.default_workers(4, adaptive=True) == 1  # a busy one: more processes only compete
    assert w.default_workers(4) == 2  # --jobs on the command line is obeyed (up to the CPUs)


def test_progress_counts_functions_as_the_header_does(fake_engine, monkeypatch):
    """The bar's total is the header's "N functions" (not the prompts: a function can have a
    debug and a docstring prompt), and it reaches it."""
    import rich.progress

    from assistant.review import Options, run_review

    seen = {}

    class Recorder:
        def __init__(self, *a, **k):
            seen["advanced"] = 0

        def start(self):
            pass

        def stop(self):
            pass

        def add_task(self, description, total):
            seen["total"] = total
            return 0

        def update(self, task, advance=0, description=""):
            seen["advanced"] += advance

    monkeypatch.setattr(rich.progress, "Progress", Recorder)
    report = run_review([str(EXAMPLES)], Options(progress=True, min_confidence=0.0), fake_engine)
    assert seen["total"] == report.functions_reviewed == 9  # 9 functions, 12 prompts
    assert seen["advanced"] == 9


def test_running_the_evidence_has_its_own_bar_and_counts_in_the_time(fake_engine, monkeypatch):
    """--run takes seconds a function after the model's pass: a second bar counts the functions
    whose code runs, and the summary's time includes that phase."""
    import time

    import rich.progress

    import assistant.review as review
    from assistant.review import Options, run_review

    bars = []

    class Recorder:
        def __init__(self, *columns, **k):
            self.label, self.total, self.advanced = columns[0].text_format, None, 0
            bars.append(self)

        def start(self):
            pass

        def stop(self):
            pass

        def add_task(self, description, total):
            self.total = total
            return 0

        def update(self, task, advance=0, description=""):
            self.advanced += advance

    ran = []
    monkeypatch.setattr(rich.progress, "Progress", Recorder)
    monkeypatch.setattr(review, "_evidence_for", lambda job, *a: (ran.append(job.func.qualname), time.sleep(0.05)))
    report = run_review([str(EXAMPLES)], Options(progress=True, run=True, min_confidence=0.0), fake_engine)
    assert [b.label for b in bars] == ["reviewing", "running examples and tests"]
    assert bars[1].total == bars[1].advanced == len(ran) == report.functions_reviewed == 9
    assert report.elapsed_s >= 9 * 0.05


@pytest.mark.slow
def test_a_terminal_sees_a_spinner_while_the_model_loads_then_the_bar(tiny_model_dir, tmp_path):
    """`moecoder review` with stderr on a terminal: "loading the model..." while the model loads
    (the issue: nothing for the first seconds), then the bar in functions, as the header counts."""
    import pty
    import select
    import sys

    master, slave = pty.openpty()
    out = tmp_path / "r.txt"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MOECODER_CONFIG": str(tmp_path / "none.toml"), "TERM": "xterm",
           "COLUMNS": "100"}
    proc = subprocess.Popen([sys.executable, "-m", "assistant.cli", "review", str(EXAMPLES / "stats.py"), "--model",
                             str(tiny_model_dir), "--max-tokens", "2", "--jobs", "1", "--output", str(out)],
                            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=slave, env=env)
    os.close(slave)
    seen = b""
    try:
        while select.select([master], [], [], 120)[0]:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            seen += data
        proc.wait(timeout=120)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    screen = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", seen.decode(errors="replace"))  # colours, cursor moves
    assert proc.returncode in (0, 1), screen
    header = out.read_text().splitlines()[0]
    n = int(re.search(r"(\d+) functions?", header).group(1))
    assert "loading the model" in screen, screen
    assert re.search(rf"reviewing.*\b{n}/{n} functions", screen), screen
    assert screen.index("loading the model") < screen.index("reviewing"), screen
