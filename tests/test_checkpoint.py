"""Checkpoints: safetensors round trips, atomic writes, pickles refused and never unpickled."""
import json
import pickle

import pytest
import torch

from imgclf.checkpoint import load_checkpoint, save_checkpoint
from imgclf.errors import ImgclfError


def test_round_trip_with_train_state(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    state = {"optimizer": opt.state_dict(), "rng": torch.get_rng_state(), "best": float("inf"),
             "pair": (1, "a"), "history": [{"epoch": 1, "val_loss": 0.5}], "none": None}
    path = save_checkpoint(tmp_path / "last.safetensors", model, {"classes": ["a", "b", "c"]}, state)
    ck = load_checkpoint(path)
    assert ck.meta["classes"] == ["a", "b", "c"] and ck.meta["format"] == "imgclf-checkpoint"
    for k, v in model.state_dict().items():
        assert torch.equal(ck.state_dict[k], v)
    ts = ck.train_state
    assert ts["best"] == float("inf") and ts["pair"] == (1, "a") and ts["none"] is None
    assert torch.equal(ts["rng"], state["rng"])
    opt2 = torch.optim.Adam(model.parameters())
    opt2.load_state_dict(ts["optimizer"])  # int keys of optimizer state survive the trip
    assert set(opt2.state_dict()["state"]) == {0, 1, 2, 3}


def test_run_folder_resolves_to_best(tmp_path):
    m = torch.nn.Linear(2, 2)
    save_checkpoint(tmp_path / "last.safetensors", m, {"kind": "last"})
    assert load_checkpoint(tmp_path).meta["kind"] == "last"
    save_checkpoint(tmp_path / "best.safetensors", m, {"kind": "best"})
    assert load_checkpoint(tmp_path).meta["kind"] == "best"
    # runs/NAME/best and runs/NAME/last, without the extension, as Ultralytics users write them
    assert load_checkpoint(tmp_path / "last").meta["kind"] == "last"
    assert load_checkpoint(tmp_path / "best").meta["kind"] == "best"
    with pytest.raises(ImgclfError, match="runs/NAME/best"):
        load_checkpoint(tmp_path / "worst")


def test_pickle_is_refused_and_never_unpickled(tmp_path):
    class Boom:
        def __reduce__(self):
            return (exec, ("open(%r, 'w').write('pwned')" % str(tmp_path / "pwned"),))

    evil = tmp_path / "best.safetensors"
    evil.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(ImgclfError, match="not an imgclf checkpoint"):
        load_checkpoint(evil)
    torch_file = tmp_path / "model.safetensors"
    torch.save(torch.nn.Linear(2, 2).state_dict(), torch_file)  # a torch.save zip/pickle renamed
    with pytest.raises(ImgclfError, match="pickled PyTorch files are refused"):
        load_checkpoint(torch_file)
    assert not (tmp_path / "pwned").exists()


def test_foreign_safetensors_and_missing(tmp_path):
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(ImgclfError, match="no imgclf metadata"):
        load_checkpoint(tmp_path / "x.safetensors")
    with pytest.raises(ImgclfError, match="not found"):
        load_checkpoint(tmp_path / "nope.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImgclfError, match="holds no checkpoint"):
        load_checkpoint(tmp_path / "empty")


def test_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "best.safetensors"
    save_checkpoint(path, torch.nn.Linear(2, 2), {"v": 1})
    import imgclf.checkpoint as ckmod

    def broken_save(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(ckmod, "save_file", broken_save)
    with pytest.raises(OSError):
        save_checkpoint(path, torch.nn.Linear(2, 2), {"v": 2})
    assert load_checkpoint(path).meta["v"] == 1          # old file intact
    assert [p.name for p in tmp_path.iterdir()] == ["best.safetensors"]  # no temp file left
    assert json.loads(json.dumps(load_checkpoint(path).meta))["v"] == 1
