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



# ----------------------------------------------------------------------------- probing
# Differential testing of verified candidates: the arguments the evidence called the function
# with are recorded, inputs are derived from them (small type-driven changes that keep what
# held for every recorded call: types, sortedness, distinct items, non-negative numbers,
# an index inside a sequence argument), and the original and each candidate are called on
# every derived input. The assistant compares what they return.

MAX_PROBE_INPUTS = 120
_ADDR = None


def _norm_repr(v, limit=300):
    global _ADDR
    import re

    if _ADDR is None:
        _ADDR = re.compile(r" at 0x[0-9a-fA-F]+")
    try:
        text = repr(v)
    except BaseException as e:  # noqa: BLE001
        text = f"<repr failed: {type(e).__name__}>"
    text = _ADDR.sub("", text)
    return text if len(text) <= limit else text[:limit] + "..."


def _call_args(code, f_locals):
    """(positional, keyword) arguments of a call from its frame's locals at the call."""
    names = code.co_varnames
    n_pos = code.co_argcount
    n_kw = code.co_kwonlyargcount
    pos = [f_locals[n] for n in names[:n_pos]]
    kw = {n: f_locals[n] for n in names[n_pos:n_pos + n_kw]}
    i = n_pos + n_kw
    if code.co_flags & 0x04:  # *args
        pos += list(f_locals[names[i]])
        i += 1
    if code.co_flags & 0x08:  # **kwargs
        kw.update(f_locals[names[i]])
    return pos, kw


def _sorted_ok(seq):
    try:
        return all(seq[i] <= seq[i + 1] for i in range(len(seq) - 1))
    except Exception:  # noqa: BLE001
        return False


def _distinct(seq):
    try:
        return len(set(seq)) == len(seq)
    except Exception:  # noqa: BLE001
        return len(seq) < 2


_SEQ = (list, tuple, str)


def _facts(v):
    """What is true of one argument value (compared across the recorded calls)."""
    f = {"type": type(v).__name__}
    if isinstance(v, bool):
        return f
    if isinstance(v, (int, float)):
        f["nonneg"] = v >= 0
        f["pos"] = v > 0
    if isinstance(v, _SEQ):
        f["nonempty"] = len(v) > 0
        f["sorted"] = _sorted_ok(v)
        f["distinct"] = _distinct(v)
        f["items"] = sorted({type(x).__name__ for x in v})
    return f


def _invariants(calls):
    """Facts that hold for an argument position in every recorded call."""
    inv = {}
    for pos, _kw in calls:
        for i, v in enumerate(pos):
            f = _facts(v)
            if i not in inv:
                inv[i] = dict(f)
            else:
                inv[i] = {k: val for k, val in inv[i].items() if f.get(k) == val}
    # an integer argument that indexes a sequence argument in every call
    rel = set()
    n = min((len(p) for p, _ in calls), default=0)
    for i in range(n):
        for j in range(n):
            if i != j and all(isinstance(p[i], int) and not isinstance(p[i], bool) and isinstance(p[j], _SEQ)
                              for p, _ in calls):
                if all(0 <= p[i] < len(p[j]) for p, _ in calls):
                    rel.add((i, j, "lt"))
                elif all(0 <= p[i] <= len(p[j]) for p, _ in calls):
                    rel.add((i, j, "le"))
    return inv, rel


def _keeps(pos, inv, rel):
    for i, v in enumerate(pos):
        want = inv.get(i)
        if want is None:
            continue
        f = _facts(v)
        for k, val in want.items():
            if f.get(k) != val:
                return False
    for i, j, how in rel:
        if i < len(pos) and j < len(pos):
            if not isinstance(pos[i], int) or not isinstance(pos[j], _SEQ):
                return False
            if not (0 <= pos[i] < len(pos[j]) if how == "lt" else 0 <= pos[i] <= len(pos[j])):
                return False
    return True


