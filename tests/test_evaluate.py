"""The eval harness (assistant/evaluate.py): metrics, and every suite scored with known answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from assistant import evaluate as E
from model.formats import Finding, format_finding, number_lines
from tests.scripts import load_script
from tests.shared_data import needs_shared

EVAL = E._eval_dir(None)
needs_eval = needs_shared(EVAL / "mbpp", "the eval sets (../shared/eval)")


# --------------------------------------------------------------------------- metrics


def test_exact_match_and_edit_similarity():
    assert E.exact_match("    return x\n", "    return x  \n")
    assert not E.exact_match("return x\n", "    return x\n"), "indentation counts"
    assert E.edit_similarity("abc", "abc") == 1.0
    assert E.edit_similarity("", "abc") == 0.0
    assert E.edit_similarity("xyz", "abc") == 0.0
    assert E.levenshtein("kitten", "sitting") == 3
    assert E.edit_similarity("kitten", "sitting") == pytest.approx(1 - 3 / 7)


def test_rouge_l():
    assert E.rouge_l("Return the sum of a and b.", "return the SUM of a and b") == 1.0
    assert E.rouge_l("zzz qqq", "Return the sum.") == 0.0
    assert E.rouge_l("", "Return the sum.") == 0.0
    # LCS 3 of 3 predicted and 6 reference words: P=1, R=0.5
    assert E.rouge_l("the cat sat", "the cat sat on the mat") == pytest.approx(2 * 0.5 / 1.5)


def test_debug_scores():
    f = lambda line: Finding(line, "x", None)
    perfect = E.debug_scores([(3, f(3)), (5, f(5)), (None, None), (None, None)])
    assert perfect["precision"] == perfect["recall"] == 1.0 and perfect["false_alarm_rate"] == 0.0
    flag_all = E.debug_scores([(3, f(1)), (5, f(1)), (None, f(1)), (None, f(1))])
    assert flag_all["precision"] == flag_all["recall"] == 0.0 and flag_all["false_alarm_rate"] == 1.0
    assert flag_all["detection_recall"] == 1.0
    mixed = E.debug_scores([(3, f(3)), (5, None), (None, f(2)), (None, "invalid")])
    assert mixed["precision"] == 0.5 and mixed["recall"] == 0.5 and mixed["false_alarm_rate"] == 0.5
    assert mixed["unparseable"] == 1


# --------------------------------------------------------------------------- suites with oracles


class Oracle:
    """Answers from a table built from the references; ``wrong`` gives known-wrong answers instead."""

    def __init__(self, table: dict, wrong=None):
        self.table, self.wrong = table, wrong

    def _get(self, key):
        return self.wrong(key) if self.wrong else self.table[key]

    def complete(self, prompts, stops, max_new_tokens):
        return [self._get(p) for p in prompts]

    def fim(self, pairs, max_new_tokens, spm=False):
        return [self._get(p) for p in pairs]

    def task(self, task, codes, max_new_tokens):
        return [self._get(c) for c in codes]


@needs_eval
def test_mbpp_perfect_and_wrong():
    tasks = E.load_mbpp(EVAL)[:6]
    table = {}
    for t in tasks:
        prompt, oracle = E.mbpp_prompt(t)
        assert prompt.rstrip().endswith(":") and "# Example: assert" in prompt
        table[prompt] = oracle
    ctx = E.Context(predictor=Oracle(table), limit=6, eval_dir=EVAL, jobs=2)
    assert E.suite_mbpp(ctx)["pass@1"] == 1.0
    ctx.predictor = Oracle(table, wrong=lambda p: "    return None\n")
    r = E.suite_mbpp(ctx)
    assert r["pass@1"] == 0.0 and r["n"] == 6


@needs_eval
def test_mbpp_docstring_prompt_runs_the_oracle(monkeypatch):
    tasks = E.load_mbpp(EVAL)[:6]
    table = {}
    for t in tasks:
        prompt, oracle = E.mbpp_prompt(t, "docstring")
        head, doc = prompt.split('"""', 1)
        assert head.rstrip().endswith(":") and prompt.rstrip().endswith('"""') and "assert" not in prompt
        assert not doc.lower().startswith("write ")  # "Write a function to find x." -> "Find x."
        table[prompt] = oracle
    monkeypatch.setattr(E, "MBPP_PROMPT", "docstring")
    ctx = E.Context(predictor=Oracle(table), limit=6, eval_dir=EVAL, jobs=2)
    assert E.suite_mbpp(ctx)["pass@1"] == 1.0


