"""moecoder serve: the OpenAI API with the official client, errors, cancellation, auth."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

openai = pytest.importorskip("openai")

from tests.serve_support import running, script_reasoning  # noqa: E402


@pytest.fixture(scope="module")
def service(tiny_model_dir):
    from assistant.serving import Service

    s = Service(str(tiny_model_dir), max_batch=8, max_seconds=30)
    s.script = script_reasoning(s)
    yield s
    s.close()


@pytest.fixture(scope="module")
def url(service):
    with running(service) as u:
        yield u


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def _solo(service, ids, max_new, stop_ids=()):
    from model.generate import SamplingParams, generate  # the reference: one prompt alone, no server

    return generate(service.model, service.tokenizer, ids, SamplingParams(max_new, stop_token_ids=stop_ids)).text


def test_models_list(client, service):
    models = client.models.list()
    assert [m.id for m in models.data] == [service.name]
    assert client.models.retrieve(service.name).id == service.name


def test_completion_with_suffix_is_fill_in_the_middle(client, service):
    prompt, suffix = "def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"
    r = client.completions.create(model=service.name, prompt=prompt, suffix=suffix, max_tokens=6, temperature=0)
    ids, stops = service.prompt_ids(prompt, suffix)
    assert stops and ids[-1] == service.tokenizer.special_id("fim_middle")
    assert r.choices[0].text == _solo(service, ids, 6, stops)
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(ids) and 1 <= r.usage.completion_tokens <= 6


def test_streamed_completion_equals_the_whole(client, service):
    kw = dict(model=service.name, prompt="import os\nimport", max_tokens=10, temperature=0)
    whole = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_chat_streams_reasoning_content_before_content(client, service):
    stream = client.chat.completions.create(
        model=service.name, stream=True, max_tokens=20,
        messages=[{"role": "user", "content": "/explain\n```python\nx = compute(1)\nprint(x)\n```"}])
    order = []
    for chunk in stream:
        delta = chunk.choices[0].delta
        extra = delta.model_extra or {}
        if extra.get("reasoning_content"):
            order.append(("reasoning", extra["reasoning_content"]))
        if delta.content:
            order.append(("content", delta.content))
    kinds = [k for k, _ in order]
    assert "reasoning" in kinds and "content" in kinds
    assert kinds.index("content") > max(i for i, k in enumerate(kinds) if k == "reasoning")
    assert "".join(t for k, t in order if k == "reasoning").strip() == service.script["reasoning"].strip()
    # the same turn without streaming: both fields in the message
    r = client.chat.completions.create(
        model=service.name, max_tokens=20,
        messages=[{"role": "user", "content": "/explain\n```python\nx = compute(1)\nprint(x)\n```"}])
    msg = r.choices[0].message
    assert msg.content == "".join(t for k, t in order if k == "content")
    assert (msg.model_extra or {}).get("reasoning_content", "").strip() == service.script["reasoning"].strip()


def test_plain_chat_continues_the_conversation(client, service):
    r = client.chat.completions.create(model=service.name, max_tokens=5, temperature=0,
                                       messages=[{"role": "user", "content": "hello there"}])
    assert r.choices[0].message.role == "assistant"
    assert isinstance(r.choices[0].message.content, str)
    assert 1 <= r.usage.completion_tokens <= 5


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "max_tokens": "many"}, "max_tokens"),
    ({"prompt": 7}, "prompt"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "stop": ["a", ""]}, "stop"),
    ({"max_tokens": 3}, "prompt"),
])
def test_wrong_types_are_400_with_a_json_error(url, service, body, param):
    r = httpx.post(f"{url}/v1/completions", json={"model": service.name, **body}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"].startswith(param) and err["message"]


def test_client_errors_are_4xx_and_the_server_lives(client, url, service):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-4o", prompt="x", max_tokens=2)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=service.name, prompt="word " * (service.context_length + 10), max_tokens=2)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=service.name, messages=[], max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=service.name, messages=[{"role": "wizard", "content": "x"}])
    for raw in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        r = httpx.post(f"{url}/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["message"], raw
    r = httpx.get(f"{url}/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()
    h = httpx.get(f"{url}/health").json()
    assert h["status"] == "ok" and h["error"] is None
    assert client.completions.create(model=service.name, prompt="x", max_tokens=2).choices[0].text is not None


def test_client_disconnect_stops_generation(url, service):
    before = dict(service.health["finished"])
    tokens0 = service.health["tokens"]
    body = {"model": service.name, "prompt": "def f(", "max_tokens": 200, "stream": True, "temperature": 0}
    with httpx.Client(timeout=30) as c, c.stream("POST", f"{url}/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = 0
        for line in lines:
            if line.startswith("data: "):
                got += 1
            if got >= 3:
                break
    t0 = time.monotonic()
    while time.monotonic() - t0 < 10:
        h = service.health
        if h["active"] == 0 and h["finished"].get("cancelled", 0) > before.get("cancelled", 0):
            break
        time.sleep(0.05)
    h = service.health
    assert h["active"] == 0
    assert h["finished"].get("cancelled", 0) == before.get("cancelled", 0) + 1
    assert h["tokens"] - tokens0 < 200  # stopped long before max_tokens


def test_concurrent_requests_are_batched_and_not_mixed(url, service):
    prompts = [f"def f{i}(x):\n    return x" + " + 1" * i for i in range(8)]
    want = [_solo(service, service.prompt_ids(p, None)[0], 12) for p in prompts]
    got: list[str | None] = [None] * len(prompts)
    rows0 = service.health["max_rows"]

    def one(i: int) -> None:
        r = httpx.post(f"{url}/v1/completions", json={"model": service.name, "prompt": prompts[i], "max_tokens": 12},
                       timeout=60)
        got[i] = r.json()["choices"][0]["text"]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want
    assert service.health["max_rows"] >= max(rows0, 2)


def test_api_key(service):
    with running(service, api_key="s3cret") as u:
        assert httpx.get(f"{u}/v1/models").status_code == 401
        r = httpx.get(f"{u}/v1/models", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        ok = openai.OpenAI(base_url=f"{u}/v1", api_key="s3cret", max_retries=0)
        assert ok.models.list().data[0].id == service.name
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{u}/v1", api_key="nope", max_retries=0).models.list()


def test_task_stream_endpoint(url, service):
    body = {"task": "explain", "source": "x = 1\ny = x + 1", "line": 0, "end_line": 1, "max_new_tokens": 10}
    kinds = []
    with httpx.stream("POST", f"{url}/v1/moecoder/tasks", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                kinds.append(json.loads(line[6:])["kind"])
    assert kinds[-1] == "done" and kinds.index("answer") > kinds.index("reasoning")


def test_sampling_with_a_seed_repeats_and_top_p_is_honoured(client, service):
    kw = dict(model=service.name, prompt="def main():\n", max_tokens=8, temperature=1.5, top_p=0.9)
    a = client.completions.create(seed=7, **kw).choices[0].text
    b = client.completions.create(seed=7, **kw).choices[0].text
    assert a == b
    texts = {client.completions.create(seed=s, **kw).choices[0].text for s in range(6)}
    assert len(texts) > 1  # the seed matters: this is sampling, not greedy


def test_fim_tokens_written_as_text_are_fill_in_the_middle(client, service):
    """llm.nvim / llm-ls send the FIM prompt as text with the model's marker spellings."""
    from assistant.serving import split_fim_markers

    prefix, suffix = "def add(a, b):\n    return ", "\n\nprint(add(1, 2))\n"
    text = f"<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>"
    assert split_fim_markers(text) == (prefix, suffix)
    assert split_fim_markers(f"<|fim_suffix|>{suffix}<|fim_prefix|>{prefix}<|fim_middle|>") == (prefix, suffix)
    assert split_fim_markers("def f(): <|fim_middle|>") is None
    marked = client.completions.create(model=service.name, prompt=text, max_tokens=6).choices[0].text
    direct = client.completions.create(model=service.name, prompt=prefix, suffix=suffix, max_tokens=6).choices[0].text
    assert marked == direct


