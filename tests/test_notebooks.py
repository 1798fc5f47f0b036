"""Every ``notebooks/*.ipynb`` runs top to bottom in a fresh Jupyter kernel of this interpreter (nbclient), in a
temporary working directory, offline; and every notebook is stored clean (no outputs) and listed in the README.

* The kernel comes from a kernel spec written into a temporary folder whose command is ``sys.executable -m
  ipykernel_launcher``, so a ``python3`` kernel spec installed elsewhere on the machine is never used.
* The selected notebooks run once per module, ``PARALLEL`` kernels at a time (each kernel spends most of its few
  seconds importing torch and transformers, single-threaded); each test then reports its own notebook's result:
  the failing cell's number, source and error.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from jupyter_client.kernelspec import KernelSpecManager  # noqa: E402
from jupyter_client.manager import AsyncKernelManager  # noqa: E402
from traitlets import default  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT_S = 120
PARALLEL = max(1, min(4, os.cpu_count() or 1))
KERNEL_NAME = "hf-prune-test-python"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _manager_class(tmp: Path) -> type[AsyncKernelManager]:
    """A kernel manager class whose only kernel spec runs ipykernel with ``sys.executable``, offline, with the Hub
    and remote-code caches inside ``tmp``."""
    spec_dir = tmp / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    env = {
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp / "hf_home"),
        "HF_MODULES_CACHE": str(tmp / "hf_modules"),
        "HF_PRUNE_NOTEBOOK_PUSH_REPO": "",  # notebook 05 uploads only when this names a repo
        "MPLBACKEND": "Agg",
        # tiny models: one thread is as fast, and far faster when other jobs share the cores (2-thread OpenMP
        # barriers stall whenever one core is busy: 6.5 s instead of 0.8 s for notebook 01's training loop)
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",
    }
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "hf_prune tests", "language": "python", "env": env,
    }))
    kernel_dirs = [str(tmp / "kernels")]

    class Manager(AsyncKernelManager):
        @default("kernel_spec_manager")
        def _only_this_kernel_spec(self) -> KernelSpecManager:
            return KernelSpecManager(kernel_dirs=kernel_dirs, ensure_native_kernel=False)

    return Manager


async def _execute(path: Path, tmp: Path) -> dict[str, Any]:
    """Run the notebook at ``path``; return ``{"error": text or None, "seconds", "executable"}``."""
    nb = nbformat.read(path, as_version=4)
    # one extra cell, last, so cell numbers in failures match the notebook: which interpreter ran it
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    workdir = tmp / "work"
    workdir.mkdir()
    current: dict[str, Any] = {}

    def on_cell_start(cell: Any, cell_index: int) -> None:
        current.update(index=cell_index, source=cell.source)

    client = nbclient.NotebookClient(
        nb, kernel_name=KERNEL_NAME, kernel_manager_class=_manager_class(tmp), timeout=CELL_TIMEOUT_S,
        startup_timeout=120, shutdown_kernel="immediate", allow_errors=False,
        resources={"metadata": {"path": str(workdir)}}, on_cell_start=on_cell_start,
    )
    start = time.perf_counter()
    error = None
    try:
        await client.async_execute()
    except Exception as exc:  # CellExecutionError, CellTimeoutError, DeadKernelError: report the cell
        error = (f"cell {current.get('index', '?')} of {path.name} failed:\n--- source ---\n"
                 f"{current.get('source', '')}\n--- error ---\n{_ANSI.sub('', str(exc))[-6000:]}")
    last = nb.cells[-1].get("outputs", [])
    executable = "".join(o.get("text", "") for o in last if o.get("output_type") == "stream").strip()
    return {"error": error, "seconds": time.perf_counter() - start, "executable": executable}


@pytest.fixture(scope="module")
def executed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Run every notebook selected in this session (``-k`` narrows it), ``PARALLEL`` at a time."""
    selected = sorted({item.callspec.params["path"] for item in request.session.items
                       if getattr(item, "originalname", None) == "test_notebook_runs"})
    results: dict[str, dict] = {}

    async def run_all() -> None:
        gate = asyncio.Semaphore(PARALLEL)

        async def one(path: Path) -> None:
            async with gate:
                results[path.name] = await _execute(path, tmp_path_factory.mktemp(path.stem))

        await asyncio.gather(*(one(p) for p in selected))

    asyncio.run(run_all())
    return results


@pytest.mark.timeout(900)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path, executed: dict[str, dict]) -> None:
    result = executed[path.name]
    print(f"{path.name}: {result['seconds']:.1f} s")
    if result["error"]:
        pytest.fail(result["error"], pytrace=False)
    assert Path(result["executable"]) == Path(sys.executable), (
        f"the kernel ran {result['executable']!r}, not {sys.executable}")


def test_notebooks_are_clean_and_listed() -> None:
    """Stored without outputs (readable diffs), valid nbformat, self-contained, and named in the README."""
    assert NOTEBOOKS, "no notebooks found in notebooks/"
    readme = (ROOT / "README.md").read_text()
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for i, cell in enumerate(nb.cells):
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name} cell {i} has outputs"
                assert not re.search(r"^\s*(from|import)\s+(tests|tiny_models|conftest)\b", cell.source, re.M), (
                    f"{path.name} cell {i} imports from the test suite")
        assert f"notebooks/{path.name}" in readme, f"README.md does not list notebooks/{path.name}"
