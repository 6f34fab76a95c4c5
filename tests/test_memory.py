"""Repository memory for completion (``assistant.memory``: a kNN-LM over the project) and the
generation hook it uses (``SamplingParams.mix``)."""

from __future__ import annotations

import os
import time

import pytest
import torch

from assistant import memory
from assistant.engine import Engine
from assistant.tasks import TaskRequest, execute_batch, make_plan
from model.generate import SamplingParams, generate

UTIL = "def scale(values, factor=2.0):\n    return [v * factor for v in values]\n\n\nLIMIT = 40\n"
MAIN = "from pkg.util import scale\n\n\ndef main(xs):\n    ys = scale(xs)\n    return ys\n"


@pytest.fixture()
def loaded(tiny_model_dir):
    from model.checkpoint import load_model

    return load_model(str(tiny_model_dir))


def _project(tmp_path):
    root = tmp_path / "proj"
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_text("")
    (root / "pkg" / "util.py").write_text(UTIL)
    (root / "pkg" / "main.py").write_text(MAIN)
    return root


def _head_inputs(model, ids):
    """The final norm's output at every position of ``ids`` (what the memory keys)."""
    out = []
    hook = model.norm.register_forward_hook(lambda _m, _a, o: out.append(o))
    with torch.inference_mode():
        logits = model(torch.tensor([ids]))
    hook.remove()
    return logits[0], out[-1][0]


def test_memory_holds_every_position_and_recalls_the_token_that_followed(loaded, tmp_path, monkeypatch):
    root = _project(tmp_path)
    model, tok = loaded.model, loaded.tokenizer
    mem = memory.RepoMemory(model, tok, root)
    per_file = {rel: len(tok.encode((root / rel).read_text())) for rel in ("pkg/util.py", "pkg/main.py")}
    assert mem.entries == sum(per_file.values())  # every token predicts the next one (the last: end of text)
    held = {rel for rel, i in mem.file_ids.items() if bool((mem.fids == i).any())}
    assert held == {"pkg/util.py", "pkg/main.py"}  # the empty __init__ has no entries

    ids = tok.encode(UTIL)
    logits, h = _head_inputs(model, ids)
    # at distance ~0 the memory alone speaks (lam = LAM_MAX = 1): the position's own entry wins
    monkeypatch.setattr(memory, "LAM_MAX", 1.0)
    picked = mem.mix(logits, h).argmax(-1)
    assert picked.tolist() == ids[1:] + [int(tok.eos_id)]
    # the model alone would not say so (a tiny random model)
    assert logits.argmax(-1).tolist() != picked.tolist()
    # the file being edited is left out: only main.py's entries can vote now
    d, v, ok = mem.nearest(h, exclude="pkg/util.py")
    assert bool(ok.all()) and set(v.flatten().tolist()) <= set(tok.encode(MAIN) + [int(tok.eos_id)])
    # far from everything it has seen, the memory has little say (lam = LAM_MAX exp(-r / R0))
    far = h + 50 * torch.randn(h.shape, generator=torch.Generator().manual_seed(0))
    drift = (mem.mix(logits, far).exp() - logits.softmax(-1)).abs().sum(-1)
    assert float(drift.max()) < 2 * 0.2  # total variation < 0.2: lam < 0.2 at r ~ 1
    # a mixture is a distribution: (1 - lam) p_model + lam p_knn, lam <= LAM_MAX
    monkeypatch.setattr(memory, "LAM_MAX", 0.5)
    p = mem.mix(logits, h).exp()
    assert torch.allclose(p.sum(-1), torch.ones(len(ids)), atol=1e-4)
    assert bool((p >= 0.5 * logits.softmax(-1) - 1e-6).all())


