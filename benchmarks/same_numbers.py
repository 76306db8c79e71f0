"""Same seeded commands, same numbers, at two versions of the code.

    python benchmarks/same_numbers.py OLD_COMMIT [NEW_COMMIT] [--only seed,fast,photo,int8] [--keep DIR]

A restructuring (modules moved, code split or merged) must keep every number the CLI prints. This script
checks out OLD_COMMIT (and NEW_COMMIT, else it takes the working tree as it is, uncommitted changes
included) as temporary git worktrees and runs the same small seeded commands on each, through the command
line only (``PYTHONPATH=<tree>/src python -m imgclf ...``, never imgclf's internals, whose paths differ
between versions). Each side gets its own fresh ``IMGCLF_HOME``, so neither reuses the other's cache, and
the same fixed environment otherwise (threads, ``PYTHONHASHSEED=0``, ``--device cpu``):

- seed:  the seed recipe, 1 epoch on 5 % of CIFAR-10;
- fast:  the fast recipe (FastNet-S), 2 epochs on 5 % of CIFAR-10, flip TTA;
- photo: the photo recipe (ImageNet EfficientNet-Lite0, offline weights), 3 epochs on 25 weather photos
  per class (the first by sorted name), extracted once and shared by both sides;
- int8:  ``imgclf export`` of the fast run with int8, JSON: agreement, accuracy, logit differences.

From each command's stdout+stderr it keeps the lines that carry numbers, after removing what legitimately
differs (times in seconds, images/s, ``eta`` and ``data:`` (memory) lines, temporary paths, source
file:line in warnings, dates, file sizes: an .onnx file's metadata holds its source path and the run's
training seconds), and prints
them as a full-context diff (``-`` old, ``+`` new, ``?`` marks the differing characters) with a verdict:
SAME or DIFFERENT. Exit status 0 only when every command is SAME. The data are ``../shared/datasets``;
about 1-2 minutes per side on 2 cores.
"""
from __future__ import annotations

import argparse
import collections
import difflib
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATASETS = (REPO / ".." / "shared" / "datasets").resolve()
CIFAR = DATASETS / "cifar10-jpeg.tar.gz"
WEATHER = DATASETS / "weather-photos.tar.gz"
PHOTOS_PER_CLASS = 25
COMMANDS = ("seed", "fast", "photo", "int8")
NEEDS = {"int8": "fast"}          # int8 exports the fast run of the same side
TIMEOUT_S = 1800                  # per command; a hang is a failure, not a wait forever


def train_args(data: Path, runs: Path, name: str, *flags: str, device: str) -> list[str]:
    return ["train", "--data", str(data), *flags, "--seed", "0", "--device", device,
            "--project", str(runs), "--name", name, "--no-progress"]


def command_args(cmd: str, runs: Path, photos: Path, device: str) -> list[str]:
    """The `imgclf` arguments of ``cmd`` for the side whose run folders are under ``runs``."""
    if cmd == "seed":
        return train_args(CIFAR, runs, "seed", "--recipe", "seed", "--epochs", "1", "--fraction", "0.05",
                          device=device)
    if cmd == "fast":
        return train_args(CIFAR, runs, "fast", "--recipe", "fast", "--model", "fastnet-s", "--epochs", "2",
                          "--fraction", "0.05", "--tta", "flip", device=device)
    if cmd == "photo":
        return train_args(photos, runs, "photo", "--recipe", "photo", "--epochs", "3", device=device)
    if cmd == "int8":
        return ["export", str(runs / "fast"), "--int8", "--json", "--no-speed", "--no-progress"]
    raise ValueError(cmd)


@dataclass
class Side:
    label: str                    # "old" or "new"
    tree: Path                    # the repository tree whose src/ runs
    root: Path                    # this side's scratch folder
    what: str                     # commit, or the working tree
    seconds: float = 0.0
    ok: set = field(default_factory=set)

    @property
    def home(self) -> Path:
        return self.root / "home"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    def env(self, base: dict) -> dict:
        return {**base, "PYTHONPATH": str(self.tree / "src"), "IMGCLF_HOME": str(self.home)}


def fixed_env() -> dict:
    """The environment both sides share: the caller's, less what picks the code or the cache, plus fixed
    threads, hashing, buffering (stdout and stderr interleave in program order), time zone and width."""
    threads = str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "IMGCLF_HOME", "PYTHONSTARTUP")}
    env.update(PYTHONHASHSEED="0", PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS=threads,
               MKL_NUM_THREADS=threads, TZ="UTC", COLUMNS="200", TERM="dumb", NO_COLOR="1")
    return env


