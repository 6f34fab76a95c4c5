"""The assistant on open checkpoints: FIM by family, prefix-only completion, chat templates,
native thinking vs the answer marker, and `moecoder complete` / `review` / `chat` end to end
on tiny transformers-made checkpoint directories (tests/hf_tiny.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).parent))
from hf_tiny import make_checkpoint  # noqa: E402

from assistant import prompts  # noqa: E402
from assistant.engine import Backend, Engine  # noqa: E402
from assistant.tasks import DebugResult, Explanation, TaskRequest, make_plan  # noqa: E402
from model.generate import GenerationResult, TokenEvent  # noqa: E402

SRC = "def add(a, b):\n    return a - b\n\n\ndef mul(a, b):\n    return a * b\n"


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is ~30x faster than oversubscribed threads on a busy box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hfa")
    out = {}
    for fam in ("qwen3_moe", "deepseek_v2", "mixtral"):
        make_checkpoint(fam, root / fam)
        out[fam] = root / fam
    return out


@pytest.fixture(scope="module")
def engines(dirs):
    engs = {fam: Engine(str(d), default_max_seconds=None) for fam, d in dirs.items()}
    yield engs
    for e in engs.values():
        e.close()


def test_fim_prompts_by_family(engines):
    req = TaskRequest("complete", SRC, line=1, column=12)
    qwen = engines["qwen3_moe"]
    tok = qwen.tokenizer
    plan = make_plan(qwen, req)
    ids = plan.prompt_ids
    # prefix-suffix-middle with Qwen's tokens; the word typed at the cursor ("a") is healed: the
    # prompt stops before it and the model spells it again
    assert ids[0] == tok.special_id("fim_prefix") and ids[-1] == tok.special_id("fim_middle")
    s = ids.index(tok.special_id("fim_suffix"))
    assert plan.heal == "a"
    assert tok.decode(ids[1:s]).endswith("return ") and tok.decode(ids[s + 1:-1]).startswith(" - b\n")
    ds = engines["deepseek_v2"]
    ids = make_plan(ds, req).prompt_ids
    assert ids[0] == ds.tokenizer.tok.token_to_id("<｜fim▁begin｜>")
    assert ds.tokenizer.tok.token_to_id("<｜fim▁hole｜>") in ids and ids[-1] == ds.tokenizer.tok.token_to_id("<｜fim▁end｜>")
    # no FIM tokens: the prefix only, no special ids, and the context report says so
    mx = engines["mixtral"]
    plan = make_plan(mx, req)
    assert mx.tokenizer.decode(plan.prompt_ids) == "def add(a, b):\n    return " and plan.heal == "a"
    assert not any(mx.tokenizer.is_special(i) for i in plan.prompt_ids)
    assert any("prefix only" in n for n in plan.notes)
    assert mx.tokenizer.eos_id in plan.stop_token_ids
    # DeepSeek has no file separator: the stops are what the vocabulary has (serve uses these too)
    stops = prompts.fim_stop_ids(ds.tokenizer)
    assert not ds.tokenizer.has_special("file_sep") and ds.tokenizer.eos_id in stops
    assert ds.tokenizer.tok.token_to_id("<｜fim▁hole｜>") in stops


def test_chat_template_prompts(engines):
    qwen, ds = engines["qwen3_moe"], engines["deepseek_v2"]
    req = TaskRequest("debug", SRC, function="add")
    ids = make_plan(qwen, req).prompt_ids
    text = qwen.tokenizer.decode(ids)  # specials decode to "": check the ids themselves too
    assert ids[0] == qwen.tokenizer.tok.token_to_id("<|im_start|>") and "Find the most likely bug" in text
    assert "1| def add(a, b):" in text and ids[-2] == qwen.tokenizer.special_id("think")  # "<think>\\n"
    assert prompts.answer_marker(qwen.tokenizer) is None  # Qwen3 thinks natively
    ids = make_plan(ds, TaskRequest("comment", SRC, function="mul")).prompt_ids
    text = ds.tokenizer.decode(ids)
    assert text.startswith("User: Write a docstring") and text.endswith("Assistant:")
    assert prompts.ANSWER_MARKER in text and prompts.answer_marker(ds.tokenizer) == prompts.ANSWER_MARKER


class _Scripted(Backend):
    """Streams fixed text through the checkpoint's real tokenizer."""

    def __init__(self, tok, pieces):
        self.tokenizer, self.context_length, self.pieces = tok, 512, pieces

    def _ids(self):
        out = []
        for p in self.pieces:
            out += [p] if isinstance(p, int) else self.tokenizer.encode(p)
        return out + [self.tokenizer.eos_id]

    def stream(self, prompt_ids, params, cancel):
        for t in self._ids():
            yield TokenEvent(t, self.tokenizer.decode([t]), -0.1)

    def generate_batch(self, prompts_, params, cancel=None):
        ids = self._ids()
        return [GenerationResult(self.tokenizer.decode(ids), ids, [-0.1] * len(ids), "eos") for _ in prompts_]

    def token_logprobs(self, ids):
        return [0.0] + [-1.0] * (len(ids) - 1)


