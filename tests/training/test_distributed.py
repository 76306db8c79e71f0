"""Several processes (torchrun, gloo on CPU) train what one process trains; a failed process ends the job.

Each test launches ``python -m torch.distributed.run --nproc-per-node 2`` in a subprocess, one thread per
child, on a tiny synthetic folder: about 15 s a launch, most of it imports."""
import textwrap

import pytest
import torch

import imgclf
from imgclf.checkpoint import load_checkpoint
from imgclf.errors import ImgclfError
from imgclf.training import distributed

from support import cli_flags, torchrun, weights
from synthetic import colour_folder

ATOL = 1e-5


SETTINGS = dict(recipe="seed", model="seed-cnn", augment="none", precision="fp32", batch_size=16, seed=5,
                device="cpu")  # gloo on CPUs, also where a GPU is visible (tests/test_cuda.py has those)


def _script(tmp_path, body: str) -> str:
    path = tmp_path / "job.py"
    path.write_text(textwrap.dedent(body))
    return str(path)


@pytest.fixture
def data(tmp_path):
    """66 training images over 3 classes, one class short (so --class-weights auto weighs), 24 px."""
    root = colour_folder(tmp_path / "data", n_train=26, n_test=6, size=24)
    for i in range(12):
        (root / "train" / "red" / f"{i}.png").unlink()
    return root


def _assert_close(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= ATOL, f"largest weight difference {worst:g} > {ATOL:g}"


def test_two_processes_train_the_one_process_model(data, tmp_path):
    # head-only first epoch (hand-averaged gradients), then DDP; 66 images at batch 16 leave a last batch of
    # 2; class weights change the loss's denominator: every piece of the split must be exact
    settings = dict(SETTINGS, epochs=3, freeze_epochs=1, class_weights="auto")
    one = imgclf.train(data=str(data), project=str(tmp_path / "one"), name="run", progress=False, **settings)
    proc, _ = torchrun(["-m", "imgclf", "train", "--data", str(data), "--project", str(tmp_path / "two"),
                       "--no-progress", *cli_flags(settings)], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = list((tmp_path / "two").iterdir())
    assert len(runs) == 1  # one run folder: rank 0 made it and told rank 1
    two = runs[0]
    assert proc.stdout.strip().splitlines()[-1] == str(two)  # only rank 0 prints ...
    assert proc.stdout.count("epoch   1/3") == 1 and "2 processes (gloo)" in proc.stdout
    _assert_close(weights(one.run_dir), weights(two))
    # ... and the figures are the whole job's: train loss/accuracy summed over both processes
    hist = load_checkpoint(two / "last.safetensors").train_state["history"]
    for a, b in zip(one.history, hist):
        assert b["train_acc"] == pytest.approx(a["train_acc"]) and b["train_loss"] == pytest.approx(a["train_loss"])
        assert b["val_loss"] == pytest.approx(a["val_loss"], abs=1e-4)
    assert load_checkpoint(two / "best.safetensors").meta["test_metrics"]["n"] == 18


def test_stop_mid_epoch_on_two_processes_resume_on_one(data, tmp_path):
    """State saved by two processes mid-epoch resumes on one: same global batches, same result."""
    settings = dict(SETTINGS, epochs=2)
    full = imgclf.train(data=str(data), project=str(tmp_path / "runs"), name="full", progress=False, **settings)
    script = _script(tmp_path, f"""
        import imgclf
        from imgclf.training.callbacks import Callback

        class StopAt(Callback):
            def on_step_end(self, trainer, epoch, step, loss):
                if (epoch, step) == (1, 1):
                    trainer.request_stop()

        r = imgclf.train(data={str(data)!r}, project={str(tmp_path / "runs")!r}, name="part", progress=False,
                         callbacks=[StopAt()], **{settings!r})
        assert r.status == "interrupted", r
    """)
    proc, _ = torchrun([script], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    part = tmp_path / "runs" / "part"
    assert load_checkpoint(part / "last.safetensors").train_state["step"] == 2
    resumed = imgclf.train(resume=part, progress=False)
    assert resumed.status == "finished" and resumed.epochs_done == 2
    _assert_close(weights(full.run_dir), weights(part))
    assert resumed.history[-1]["train_loss"] == pytest.approx(full.history[-1]["train_loss"])


@pytest.mark.parametrize("how", ["raise", "hang"])
def test_a_failed_process_ends_the_job(data, tmp_path, how):
    """Rank 1 raises (torchrun stops rank 0) or hangs (rank 0's collective times out) in epoch 2: the job
    exits non-zero in bounded time, one run folder, epoch 1's checkpoints intact."""
    script = _script(tmp_path, f"""
        import os, time
        import imgclf
        from imgclf.training.callbacks import Callback

        class Fail(Callback):
            def on_step_end(self, trainer, epoch, step, loss):
                if (epoch, step) == (1, 1) and os.environ["RANK"] == "1":
                    if {how!r} == "hang":
                        time.sleep(600)
                    raise RuntimeError("rank 1 fails on purpose")

        imgclf.train(data={str(data)!r}, project={str(tmp_path / "runs")!r}, name="job", progress=False,
                     callbacks=[Fail()], **{dict(SETTINGS, epochs=3)!r})
    """)
    proc, seconds = torchrun([script], tmp_path, env={distributed.TIMEOUT_ENV: "10"})
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert seconds < 120
    if how == "raise":
        assert "rank 1 fails on purpose" in out
    else:
        assert "lost contact with the other processes" in out and distributed.TIMEOUT_ENV in out
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["job"]
    last = load_checkpoint(tmp_path / "runs" / "job" / "last.safetensors")
    assert last.train_state["epoch"] == 1 and load_checkpoint(tmp_path / "runs" / "job" / "best.safetensors")


def test_one_process_world_is_a_no_op(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with distributed.process_group() as world:
        assert (world.rank, world.size, world.is_main) == (0, 1, True)
        model = torch.nn.Linear(2, 2)
        assert world.wrap(model) is model
        assert world.share(torch.arange(4), torch.zeros(4, dtype=torch.long), None, 0, 0, 0) is None
        assert world.sum([1.5, 2]) == [1.5, 2] and world.any(False) is False
        assert world.from_main(lambda: "x") == "x"


def test_timeout_setting(monkeypatch):
    monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
    assert distributed.timeout_s() == distributed.DEFAULT_TIMEOUT_S
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "42")
    assert distributed.timeout_s() == 42
    monkeypatch.setenv(distributed.TIMEOUT_ENV, "soon")
    with pytest.raises(ImgclfError, match=distributed.TIMEOUT_ENV):
        distributed.timeout_s()


def test_more_processes_than_gpus_is_a_clear_error(monkeypatch):
    """torchrun --nproc-per-node 2 on a one-GPU machine: rank 1 would ask for cuda:1; it says what to do."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(distributed, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ImgclfError, match=r"started 2 processes on this machine, but it has 1 GPU\(s\).*"
                                          r"--nproc-per-node 1.*--device cpu"), distributed.process_group("cuda"):
        pass
