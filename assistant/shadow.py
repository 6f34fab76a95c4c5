"""Detect another distribution that shadows one of our top-level package names.

moecoder installs the top-level packages ``assistant``, ``model``, ``kernels``, ``lsp``, ``tui``
(and ``serve``). Some of these names are taken on the package index (``kernels``, for one, is a
popular package). Installed into the same environment, such a package replaces ours, silently:
pip warns of nothing and a later command dies with an ``AttributeError`` deep inside.

``check()`` finds that at start, cheaply (a few directory listings; the RECORD files of the
distributions installed beside ours are read only in a non-editable install) and returns one
line naming the other distribution and the fix, or None.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

NAMES = ("assistant", "model", "kernels", "lsp", "tui", "serve")
OUR_DIST = "moecoder"
FIX = ("install moecoder into its own environment (`pipx install .` or `uv tool install .` in its checkout) "
       "or remove the other (`pip uninstall {dist}`, then reinstall moecoder)")


def _root() -> Path:
    """The directory holding our top-level packages (a source checkout or a site-packages)."""
    return Path(__file__).resolve().parent.parent


def _dist_infos(site: Path) -> list[Path]:
    try:
        return [site / n for n in os.listdir(site) if n.endswith((".dist-info", ".egg-info"))]
    except OSError:
        return []


def _dist_label(info: Path) -> tuple[str, str]:
    """(name, 'name version') from a ``*.dist-info`` directory."""
    name, version = info.name.rsplit(".", 1)[0], ""
    try:
        for line in (info / "METADATA").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("Name:"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("Version:"):
                version = line.split(":", 1)[1].strip()
            elif not line.strip():
                break
    except OSError:
        pass
    return name, f"{name} {version}".strip()


def _claims(info: Path, name: str) -> bool:
    """Whether the distribution at ``info`` installed files of the top-level package ``name``."""
    for fname in ("RECORD", "installed-files.txt", "SOURCES.txt"):
        try:
            text = (info / fname).read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        text = "\n" + text.replace("\\", "/")
        return f"\n{name}/" in text or f"\n../{name}/" in text
    return False


def _owner(site: Path, name: str) -> str | None:
    """'dist version' of the first distribution other than ours in ``site`` that claims ``name``."""
    for info in sorted(_dist_infos(site)):
        dist, label = _dist_label(info)
        if dist.lower().replace("_", "-") == OUR_DIST:
            continue
        if _claims(info, name):
            return label
    return None


def check(names: tuple[str, ...] = NAMES) -> str | None:
    """One line describing the first shadowed name, or None when every name is ours."""
    root = _root()
    editable = (root / "pyproject.toml").is_file()  # a source checkout: nothing is installed over it
    for name in names:
        ours = root / name
        if not ours.is_dir():
            continue  # a room this version does not ship
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        origin = Path(spec.origin).resolve() if spec is not None and spec.origin else None
        locations = [Path(p).resolve() for p in (spec.submodule_search_locations or [])] if spec else []
        if origin is not None and origin.parent != ours and ours not in locations:
            other = origin.parent
            dist = _owner(other.parent, name)
            what = f"distribution '{dist}'" if dist else f"{other}"
            return (f"the package '{name}' resolves to {what} ({origin}), not moecoder's; "
                    + FIX.format(dist=dist.split()[0] if dist else name))
        if not editable:
            dist = _owner(root, name)
            if dist is not None:
                return (f"the package '{name}' in {root} is also installed by distribution '{dist}', "
                        "which replaces moecoder's files; " + FIX.format(dist=dist.split()[0]))
    return None