def _events(engine, req):
    evs = list(engine.stream(req))
    kinds = [e.kind for e in evs]
    first_answer = kinds.index("answer") if "answer" in kinds else len(kinds)
    assert "reasoning" not in kinds[first_answer:], kinds  # reasoning always comes first
    return evs


def test_native_think_and_answer_marker_stream(engines):
    qtok = engines["qwen3_moe"].tokenizer
    fix = "line 2: subtracts instead of adding\nfix: return a + b"
    eng = Engine.from_loaded(backend=_Scripted(qtok, ["The function adds", " but uses minus.", qtok.special_id("think_end"),
                                                      "\n\n" + fix]))
    evs = _events(eng, TaskRequest("debug", SRC, function="add"))
    reasoning = "".join(e.text for e in evs if e.kind == "reasoning")
    result = evs[-1].result
    assert reasoning == "The function adds but uses minus."
    assert isinstance(result, DebugResult) and result.hints[0].line == 1 and result.hints[0].fix == "    return a + b"
    dtok = engines["deepseek_v2"].tokenizer
    eng = Engine.from_loaded(backend=_Scripted(dtok, ["It multiplies", " two numbers. ANS", "WER: Multiplies a by b."]))
    evs = _events(eng, TaskRequest("explain", SRC, function="mul"))
    assert "".join(e.text for e in evs if e.kind == "reasoning") == "It multiplies two numbers. "
    assert "".join(e.text for e in evs if e.kind == "answer") == "Multiplies a by b."
    assert isinstance(evs[-1].result, Explanation) and evs[-1].result.text == "Multiplies a by b."
    # the batch road splits the same way
    (res,) = eng.run_batch([TaskRequest("explain", SRC, function="mul")])
    assert res.text == "Multiplies a by b." and res.reasoning == "It multiplies two numbers."


def test_complete_and_review_cli(dirs, tmp_path, capsys):
    from assistant.review import main as review_main
    from assistant.tasks import main as task_main

    f = tmp_path / "a.py"
    f.write_text(SRC)
    assert task_main(["complete", f"{f}:2:13", "--model", str(dirs["qwen3_moe"]), "--max-tokens", "4"]) == 0
    assert task_main(["debug", str(f), "add", "--model", str(dirs["deepseek_v2"]), "--max-tokens", "6",
                      "--json"]) == 0
    out = capsys.readouterr().out
    assert set(json.loads(out[out.index("["):])[0]) == {"hints", "reasoning"}
    rc = review_main([str(f), "--model", str(dirs["qwen3_moe"]), "--max-tokens", "6", "--format", "json",
                      "--no-progress"])
    assert rc in (0, 1)
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == str(dirs["qwen3_moe"]) and isinstance(report["findings"], list)


async def test_chat_tui_on_an_open_checkpoint(engines, tmp_path):
    from tests.test_tui import last_done, turns, type_text, wait_for
    from tui.app import ChatApp

    app = ChatApp(engine=engines["qwen3_moe"], data_dir=tmp_path / "data", cwd=tmp_path,
                  clock=lambda: 1_700_000_000.0)
    async with app.run_test(size=(100, 40)) as pilot:
        await type_text(pilot, "what does add do?")
        await pilot.press("enter")
        await wait_for(pilot, last_done(app), timeout=120)
        (turn,) = turns(app)
        assert turn.state.status == "done"
        assert turn.state.order and turn.state.order[0] == "reasoning"  # Qwen3-style: thinking streams first


def test_serve_plain_chat_uses_the_checkpoint_chat_template(dirs):
    """`moecoder serve --model DIR`: plain chat on an open checkpoint is rendered with the
    checkpoint's own template; a native thinker's tokens before </think> stream as
    reasoning_content, the rest as content, and <|im_end|> ends the turn."""
    openai = pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    from assistant.serving import Service
    from tests.serve_support import running

    s = Service(str(dirs["qwen3_moe"]), max_batch=4, max_seconds=30)
    try:
        tok = s.tokenizer
        think, a, b = tok.special_id("think_end"), tok.encode("alpha")[0], tok.encode("beta")[0]
        end = tok.encode_with_specials("<|im_end|>")[0]
        expected = tok.encode_with_specials(tok.render_chat([{"role": "user", "content": "hi there"}]) + "<think>\n")
        script = {expected[-1]: a, a: think, think: b, b: end}  # reasoning "alpha", answer "beta", end of turn

        def hook(_module, inputs, logits):
            for row, t in enumerate(inputs[0][:, -1].tolist()):
                if t in script:
                    logits[row, -1] = -1e4
                    logits[row, -1, script[t]] = 1e4
            return logits

        s.model.register_forward_hook(hook)
        with running(s) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
            r = client.chat.completions.create(model=s.name, max_tokens=8, temperature=0,
                                               messages=[{"role": "user", "content": "hi there"}])
        assert r.usage.prompt_tokens == len(expected)  # the template's prompt, not "User: ...\nAssistant:"
        msg = r.choices[0].message
        assert msg.content == tok.decode([b]) and getattr(msg, "reasoning_content", None) == tok.decode([a])
        assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 4
    finally:
        s.close()
