"""imgclf prune: a pruned, fine-tuned run folder that loads, evaluates, predicts, exports and trains on like any
other; bad input in one line."""
import json
import shutil

import pytest
import torch

import imgclf
from imgclf.config import read_config_file
from imgclf.errors import ImgclfError
from imgclf.models import count_params

from support import StopAt, run_cli
from synthetic import colour_folder


@pytest.fixture(scope="module")
def fastnet_run(tmp_path_factory):
    """The default model, trained briefly on a tiny colour folder of 16 px images (FastNet's arithmetic is a quarter
    of its 32 px one)."""
    root = tmp_path_factory.mktemp("prune_src")
    data = colour_folder(root / "data", size=16)
    return imgclf.train(data=str(data), model="fastnet", epochs=1, batch_size=16, project=str(root / "runs"),
                        name="src", progress=False, precision="fp32")


def test_pruned_run_is_a_normal_run(fastnet_run, tmp_path):
    result = imgclf.prune(fastnet_run.run_dir, amount=0.5, project=str(tmp_path), progress=False)
    run = result.run_dir
    assert run == tmp_path / "src-pruned50" and result.status == "finished"
    for name in ("config.toml", "run.json", "metrics.csv", "best.safetensors", "last.safetensors",
                 "pruned.safetensors", "report.html"):
        assert (run / name).is_file(), name
    info = json.loads((run / "run.json").read_text())
    rec = info["pruning"]
    assert rec["amount"] == 0.5 and rec["source"] == str(fastnet_run.run_dir / "best.safetensors")
    assert rec["params_after"] < 0.5 * rec["params_before"] and rec["macs_after"] < 0.5 * rec["macs_before"]
    assert set(rec["kept"]) == {"head", "whiten"} and info["status"] == "finished"
    assert read_config_file(run / "config.toml")["init_from"] == str(run / "pruned.safetensors")

    clf = imgclf.load(run)
    assert clf.meta["arch"]["pruned"] is True and count_params(clf.model) == rec["params_after"]
    assert imgclf.evaluate(run, progress=False, save=False)["top1"] == pytest.approx(info["test_metrics"]["top1"])
    image = next((fastnet_run.run_dir.parent.parent / "data" / "test").rglob("*.png"))
    assert clf.predict([image])[0].label == imgclf.load(fastnet_run.run_dir).predict([image])[0].label
    report = imgclf.export(run, speed=False, progress=False)
    onnx = next(r for r in report.rows if r.name == "onnx fp32")
    assert onnx.agreement == 1.0 and onnx.max_logit_diff < 1e-4
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    torch.testing.assert_close(imgclf.load(report.out).logits(x), clf.logits(x), atol=1e-4, rtol=1e-4)

    # a pruned run starts another: its narrower layers are rebuilt from the weights' shapes
    again = imgclf.train(data=str(fastnet_run.run_dir.parent.parent / "data"), init_from=str(run), epochs=1,
                         batch_size=16, project=str(tmp_path), name="again", progress=False, precision="fp32")
    assert count_params(imgclf.load(again.run_dir).model) == rec["params_after"]


def test_cli_prunes_the_seed_cnn(tiny_run, tmp_path, capsys):
    code, out, err = run_cli(capsys, "prune", str(tiny_run.run_dir), "--amount", "0.25", "--epochs", "1",
                             "--project", str(tmp_path), "--name", "p", "--no-progress")
    assert code == 0, err
    assert out.strip().splitlines()[-1] == str(tmp_path / "p")
    assert "parameters 159,299 -> " in out and "kept whole: head.1 (its outputs are the classes)" in out
    assert imgclf.load(tmp_path / "p").meta["arch"]["pruned"] is True


@pytest.mark.parametrize("args, message", [
    (["--amount", "1.5"], "--amount must be a fraction of the channels strictly between 0 and 1"),
    (["--amount", "0"], "strictly between 0 and 1"),
    (["--epochs", "0"], "--epochs must be a positive number"),
    (["--importance", "random"], "importance must be taylor or magnitude"),
])
def test_bad_input_is_one_line(tiny_run, tmp_path, capsys, args, message):
    code, out, err = run_cli(capsys, "prune", str(tiny_run.run_dir), *args, "--project", str(tmp_path))
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not list(tmp_path.iterdir())  # nothing written


def test_a_checkpoint_without_its_run_folder_is_refused(tiny_run, tiny_onnx, tmp_path):
    lone = tmp_path / "lone.safetensors"
    shutil.copy(tiny_run.run_dir / "best.safetensors", lone)
    with pytest.raises(ImgclfError, match="has no config.toml: prune fine-tunes with the run's own settings"):
        imgclf.prune(lone, 0.5)
    onnx_run = tmp_path / "onnx"
    onnx_run.mkdir()
    shutil.copy(tiny_onnx[1], onnx_run / "best.onnx")
    shutil.copy(tiny_run.run_dir / "config.toml", onnx_run / "config.toml")
    with pytest.raises(ImgclfError, match="prune needs a run folder or .safetensors checkpoint, not an ONNX file"):
        imgclf.prune(onnx_run / "best.onnx", 0.5)


def test_an_interrupted_fine_tune_resumes(tiny_run, tmp_path):
    stopped = imgclf.prune(tiny_run.run_dir, 0.5, epochs=2, project=str(tmp_path), progress=False,
                           callbacks=[StopAt(0, 1)])
    assert stopped.status == "interrupted"
    done = imgclf.train(resume=stopped.run_dir, progress=False)
    info = json.loads((done.run_dir / "run.json").read_text())
    assert done.status == "finished" and done.epochs_done == 2 and info["pruning"]["amount"] == 0.5
    assert count_params(imgclf.load(done.run_dir).model) == info["pruning"]["params_after"]


def test_the_fine_tune_trains_every_layer_for_as_long_as_the_recipe_needs():
    """A pretrained fine-tune (the photo recipe) is repeated in full, a run from scratch gets an eighth; no block
    stays frozen, since every block was cut."""
    from imgclf.data.probe import ImageProbe
    from imgclf.recipes import resolve
    from imgclf.training.prune import FINE_TUNE, default_epochs

    photo, _ = resolve(imgclf.TrainConfig(data="photos"), probe=ImageProbe(375))
    fast, _ = resolve(imgclf.TrainConfig(data="cifar10", epochs=16), probe=ImageProbe(32))
    seed, _ = resolve(imgclf.TrainConfig(recipe="seed"), probe=ImageProbe(32))
    assert (default_epochs(photo), default_epochs(fast), default_epochs(seed)) == (5, 2, 1)
    assert FINE_TUNE["freeze_blocks"] == 0 and FINE_TUNE["freeze_epochs"] == 0