def test_switched_off_tasks_are_refused_with_a_400(tiny_model_dir):
    """The config file's [features] reach the server's tasks (serve.server passes engine_options)."""
    from assistant.serving import Service

    s = Service(str(tiny_model_dir), max_batch=2, engine_options={"disabled_tasks": frozenset({"debug"})})
    try:
        with running(s) as u:
            c = openai.OpenAI(base_url=f"{u}/v1", api_key="x", max_retries=0)
            with pytest.raises(openai.BadRequestError, match="switched off"):
                c.chat.completions.create(model=s.name, messages=[
                    {"role": "user", "content": "/debug\n```python\ndef f(x):\n    return x\n```"}])
            r = c.chat.completions.create(model=s.name, max_tokens=4, messages=[
                {"role": "user", "content": "/explain\n```python\ndef f(x):\n    return x\n```"}])
            assert r.choices[0].finish_reason == "stop"
    finally:
        s.close()


def test_serve_cli_errors_are_one_line_exit_2(tmp_path, capsys):
    from serve.server import main

    assert main(["--port", "0"]) == 2
    assert main(["--max-batch", "0"]) == 2
    assert main(["--ep", "2", "--model", str(tmp_path)]) == 2  # no torchrun: one line, not a hang
    assert main(["--model", str(tmp_path / "missing")]) == 2
    assert main(["--context", "8"]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 5 and all(ln.startswith("moecoder serve: error: ") for ln in lines), lines


def test_a_plain_request_whose_client_leaves_is_cancelled(url, service, monkeypatch):
    forward = service.model.forward

    def slow_forward(*a, **k):  # 240 steps take >= 2.4 s on any machine: the client leaves first
        time.sleep(0.01)
        return forward(*a, **k)

    monkeypatch.setattr(service.model, "forward", slow_forward)
    before = service.health["finished"].get("cancelled", 0)
    tokens0 = service.health["tokens"]
    body = {"model": service.name, "prompt": "class A:\n", "max_tokens": 240, "temperature": 0}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{url}/v1/completions", json=body, timeout=httpx.Timeout(5.0, read=0.3))
    t0 = time.monotonic()
    while time.monotonic() - t0 < 10 and service.health["finished"].get("cancelled", 0) == before:
        time.sleep(0.05)
    assert service.health["finished"].get("cancelled", 0) == before + 1
    assert service.health["active"] == 0 and service.health["tokens"] - tokens0 < 240
