"""The LiteRT converter's own Python: litert-torch lives in a virtual environment of its own, which imgclf
builds from the package index on first use.

    python = converter_python()          # $IMGCLF_LITERT_PYTHON, else the venv (built the first time)
    result = run_converter(python, job)  # litert_convert.py in that venv -> {"ok": ..., "error", "op"}

litert-torch (Google's PyTorch -> LiteRT converter) takes the same torch as imgclf (it allows torch >= 2.4,
< 2.15) but cannot share imgclf's environment: through ai-edge-litert[model-utils] it pins xdsl 0.28, which
pins typing-extensions < 4.13, below what pydantic 2.12+ (FastAPI's) needs. So the venv holds torch at
imgclf's version (a ``torch.export`` program travels between the two) and litert-torch, ~2 GB; on a
2-core VM it built in 90 s (torch from a local wheel). ``$IMGCLF_LITERT_VENV`` moves it;
``$IMGCLF_LITERT_PYTHON`` names a Python that already has both instead.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from ..errors import ImgclfError
from ..utils import imgclf_home

LITERT_TORCH = "litert-torch==0.10.0"  # the converter whose op coverage the tests saw; it brings ai-edge-quantizer
SCRIPT = Path(__file__).with_name("litert_convert.py")
READY = ".imgclf-ready"                # written last: a venv without it is a half-built one


def torch_requirement() -> str:
    """The converter's torch: imgclf's own release (a local build's ``+cpu`` tag is matched by pip)."""
    return "torch==" + torch.__version__.split("+")[0]


def venv_dir() -> Path:
    default = imgclf_home() / "venvs" / f"{LITERT_TORCH.replace('==', '-')}-{torch_requirement()[7:]}"
    return Path(os.environ.get("IMGCLF_LITERT_VENV") or default).expanduser()


def _python_in(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def converter_python(progress: bool = True) -> Path:
    """A Python that has litert-torch: ``$IMGCLF_LITERT_PYTHON``, else :func:`venv_dir`, built first if needed."""
    given = os.environ.get("IMGCLF_LITERT_PYTHON")
    if given:
        if not Path(given).is_file():
            raise ImgclfError(f"IMGCLF_LITERT_PYTHON={given}: no such file; name a python that has {LITERT_TORCH}")
        return Path(given)
    venv = venv_dir()
    if (venv / READY).is_file():
        return _python_in(venv)
    return build_venv(venv, progress)


def build_venv(venv: Path, progress: bool = True) -> Path:
    """Create ``venv`` with imgclf's torch and litert-torch from the package index. Built beside it and then
    renamed, so that an interrupted build or a second process building at once leaves no half venv."""
    tmp = venv.with_name(f"{venv.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    if progress:
        print(f"installing {LITERT_TORCH} and {torch_requirement()} into {venv} (first use only: ~2 GB, a few "
              "minutes)", file=sys.stderr, flush=True)
    try:
        for cmd in ([sys.executable, "-m", "venv", str(tmp)],
                    [str(_python_in(tmp)), "-m", "pip", "install", "-q", "--no-compile", "--disable-pip-version-check",
                     torch_requirement(), LITERT_TORCH]):
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
                raise ImgclfError(f"could not install {LITERT_TORCH} into {venv} ({last[0][:200]}); set "
                                  f"IMGCLF_LITERT_PYTHON to a python that has it and {torch_requirement()}")
        (tmp / READY).write_text(f"{LITERT_TORCH} {torch_requirement()}\n")
        try:
            tmp.rename(venv)
        except OSError:  # another process finished first: use its venv
            if not (venv / READY).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _python_in(venv)


def run_converter(python: Path, job: dict, workdir: Path) -> dict:
    """Run litert_convert.py on ``job`` with ``python``; its last output line, as a dict. The converter's
    own chatter (progress lines, MLIR dumps) is kept only for an error it does not explain itself."""
    (workdir / "job.json").write_text(json.dumps(job))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONWARNINGS="ignore")
    done = subprocess.run([str(python), str(SCRIPT), str(workdir / "job.json")], capture_output=True, text=True,
                          env=env, cwd=workdir)
    lines = done.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, ValueError):
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ImgclfError(f"the LiteRT converter ({python}) stopped with status {done.returncode}: {tail[:300]}") \
            from None
