"""Runs inside the sandbox (``assistant.sandbox``): executes a function's evidence — doctest
examples and pytest tests — once per candidate version of the target file, with per-run line
coverage (coverage.py) and a per-run time limit, appending one JSON line per run to the results
file as it goes (so a run killed half-way keeps what it recorded).

Usage (inside the sandbox work dir): ``python _moecoder_runner.py spec.json``. The spec:
``target`` (relative path of the file under test), ``module`` (its dotted name), ``examples``
(``[{"id", "source", "want", "lineno"}]``, run in order in one namespace made from the module),
``pytest`` (node ids / paths; ``pytest_args`` extra arguments), ``candidates``
(``[{"id", "source"}]``; ``source`` None = the file as it is), ``coverage`` (bool),
``per_run_timeout`` (seconds), ``stop_on_fail`` (a candidate stops at its first failing run),
``only_first`` (pytest ids a candidate must pass before the rest run), ``out`` (results file).

This file is data to the assistant (it is copied into the sandbox, never imported there).
"""

import doctest
import importlib
import importlib.util
import json
import os
import signal
import sys
import time


class RunTimeout(BaseException):  # BaseException: user code's ``except Exception`` does not swallow it
    pass


def _alarm(signum, frame):
    raise RunTimeout()


signal.signal(signal.SIGALRM, _alarm)


def _short(text, limit=400):
    text = str(text).strip()
    return text if len(text) <= limit else text[:limit] + " ..."


class Coverage:
    def __init__(self, target, enabled):
        self.target = os.path.realpath(target)
        self.cov = None
        if enabled:
            try:
                import coverage

                self.cov = coverage.Coverage(data_file=None, include=[self.target], config_file=False,
                                             branch=False)
            except Exception:  # noqa: BLE001 - coverage missing: runs without lines
                self.cov = None

    def start(self):
        if self.cov is not None:
            self.cov.erase()
            self.cov.start()

    def stop(self):
        if self.cov is None:
            return []
        self.cov.stop()
        data = self.cov.get_data()
        return sorted(data.lines(self.target) or [])


class Timer:
    def __init__(self, seconds):
        self.seconds = seconds

    def __enter__(self):
        signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *exc):
        signal.setitimer(signal.ITIMER_REAL, 0)


def purge(work, keep):
    for name, mod in list(sys.modules.items()):
        f = getattr(mod, "__file__", None)
        if f and os.path.realpath(f).startswith(work + os.sep) and os.path.realpath(f) not in keep:
            del sys.modules[name]
    importlib.invalidate_caches()


def load_module(name, path):
    """The module at ``path`` by its dotted ``name``: through the import system when that
    finds this very file (a package's circular imports then work), else from the file."""
    try:
        mod = importlib.import_module(name)
        if os.path.realpath(getattr(mod, "__file__", "") or "") == os.path.realpath(path):
            return mod
    except Exception:  # noqa: BLE001 - fall back to loading the file directly
        pass
    sys.modules.pop(name, None)
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


class _Runner(doctest.DocTestRunner):
    def __init__(self):
        super().__init__(verbose=False, optionflags=doctest.ELLIPSIS)
        self.got = None
        self.exc = None

    def report_failure(self, out, test, example, got):
        self.got = got

    def report_unexpected_exception(self, out, test, example, exc_info):
        self.exc = exc_info[1]


def run_examples(spec, cand, cov, emit, t_run):
    name = spec["module"]
    try:
        with Timer(t_run):
            mod = load_module(name, spec["target"])
    except BaseException as e:  # noqa: BLE001
        for ex in spec["examples"]:
            emit({"kind": "doctest", "test": ex["id"], "outcome": "error", "lines": [],
                  "message": "the module failed to import: " + _short(f"{type(e).__name__}: {e}")})
        return False
    return run_examples_in(spec, mod, cov, emit, t_run)


def run_examples_in(spec, mod, cov, emit, t_run):
    globs = dict(vars(mod))
    ok = True
    for ex in spec["examples"]:
        if ex["id"] in spec.get("deselect", ()):
            continue
        example = doctest.Example(ex["source"], ex["want"], lineno=ex.get("lineno", 0))
        test = doctest.DocTest([example], globs, ex["id"], spec["target"], 0, None)
        runner = _Runner()
        emit({"kind": "start", "test": ex["id"]})
        cov.start()
        timed_out = False
        t0 = time.monotonic()
        try:
            with Timer(t_run):
                res = runner.run(test, out=lambda s: None, clear_globs=False)
        except RunTimeout:
            timed_out = True
            res = None
        lines = cov.stop()
        rec = {"kind": "doctest", "test": ex["id"], "source": ex["source"].strip(), "want": ex["want"].strip(),
               "lines": lines, "seconds": round(time.monotonic() - t0, 4)}
        if timed_out:
            rec.update(outcome="timeout", message=f"did not finish within {t_run:g}s")
        elif res.failed:
            if runner.exc is not None:
                e = runner.exc
                if isinstance(e, RunTimeout):
                    rec.update(outcome="timeout", message=f"did not finish within {t_run:g}s")
                else:
                    rec.update(outcome="failed", got=_short(f"{type(e).__name__}: {e}", 200),
                               message="raised " + _short(f"{type(e).__name__}: {e}", 200))
            else:
                rec.update(outcome="failed", got=_short(runner.got or "", 200),
                           message="returned " + _short((runner.got or "").strip(), 200))
        else:
            rec.update(outcome="passed", message="")
        emit(rec)
        if rec["outcome"] != "passed":
            ok = False
            if spec.get("stop_on_fail") or (rec["outcome"] == "timeout" and spec.get("stop_on_timeout")):
                return False
    return ok