def test_memory_reads_changed_and_new_files_again(loaded, tmp_path, monkeypatch):
    root = _project(tmp_path)
    model, tok = loaded.model, loaded.tokenizer
    mem = memory.RepoMemory(model, tok, root)
    before = mem.entries
    (root / "pkg" / "extra.py").write_text("EXTRA = 'x'\n")
    mem.refresh()  # within RECHECK_S: nothing is looked at
    assert mem.entries == before
    monkeypatch.setattr(memory, "RECHECK_S", 0.0)
    basis = mem.proj
    mem.refresh()
    assert mem.entries == before + len(tok.encode("EXTRA = 'x'\n"))
    assert mem.proj is basis  # the projection is fixed once the project was read: a new file is projected alone
    (root / "pkg" / "extra.py").unlink()
    later = time.time() + 5
    (root / "pkg" / "util.py").write_text(UTIL + "OTHER = 1\n")
    os.utime(root / "pkg" / "util.py", (later, later))
    mem.refresh()
    assert "pkg/extra.py" not in mem.file_ids
    assert mem.entries == before + len(tok.encode(UTIL + "OTHER = 1\n")) - len(tok.encode(UTIL))


def test_generation_picks_from_the_mixed_logits_greedy_and_beams(loaded):
    model, tok = loaded.model, loaded.tokenizer
    prompt = tok.encode("def main():\n    return ")
    plain = generate(model, tok, prompt, SamplingParams(max_new_tokens=6))
    seen = []
    forced = int(tok.encode("x")[0])

    def mix(logits, h):
        seen.append((tuple(logits.shape), tuple(h.shape)))
        out = torch.full_like(logits, float("-inf"))
        out[:, forced] = 0.0
        return out

    for beams in (1, 3):
        seen.clear()
        r = generate(model, tok, prompt, SamplingParams(max_new_tokens=6, beams=beams, mix=mix))
        assert r.token_ids == [forced] * 6
        assert seen and all(s == ((s[0][0], model.cfg.vocab_size), (s[0][0], model.cfg.dim)) for s in seen)
    assert plain.token_ids != [forced] * 6
    # the hook is gone afterwards: the plain answer again
    assert generate(model, tok, prompt, SamplingParams(max_new_tokens=6)).token_ids == plain.token_ids


def test_completion_with_repository_context_uses_the_memory(loaded, tmp_path):
    root = _project(tmp_path)
    eng = Engine.from_loaded(loaded)
    src = MAIN.replace("    ys = scale(xs)\n", "    ys = \n")
    req = TaskRequest("complete", src, path=str(root / "pkg" / "main.py"), line=4, column=9, max_new_tokens=8)
    assert make_plan(eng, req).mix is None
    req.repo = str(root)
    plan = make_plan(eng, req)
    # the whole file is in the prompt: all of its entries are left out
    assert plan.mix is not None and plan.mix.exclude == "pkg/main.py"
    assert any("memory" in n for n in plan.notes)
    assert not any(n.startswith("repository context: added") for n in plan.notes)  # no stubs beside it
    res = execute_batch(eng, [req], 1)[0]
    assert isinstance(res.text, str)
    mem = plan.mix._mem or memory.memory_for(loaded.model, loaded.tokenizer, root)
    assert mem.entries > 0 and "pkg/util.py" in mem.file_ids
    # a repository that is not there: no memory, no failure
    req.repo = str(tmp_path / "missing")
    assert make_plan(eng, req).mix is None


def test_a_read_budget_fills_the_memory_over_several_uses(loaded, tmp_path, monkeypatch):
    """An editor's completion reads the project a slice at a time (TaskRequest.repo_read_s)."""
    root = _project(tmp_path)
    for i in range(3):
        (root / "pkg" / f"mod{i}.py").write_text(f"VALUE_{i} = {i}\n" * 20)
    model, tok = loaded.model, loaded.tokenizer
    full = memory.RepoMemory(model, tok, root).entries
    mem = memory.RepoMemory(model, tok, root, read_s=0.0)  # one file per use
    sizes = [mem.entries]
    while not mem.complete:
        mem.refresh(read_s=0.0)  # an incomplete memory goes on at once, RECHECK_S or not
        sizes.append(mem.entries)
        assert len(sizes) < 10
    assert sizes[0] < full and sizes == sorted(sizes) and sizes[-1] == full


