"""Carry more Python source to the GPU machine: packages of this machine's environments that the
GPU image lacks, never a held-out evaluation package, as one `.carry/extra_py.tar.xz`.

    python scripts/build_extra.py SITE_PACKAGES... --out .carry/extra_py.tar.xz
    python scripts/build_extra.py --wheels /opt/pypi/files /opt/pypi-more/files --exclude-from .carry/extra_py.tar.xz \
        --arcname extra2 --max-mb 80 --out .carry/extra2_py.tar.xz

`--wheels`: the ``.py`` files of local wheel files (one per package, the newest version), smallest packages first
up to ``--max-mb`` of source (the carry must fit the device's 64 MiB with the working tree);
`--exclude-from`: leave out the packages an earlier archive holds.

`scripts/gpu_train.sh` unpacks each `.carry/extra*_py.tar.xz` under `$WORK` and adds it as one more corpus root (the
corpus tool dedupes against the rest and drops files that overlap the eval set). Each package
goes with its `.dist-info` so that the corpus tool names it as in any site-packages directory.
Packages whose name hashes into the valid/test splits stay out (the splits stay as they were).
"""
from __future__ import annotations

import argparse
import re
import shutil
import tarfile
import tempfile
import zipfile
from importlib.metadata import PathDistribution
from pathlib import Path

from model.data.corpus import package_unit

# held-out evaluation packages (docs/model-card.md) and their close relatives
HELD_OUT = {"pygls", "jsonschema", "jsonschema-specifications", "cattrs", "pytest-lsp", "import-linter",
            "textual", "lsprotocol", "grimp"}
# the GPU image's own packages (device KINDS.md), already in its corpus
GPU_IMAGE = set("""absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cycler cython diffrax e3nn
einops equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py
hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jaxlib jaxtyping
jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch
mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
zipp moecoder""".split())
SKIP_FRACTION = 0.02  # valid + test fractions of the corpus tool's default split


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def tops(dist_dir: Path) -> list[str]:
    """Top-level names a distribution installs (top_level.txt, else RECORD's first path parts)."""
    tl = dist_dir / "top_level.txt"
    if tl.is_file():
        return [t.strip() for t in tl.read_text().split() if t.strip()]
    rec = dist_dir / "RECORD"
    names = set()
    if rec.is_file():
        for line in rec.read_text().splitlines():
            part = line.split(",")[0].split("/")[0]
            if part and not part.endswith((".dist-info", ".data")) and part != "..":
                names.add(part[:-3] if part.endswith(".py") else part)
    return sorted(names)


def _skip(name: str, seen: set[str]) -> bool:
    return name in seen or name in HELD_OUT or name in GPU_IMAGE or name.startswith(("nvidia-", "types-"))


def archived(paths: list[Path]) -> set[str]:
    """Normalised names of the packages (``.dist-info`` directories) inside earlier archives."""
    out = set()
    for p in paths:
        with tarfile.open(p) as tf:
            for n in tf.getnames():
                m = re.match(r"[^/]+/([^/]+)-[^-/]+\.dist-info$", n)
                if m:
                    out.add(norm(m.group(1)))
    return out


def wheel_packages(dirs: list[Path], seen: set[str]) -> list[tuple[int, str, Path, list[str], str]]:
    """(bytes of .py, name, wheel, top-level names, dist-info dir) of the newest wheel of each package in ``dirs``
    that may go (not held out, not on the GPU image, not already seen, not hashing into valid/test)."""
    from packaging.utils import InvalidWheelFilename, parse_wheel_filename

    newest: dict[str, tuple] = {}
    for d in dirs:
        for whl in sorted(d.glob("*.whl")):
            try:
                name, version, _, _ = parse_wheel_filename(whl.name)
            except InvalidWheelFilename:
                continue
            name = norm(name)
            if not _skip(name, seen) and (name not in newest or version > newest[name][0]):
                newest[name] = (version, whl)
    out = []
    for name, (_, whl) in sorted(newest.items()):
        try:
            with zipfile.ZipFile(whl) as z:
                infos = z.infolist()
                di = next((i.filename.split("/")[0] for i in infos if i.filename.endswith(".dist-info/METADATA")), None)
                if di is None:
                    continue
                tl = f"{di}/top_level.txt"
                if tl in z.namelist():
                    tops_ = [t.strip() for t in z.read(tl).decode().split() if t.strip()]
                else:
                    tops_ = sorted({i.filename.split("/")[0].removesuffix(".py") for i in infos
                                    if not i.filename.split("/")[0].endswith((".dist-info", ".data"))})
        except (OSError, zipfile.BadZipFile, UnicodeDecodeError):
            continue
        tops_ = [t for t in tops_ if t and t != ".."]
        if not tops_ or any(package_unit(t) < SKIP_FRACTION for t in tops_):
            continue
        size = sum(i.file_size for i in infos if i.filename.endswith(".py") and i.filename.split("/")[0].removesuffix(".py")
                   in tops_)  # fmt: skip
        if size:
            out.append((size, name, whl, tops_, di))
    return out