def git(*args: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def resolve_commit(ref: str) -> str:
    try:
        return git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    except subprocess.CalledProcessError:
        sys.exit(f"same_numbers: {ref!r} is not a commit of {REPO}")


def add_worktree(commit: str, path: Path) -> None:
    git("worktree", "add", "--detach", "--quiet", str(path), commit)


def remove_worktree(path: Path) -> None:
    try:
        git("worktree", "remove", "--force", str(path))
    except subprocess.CalledProcessError:
        shutil.rmtree(path, ignore_errors=True)
        subprocess.run(["git", "worktree", "prune"], cwd=REPO, capture_output=True)


def extract_photos(dest: Path, per_class: int) -> int:
    """The first ``per_class`` photos of each class by sorted name, as bare <class>/<file> folders."""
    with tarfile.open(WEATHER) as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile()}
        by_class = collections.defaultdict(list)
        for name in members:
            by_class[name.split("/")[0]].append(name)
        chosen = [members[n] for c in sorted(by_class) for n in sorted(by_class[c])[:per_class]]
        tar.extractall(dest, members=chosen, filter="data")
    return len(chosen)


def check_import(side: Side, base: dict) -> None:
    """imgclf must import from this side's own tree, not the installed (editable) package."""
    proc = subprocess.run([sys.executable, "-c", "import imgclf, sys; print(imgclf.__file__)"],
                          env=side.env(base), cwd=side.root, capture_output=True, text=True)
    where = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    print(f"{side.label}: {side.what}\n     imgclf from {where or '(import failed)'}")
    if proc.returncode != 0 or not Path(where).resolve().is_relative_to((side.tree / "src").resolve()):
        sys.exit(f"same_numbers: {side.label} side does not import imgclf from {side.tree / 'src'}:\n"
                 f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}")


def normalize(text: str, side: Side, photos: Path, scratch: Path) -> list[str]:
    """The lines that carry numbers, with what legitimately differs between the sides replaced."""
    for path, tag in sorted([(side.tree, "<tree>"), (side.home, "<home>"), (side.runs, "<runs>"),
                             (photos, "<photos>"), (side.root, "<side>"), (scratch, "<scratch>"),
                             (DATASETS, "<datasets>")], key=lambda p: -len(str(p[0]))):
        text = text.replace(str(path), tag)
    subs = [
        (r"<tree>/\S+?\.py:\d+", "<source>"),                                 # warnings' file:line
        (r'File "<tree>/[^"]+", line \d+', 'File "<source>"'),                 # tracebacks
        (re.escape(tempfile.gettempdir()) + r"/[^\s\"',)]*", "<tmp>"),          # other temporary paths
        (r"\b\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})?)?", "<date>"),
        (r"\b\d{2}:\d{2}:\d{2}(\.\d+)?\b", "<clock>"),
        (r"[\d,]+(\.\d+)?\s*(img|images)/s\b", "<rate>"),
        (r'("[\w ]*(_s|seconds|time|per_s)"\s*:\s*)-?[\d.eE+-]+', r"\1<t>"),   # JSON timings
        (r'("size_bytes"\s*:\s*)\d+', r"\1<bytes>"),   # .onnx metadata holds the run's path and seconds
        (r"\b\d[\d,]*(\.\d+)?\s?(ms|s|min)\b", "<t>"),                        # 13.8s, 2.9 s, 12 ms
    ]
    lines = []
    for line in text.splitlines():
        for pattern, repl in subs:
            line = re.sub(pattern, repl, line)
        line = line.rstrip()
        # eta: a time forecast; "note   data:": the memory free at the time, and whether the images were held
        # in memory, which must not change a number
        if re.search(r"\d", line) and not line.startswith(("eta ", "note   data: ")):
            lines.append(line)
    return lines