def test_a_file_longer_than_the_context_is_read_in_overlapping_windows(loaded, tmp_path):
    """Every position once, each with at least a quarter window of code before it (the tiny
    model's context is 256 tokens)."""
    root = tmp_path / "long"
    root.mkdir()
    text = "".join(f"def f{i}(x):\n    return x + {i}\n\n\n" for i in range(120))
    (root / "big.py").write_text(text)
    model, tok = loaded.model, loaded.tokenizer
    ids = tok.encode(text)
    assert len(ids) > 3 * model.cfg.max_seq_len
    mem = memory.RepoMemory(model, tok, root)
    assert mem.entries == len(ids) and mem.vals.tolist() == ids[1:] + [int(tok.eos_id)]


def test_a_large_memory_searches_its_nearest_cells(loaded, tmp_path, monkeypatch):
    """From IVF_MIN entries the search goes through k-means cells: each stored position still
    finds itself first (its own cell is the query's nearest), the edited file's entries stay out,
    and a file read later joins the cells that were fixed."""
    root = tmp_path / "ivf"
    root.mkdir()
    for i in range(4):
        (root / f"m{i}.py").write_text("".join(f"def g{i}_{j}(y):\n    return y * {j}\n\n\n" for j in range(60)))
    monkeypatch.setattr(memory, "IVF_MIN", 500)
    monkeypatch.setattr(memory, "IVF_PROBE", 4)
    model, tok = loaded.model, loaded.tokenizer
    mem = memory.RepoMemory(model, tok, root)
    assert mem.centroids is not None and mem.entries > 2000
    text = (root / "m1.py").read_text()
    ids = tok.encode(text)[:200]
    _, h = _head_inputs(model, ids)
    d, v, ok = mem.nearest(h, k=4)
    assert float(d[:, 0].abs().max()) < 1e-3 and v[:, 0].tolist() == tok.encode(text)[1:201]
    d, v, ok = mem.nearest(h, exclude="m1.py", k=4)
    # its own entries are gone; other files answer (the first tokens, "def g", read the same in all)
    assert float(d[5:, 0].min()) > 1e-3 and bool(ok.all())
    cells = mem.centroids
    (root / "m9.py").write_text("VALUE = 99\n")
    monkeypatch.setattr(memory, "RECHECK_S", 0.0)
    mem.refresh()
    assert mem.centroids is cells and "m9.py" in mem.file_ids
    assert sum(b - a for a, b in zip(mem.offsets, mem.offsets[1:])) == mem.entries


def test_an_idle_reader_fills_the_memory_and_completions_only_use_it(loaded, tmp_path):
    """Engine.read_repository (the language server's idle reader) builds the memory a slice at a time;
    a completion with repo_read_s < 0 reads nothing itself: the model alone before any reading, the
    memory as read so far after."""
    root = _project(tmp_path)
    for i in range(3):
        (root / "pkg" / f"mod{i}.py").write_text(f"VALUE_{i} = {i}\n" * 20)
    eng = Engine.from_loaded(loaded)
    model = loaded.model
    memory.forget(model)
    src = MAIN.replace("    ys = scale(xs)\n", "    ys = \n")
    req = TaskRequest("complete", src, path=str(root / "pkg" / "main.py"), line=4, column=9, max_new_tokens=4,
                      repo=str(root), repo_read_s=-1.0)
    plan = make_plan(eng, req)
    logits = torch.randn(1, model.cfg.vocab_size)
    h = torch.randn(1, model.cfg.dim)
    assert plan.mix(logits, h) is logits and memory.peek(model, root) is None  # nothing read, nothing mixed
    reports = [eng.read_repository(str(root), 0.0)]  # one file a slice
    while not reports[-1]["complete"]:
        reports.append(eng.read_repository(str(root), 0.0))
        assert len(reports) < 10
    assert len(reports) > 1 and [r["entries"] for r in reports] == sorted(r["entries"] for r in reports)
    mem = memory.peek(model, root)
    assert mem is not None and mem.complete and reports[-1]["entries"] == mem.entries
    before = mem.entries
    res = execute_batch(eng, [req], 1)[0]
    assert isinstance(res.text, str) and memory.peek(model, root).entries == before  # the completion read nothing
    plan = make_plan(eng, req)
    assert not torch.equal(plan.mix(logits, h), logits)  # now the memory takes part
    assert eng.read_repository(str(tmp_path / "missing"), 1.0) is None
    eng.close()