class Recorder:
    def __init__(self, cov, emit, t_run):
        self.cov, self.emit, self.t_run = cov, emit, t_run
        self.lines = {}
        self.failed = 0
        self.last_timeout = False

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or (report.when == "setup" and not report.passed):
            if report.skipped:
                return
            rec = {"kind": "pytest", "test": report.nodeid, "lines": sorted(self.lines.get(report.nodeid, ())),
                   "seconds": round(report.duration, 4)}
            if report.passed:
                rec.update(outcome="passed", message="")
            else:
                crash = getattr(report.longrepr, "reprcrash", None)
                msg = crash.message if crash is not None else str(report.longrepr)
                if "RunTimeout" in msg:
                    self.last_timeout = True
                    rec.update(outcome="timeout", message=f"did not finish within {self.t_run:g}s")
                else:
                    rec.update(outcome="failed", message=_short(msg, 300))
                self.failed += 1
            self.emit(rec)


def make_recorder_plugin(rec):
    import pytest

    class Plugin:
        @pytest.hookimpl(hookwrapper=True)
        def pytest_runtest_call(self, item):
            rec.cov.start()
            try:
                with Timer(rec.t_run):
                    yield
            finally:
                rec.lines.setdefault(item.nodeid, set()).update(rec.cov.stop())

        def pytest_runtest_logstart(self, nodeid, location):
            rec.emit({"kind": "start", "test": nodeid})

        def pytest_collectreport(self, report):
            if report.failed:
                text = (getattr(report, "longreprtext", "") or "").strip().splitlines()
                last = next((ln for ln in reversed(text) if ln.startswith("E ")), text[-1] if text else "")
                rec.failed += 1
                rec.emit({"kind": "collect", "test": report.nodeid or "<collection>", "outcome": "error",
                          "lines": [], "message": "the tests failed to import: " + _short(last.lstrip("E "), 300)})

        def pytest_runtest_logreport(self, report):
            rec.pytest_runtest_logreport(report)

    return Plugin()


def run_pytest(spec, cov, emit, t_run, ids):
    import pytest

    rec = Recorder(cov, emit, t_run)
    args = [*ids, "--rootdir", os.getcwd(), "-p", "no:cacheprovider", "-q", "-o", "addopts=",
            "-o", "python_files=test_*.py *_test.py tests.py", *spec.get("pytest_args", [])]
    for d in spec.get("deselect", []):
        args += ["--deselect", d]
    if spec.get("stop_on_fail"):
        args.append("-x")
    devnull = open(os.devnull, "w")
    old = sys.stdout
    sys.stdout = devnull
    try:
        code = pytest.main(args, plugins=[make_recorder_plugin(rec)])
        if int(code) in (2, 3, 4):
            emit({"kind": "collect", "test": "<pytest>", "outcome": "error", "lines": [],
                  "message": f"pytest stopped (exit code {int(code)})"})
            rec.failed += 1
    except BaseException as e:  # noqa: BLE001
        emit({"kind": "collect", "test": "<pytest>", "outcome": "error", "lines": [],
              "message": "pytest stopped: " + _short(f"{type(e).__name__}: {e}", 200)})
        rec.failed += 1
    finally:
        sys.stdout = old
    return rec.failed == 0


def _find_code(code, qualname):
    for c in code.co_consts:
        if hasattr(c, "co_code"):
            if getattr(c, "co_qualname", c.co_name).replace("<locals>.", "") == qualname:
                return c
            found = _find_code(c, qualname)
            if found is not None:
                return found
    return None


def _resolve(obj, qualname):
    for part in qualname.split("."):
        obj = vars(obj)[part] if isinstance(obj, type) and part in vars(obj) else getattr(obj, part)
        if isinstance(obj, property):
            obj = obj.fget
        obj = getattr(obj, "__func__", obj)  # staticmethod / classmethod
        obj = getattr(obj, "__wrapped__", obj)  # functools.wraps decorators (lru_cache, ...)
    return obj