def run_command(cmd: str, side: Side, base: dict, photos: Path, device: str, keep: Path | None) -> tuple:
    """-> (exit status, seconds, raw output) of ``cmd`` on ``side``."""
    argv = [sys.executable, "-m", "imgclf", *command_args(cmd, side.runs, photos, device)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(argv, env=side.env(base), cwd=side.root, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT_S)
        rc, out = proc.returncode, proc.stdout
    except subprocess.TimeoutExpired as e:
        partial = e.stdout or b""
        out = partial.decode(errors="replace") if isinstance(partial, bytes) else partial
        rc = f"timeout after {TIMEOUT_S} s"
    seconds = time.perf_counter() - t0
    side.seconds += seconds
    if keep:
        (keep / f"{cmd}.{side.label}.log").write_text(
            f"# {side.what}\n# PYTHONPATH={side.tree / 'src'} IMGCLF_HOME={side.home}\n# {' '.join(argv)}\n"
            f"# exit {rc}, {seconds:.1f} s\n{out}")
    if rc == 0:
        side.ok.add(cmd)
    return rc, seconds, out


def report(cmd: str, sides: list[Side], results: dict, photos: Path, scratch: Path, keep: Path | None) -> bool:
    old, new = sides
    (rc_o, s_o, out_o), (rc_n, s_n, out_n) = results[old.label], results[new.label]
    a, b = normalize(out_o, old, photos, scratch), normalize(out_n, new, photos, scratch)
    if keep:
        for side, lines in ((old, a), (new, b)):
            (keep / f"{cmd}.{side.label}.numbers.txt").write_text("\n".join(lines) + "\n")
    same = rc_o == 0 and rc_n == 0 and a == b and bool(a)
    verdict = "SAME" if same else "DIFFERENT"
    changed = sum(max(i2 - i1, j2 - j1) for op, i1, i2, j1, j2 in
                  difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes() if op != "equal")
    why = "" if same else (f" (exit {rc_o} old, {rc_n} new)" if (rc_o, rc_n) != (0, 0) else
                           " (no number lines)" if not a else f" ({changed} of {max(len(a), len(b))} lines)")
    argv = " ".join(command_args(cmd, Path("<runs>"), Path("<photos>"), "cpu")).replace(str(DATASETS), "<datasets>")
    print(f"\n=== {cmd}: {verdict}{why}   old {s_o:.0f} s, new {s_n:.0f} s\n    imgclf {argv}")
    for line in difflib.ndiff(a, b) if a != b else ("  " + x for x in a):
        print("  " + line.rstrip("\n"))
    for side, rc, out in ((old, rc_o, out_o), (new, rc_n, out_n)):
        if rc != 0:
            print(f"  --- {side.label} exited {rc}; its last lines:")
            print("\n".join("  | " + x for x in out.strip().splitlines()[-15:]))
    return same


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("old", metavar="OLD_COMMIT")
    ap.add_argument("new", metavar="NEW_COMMIT", nargs="?", help="default: the working tree, uncommitted "
                    "changes included")
    ap.add_argument("--only", default=",".join(COMMANDS), help=f"comma-separated subset of {','.join(COMMANDS)}")
    ap.add_argument("--keep", type=Path, metavar="DIR", help="write each side's raw log and compared lines here")
    ap.add_argument("--device", default="cpu", help="--device of the training commands (default cpu)")
    args = ap.parse_args()
    wanted = [c.strip() for c in args.only.split(",") if c.strip()]
    if bad := [c for c in wanted if c not in COMMANDS]:
        ap.error(f"--only: unknown {', '.join(bad)}; choose from {', '.join(COMMANDS)}")
    to_run = [c for c in COMMANDS if c in wanted or any(NEEDS.get(w) == c for w in wanted)]
    for need in sorted({NEEDS[w] for w in wanted if w in NEEDS} - set(wanted)):
        print(f"({need} runs too, unreported: {', '.join(w for w in wanted if NEEDS.get(w) == need)} needs it)")
    missing = [p for p, c in ((CIFAR, {"seed", "fast"}), (WEATHER, {"photo"})) if c & set(to_run) and not p.is_file()]
    if missing:
        sys.exit(f"same_numbers: not found: {', '.join(map(str, missing))}")
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)

    old_commit = resolve_commit(args.old)
    new_commit = resolve_commit(args.new) if args.new else None
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # run the clean-up below on kill too
    scratch = Path(tempfile.mkdtemp(prefix="same_numbers-"))
    worktrees = []
    try:
        old = Side("old", scratch / "old" / "tree", scratch / "old", f"{args.old} = {old_commit[:12]}")
        if new_commit:
            new = Side("new", scratch / "new" / "tree", scratch / "new", f"{args.new} = {new_commit[:12]}")
        else:
            changed = len(git("status", "--porcelain", "--untracked-files=no").splitlines())
            new = Side("new", REPO, scratch / "new", f"working tree {REPO} (HEAD {git('rev-parse', 'HEAD')[:12]}"
                       f" + {changed} changed files)")
        sides = [old, new]
        for side, commit in ((old, old_commit), (new, new_commit)):
            side.root.mkdir(parents=True)
            if commit:
                worktrees.append(side.tree)
                add_worktree(commit, side.tree)
        base = fixed_env()
        print(f"python {sys.executable}; {base['OMP_NUM_THREADS']} threads; scratch {scratch}")
        for side in sides:
            check_import(side, base)
        photos = scratch / "photos"
        if "photo" in to_run:
            n = extract_photos(photos, PHOTOS_PER_CLASS)
            print(f"photos: {n} from {WEATHER.name} ({PHOTOS_PER_CLASS} per class, first by sorted name)")

        verdicts = {}
        for cmd in to_run:
            results = {}
            for side in sides:
                if NEEDS.get(cmd) and NEEDS[cmd] not in side.ok:
                    results[side.label] = (f"skipped: {NEEDS[cmd]} failed", 0.0, "")
                    continue
                print(f"... {cmd} on {side.label}", flush=True)
                results[side.label] = run_command(cmd, side, base, photos, args.device, args.keep)
            if cmd in wanted:
                verdicts[cmd] = report(cmd, sides, results, photos, scratch, args.keep)

        print("\n=== summary")
        for cmd, same in verdicts.items():
            print(f"  {cmd:<6} {'SAME' if same else 'DIFFERENT'}")
        print(f"  total time: old {old.seconds:.0f} s, new {new.seconds:.0f} s")
        if args.keep:
            print(f"  raw logs: {args.keep}")
        return 0 if all(verdicts.values()) else 1
    finally:
        for path in worktrees:
            remove_worktree(path)
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
