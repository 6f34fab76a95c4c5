"""Carry more Python source to the GPU machine: packages of this machine's environments that the
GPU image lacks, never a held-out evaluation package, as one `.carry/extra_py.tar.xz`.

    python scripts/build_extra.py SITE_PACKAGES... --out .carry/extra_py.tar.xz

`scripts/gpu_train.sh` unpacks it into `$WORK/extra` and adds it as one more corpus root (the
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sites", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path(".carry/extra_py.tar.xz"))
    a = ap.parse_args()
    seen: set[str] = set()
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / "extra"
        dst.mkdir()
        total = 0
        for site in a.sites:
            for di in sorted(site.glob("*.dist-info")):
                name = norm(PathDistribution(di).metadata["Name"] or di.name.split("-")[0])
                if name in seen or name in HELD_OUT or name in GPU_IMAGE or name.startswith(("nvidia-", "types-")):
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
        a.out.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(a.out, "w:xz") as tf:
            tf.add(dst, arcname="extra")
    print(f"{len(seen)} packages, {total / 1e6:.1f} MB of .py -> {a.out} ({a.out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
