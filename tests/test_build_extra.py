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


def _wheel(d: Path, name: str, version: str, body: str = "X = 1\n", top_level: bool = True) -> Path:
    import zipfile

    d.mkdir(parents=True, exist_ok=True)
    whl = d / f"{name}-{version}-py3-none-any.whl"
    di = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr(f"{name}/__init__.py", body)
        z.writestr(f"{name}/sub/m.py", "def f():\n    return 2\n")
        z.writestr(f"{name}/data.json", "{}")
        z.writestr(f"{di}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{di}/WHEEL", "Wheel-Version: 1.0\n")
        z.writestr(f"{di}/RECORD", f"{name}/__init__.py,sha256=x,1\n")
        z.writestr(f"{di}/licenses/", "")  # a directory entry
        z.writestr(f"{di}/licenses/LICENSE", "MIT License\n")
        if top_level:
            z.writestr(f"{di}/top_level.txt", f"{name}\n")
    return whl


def test_wheels_newest_version_smallest_first_under_the_cap(tmp_path, monkeypatch, capsys):
    """--wheels: one wheel per package (the newest), .py files and metadata only, held-out / GPU-image /
    split-hashed / already archived packages left out, smallest packages first up to --max-mb."""
    mod = load_script("build_extra")
    w = tmp_path / "wheels"
    _wheel(w, "alpha", "1.0", body="OLD = 1\n")
    _wheel(w, "alpha", "2.0", body="NEW = 2\n")
    _wheel(w, "kilo", "1.0", top_level=False)             # top-level names from the file list
    _wheel(w, "lima", "1.0")                              # hashes into valid/test
    _wheel(w, "textual", "1.0")                           # held out
    _wheel(w, "numpy", "1.0")                             # on the GPU image
    _wheel(w, "bravo", "1.0", body="Y = 1\n" * 200_000)   # 1.2 MB: over the cap
    (w / "not-a-wheel.whl").write_bytes(b"junk")
    site = tmp_path / "site"
    _dist(site, "charlie", ["charlie"])
    first = tmp_path / "extra.tar.xz"
    monkeypatch.setattr(sys, "argv", ["build_extra.py", str(site), "--out", str(first)])
    mod.main()
    _wheel(w, "charlie", "1.0")                           # already in the first archive
    out = tmp_path / "extra2.tar.xz"
    monkeypatch.setattr(sys, "argv", ["build_extra.py", "--wheels", str(w), "--exclude-from", str(first),
                                      "--arcname", "extra2", "--max-mb", "1", "--out", str(out)])
    mod.main()
    with tarfile.open(out) as tf:
        names = set(tf.getnames())
        new = tf.extractfile("extra2/alpha/__init__.py").read().decode()
    assert new == "NEW = 2\n"
    assert {"extra2/alpha/sub/m.py", "extra2/kilo/__init__.py", "extra2/alpha-2.0.dist-info/METADATA",
            "extra2/alpha-2.0.dist-info/licenses/LICENSE", "extra2/kilo-1.0.dist-info/top_level.txt"} <= names
    assert not any(n.endswith((".json", "WHEEL", "RECORD")) for n in names)
    assert not any(n.startswith(tuple(f"extra2/{p}" for p in ("lima", "textual", "numpy", "bravo", "charlie", "not")))
                   for n in names)  # fmt: skip
    assert "2 packages" in capsys.readouterr().out.splitlines()[-1]
