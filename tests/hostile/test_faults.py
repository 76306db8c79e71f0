"""Disk and process faults: a full disk on every write path is one clear error that keeps the previous file,
run.json says `failed` and why, one writer per run folder, files follow the umask, checkpoints are fsynced."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import imgclf
from imgclf import utils
from imgclf.checkpoint import load_checkpoint, save_checkpoint
from imgclf.errors import ImgclfError
from imgclf.training.callbacks import Callback
from imgclf.training.run_folder import RunLock

from support import train_run


def _full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


WRITERS = {
    "text": lambda path: utils.atomic_write_text(path, "new"),
    "bytes": lambda path: utils.atomic_write_bytes(path, b"new"),
    "durable text": lambda path: utils.atomic_write_text(path, "new", durable=True),
    "checkpoint": lambda path: save_checkpoint(path, {"w": torch.ones(2)}, {"kind": "best"}),
}


FAULTS = ([(writer, where) for writer in WRITERS for where in ("create", "rename")]
          + [(writer, "write") for writer in ("text", "bytes", "durable text")]
          + [(writer, "fsync") for writer in ("durable text", "checkpoint")])


@pytest.mark.parametrize(("writer", "where"), FAULTS)
def test_a_full_disk_on_a_write_path_is_one_clear_error_and_keeps_the_previous_file(tmp_path, monkeypatch,
                                                                                    writer, where):
    path = tmp_path / "file.out"
    path.write_bytes(b"old")
    if where == "create":
        monkeypatch.setattr(utils.tempfile, "mkstemp", _full)
    elif where == "write":
        monkeypatch.setattr(Path, "write_text", _full)
        monkeypatch.setattr(Path, "write_bytes", _full)
    elif where == "fsync":
        monkeypatch.setattr(utils.os, "fsync", _full)
    else:
        monkeypatch.setattr(utils.os, "replace", _full)
    with pytest.raises(ImgclfError) as e:
        WRITERS[writer](path)
    assert str(e.value) == (f"cannot write {path} (No space left on device); the previous file is unchanged; "
                            "free disk space or check the folder's permissions, then run again")
    assert path.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_a_checkpoint_that_cannot_be_serialised_for_lack_of_space_is_the_same_clear_error(tmp_path, monkeypatch):
    from safetensors import SafetensorError

    from imgclf import checkpoint

    def full(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')

    path = tmp_path / "best.safetensors"
    save_checkpoint(path, {"w": torch.zeros(2)}, {"kind": "best"})
    monkeypatch.setattr(checkpoint, "save_file", full)
    with pytest.raises(ImgclfError, match=r"cannot write .*best.safetensors \(No space left on device\); the previous"):
        save_checkpoint(path, {"w": torch.ones(2)}, {"kind": "best"})
    assert load_checkpoint(path).state_dict["w"].sum() == 0
    assert _leftovers(tmp_path) == []


def test_checkpoints_and_configs_reach_the_disk_before_the_rename(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(utils.os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real(fd))
    save_checkpoint(tmp_path / "last.safetensors", {"w": torch.ones(2)}, {"kind": "last"})
    assert len(synced) == 2
    assert synced[0].startswith(str(tmp_path / ".last.safetensors.")) and synced[1] == str(tmp_path)
    utils.atomic_write_text(tmp_path / "metrics.csv", "a,b\n")  # cheap files are not fsynced
    assert len(synced) == 2


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_written_files_follow_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        utils.atomic_write_text(tmp_path / "run.json", "{}")
        save_checkpoint(tmp_path / "best.safetensors", {"w": torch.ones(1)}, {"kind": "best"})
    finally:
        os.umask(old)
    for name in ("run.json", "best.safetensors"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~mask


def test_a_failed_run_says_so_in_run_json(tiny_folder, tmp_path):
    class Boom(Callback):
        def on_epoch_end(self, trainer, row):
            if trainer.state.epoch == 1:
                raise RuntimeError("the GPU fell off\nsecond line")

    with pytest.raises(RuntimeError):
        train_run(tiny_folder, tmp_path, epochs=3, callbacks=[Boom()], name="boom")
    info = json.loads((tmp_path / "runs" / "boom" / "run.json").read_text())
    assert info["status"] == "failed" and info["error"] == "RuntimeError: the GPU fell off"
    assert info["epochs_done"] == 1


def test_a_full_disk_mid_training_is_one_line_and_a_failed_run_json(tiny_folder, tmp_path):
    """The CLI's view: `last` cannot be written at the second epoch's end (the disk filled up meanwhile)."""
    code = """
