"""The results-file and worker plumbing that the multi-run benchmark drivers share (`loraprune.py`, `pat.py`,
`recovery.py`): one results file per benchmark, rows added or redone with ``--append``, every row stamped with the
machine it ran on (so a file that mixes machines says which row came from where), and each run in its own process
(``--worker NAME``) so that its peak RSS is its own.

    results = start("benchmarks/pat.py", protocol, out, append=args.append)
    run_workers(__file__, args, ["dense+lora", "pat"], results, out, markdown)   # or put(...) + save(...)

In the markdown, `header` gives the machine / date / command / protocol lines and `tag(results, row)` the ``[a]``
marker of a row's machine when the file holds more than one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from oneshot import command_line, machine

# driver-only options, not passed on to the workers
DRIVER_OPTIONS = ("runs", "quick", "worker", "work", "out", "append")


def start(script: str, protocol: str, out: Path, append: bool, **fields: Any) -> dict:
    """A new results dict (this machine, today, the command line, ``protocol``, ``fields``). With ``append`` and
    an existing ``out``, its rows are kept, each stamped with the machine it ran on, and the commands are joined."""
    results = {"machine": machine(), "date": datetime.date.today().isoformat(), "command": command_line(script),
               "protocol": protocol, **fields, "rows": []}
    if append and out.exists():
        old = json.loads(out.read_text())
        results["rows"] = old["rows"]
        results["command"] = old["command"] + "; " + results["command"]
        for r in results["rows"]:
            r.setdefault("machine", old.get("machine"))
    return results


def put(results: dict, row: dict, key: Callable[[dict], Any]) -> None:
    """Add ``row`` (stamped with this machine if it carries none), replacing any row with the same ``key``."""
    row.setdefault("machine", results["machine"])
    results["rows"] = [r for r in results["rows"] if key(r) != key(row)] + [row]


def save(results: dict, out: Path, markdown: Callable[[dict], str]) -> None:
    """Write ``out`` (JSON) and its ``.md`` twin, each through a temporary file and a rename."""
    from hf_prune.report import atomic_write_text

    atomic_write_text(str(out), json.dumps(results, indent=2))
    atomic_write_text(str(out.with_suffix(".md")), markdown(results) + "\n")


def machines(results: dict) -> list[str]:
    return sorted({r.get("machine") or results["machine"] for r in results["rows"]} or {results["machine"]})


def tag(results: dict, row: dict) -> str:
    """`` [a]``, `` [b]``... naming the row's machine when the rows come from more than one, else ``""``."""
    ms = machines(results)
    return "" if len(ms) == 1 else f" [{chr(ord('a') + ms.index(row.get('machine') or results['machine']))}]"


def header(results: dict) -> list[str]:
    """The markdown's first lines: machine(s), date, command, protocol."""
    ms = machines(results)
    first = (f"Machine: {ms[0]}  " if len(ms) == 1 else
             "Machines: " + "; ".join(f"[{chr(ord('a') + i)}] {m}" for i, m in enumerate(ms)) + "  ")
    return [first, f"Date: {results['date']}  ", f"Command: `{results['command']}`  ",
            f"Protocol: {results['protocol']}"]


def worker_file(work: str, name: str) -> Path:
    return Path(work, f"{name.replace('+', '_')}.json")


def run_workers(script: str, args: argparse.Namespace, names: Sequence[str], results: dict, out: Path,
                markdown: Callable[[dict], str], key: Callable[[dict], Any] = lambda r: r["run"],
                quiet: Sequence[str] = ("history", "results")) -> None:
    """Run each of ``names`` as ``python script --worker NAME`` with this driver's options, then add its row
    (written by the worker to `worker_file`) and save after each run, so a failure later keeps what finished."""
    passthrough = [f"--{k.replace('_', '-')}" if v is True else f"--{k.replace('_', '-')}={v}"
                   for k, v in vars(args).items() if k not in DRIVER_OPTIONS and v is not None and v is not False]
    for name in names:
        print(f"== {name}", flush=True)
        subprocess.run([sys.executable, script, *passthrough, "--worker", name, "--work", args.work], check=True)
        row = json.loads(worker_file(args.work, name).read_text())
        print(json.dumps({k: v for k, v in row.items() if k not in quiet}), flush=True)
        put(results, row, key)
        save(results, out, markdown)