def _variants(v, depth=0):
    """Small changes of one value, simplest first."""
    if isinstance(v, bool):
        yield not v
    elif isinstance(v, int):
        yield from (v + 1, v - 1, 0, v * 2, -v, v + 2)
    elif isinstance(v, float):
        yield from (v + 1.0, v - 1.0, 0.0, v * 2, -v, v / 2)
    elif isinstance(v, str):
        yield from (v[1:], v[:-1], v[::-1], v + v[:1], v[:1] + v, v.upper(), "")
    elif isinstance(v, (list, tuple)):
        mk = type(v)
        n = len(v)
        yield mk(v[1:])
        yield mk(v[:-1])
        yield mk(v[::-1])
        if n:
            yield mk([*v, v[-1]])
            yield mk([v[0], *v])
        try:
            yield mk(sorted(v))
            yield mk(sorted(v, reverse=True))
        except Exception:  # noqa: BLE001
            pass
        yield mk(v[: n // 2])
        yield mk(v[n // 2:])
        for i in range(min(n, 8)):
            yield mk([*v[:i], *v[i + 1:]])
        for i in range(min(n - 1, 6)):
            w = list(v)
            w[i], w[i + 1] = w[i + 1], w[i]
            yield mk(w)
        if depth == 0:
            for i in range(min(n, 6)):
                for x in list(_variants(v[i], depth + 1))[:4]:
                    w = list(v)
                    w[i] = x
                    yield mk(w)
        yield mk([])
    elif isinstance(v, dict) and depth == 0:
        for k in list(v)[:6]:
            yield {kk: vv for kk, vv in v.items() if kk != k}


def derive_inputs(calls, limit=MAX_PROBE_INPUTS):
    """Inputs derived from the recorded calls that keep what held in all of them."""
    import copy

    inv, rel = _invariants(calls)
    seen = set()
    out = []
    gens = []
    for pos, kw in calls:
        seen.add(_norm_repr((pos, kw), 2000))

        def gen(pos=pos, kw=kw):
            for i, v in enumerate(pos):
                for x in _variants(v):
                    w = list(pos)
                    w[i] = x
                    yield w, kw
            # a scalar argument given a value that an item of another argument has
            for i, v in enumerate(pos):
                if isinstance(v, (int, float, str)) and not isinstance(v, bool):
                    for j, seq in enumerate(pos):
                        if j != i and isinstance(seq, (list, tuple)):
                            for x in seq[:12]:
                                if type(x) is type(v):
                                    w = list(pos)
                                    w[i] = x
                                    yield w, kw
            # two arguments changed together (the first two variants of each)
            for i in range(len(pos)):
                for j in range(i + 1, len(pos)):
                    for x in list(_variants(pos[i]))[:3]:
                        for y in list(_variants(pos[j]))[:3]:
                            w = list(pos)
                            w[i], w[j] = x, y
                            yield w, kw

        gens.append(gen())
    # round robin over the recorded calls, so each contributes
    while gens and len(out) < limit:
        alive = []
        for g in gens:
            for pos, kw in g:
                key = _norm_repr((pos, kw), 2000)
                if key in seen or not _keeps(pos, inv, rel):
                    continue
                seen.add(key)
                try:
                    out.append(copy.deepcopy((pos, kw)))
                except Exception:  # noqa: BLE001
                    continue
                alive.append(g)
                break
            if len(out) >= limit:
                break
        gens = alive
    return out


def _outcome(fn, pos, kw, t_run):
    import copy
    import random
    import types

    try:
        pos, kw = copy.deepcopy((pos, kw))
    except Exception:  # noqa: BLE001
        return ["skip"]
    random.seed(0)
    try:
        with Timer(t_run):
            res = fn(*pos, **kw)
            if isinstance(res, types.GeneratorType):
                import itertools

                res = list(itertools.islice(res, 1000))
    except RunTimeout:
        return ["timeout"]
    except RecursionError:
        return ["raise", "RecursionError"]
    except BaseException as e:  # noqa: BLE001 - the candidate's behaviour
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            return ["raise", type(e).__name__]
        return ["raise", type(e).__name__]
    return ["ok", _norm_repr(res), _norm_repr((pos, kw))]


def run_probe(spec, mod, fn, orig, use, items, emit_line, t_run):
    """Record the calls the evidence makes (the original code), derive inputs, and call the
    original and each candidate on them: one ``probe`` line per input (every version's outcome
    on it), so a run stopped half-way keeps whole rows. The original runs twice on each input;
    an input it answers differently is marked unstable."""
    calls = []
    fn.__code__ = orig
    t_end = time.monotonic() + float(spec.get("probe_budget", 15.0))

    def prof(frame, event, arg):
        if event == "call" and frame.f_code is orig and (frame.f_back is None or frame.f_back.f_code is not orig):
            import copy

            try:
                calls.append(copy.deepcopy(_call_args(orig, frame.f_locals)))
            except Exception:  # noqa: BLE001 - an argument that cannot be copied
                pass

    devnull = open(os.devnull, "w")
    old = sys.stdout
    sys.stdout = devnull
    sys.setprofile(prof)
    try:
        if spec.get("examples"):
            run_examples_in(dict(spec, stop_on_fail=False), mod, Coverage(spec["target"], False),
                            lambda rec: None, t_run)
        for item in items:
            item.config.hook.pytest_runtest_protocol(item=item, nextitem=None)
    finally:
        sys.setprofile(None)
    try:
        calls = calls[:200]
        inputs = derive_inputs(calls, int(spec.get("probe_inputs", MAX_PROBE_INPUTS)))
        emit_line({"kind": "probe_start", "calls": len(calls), "inputs": len(inputs)})
        t_call = float(spec.get("probe_timeout", 0.25))
        usable = [c for c in spec["candidates"] if use(c)]
        hangs = 0  # calls stopped by the timer: they cost the most, so they are rationed
        for j, (pos, kw) in enumerate(inputs):
            if time.monotonic() > t_end or hangs >= int(spec.get("probe_max_hangs", 12)):
                break
            fn.__code__ = orig
            first = _outcome(fn, pos, kw, t_call)
            if first[0] != "timeout":
                again = _outcome(fn, pos, kw, t_call)
                if again != first:
                    first = ["unstable"]
            row = {"base": first}
            for cand in usable:
                use(cand)
                got = _outcome(fn, pos, kw, t_call)
                if got[0] == "timeout" and first[0] == "ok":  # a slow moment, or a real hang: once more, longer
                    got = _outcome(fn, pos, kw, 4 * t_call)
                row[cand["id"]] = got
            fn.__code__ = orig
            hangs += sum(1 for v in row.values() if v[0] == "timeout")
            emit_line({"kind": "probe", "i": j, "input": _norm_repr((pos, kw), 160), "results": row})
    finally:
        sys.stdout = old
        fn.__code__ = orig

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
        if spec.get("probe"):
            run_probe(spec, mod, fn, orig, use, items, lambda rec: out.write(json.dumps(rec) + "\n"), t_run)
            return
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
