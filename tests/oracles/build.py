"""Build (once, cached) the oracle environment: one virtual environment in which the official scorers run.

The official packages (`image-reward` today) need transformers 4 and timm 0.6, which cannot share an environment
with this project. The oracle environment installs only those pinned packages (with --no-deps) and sees every
other package, torch included, through a `.pth` file that points at the running interpreter's
site-packages, placed after its own so its pins win. Nothing outside the cache folder is touched.

    python -m tests.oracles.build          # build if needed, print the oracle's python
    DRTUNE_ORACLE_ENV=/some/dir     ...           # put the environment there instead of ~/.cache
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
import sysconfig
import time
import venv
from pathlib import Path

# The official packages and the versions of their own dependencies that they still run with.
PINS = (
    "image-reward==1.5",
    "transformers==4.49.0",
    "tokenizers==0.21.4",
    "huggingface_hub==0.36.0",
    "timm==0.6.13",
    "fairscale==0.4.13",
    "t2v-metrics==3.0",  # VQAScore; its CLIP-FlanT5 path also needs the slow T5 tokenizer's sentencepiece
    "sentencepiece==0.2.0",
    "hpsv3==1.0.0",  # HPSv3's official inferencer; it pins transformers 4.45.2, runs on the 4.49.0 above
    "omegaconf==2.3.0",  # hpsv3 reads its model config through OmegaConf
    "antlr4-python3-runtime==4.9.3",  # omegaconf's parser runtime
    "cyclereward==0.1.7",  # CycleReward's official package; its score imports only what image-reward's does
)
ENV_VAR = "DRTUNE_ORACLE_ENV"
PTH_NAME = "zz_drtune_main_env.pth"  # sorts last, after the pinned packages' own .pth files
READY = "drtune-oracle-ready.json"


class OracleBuildError(RuntimeError):
    """The oracle environment could not be built; the message says which step failed and why."""


def main_site_packages() -> list[str]:
    """Site-packages folders the running interpreter (the project's environment) imports from, in its order."""
    own = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    found = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")] + own
    return list(dict.fromkeys(str(Path(p).resolve()) for p in found if Path(p).is_dir()))


def oracle_dir() -> Path:
    """Where the oracle lives: $DRTUNE_ORACLE_ENV, else a cache folder keyed by pins and environment."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    key = json.dumps([PINS, sys.version, main_site_packages()]).encode()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "drtune-rewards" / f"oracle-env-{hashlib.sha256(key).hexdigest()[:12]}"


def oracle_python(root: Path | None = None) -> Path:
    """Path of the oracle environment's interpreter."""
    root = root or oracle_dir()
    return root / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def build(root: Path | None = None, *, quiet: bool = True) -> Path:
    """Build the oracle environment if it is not ready yet (idempotent, safe to run concurrently); return its python."""
    root = root or oracle_dir()
    python = oracle_python(root)
    if (root / READY).is_file() and python.is_file():
        return python
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f"{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second builder waits here, then finds the environment ready
        if (root / READY).is_file() and python.is_file():
            return python
        return _build(root, python, quiet)


def _build(root: Path, python: Path, quiet: bool) -> Path:
    start = time.perf_counter()
    venv.EnvBuilder(with_pip=True, clear=True).create(root)
    _run([python, "-m", "pip", "install", "--no-deps", *(["-q"] if quiet else []), *PINS], "pip install the pins")
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], "find site-packages")
    Path(site.strip(), PTH_NAME).write_text("\n".join(main_site_packages()) + "\n")
    versions = _run([python, "-c", _CHECK], "import the pinned packages with the main torch")
    info = {"pins": PINS, "main_site_packages": main_site_packages(), "versions": json.loads(versions)}
    info["build_seconds"] = round(time.perf_counter() - start, 1)
    (root / READY).write_text(json.dumps(info, indent=1))
    return python


_CHECK = """
import json, torch, torchvision, transformers, timm, huggingface_hub, fairscale
print(json.dumps({m.__name__: m.__version__ for m in (torch, torchvision, transformers, timm, huggingface_hub)}))
"""


def _run(cmd: list, what: str) -> str:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        raise OracleBuildError(
            f"oracle environment: could not {what} (exit {proc.returncode}); command: {' '.join(map(str, cmd))}\n"
            f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}\n"
            "The oracle needs PyPI access once to install its pins; set "
            f"{ENV_VAR} to reuse an environment built elsewhere."
        )
    return proc.stdout


if __name__ == "__main__":
    t0 = time.perf_counter()
    print(build(quiet=False))
    print(f"ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