def add_wheels(dirs: list[Path], dst: Path, seen: set[str], max_bytes: float) -> int:
    """Extract the .py files (and the .dist-info's metadata) of the wheels' packages, smallest first, into ``dst``."""
    total = 0
    for size, name, whl, tops_, di in sorted(wheel_packages(dirs, seen)):
        if total + size > max_bytes:
            continue
        with zipfile.ZipFile(whl) as z:
            for i in z.infolist():
                if i.is_dir():
                    continue
                f = i.filename
                top = f.split("/")[0]
                keep_py = f.endswith(".py") and top.removesuffix(".py") in tops_
                base = f.split("/", 1)[-1]  # metadata and licences of the .dist-info (no RECORD: its hashes
                keep_meta = top == di and (base in ("METADATA", "top_level.txt")  # do not compress)
                                           or base.startswith(("LICEN", "licenses/", "COPYING")))
                if (keep_py or keep_meta) and ".." not in f.split("/") and not f.startswith("/"):
                    (dst / f).parent.mkdir(parents=True, exist_ok=True)
                    (dst / f).write_bytes(z.read(i))
        if not (dst / di / "top_level.txt").exists():  # how the corpus tool maps the files to this package
            (dst / di / "top_level.txt").write_text("\n".join(tops_) + "\n")
        seen.add(name)
        total += size
        print(f"{name:32s} {size / 1e6:7.2f} MB  ({', '.join(tops_)}; {whl.name})")
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sites", nargs="*", type=Path)
    ap.add_argument("--wheels", nargs="*", type=Path, default=[], help="directories of .whl files")
    ap.add_argument("--exclude-from", nargs="*", type=Path, default=[], help="archives whose packages to leave out")
    ap.add_argument("--max-mb", type=float, default=float("inf"), help="at most this much .py from --wheels")
    ap.add_argument("--arcname", default="extra", help="the archive's top directory (one per archive)")
    ap.add_argument("--out", type=Path, default=Path(".carry/extra_py.tar.xz"))
    a = ap.parse_args()
    if not a.sites and not a.wheels:
        ap.error("give site-packages directories or --wheels directories")
    seen: set[str] = archived(a.exclude_from)
    n_before = len(seen)
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / a.arcname
        dst.mkdir()
        total = 0
        for site in a.sites:
            for di in sorted(site.glob("*.dist-info")):
                name = norm(PathDistribution(di).metadata["Name"] or di.name.split("-")[0])
                if _skip(name, seen):
                    continue
                mods = [t for t in tops(di) if (site / t).is_dir() or (site / f"{t}.py").is_file()]
                if not mods or any(package_unit(m) < SKIP_FRACTION for m in mods):
                    continue
                size = 0
                for m in mods:
                    src = site / m
                    if src.is_dir():
                        shutil.copytree(src, dst / m, ignore=lambda d, fs: [f for f in fs if not (
                            f.endswith(".py") or (Path(d, f).is_dir() and f != "__pycache__"))])
                        size += sum(p.stat().st_size for p in (dst / m).rglob("*.py"))
                    else:
                        shutil.copy2(site / f"{m}.py", dst / f"{m}.py")
                        size += (dst / f"{m}.py").stat().st_size
                if size == 0:
                    continue
                shutil.copytree(di, dst / di.name)
                seen.add(name)
                total += size
                print(f"{name:32s} {size / 1e6:7.2f} MB  ({', '.join(mods)})")
        total += add_wheels(a.wheels, dst, seen, a.max_mb * 1e6)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(a.out, "w:xz", preset=9) as tf:
            tf.add(dst, arcname=a.arcname)
    print(f"{len(seen) - n_before} packages, {total / 1e6:.1f} MB of .py -> {a.out} ({a.out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
