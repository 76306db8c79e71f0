"""Run imgclf commands held to a memory limit (a cgroup), and say whether each finished or was killed.

    sudo python benchmarks/memory_cap.py --limit-mb 1200 \\
        -- imgclf train --data /tmp/imgclf-data-scale/synthetic-200000-64px --epochs 1 --fraction 0.05 --name capped \\
        -- imgclf evaluate runs/capped \\
        -- imgclf predict runs/capped /tmp/imgclf-data-scale/synthetic-200000-64px/test/c3/0000003.jpg

Each command (split by ``--``) runs in a new memory cgroup (v1 ``memory`` controller, else v2) whose limit is
--limit-mb, swap included where the kernel accounts it. Printed per command: exit status, seconds, the
cgroup's peak usage (page cache included, which the kernel reclaims at the limit rather than killing), and
how many processes the kernel killed for memory, and how many of the command's processes outlived it (they
are killed). The cgroup is removed afterwards. --python runs the
commands with another interpreter (or checkout, through PYTHONPATH) to compare versions under the same cap.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

V1 = Path("/sys/fs/cgroup/memory")
V2 = Path("/sys/fs/cgroup")


def make_group(name: str, limit: int) -> tuple[Path, dict[str, str]]:
    """-> (the cgroup folder, names of its files: procs, peak, limit, events)."""
    if V1.is_dir() and (V1 / "memory.limit_in_bytes").exists():
        group = V1 / name
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(limit))
        swap = group / "memory.memsw.limit_in_bytes"
        if swap.exists():
            swap.write_text(str(limit))
        return group, {"procs": "cgroup.procs", "peak": "memory.max_usage_in_bytes", "oom": "memory.oom_control"}
    group = V2 / name
    group.mkdir()
    (group / "memory.max").write_text(str(limit))
    if (group / "memory.swap.max").exists():
        (group / "memory.swap.max").write_text("0")
    return group, {"procs": "cgroup.procs", "peak": "memory.peak", "oom": "memory.events"}


def oom_kills(group: Path, files: dict[str, str]) -> int:
    for line in (group / files["oom"]).read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            return int(value)
    return 0


def run_capped(cmd: list[str], limit: int, env: dict) -> dict:
    name = f"imgclf-cap-{os.getpid()}-{time.time_ns()}"
    group, files = make_group(name, limit)
    try:
        t0 = time.perf_counter()
        # the shell joins the cgroup first, then becomes the command: everything it starts is held too
        proc = subprocess.run(["sh", "-c", f'echo $$ > {group / files["procs"]} && exec "$@"', "sh", *cmd], env=env)
        seconds = time.perf_counter() - t0
        peak = int((group / files["peak"]).read_text()) if (group / files["peak"]).exists() else -1
        time.sleep(1)  # processes the command started get a moment to leave with it
        left = [int(p) for p in (group / files["procs"]).read_text().split()]
        return {"command": shlex.join(cmd), "rc": proc.returncode, "seconds": round(seconds, 1),
                "peak_mb": round(peak / 2**20), "oom_kills": oom_kills(group, files), "left_behind": len(left)}
    finally:
        for pid in [int(p) for p in (group / files["procs"]).read_text().split()]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)  # what outlived the command must not outlive its cgroup
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:  # its last process is still leaving
                time.sleep(0.1)


def main() -> None:
    argv = sys.argv[1:]
    split = [i for i, a in enumerate(argv) if a == "--"]
    if not split:
        sys.exit("usage: memory_cap.py --limit-mb N [--python PY] [--pythonpath DIR] -- COMMAND [-- COMMAND ...]")
    p = argparse.ArgumentParser()
    p.add_argument("--limit-mb", type=int, required=True)
    p.add_argument("--pythonpath", help="PYTHONPATH for the commands (e.g. another checkout's src/)")
    args = p.parse_args(argv[:split[0]])
    commands, start = [], split[0] + 1
    for end in [*split[1:], len(argv)]:
        commands.append(argv[start:end])
        start = end + 1
    env = dict(os.environ)
    if args.pythonpath:
        env["PYTHONPATH"] = args.pythonpath
    limit = args.limit_mb * 2**20
    results = []
    for cmd in commands:
        if cmd and cmd[0] == "imgclf":  # the imgclf of this interpreter (and of --pythonpath, if given)
            cmd = [sys.executable, "-m", "imgclf", *cmd[1:]]
        r = run_capped(cmd, limit, env)
        results.append(r)
        verdict = "finished" if r["rc"] == 0 else ("KILLED for memory" if r["oom_kills"] else f"failed ({r['rc']})")
        print(f"[{args.limit_mb} MB cap] {verdict}: rc {r['rc']}, {r['seconds']} s, peak {r['peak_mb']} MB, "
              f"{r['oom_kills']} OOM kill(s), {r['left_behind']} process(es) left behind: {r['command']}", flush=True)
    print(json.dumps({"limit_mb": args.limit_mb, "results": results}))


if __name__ == "__main__":
    main()
