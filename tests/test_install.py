"""Installing beside other packages: a distribution that takes one of our top-level names
(``kernels`` is a popular one) is detected at start with one line naming it and the fix."""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _dummy_wheel(out: Path, name: str = "kernels", version: str = "9.9.9") -> Path:
    """A real wheel (zip + dist-info + RECORD) of a distribution owning the package ``name``."""
    files = {
        f"{name}/__init__.py": b"HELLO = 'not moecoder'\n",
        f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{name}-{version}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{name}-{version}.dist-info/RECORD,,")
    whl = out / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
        z.writestr(f"{name}-{version}.dist-info/RECORD", "\n".join(record) + "\n")
    return whl


def _pip_target(wheel: Path, target: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--upgrade",
                    "--target", str(target), str(wheel)], check=True, capture_output=True, timeout=300)


def _moecoder(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, "-c", "import sys; from assistant.cli import main; sys.exit(main())", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _install_moecoder_copy(site: Path) -> None:
    """moecoder's packages as a non-editable install leaves them: in a site dir with its dist-info."""
    for pkg in ("assistant", "model", "kernels", "lsp", "tui"):
        shutil.copytree(ROOT / pkg, site / pkg, ignore=shutil.ignore_patterns("weights", "__pycache__"))
    info = site / "moecoder-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: moecoder\nVersion: 0.1.0\n")
    (info / "RECORD").write_text("".join(f"{p.relative_to(site).as_posix()},,\n" for p in site.rglob("*.py")))


@pytest.mark.slow
def test_a_kernels_distribution_installed_over_ours_is_named(tmp_path):
    site, cwd = tmp_path / "site", tmp_path / "work"
    site.mkdir()
    cwd.mkdir()
    _install_moecoder_copy(site)
    ok = _moecoder(site, cwd, "review", str(cwd))  # nothing to review: exits 2 for that, not for shadowing
    assert "shadow" not in ok.stderr and "also installed by" not in ok.stderr, ok.stderr
    _pip_target(_dummy_wheel(tmp_path), site)  # the issue: `pip install kernels` into the same env
    assert "not moecoder" in (site / "kernels" / "__init__.py").read_text()
    r = _moecoder(site, cwd, "review", str(cwd))
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "'kernels'" in lines[0] and "kernels 9.9.9" in lines[0] and "pip uninstall kernels" in lines[0]
    assert "pipx install" in lines[0]


@pytest.mark.slow
def test_a_kernels_package_earlier_on_the_path_is_named(tmp_path):
    other, cwd = tmp_path / "other", tmp_path / "work"
    other.mkdir()
    cwd.mkdir()
    _pip_target(_dummy_wheel(tmp_path), other)
    env = {**os.environ, "PYTHONPATH": f"{other}{os.pathsep}{ROOT}"}
    r = subprocess.run([sys.executable, "-c", "import sys; from assistant.cli import main; sys.exit(main())",
                        "debug", "x.py"], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "resolves to distribution 'kernels 9.9.9'" in r.stderr and "pip uninstall kernels" in r.stderr


def test_our_own_checkout_is_not_reported():
    from assistant.shadow import check

    assert check() is None


def test_base_dependencies_leave_triton_out_and_the_test_extra_pins_what_it_pulls():
    """A CPU machine gets no Triton from the base install (torch's GPU builds bring it; the
    `gpu` extra may pin it), and the test extra pins each tool it pulls, so CI and every
    developer run the same ones (the issue: an unpinned release-candidate Neovim repackaging)."""
    import re
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    name = lambda req: re.match(r"[A-Za-z0-9_.\-]+", req).group(0).lower()  # noqa: E731
    assert "triton" not in {name(r) for r in project["dependencies"]}
    assert any(name(r) == "triton" for r in project["optional-dependencies"]["gpu"])
    loose = [r for r in project["optional-dependencies"]["test"]
             if not name(r).startswith("moecoder") and not re.search(r"==\s*[0-9]", r.split(";")[0])]
    assert loose == [], loose


def test_no_installed_distribution_takes_one_of_our_names():
    """The environment the test extra builds holds no distribution that owns one of our top-level
    packages: transformers 5.25.0 requires the `kernels` distribution, and `pip install -e
    ".[test]"` with it left `moecoder` stopping at start with the shadowing error (the test extra
    pins a transformers release that does not)."""
    from importlib import metadata

    from assistant.shadow import NAMES

    taken = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"] or "?"
        if name.lower().replace("_", "-") == "moecoder":
            continue
        tops = set((dist.read_text("top_level.txt") or "").split())
        tops |= {f.parts[0] for f in dist.files or () if len(f.parts) > 1}
        for ours in NAMES:
            if ours in tops:
                taken[ours] = f"{name} {dist.version}"
    assert taken == {}, taken