def main_swap(spec, out):
    """Many candidates in one process: the function's code object is swapped in place (every
    reference to the function, in the tests too, runs the candidate), the tests collected once."""
    t_run = float(spec.get("per_run_timeout", 2.0))
    cur = {"id": None}

    def emit(rec):
        rec["candidate"] = cur["id"]
        out.write(json.dumps(rec) + "\n")

    try:
        mod = load_module(spec["module"], spec["target"])
    except BaseException as e:  # noqa: BLE001
        mod, err = None, e
    try:
        fn = _resolve(mod, spec["swap"]) if mod is not None else None
        orig = fn.__code__ if fn is not None else None
    except (AttributeError, KeyError, TypeError):  # not reachable from the module (nested): rewrite files
        return main_plain(spec, out)
    if mod is None:
        e = err
        for cand in spec["candidates"]:
            cur["id"] = cand["id"]
            emit({"kind": "collect", "test": "<import>", "outcome": "error", "lines": [],
                  "message": "the module failed to import: " + _short(f"{type(e).__name__}: {e}")})
            out.write(json.dumps({"candidate": cand["id"], "kind": "end", "ok": False}) + "\n")
        return

    def use(cand):
        if cand.get("source") is None:
            fn.__code__ = orig
            return True
        try:
            code = _find_code(compile(cand["source"], os.path.realpath(spec["target"]), "exec"), spec["swap"])
            if code is None or code.co_freevars != orig.co_freevars:
                return False
            fn.__code__ = code
            return True
        except (SyntaxError, ValueError):
            return False

    cov = Coverage(spec["target"], False)
    first = [i for i in spec.get("only_first", [])]

    def loop(session=None):
        items = list(session.items) if session is not None else []
        rank = {n: k for k, n in enumerate(first)}
        items.sort(key=lambda it: rank.get(it.nodeid, len(rank)))
        for cand in spec["candidates"]:
            cur["id"] = cand["id"]
            if not use(cand):
                out.write(json.dumps({"candidate": cand["id"], "kind": "end", "ok": False}) + "\n")
                continue
            ok = True
            through = spec.get("through_failing")
            if spec.get("examples"):
                ex_spec = dict(spec, stop_on_fail=not through, stop_on_timeout=True)
                ok = run_examples_in(ex_spec, mod, cov, emit, t_run)
            if (ok or through) and items:
                first_set = set(first)
                for item in items:
                    rec.failed = 0
                    rec.last_timeout = False
                    item.config.hook.pytest_runtest_protocol(item=item, nextitem=None)
                    if rec.failed:
                        ok = False
                        if not through or rec.last_timeout or item.nodeid not in first_set:
                            break
                    elif not ok and item.nodeid not in first_set:
                        break  # the failing runs are counted; a candidate that failed one is not verified
            out.write(json.dumps({"candidate": cand["id"], "kind": "end", "ok": ok}) + "\n")
        fn.__code__ = orig

    if not spec.get("pytest"):
        loop()
        return
    import pytest

    rec = Recorder(cov, emit, t_run)

    class Loop:
        @pytest.hookimpl(tryfirst=True)
        def pytest_runtestloop(self, session):
            loop(session)
            return True

    args = [*spec["pytest"], "--rootdir", os.getcwd(), "-p", "no:cacheprovider", "-q",
            "-o", "addopts=", "-o", "python_files=test_*.py *_test.py tests.py", *spec.get("pytest_args", [])]
    devnull = open(os.devnull, "w")
    old = sys.stdout
    sys.stdout = devnull
    try:
        pytest.main(args, plugins=[make_recorder_plugin(rec), Loop()])
    finally:
        sys.stdout = old


def main():
    spec = json.load(open(sys.argv[1]))
    out = open(spec["out"], "a", buffering=1)
    if spec.get("swap"):
        main_swap(spec, out)
    else:
        main_plain(spec, out)


def main_plain(spec, out):
    """One candidate at a time: the file rewritten, the project's modules imported afresh."""
    work = os.path.realpath(os.getcwd())
    keep = {os.path.realpath(__file__)}
    cov = Coverage(spec["target"], spec.get("coverage", False))
    t_run = float(spec.get("per_run_timeout", 2.0))
    original = open(spec["target"], encoding="utf-8").read()
    for cand in spec["candidates"]:
        src = original if cand.get("source") is None else cand["source"]
        with open(spec["target"], "w", encoding="utf-8") as fh:
            fh.write(src)
        purge(work, keep)

        def emit(rec, _cid=cand["id"]):
            rec["candidate"] = _cid
            out.write(json.dumps(rec) + "\n")

        ok = True
        if spec.get("examples"):
            ok = run_examples(spec, cand, cov, emit, t_run)
        if spec.get("pytest") and (ok or not spec.get("stop_on_fail")):
            first = [i for i in spec.get("only_first", []) if i in spec["pytest"]]
            if first and spec.get("stop_on_fail"):
                ok = run_pytest(spec, cov, emit, t_run, first)
                rest = [i for i in spec["pytest"] if i not in first]
                if ok and rest:
                    ok = run_pytest(spec, cov, emit, t_run, rest)
            else:
                ok = run_pytest(spec, cov, emit, t_run, spec["pytest"])
        out.write(json.dumps({"candidate": cand["id"], "kind": "end", "ok": ok}) + "\n")
    with open(spec["target"], "w", encoding="utf-8") as fh:
        fh.write(original)


if __name__ == "__main__":
    main()
