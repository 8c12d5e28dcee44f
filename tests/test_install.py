"""The install: one import name nothing else owns, a wheel that carries what the package needs, a lock
that pins every dependency, and Hugging Face's ``kernels`` next to ours.

Why (README, "Set-up"): transformers 5.25 made Hugging Face's ``kernels`` distribution a hard
dependency and imports it when a model module loads. Our packages were importable as bare
``kernels``, ``engine``, ``index`` and ``jobs``, so whichever came first on ``sys.path`` won, and
every T5 and CLAP path crashed on a fresh machine.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("engine", "kernels", "index", "jobs")
LOCK = ROOT / "requirements.lock"


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def lock_pins() -> dict[str, str]:
    """name -> version of every package in requirements.lock."""
    pins = {}
    for line in LOCK.read_text().splitlines():
        if m := re.match(r"^([A-Za-z0-9._-]+)==(\S+)", line):
            pins[canonicalize_name(m[1])] = m[2]
    return pins


def _nodes_with_code_strings(tree: ast.AST):
    """Every node of ``tree`` and of each string constant in it that is Python code with an import
    (the code tests run in subprocesses with ``python -c``)."""
    for node in ast.walk(tree):
        yield node
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and "import " in node.value:
            try:
                inner = ast.parse(node.value)
            except SyntaxError:
                continue
            yield from _nodes_with_code_strings(inner)


def test_no_module_imports_a_bare_project_name():
    """Every import of ours goes through amg_engine (a bare ``import kernels`` would be Hugging Face's)."""
    bare = []
    for folder in (*FOLDERS, "tests", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in _nodes_with_code_strings(ast.parse(path.read_text(), filename=str(path))):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level:
                    names = [node.module or ""]
                where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
                bare += [f"{where} {n}" for n in names if n.split(".")[0] in FOLDERS]
    assert not bare, f"import these as amg_engine.<package>: {bare}"


def test_top_level_folders_cannot_shadow_an_installed_distribution():
    """From the repository root (first on sys.path under ``python -m``) the folders are namespace
    portions, which lose to any installed regular package of the same name."""
    assert (ROOT / "__init__.py").is_file()
    assert [f for f in FOLDERS if (ROOT / f / "__init__.py").exists()] == []


def test_the_package_list_covers_every_code_folder():
    """pyproject lists packages explicitly (the root maps onto amg_engine): a new subfolder holding
    Python code must be listed, or a wheel install would lack it."""
    listed = set(pyproject()["tool"]["setuptools"]["packages"])
    code_dirs = {p.parent for f in FOLDERS for p in (ROOT / f).rglob("*.py") if "__pycache__" not in p.parts}
    wanted = {".".join(["amg_engine", *d.relative_to(ROOT).parts]) for d in code_dirs} | {"amg_engine"}
    assert wanted == listed


def test_wheel_install_runs_outside_the_checkout(tmp_path):
    """A normal (non-editable) wheel, installed into a folder and imported from elsewhere, holds the
    code, the bundled model, index and example manifest, and its ``amg`` entry point resolves."""
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip"]
    build = [*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(ROOT)]
    subprocess.run(build, check=True, capture_output=True, cwd=tmp_path)
    (wheel,) = wheels.glob("amg_engine-*.whl")
    target = tmp_path / "site"
    install = [*pip, "install", "-q", "--no-deps", "--no-index", "--target", str(target), str(wheel)]
    subprocess.run(install, check=True, capture_output=True)
    code = (
        "import json, amg_engine, amg_engine.jobs.cli as cli, importlib.resources as r\n"
        "from amg_engine.engine.engine import DEFAULT_INDEX_DIR\n"
        "eng = r.files('amg_engine.engine')\n"
        "print(json.dumps({'root': amg_engine.__file__, 'main': callable(cli.main),\n"
        "  'index': DEFAULT_INDEX_DIR.is_dir() and any(DEFAULT_INDEX_DIR.iterdir()),\n"
        "  'weights': any((eng / 'default' / 'assets' / 'model').iterdir()),\n"
        "  'config': (eng / 'configs' / 'stable_audio_open_1_0.json').is_file(),\n"
        "  'manifest': (r.files('amg_engine.jobs') / 'examples' / 'manifest.parquet').is_file()}))"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    cmd = [sys.executable, "-P", "-c", code]  # -P: the current folder is not on sys.path
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    found = json.loads(run.stdout)
    assert Path(found.pop("root")).is_relative_to(target)
    assert all(found.values()), found
    entry = [e for e in md.distribution("amg-engine").entry_points if e.name == "amg"]
    assert [e.value for e in entry] == ["amg_engine.jobs.cli:main"]


COEXIST = r"""
import importlib, json, sys, tempfile, importlib.metadata as md
from pathlib import Path
import torch
sys.path.append(sys.argv[1])  # tests/, for the tiny CLAP builder (after the root: '' stays first)
kernels = importlib.import_module("kernels")  # Hugging Face's, the one transformers imports
kernels.CUDAProperties  # the name whose import failed
from transformers.integrations import hub_kernels  # noqa: F401
from amg_engine.engine.default.model import build_tokenizer, model_config
from amg_engine.engine.models import build_model, encode_conditioning, load_model, save_model
from amg_engine.index.clap import ClapEmbedder
from clap_helpers import build_laion_clap, write_clap_checkpoint
from transformers import AutoTokenizer, T5Config, T5EncoderModel

tmp = Path(tempfile.mkdtemp())
prompts = ["a drum loop, 120 bpm", "a warm pad"]
build_tokenizer(prompts, tmp / "model" / "t5")
tok = AutoTokenizer.from_pretrained(str(tmp / "model" / "t5"))
T5EncoderModel(T5Config(vocab_size=len(tok), d_model=768, d_kv=16, num_heads=2, d_ff=32,
                        num_layers=1)).save_pretrained(str(tmp / "model" / "t5"))
config = model_config(depth=1, heads=2, embed=64, cond_dim=64)
config["model"]["conditioning"]["configs"][0] = {"id": "prompt", "type": "t5",
                                                 "config": {"t5_model_name": "t5", "max_length": 16}}
save_model(build_model(config, tmp / "model"), config, tmp / "model")
model, _ = load_model(tmp / "model")
with torch.no_grad():
    cond = encode_conditioning(model, [{"prompt": p, "seconds_total": 1.0} for p in prompts], "cpu")
clap = ClapEmbedder(write_clap_checkpoint(build_laion_clap(0), tmp / "630k-audioset-best.pt"))
with torch.no_grad():
    emb = clap(torch.randn(2, 1, 48000) * 0.1, 48000)  # [B, channels, T]
print(json.dumps({"kernels": kernels.__file__, "transformers": md.version("transformers"),
                  "t5": list(cond.cross_attn.shape), "t5_finite": bool(cond.cross_attn.isfinite().all()),
                  "clap": list(emb.shape), "clap_finite": bool(emb.isfinite().all())}))
"""


@pytest.mark.integration
def test_hugging_face_kernels_and_transformers_coexist_with_ours(tmp_path):
    """With Hugging Face's ``kernels`` and transformers >= 5.25 installed, T5 and LAION-CLAP load and
    run through our code, in a process whose first sys.path entry is the repository root (``-c`` from
    the root, as ``python -m`` from the root does): the case that crashed."""
    from packaging.version import Version

    if Version(md.version("transformers")) < Version("5.25"):
        pytest.skip(f"transformers {md.version('transformers')} does not import Hugging Face's kernels")
    md.version("kernels")  # transformers >= 5.25 requires it: missing is a broken install, not a skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-c", COEXIST, str(ROOT / "tests")]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert Path(out["kernels"]) == Path(str(md.distribution("kernels").locate_file("kernels/__init__.py")))
    assert not Path(out["kernels"]).is_relative_to(ROOT / "kernels")
    assert out["t5"] == [2, 17, 64] and out["t5_finite"]  # 16 prompt tokens + seconds_total
    assert out["clap"] == [2, 512] and out["clap_finite"]


def test_lock_pins_every_dependency_exactly_with_hashes():
    text = LOCK.read_text()
    body = "\n".join(ln for ln in text.splitlines() if not ln.startswith("#"))
    entries = re.split(r"\n(?=[A-Za-z0-9])", body)
    assert len(entries) > 50
    for entry in entries:
        assert re.match(r"^[a-z0-9-]+==[^\s\\]+ \\\n", entry), entry[:200]
        assert re.search(r"--hash=sha256:[0-9a-f]{64}", entry), f"no hash: {entry[:80]}"


def test_lock_covers_and_satisfies_the_declared_ranges():
    """Every direct dependency (pyproject, extra test, requirements-nodeps.in) is locked, at a version
    its range allows; transformers and Hugging Face's kernels are in it (the coexistence test runs)."""
    pins = lock_pins()
    project = pyproject()["project"]
    declared = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    nodeps = (ROOT / "requirements-nodeps.in").read_text().splitlines()
    declared += [ln for ln in nodeps if ln and ln[0] != "#"]
    problems = []
    for spec in declared:
        req = Requirement(spec)
        version = pins.get(canonicalize_name(req.name))
        if version is None or not req.specifier.contains(version, prereleases=True):
            problems.append(f"{spec}: locked {version}")
        for extra in req.extras:  # e.g. ray[data]: its extra's packages are locked too
            for dep in md.requires(req.name) or []:
                dreq = Requirement(dep)
                if dreq.marker and dreq.marker.evaluate({"extra": extra}) and \
                        canonicalize_name(dreq.name) not in pins:  # fmt: skip
                    problems.append(f"{spec}: {dreq.name} (extra {extra}) not locked")
    assert not problems, problems
    assert "kernels" in pins and "transformers" in pins


def _version(name: str) -> str | None:
    """The version ``import`` would see (the first on sys.path: setuptools puts its vendored copies of
    packaging, wheel and others on sys.path after site-packages once imported)."""
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def test_environment_is_the_lock():
    """The suite runs on exactly the locked versions (``make test`` installs the lock): a package at
    another version means the environment was not made by ``make setup``."""
    wrong = {n: (v, installed) for n, v in lock_pins().items() if (installed := _version(n)) != v}
    assert not wrong, f"locked vs installed: {wrong}"


def test_gpu_wheels_come_from_the_lock():
    """benchmarks/fetch_gpu_wheels.py fetches the GPU machine's missing packages at the locked versions."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import fetch_gpu_wheels

    pins = lock_pins()
    specs = fetch_gpu_wheels.locked(fetch_gpu_wheels.NEEDED)
    assert [s.split("==")[1] for s in specs] == [pins[n] for n in fetch_gpu_wheels.NEEDED]