def test_reading_stops_between_windows_and_goes_on_inside_the_file(loaded, tmp_path):
    """``stop()`` is checked between the model's windows: a file longer than the context is read over
    several calls (one window each at least), and the memory ends the same as one uninterrupted read."""
    root = tmp_path / "long"
    root.mkdir()
    text = "".join(f"def f{i}(x):\n    return x + {i}\n\n\n" for i in range(120))
    (root / "big.py").write_text(text)
    (root / "small.py").write_text("A = 1\n")
    model, tok = loaded.model, loaded.tokenizer
    full = memory.RepoMemory(model, tok, root)
    calls = [0]

    def stop() -> bool:  # "a request came": after every window
        calls[0] += 1
        return True

    mem = memory.RepoMemory(model, tok, root, stop=stop)
    uses = 1
    while not mem.complete:
        assert mem._partial or mem.entries < full.entries
        mem.refresh(stop=stop)
        uses += 1
        assert uses < 40
    n_windows = -(-len(tok.encode(text)) // (model.cfg.max_seq_len - 1 - model.cfg.max_seq_len // 4))
    assert uses >= n_windows - 1 and calls[0] >= uses - 1  # a window a call, not a file a call
    assert mem.entries == full.entries and not mem._partial
    assert torch.equal(mem.vals, full.vals) and torch.allclose(mem.keys.float(), full.keys.float(), atol=1e-3)


def test_the_memory_is_kept_on_disk_and_only_changed_files_are_read_again(loaded, tmp_path, monkeypatch):
    """With the cache on, a new memory of the same project and model (a new process, say) reads no
    file that did not change, and searches like the first; an edited file is read again, a deleted
    one leaves; other weights get another cache; MOECODER_MEMORY_CACHE=0 writes nothing."""
    monkeypatch.setenv("MOECODER_MEMORY_CACHE", "1")
    monkeypatch.setenv("MOECODER_CACHE_DIR", str(tmp_path / "cache"))
    root = _project(tmp_path)
    for i in range(3):
        (root / "pkg" / f"mod{i}.py").write_text(f"VALUE_{i} = {i}\n" * 20)
    model, tok = loaded.model, loaded.tokenizer
    first = memory.RepoMemory(model, tok, root)
    assert first.loaded == 0 and first.complete
    stored = sorted(p.name for p in first.cache.path.iterdir())
    assert "meta.pt" in stored and len(stored) == 1 + len(first.file_ids)

    read = []
    real = memory.RepoMemory._read_file
    monkeypatch.setattr(memory.RepoMemory, "_read_file", lambda self, *a, **k: read.append(1) or real(self, *a, **k))
    again = memory.RepoMemory(model, tok, root)
    assert read == [] and again.loaded == len(first.file_ids) and again.entries == first.entries
    _, h = _head_inputs(model, tok.encode(UTIL))
    d1, v1, _ = first.nearest(h, k=4)
    d2, v2, _ = again.nearest(h, k=4)
    assert torch.equal(v1[:, 0], v2[:, 0]) and torch.allclose(d1, d2, atol=1e-2, rtol=1e-2)

    time.sleep(0.01)
    (root / "pkg" / "mod0.py").write_text("VALUE_0 = 'changed'\n" * 5)
    (root / "pkg" / "mod1.py").unlink()
    third = memory.RepoMemory(model, tok, root)
    assert len(read) == 1 and "pkg/mod1.py" not in third.file_ids
    assert len(list(third.cache.path.glob("f-*.pt"))) == len(third.file_ids)
    fresh_vals = torch.tensor(tok.encode("VALUE_0 = 'changed'\n" * 5)[1:] + [int(tok.eos_id)])
    s, e = third.spans["pkg/mod0.py"]
    assert torch.equal(third.vals[s:e], fresh_vals)

    with torch.no_grad():
        model.norm.weight.add_(0.01)  # other weights (moecoder tune): another cache, read afresh
    try:
        other = memory.RepoMemory(model, tok, root)
        assert other.loaded == 0 and other.cache.path != first.cache.path
    finally:
        with torch.no_grad():
            model.norm.weight.sub_(0.01)
    monkeypatch.setenv("MOECODER_MEMORY_CACHE", "0")
    monkeypatch.setenv("MOECODER_CACHE_DIR", str(tmp_path / "cache2"))
    assert memory.RepoMemory(model, tok, root).cache is None and not (tmp_path / "cache2").exists()


def test_the_edited_file_takes_part_above_the_prompt(loaded, tmp_path, monkeypatch):
    """Each entry knows the line of the token it predicts; a completion leaves out the edited file's
    entries from the prompt's first line on (its code above the prompt's window takes part), and with
    MEMORY_OWN_FILE off the whole file, as before."""
    import assistant.tasks as tasks

    root = tmp_path / "own"
    root.mkdir()
    text = "".join(f"def helper_{i}(x):\n    return x * {i}\n\n\n" for i in range(80)) + "def main(y):\n    z = 1\n"
    (root / "m.py").write_text(text)
    model, tok = loaded.model, loaded.tokenizer
    mem = memory.RepoMemory(model, tok, root)
    ids = tok.encode(text) + [int(tok.eos_id)]
    want = [tok.decode(ids[:t]).count("\n") for t in range(1, len(ids))]  # the line of each predicted token
    assert mem.lines.tolist() == want
    out = mem._left_out(("m.py", 10))
    assert out.tolist() == [ln >= 10 for ln in want] and mem._left_out("m.py").all()
    _, h = _head_inputs(model, tok.encode(text)[:30])  # positions of the file's first lines
    d_own, _, _ = mem.nearest(h, exclude=("m.py", 10), k=1)
    d_all, _, ok = mem.nearest(h, exclude="m.py", k=1)
    assert float(d_own.max()) < 1e-3 and not bool(ok.any())  # its own entries there; none without the file

    eng = Engine.from_loaded(loaded)
    lines = text.split("\n")
    i = len(lines) - 2  # "    z = 1": a completion at the end of a long file
    src = "\n".join([*lines[:i], "    ", *lines[i + 1:]])
    req = TaskRequest("complete", src, path=str(root / "m.py"), line=i, column=4, max_new_tokens=4, repo=str(root))
    plan = tasks.make_plan(eng, req)
    rel, first = plan.mix.exclude
    prompt = tok.decode(plan.prompt_ids)
    defs = [j for j, ln in enumerate(lines) if ln.startswith("def helper_")]
    above = [j for j in defs if j < first]
    assert rel == "m.py" and 0 < first <= i and above  # a long file: its top is outside the prompt
    assert lines[above[-1]] + "\n" not in prompt  # the last def above stays out of the prompt (in the memory)
    assert all(lines[j] in prompt for j in defs if j >= first)  # from there on the prompt has them (bodies collapsed)
    # unsaved lines inserted above the prompt: the disk's lines have moved, the whole file is left out
    req.source = "# new\n" + src
    req.line += 1
    assert tasks.make_plan(eng, req).mix.exclude == "m.py"
    req.source, req.line = src, i
    monkeypatch.setattr(tasks, "MEMORY_OWN_FILE", False)
    assert tasks.make_plan(eng, req).mix.exclude == "m.py"