def test_doctest_example_from_an_assert():
    assert E._doctest_example("assert f(1, [2]) == (3, 4)", "    ") == "    >>> f(1, [2])\n    (3, 4)"
    assert E._doctest_example("assert math.isclose(f(1), 2.0)", "") is None
    assert E._doctest_example("assert f(1) != 2", "") is None
    assert E._task_sentence("Write a python function to  count   bits") == "Count bits."


@needs_eval
def test_mbpp_infill_perfect_and_wrong():
    items = E.mbpp_infill_items(E.load_mbpp(EVAL)[:6], seed=0)
    table = {(it["prefix"], it["suffix"]): it["middle"].rstrip("\n") for it in items}
    ctx = E.Context(predictor=Oracle(table), limit=6, eval_dir=EVAL, jobs=2)
    r = E.suite_mbpp_infill(ctx)
    assert r["exact_match"] == 1.0 and r["pass"] == 1.0 and r["n"] == len(items) == 6
    assert r["exact_match_spm"] == 1.0 and r["pass_spm"] == 1.0
    ctx.predictor = Oracle(table, wrong=lambda k: "    )(")
    ctx.extra["fim_orders"] = ("psm",)
    r = E.suite_mbpp_infill(ctx)
    assert r["exact_match"] == 0.0 and r["pass"] == 0.0 and "pass_spm" not in r


@needs_eval
def test_quixbugs_perfect_wrong_and_looping_fix():
    items = [E.quixbugs_item(r) for r in E.load_quixbugs(EVAL)[:4]]
    assert [it["name"] for it in items][:2] == ["bitcount", "breadth_first_search"]
    table = {number_lines("\n".join(it["lines"])): ("", format_finding(it["oracle"])) for it in items}
    ctx = E.Context(predictor=Oracle(table), limit=4, eval_dir=EVAL, jobs=2, timeout=5)
    r = E.suite_quixbugs(ctx)
    # depth_first_search misses a line: it can be localised but no one-line replacement repairs it
    assert r["localised"] == 4 and r["repaired"] == 3 == r["one_line_repairable"]
    ctx.predictor = Oracle(table, wrong=lambda k: ("", "no issue"))
    r = E.suite_quixbugs(ctx)
    assert r["localisation_top1"] == 0.0 and r["repair_pass"] == 0.0
    # the right line but the buggy code as the "fix": localised, not repaired (bitcount then loops forever)
    bit = items[0]
    bug_line = bit["oracle"].line
    wrong_fix = Finding(bug_line, "x", bit["lines"][bug_line - 1].strip())
    program = E.apply_fix(bit["lines"], wrong_fix)
    assert not E.run_quixbugs_tests(EVAL / "quixbugs", bit["rec"], program, timeout=3)
    assert E.run_quixbugs_tests(
        EVAL / "quixbugs", bit["rec"], E.apply_fix(bit["lines"], bit["oracle"]), timeout=20
    )


