"""Execute the notebooks top to bottom and keep the executed copies (``make notebooks``).

The notebooks in ``notebooks/`` stay clean (committed without outputs); the executed copies,
their run folder and a ``times.json`` (wall time and the kernel's peak memory per notebook) go
to ``--out``. Parameters are overridden the papermill way: a cell inserted after the tagged
``parameters`` cell. By default every notebook runs on the bundled model with simulated
labelers (``annotation_mode="auto"``) and one shared run folder, ``OUT/run``, in order, so each
reuses what the earlier ones built.

    python scripts/run_notebooks.py                          # every notebook, bundled model (about an hour on a 2-core CPU)
    python scripts/run_notebooks.py --smoke                  # tiny model and sizes (tests/test_notebooks.py): minutes
    python scripts/run_notebooks.py 03_ppo --set ppo_steps=4 --set threads=1
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
# Appended to each executed copy, read back, then removed: the kernel's own peak memory.
STATS_CELL = ("import json as _j, resource as _r, sys as _s\n"
              "_kib = _r.getrusage(_r.RUSAGE_SELF).ru_maxrss / (1024 if _s.platform == 'darwin' else 1)\n"
              "print('LABKIT_STATS', _j.dumps({'peak_rss_gib': _kib / 2**20}))")


def smoke_overrides() -> dict[str, dict]:
    """The tiny sizes the notebook tests use, one home: tests/test_notebooks.py's SMOKE."""
    spec = importlib.util.spec_from_file_location("_notebook_tests", ROOT / "tests" / "test_notebooks.py")
    if spec is None or not (ROOT / "tests" / "test_notebooks.py").exists():
        raise SystemExit("--smoke needs tests/test_notebooks.py (a full checkout)")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {name: {"model": "tiny", **sizes} for name, sizes in module.SMOKE.items()}


def parse_set(items: list[str]) -> dict:
    """``key=value`` pairs; a value is a Python literal where it parses as one, else a string."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise SystemExit(f"--set expects key=value, got {item!r}")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def inject(nb, overrides: dict):
    """Insert a cell after the ``parameters`` cell that overrides them (papermill's convention)."""
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    if len(tagged) != 1:
        raise ValueError(f"expected one cell tagged 'parameters', found {len(tagged)}")
    cell = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in overrides.items()))
    cell.metadata["tags"] = ["injected-parameters"]
    nb.cells.insert(tagged[0] + 1, cell)
    return nb


def run_one(name: str, overrides: dict, out: Path, timeout: int | None) -> dict:
    """Execute one notebook into ``out/NAME.ipynb``; returns its wall time, peak memory and error."""
    nb = inject(nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4), overrides)
    nb.cells.append(nbformat.v4.new_code_cell(STATS_CELL))
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(out)}})
    t0, error = time.perf_counter(), None
    try:
        client.execute()
    except CellExecutionError as e:  # keep what ran; the next notebooks build what they miss
        error = str(e).strip().splitlines()[-1] if str(e).strip() else e.__class__.__name__
    seconds = time.perf_counter() - t0
    stats = {}
    for output in nb.cells[-1].get("outputs", []):
        for line in output.get("text", "").splitlines():
            if line.startswith("LABKIT_STATS "):
                stats = json.loads(line.split(" ", 1)[1])
    nb.cells.pop()
    nbformat.write(nb, out / f"{name}.ipynb")
    return {"notebook": name, "seconds": round(seconds, 1), "peak_rss_gib": stats.get("peak_rss_gib"),
            "overrides": overrides, "error": error}


def main(argv: list[str] | None = None) -> int:
    names = sorted(p.stem for p in NOTEBOOKS.glob("*.ipynb"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"notebooks to run (default: all, in order): {' '.join(names)}")
    parser.add_argument("--out", default="runs/notebooks-executed", help="folder for the executed copies")
    parser.add_argument("--smoke", action="store_true", help="tiny model and sizes, as tests/test_notebooks.py")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a parameter in every notebook (repeatable), e.g. --set threads=1")
    parser.add_argument("--timeout", type=int, default=None, help="seconds per cell (default: no limit)")
    args = parser.parse_args(argv)
    chosen = [n for n in names if not args.names or any(n == a or n.startswith(a) for a in args.names)]
    if not chosen:
        raise SystemExit(f"no notebook matches {args.names}; the notebooks: {names}")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    smoke = smoke_overrides() if args.smoke else {}
    common = {"out_dir": str(out / "run"), "annotation_mode": "auto", **({"model": "tiny"} if args.smoke else {})}
    rows = []
    for name in chosen:  # as the notebook tests do: the defaults, then a notebook's smoke sizes, then --set
        overrides = {**common, **smoke.get(name, {}), **parse_set(args.set)}
        print(f"{name}: running ({', '.join(f'{k}={v!r}' for k, v in overrides.items())})", flush=True)
        row = run_one(name, overrides, out, args.timeout)
        rows.append(row)
        memory = f", peak {row['peak_rss_gib']:.1f} GiB" if row["peak_rss_gib"] else ""
        print(f"{name}: {'FAILED: ' + row['error'] if row['error'] else 'done'} in {row['seconds'] / 60:.1f} min"
              f"{memory} -> {out / (name + '.ipynb')}", flush=True)
    (out / "times.json").write_text(json.dumps(rows, indent=1) + "\n")
    failed = [r["notebook"] for r in rows if r["error"]]
    print(f"{len(rows) - len(failed)} of {len(rows)} notebooks ran; times in {out / 'times.json'}"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