import errno, os, sys
from imgclf import utils
real = os.replace
calls = []
def replace(src, dst):
    if str(dst).endswith("last.safetensors"):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real(src, dst)
utils.os.replace = replace  # utils' module reference only: the rest of the process is untouched
from imgclf.cli import main
main(sys.argv[1:])
"""
    run = tmp_path / "runs" / "full"
    proc = subprocess.run([sys.executable, "-c", code, "train", "--data", str(tiny_folder), "--epochs", "4",
                           "--batch-size", "16", "--project", str(tmp_path / "runs"), "--name", "full",
                           "--no-progress"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: cannot write {run / 'last.safetensors'} "
                                                           "(No space left on device); the previous file is unchanged")
    info = json.loads((run / "run.json").read_text())
    assert info["status"] == "failed" and "No space left on device" in info["error"]
    assert load_checkpoint(run / "last.safetensors").train_state["epoch"] == 1  # the epoch before is intact
    assert _leftovers(run) == []


def test_one_writer_per_run_folder_and_a_dead_owners_lock_is_taken_over(tiny_folder, tmp_path):
    r = train_run(tiny_folder, tmp_path, epochs=1, name="locked")
    with RunLock(r.run_dir), pytest.raises(ImgclfError, match=rf"{r.run_dir} is in use by process {os.getpid()}"):
        imgclf.train(resume=r.run_dir, epochs=2, progress=False)
    # a process holding the lock dies by SIGKILL: the kernel frees the lock, the next resume takes it
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from imgclf.training.run_folder import RunLock; "
                               f"lock = RunLock(Path({str(r.run_dir)!r})).__enter__(); print('held', flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ImgclfError, match=f"in use by process {holder.pid}"):
        imgclf.train(resume=r.run_dir, epochs=2, progress=False)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert imgclf.train(resume=r.run_dir, epochs=2, progress=False).status == "finished"


def test_a_damaged_last_says_so_and_offers_best(tiny_folder, tmp_path):
    r = train_run(tiny_folder, tmp_path, epochs=2, name="damaged")
    last = r.run_dir / "last.safetensors"
    last.write_bytes(last.read_bytes()[:1000])  # cut short, as by a failing disk
    with pytest.raises(ImgclfError) as e:
        imgclf.train(resume=r.run_dir, epochs=3, progress=False)
    msg = str(e.value)
    assert msg.startswith(f"cannot resume {r.run_dir}: ") and "\n" not in msg
    assert f"--init-from {r.run_dir / 'best.safetensors'}" in msg
    started = time.monotonic()
    again = imgclf.train(config=str(r.run_dir / "config.toml"), init_from=str(r.run_dir / "best.safetensors"),
                         epochs=1, progress=False)  # the command the message offers works
    assert again.status == "finished" and again.run_dir != r.run_dir and time.monotonic() - started < 300


def test_the_command_line_says_a_full_disk_in_one_line_wherever_it_happens(monkeypatch, capsys):
    """A write path outside atomic_path (the shard writer, a temporary ONNX file) reaches the command line as
    an OSError: one line, exit 2; any other OSError is a bug and keeps its traceback."""
    from imgclf import cli

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/shards/train-000003.tar")

    monkeypatch.setattr(cli, "app", full)
    with pytest.raises(SystemExit) as e:
        cli.main(["shards", "x", "y"])
    assert e.value.code == 2
    assert capsys.readouterr().err == ("error: /data/shards/train-000003.tar: No space left on device; free disk "
                                       "space or check permissions, then run again\n")
    monkeypatch.setattr(cli, "app", lambda **kw: (_ for _ in ()).throw(OSError(errno.EBADF, "bad fd")))
    with pytest.raises(OSError, match="bad fd"):
        cli.main(["predict"])