def _task_dir(tmp_path: Path) -> Path:
    from model.data.tasks import examples_for_source

    src = Path(json.__file__).read_text() + "\n" + (Path(json.__file__).parent / "decoder.py").read_text()
    recs = examples_for_source(src, "json.py", "json")
    d = tmp_path / "tasks"
    d.mkdir()
    (d / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return d


def test_bugs_perfect_and_wrong(tmp_path):
    d = _task_dir(tmp_path)
    recs = [json.loads(x) for x in (d / "test.jsonl").read_text().splitlines()]
    table = {r["code"]: (r["reasoning"], r["answer"]) for r in recs if r["task"] == "debug"}
    ctx = E.Context(predictor=Oracle(table), limit=100, task_data=d)
    r = E.suite_bugs(ctx)
    assert r["bugs"] > 0 and r["clean"] > 0
    assert r["precision"] == r["recall"] == 1.0 and r["false_alarm_rate"] == 0.0 and r["fix_exact"] == 1.0
    assert set(r["recall_by_kind"].values()) == {1.0}
    ctx.predictor = Oracle(
        table, wrong=lambda k: ("", "line 1: the def line is wrong")
    )  # bugs are never on line 1
    r = E.suite_bugs(ctx)
    assert r["precision"] == r["recall"] == 0.0 and r["false_alarm_rate"] == 1.0
    ctx.predictor = Oracle(table, wrong=lambda k: ("", "no issue"))
    r = E.suite_bugs(ctx)
    assert r["recall"] == 0.0 and r["false_alarm_rate"] == 0.0


def test_docstrings_perfect_and_wrong(tmp_path):
    d = _task_dir(tmp_path)
    recs = [json.loads(x) for x in (d / "test.jsonl").read_text().splitlines()]
    table = {r["code"]: (r["reasoning"], r["answer"]) for r in recs if r["task"] == "comment"}
    ctx = E.Context(predictor=Oracle(table), limit=50, task_data=d)
    r = E.suite_docstrings(ctx)
    assert r["n"] == len(table) > 0 and r["rouge_l_f1"] == 1.0
    ctx.predictor = Oracle(table, wrong=lambda k: ("", "qqqq zzzz"))
    assert E.suite_docstrings(ctx)["rouge_l_f1"] == 0.0


def test_fim_items_are_deterministic_and_perfect_scores_one():
    sources, where = E.heldout_sources(None, 10, seed=1)  # what suite_fim reads for 10 items
    assert "own source" in where and len(sources) == 10
    a = E.fim_items(sources, 10, 1, None, 2048, 64)
    assert a == E.fim_items(sources, 10, 1, None, 2048, 64)
    for it in a:
        assert it["middle"].endswith("\n") and it["middle"].strip()
        assert it["prefix"] + it["middle"] + it["suffix"] in dict(sources)[it["path"]] + "\n"
    table = {(it["prefix"], it["suffix"]): it["middle"].rstrip("\n") for it in a}
    ctx = E.Context(predictor=Oracle(table), limit=10, seed=1, extra={"ctx_len": 2048})
    ctx.data = None
    r = E.suite_fim(ctx)
    assert r["exact_match"] == 1.0 and r["edit_similarity"] == 1.0
    assert r["exact_match_spm"] == 1.0 and r["edit_similarity_spm"] == 1.0
    ctx.predictor = Oracle(table, wrong=lambda k: "")
    r = E.suite_fim(ctx)
    assert r["exact_match"] == 0.0 and r["edit_similarity"] == 0.0


def test_fim_clipping_fits_the_context(tiny_tokenizer):
    sources, _ = E.heldout_sources(None, 3, seed=0)
    for it in E.fim_items(sources, 6, 0, tiny_tokenizer, 256, 32):
        assert tiny_tokenizer.count(it["prefix"]) + tiny_tokenizer.count(it["suffix"]) <= 256 - 32 - 8
        assert it["prefix"] == "" or it["prefix"].endswith("\n")


# --------------------------------------------------------------------------- the CLI on the tiny model


def test_cli_runs_every_suite_on_the_tiny_model(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "report.json"
    argv = ["--model", str(tiny_model_dir), "--limit", "1", "--json", str(out), "--max-new-tokens", "8",
            "--jobs", "1", "--timeout", "5"]  # fmt: skip
    assert E.main(argv) == 0
    report = json.loads(out.read_text())
    assert set(report["suites"]) == set(E.SUITES) - {"repo-fim"}  # repo-fim runs only with --repos
    assert report["path"] == "product"
    assert report["suites"]["bpb"]["bits_per_byte"] > 0 and report["suites"]["bpb"]["tokens"] > 0
    for name, res in report["suites"].items():
        assert res["n"] + res.get("skipped", 0) >= 1, name
    assert "versions" in report and "date" in report
    assert "bits_per_byte" in capsys.readouterr().out


def test_repo_fim_scores_with_and_without_repository_context(tiny_model_dir, tmp_path):
    from tests.test_repo import _project

    root = _project(tmp_path)
    items = E.repo_fim_items([root], 5, 0)
    assert items and all(it["path"] == "pkg/main.py" for it in items)  # the one file importing from others
    assert {n for it in items for n in it["names"]} <= {"scale", "M", "fmt"}
    out = tmp_path / "r.json"
    assert E.main(["--model", str(tiny_model_dir), "--suite", "repo-fim", "--repos", str(root), "--limit", "2",
                   "--json", str(out)]) == 0
    res = json.loads(out.read_text())["suites"]["repo-fim"]
    assert res["n"] == 2 and {"exact_match_with", "exact_match_without", "gain_points"} <= set(res)
    assert E.main(["--model", str(tiny_model_dir), "--suite", "repo-fim", "--limit", "2"]) == 2  # needs --repos


def test_product_fim_with_repos_completes_lines_of_those_projects_with_their_memory(tmp_path):
    from tests.test_repo import _project

    root = _project(tmp_path)
    other = tmp_path / "elsewhere.py"
    other.write_text("def f(a, b):\n    total = a + b\n    return total * 2\n")
    data = tmp_path / "data" / "test"
    data.mkdir(parents=True)
    recs = [{"text": p.read_text(), "path": str(p), "package": "x"} for p in (root / "pkg" / "main.py", other)]
    (data / "shard-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))

    class Runner:  # answers every request right when (and only when) it carries the project's memory
        def __init__(self):
            self.seen = []

        def run(self, reqs):
            self.seen += reqs
            out = []
            for r in reqs:
                ref = Path(r.path).read_text().split("\n")[r.line].strip() if r.path else ""
                out.append(type("R", (), {"text": ref if r.repo else "nope", "multiline": False})())
            return out

    runner = Runner()
    ctx = E.Context(predictor=None, limit=8, seed=0, data=tmp_path / "data", extra={"runner": runner, "repos": [str(root)]})
    r = E.product_fim(ctx)
    under = [q for q in runner.seen if q.repo is not None]
    assert under and all(q.repo == str(root.resolve()) and q.path.startswith(str(root.resolve())) for q in under)
    assert 0 < r["n_repo"] == len(under) < r["n"] == 8  # lines of elsewhere.py are not in a --repos project
    assert r["exact_match_repo"] == 1.0 and r["exact_match_repo_without"] == 0.0 and r["exact_match"] == 0.0
    assert "items" not in r
    r = E.product_fim(E.Context(predictor=None, limit=8, seed=0, data=tmp_path / "data", extra={"runner": Runner()}))
    assert "n_repo" not in r  # no --repos: the plain suite
    ctx = E.Context(predictor=None, limit=8, seed=0, data=tmp_path / "data",
                    extra={"runner": Runner(), "repos": [str(root)], "items": True})
    res = E.product_fim(ctx)  # --items: each line with its completions, to read the misses
    recs = res["items"]
    assert len(recs) == 8 and all(x["completion"] == "nope" for x in recs)
    inside = [x for x in recs if "completion_repo" in x]
    assert 0 < len(inside) == res["n_repo"] < 8
    assert all(x["completion_repo"] == x["reference"].strip() and x["path"].startswith(str(root)) for x in inside)
    assert all("completion_repo" not in x for x in recs if x["path"].endswith("elsewhere.py"))


def test_cli_errors(tmp_path, capsys):
    assert E.main(["--suite", "nope"]) == 2
    assert "unknown suite" in capsys.readouterr().err
    assert E.main(["--model", str(tmp_path / "missing"), "--suite", "fim"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moecoder eval: error:") and err.count("\n") == 1
    assert E.main(["--data", str(tmp_path / "nodata"), "--suite", "fim"]) == 2
    assert E.main(["--limit", "0"]) == 2


# --------------------------------------------------------------------------- scripts/plot_dense_vs_moe.py


def _plot_module():
    return load_script("plot_dense_vs_moe")


def _write_run(d: Path, scale: float) -> None:
    d.mkdir()
    lines = []
    for step in range(0, 101, 10):
        if step:
            lines.append({"step": step, "loss": 3.0, "tokens": step * 512})
        if step % 50 == 0:
            lines.append(
                {"step": step, "valid_bpb": scale * (2 - step / 100), "valid_loss": scale * (4 - step / 50)}
            )
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (d / "train.log").write_text("x | params 38.00M (active 23.50M) | device cpu\n")


def test_plot_script_reads_curves_and_writes_png(tmp_path, capsys):
    mod = _plot_module()
    _write_run(tmp_path / "moe", 1.0)
    _write_run(tmp_path / "dense", 1.2)
    c = mod.load_curve(tmp_path / "moe")
    assert c.steps == [0, 50, 100] and c.tokens == [0.0, 50 * 512, 100 * 512]
    assert c.bpb == [2.0, 1.5, 1.0] and c.active == "23.50M active"
    assert mod.tokens_at([(10, 100), (20, 300)], 15) == 200 and mod.tokens_at([(10, 100)], 30) == 300
    (tmp_path / "empty.jsonl").write_text('{"step": 1, "tokens": 5}\n')
    with pytest.raises(ValueError, match="no validation records"):
        mod.load_curve(tmp_path / "empty.jsonl")
    pytest.importorskip("matplotlib")
    out = tmp_path / "docs" / "plot.png"
    assert mod.main([str(tmp_path / "moe"), str(tmp_path / "dense"), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "MoE (23.50M active)" in capsys.readouterr().out
    before = out.read_bytes()
    assert (
        mod.main([str(tmp_path / "moe"), str(tmp_path / "dense"), "--out", str(out)]) == 2
    )  # no silent overwrite
    assert out.read_bytes() == before
    assert mod.main([str(tmp_path / "nope"), str(tmp_path / "dense"), "--out", str(out)]) == 2


def test_dense_twin_matches_active_parameters():
    import dataclasses

    import torch

    from model.config import get_preset, param_counts
    from model.transformer import Transformer

    mod = _plot_module()
    for preset in ("tiny", "small"):
        overrides, active, dense = mod.dense_twin(preset)
        assert abs(dense / active - 1) < 0.01
        cfg = dataclasses.replace(get_preset(preset), **overrides)
        assert cfg.n_moe_layers == 0 and param_counts(cfg) == (dense, dense)
    model = Transformer(dataclasses.replace(get_preset("tiny"), **mod.dense_twin("tiny")[0]))
    assert sum(p.numel() for p in model.parameters()) == mod.dense_twin("tiny")[2]
    assert model(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, 512)


def test_missing_external_benchmarks_name_eval_dir_before_loading_a_model(tmp_path, monkeypatch, capsys):
    """A non-editable install has no ../shared/eval: one line that says how to point at it."""
    from assistant.evaluate import main as eval_main

    monkeypatch.setenv("MOECODER_EVAL_DIR", str(tmp_path / "nowhere"))
    assert eval_main(["--suite", "mbpp", "--model", str(tmp_path / "no-model")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--eval-dir DIR" in err[0] and "nowhere/mbpp/sanitized-mbpp.json not found" in err[0]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert eval_main(["--suite", "quixbugs", "--eval-dir", str(empty)]) == 2
    assert "--eval-dir" in capsys.readouterr().err
