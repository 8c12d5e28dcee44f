"""Fetch the Python 3.12 wheels the GPU machine lacks into ``.whl/`` (ignored by git; travels with
the working tree to the device, where ``benchmarks/gpu_check.py`` installs them before any import).

    python benchmarks/fetch_gpu_wheels.py            # into ROOT/.whl, prints each wheel and the total

The GPU machine has no package registry; its image holds torch, triton, transformers, numpy,
scipy, scikit-learn, scikit-image, pandas, h5py, einops, safetensors and the rest listed in
/work/.library/device/KINDS.md. What the engine, the SAO 1.0 architecture and the CLAP embedder import
beyond that (measured by importing them here and listing the distributions in ``sys.modules``) is
``NEEDED``, at the versions ``requirements.lock`` pins (the set CI tests). Binary wheels are for
CPython 3.12 on manylinux x86-64; packages published only as source are built into wheels here
(pure Python). faiss is not needed there (the exact search on the GPU is the project's Triton
kernel, or matmul + top-k; faiss-gpu wheels need another CUDA and exceed the 64 MiB the working tree
may carry).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

NEEDED = [
    # the model and its samplers (stable-audio-tools imports k-diffusion, whose __init__ imports all)
    "stable-audio-tools", "k-diffusion", "alias-free-torch", "einops-exts", "torchsde", "trampoline",
    "jsonmerge", "jsonschema", "jsonschema-specifications", "referencing", "rpds-py", "dctorch",
    "clean-fid", "clip-anytorch", "ftfy", "wcwidth",
    # the CLAP embedder (laion-clap imports librosa, torchlibrosa, webdataset and wget at import)
    "laion-clap", "torchlibrosa", "librosa", "soxr", "braceexpand", "webdataset", "wget",
    # audio I/O (soundfile bundles libsndfile; cffi is its foreign-function layer)
    "soundfile", "cffi", "pycparser",
]  # fmt: skip
LOCK = ROOT / "requirements.lock"


def locked(names: list[str], lock: Path = LOCK) -> list[str]:
    """``name==version`` of each name at the version requirements.lock pins (the set CI tests);
    an error naming the packages the lock lacks."""
    pins = {}
    for line in lock.read_text().splitlines():
        if line[:1].isalnum() and "==" in line:
            name, version = line.split()[0].split("==")
            pins[name.lower().replace("_", "-")] = version
    missing = [n for n in names if n not in pins]
    if missing:
        raise SystemExit(f"{lock.name} lacks {missing}: add them to pyproject.toml and run make lock")
    return [f"{n}=={pins[n]}" for n in names]


PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64",
             "manylinux1_x86_64"]  # fmt: skip


def pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)


def download(spec: str, dest: Path) -> str:
    """A 3.12 manylinux (or pure-Python) wheel of ``spec`` into ``dest``; built from source if none."""
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    run = pip("download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
              "--implementation", "cp", *plat, "-d", str(dest), spec)  # fmt: skip
    if run.returncode == 0:
        return "wheel"
    with tempfile.TemporaryDirectory() as tmp:  # source only: build it (pure Python) into a wheel
        built = pip("wheel", "-q", "--no-deps", "--no-binary=:all:", "-w", tmp, spec)
        if built.returncode != 0:
            raise RuntimeError(f"{spec}: no 3.12 wheel ({run.stderr.strip()[-300:]}) and the build failed "
                               f"({built.stderr.strip()[-300:]})")  # fmt: skip
        wheels = list(Path(tmp).glob("*.whl"))
        if any(not w.name.endswith("-none-any.whl") for w in wheels):
            raise RuntimeError(f"{spec}: its source builds a platform wheel here ({wheels}); not portable")
        for w in wheels:
            w.replace(dest / w.name)
    return "built"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dest", type=Path, default=ROOT / ".whl", help="folder for the wheels")
    args = p.parse_args()
    args.dest.mkdir(parents=True, exist_ok=True)
    specs = locked(NEEDED)
    for spec in specs:
        print(f"{spec:40s} {download(spec, args.dest)}")
    wanted = {tuple(s.replace("-", "_").lower().split("==")) for s in specs}
    stray = [w for w in args.dest.glob("*.whl") if tuple(w.name.lower().split("-")[:2]) not in wanted]
    for w in stray:  # one version of each needed package and nothing else: two would stop the install
        w.unlink()
    wheels = sorted(args.dest.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels)
    print(f"{len(wheels)} wheels, {total / 2**20:.1f} MiB in {args.dest} (the working tree may carry 64 MiB)")
    if len(wheels) != len(NEEDED):
        raise SystemExit(f"expected {len(NEEDED)} wheels, found {len(wheels)}: {[w.name for w in wheels]}")


if __name__ == "__main__":
    main()
