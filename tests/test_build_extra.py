"""scripts/build_extra.py: which packages of an environment go to the GPU machine's corpus."""

from __future__ import annotations

import sys
import tarfile
from pathlib import Path

from tests.scripts import load_script


def _dist(site: Path, name: str, tops: list[str], module: bool = False) -> None:
    di = site / f"{name}-1.0.dist-info"
    di.mkdir(parents=True)
    (di / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (di / "top_level.txt").write_text("\n".join(tops) + "\n")
    for t in tops:
        if module:
            (site / f"{t}.py").write_text(f"def {t}():\n    return 1\n")
        else:
            (site / t / "sub").mkdir(parents=True)
            (site / t / "__init__.py").write_text("X = 1\n")
            (site / t / "sub" / "m.py").write_text("def f():\n    return 2\n")
            (site / t / "sub" / "data.bin").write_bytes(b"\0" * 10)
            (site / t / "__pycache__").mkdir()
            (site / t / "__pycache__" / "x.pyc").write_bytes(b"\0")


def test_keeps_new_packages_and_leaves_out_held_out_gpu_and_split_ones(tmp_path, monkeypatch, capsys):
    mod = load_script("build_extra")
    assert mod.package_unit("lima") < mod.SKIP_FRACTION <= min(mod.package_unit(n) for n in ("alpha", "kilo"))
    site = tmp_path / "site"
    _dist(site, "alpha", ["alpha"])
    _dist(site, "kilo", ["kilo"], module=True)
    _dist(site, "lima", ["lima"])            # hashes into valid/test
    _dist(site, "textual", ["textual"])      # a held-out evaluation package
    _dist(site, "numpy", ["numpy"])          # already on the GPU machine
    (site / "ghost-1.0.dist-info").mkdir()   # installs nothing here
    (site / "ghost-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: ghost\nVersion: 1.0\n")
    out = tmp_path / "carry" / "extra.tar.xz"
    monkeypatch.setattr(sys, "argv", ["build_extra.py", str(site), str(site), "--out", str(out)])
    mod.main()
    with tarfile.open(out) as tf:
        names = set(tf.getnames())
    assert {"extra/alpha/__init__.py", "extra/alpha/sub/m.py", "extra/kilo.py",
            "extra/alpha-1.0.dist-info/METADATA", "extra/kilo-1.0.dist-info/top_level.txt"} <= names
    assert not any(n.endswith((".bin", ".pyc")) or "__pycache__" in n for n in names)
    assert not any(n.startswith(("extra/lima", "extra/textual", "extra/numpy", "extra/ghost")) for n in names)
    assert "2 packages" in capsys.readouterr().out  # the site given twice: each package once
