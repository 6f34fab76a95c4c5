"""One engine protocol and one settings loader for every face."""

from __future__ import annotations

import pytest

from assistant.config import ConfigError, load_settings
from assistant.engine import Engine as InProcessEngine
from assistant.protocols import Engine
from assistant.tasks import TaskRequest
from tests.assistant_fakes import ScriptedBackend
from tests.lsp_fakes import FakeEngine
from tests.tui_fakes import ScriptedEngine


def test_the_in_process_engine_and_the_test_doubles_satisfy_the_protocol(tiny_tokenizer):
    real = InProcessEngine.from_loaded(backend=ScriptedBackend(tiny_tokenizer))
    try:
        for engine in (real, FakeEngine(), ScriptedEngine(delay=0.0)):
            assert isinstance(engine, Engine), type(engine).__name__
            events = list(engine.stream(TaskRequest("explain", "def f():\n    return 1\n", line=0, end_line=1)))
            assert events[-1].kind == "done" and events[-1].result is not None
    finally:
        real.close()
    assert not isinstance(object(), Engine)


def _config(tmp_path, text: str):
    p = tmp_path / "config.toml"
    p.write_text(text)
    return p


def test_per_face_overrides(tmp_path):
    s = load_settings(_config(tmp_path, 'model = "/m/top"\ndevice = "cpu"\n[lsp]\nmodel = "/m/lsp"\n'
                                        '[review]\ndevice = "cuda"\njobs = 3\n'))
    assert (s.for_face("lsp").model, s.for_face("lsp").device) == ("/m/lsp", "cpu")
    assert (s.for_face("chat").model, s.for_face("review").device) == ("/m/top", "cuda")
    assert s.for_face("review").review.jobs == 3 and s.for_face("tasks").model == "/m/top"
    for bad, needle in [('[lsp]\ndevice = 3\n', "lsp.device must be a string"),
                        ('[chat]\nmodle = "x"\n', "unknown setting 'modle' in chat"),
                        ('max_seconds = true\n', "max_seconds must be a number"),
                        ('[features]\ndebug = 1\n', "features.debug must be true or false")]:
        with pytest.raises(ConfigError, match=needle):
            load_settings(_config(tmp_path, bad))


def test_the_config_files_model_and_features_reach_the_lsp(tmp_path, tiny_model_dir, monkeypatch):
    from lsp.server import Settings, build_server, config_engine_factory

    cfg = _config(tmp_path, f'[lsp]\nmodel = "{tiny_model_dir}"\n[features]\nexplain = false\ndebug = false\n')
    monkeypatch.setenv("MOECODER_CONFIG", str(cfg))
    config = load_settings().for_face("lsp")
    settings = Settings.from_config(config)
    assert settings.model_path == str(tiny_model_dir)
    assert not settings.on("hover") and not settings.on("diagnostics") and settings.on("completion")
    server = build_server(config_engine_factory(config), settings)
    engine = server.start_engine().result(timeout=120)  # what the LSP loads, as it loads it
    try:
        assert isinstance(engine, Engine) and engine.tokenizer.vocab_size == 512  # the tiny model
        assert engine.disabled_tasks == {"explain", "debug"}
        done = list(engine.stream(TaskRequest("explain", "x = 1\n")))[-1]
        assert done.kind == "error" and "switched off" in done.text
    finally:
        engine.close()
        server.executor.shutdown(wait=False)


def test_the_config_files_model_reaches_the_chat(tmp_path, monkeypatch):
    import tui.api

    missing = tmp_path / "no-model-here"
    monkeypatch.setenv("MOECODER_CONFIG", str(_config(tmp_path, f'[chat]\nmodel = "{missing}"\n')))
    config = load_settings().for_face("chat")
    assert config.model == str(missing)
    with pytest.raises(ValueError, match="no-model-here"):
        tui.api.engine_factory(config)(config.model)
