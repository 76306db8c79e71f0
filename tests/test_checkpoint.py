"""Checkpoints: safetensors round trips, atomic writes, pickles refused and never unpickled."""
import contextlib
import json
import math
import pickle
import struct
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import imgclf
from imgclf.checkpoint import Checkpoint, DamagedCheckpoint, load_checkpoint, save_checkpoint
from imgclf.errors import ImgclfError
from imgclf.models import create_model

from support import run_cli


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


# ---------------------------------------------------------------------------------------------- hostile files
# Crafted and damaged checkpoints: every one is refused with one ImgclfError line naming the file, before any of
# its metadata is believed (no huge allocation, no traceback).


def _model():
    torch.manual_seed(0)
    return create_model("seed-cnn", 3, image_size=22)  # the smallest registered network: 94k parameters


def _meta(model) -> dict:
    return {"kind": "last", "arch": model.arch_args, "classes": ["blue", "green", "red"],
            "preprocess": {"image_size": 22, "channels": 3, "mean": [0.4, 0.4, 0.4], "std": [0.3, 0.3, 0.3],
                           "resize": "shorter-center-crop"},
            "channels_last": True, "epoch": 1, "metrics": {"val_loss": 0.5}, "best": {"epoch": 1},
            "data": {"source": "/nowhere", "name": "x", "builtin": None, "val_split": 0.0, "test_split": 0.0,
                     "seed": 0, "skip_bad_images": False, "image_size": None, "channels": None}}


def _train_state(model) -> dict:
    """What TrainState.to_checkpoint writes: an Adam state after one step, generator states, counters."""
    opt = torch.optim.Adam(model.parameters())
    model(torch.zeros(2, 3, 22, 22)).sum().backward()
    opt.step()
    return {"epoch": 1, "step": 0, "sums": [0.0, 0, 0], "best_score": 0.5, "best_epoch": 1, "bad_epochs": 0,
            "history": [{"epoch": 1, "val_loss": 0.5}], "optimizer": opt.state_dict(), "scheduler": None,
            "rng": {"torch": torch.get_rng_state(), "shuffle": torch.Generator().get_state(),
                    "augment": torch.Generator().get_state(), "device": "cpu", "cuda": None}}


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A valid `last` checkpoint of the small network, with its training state."""
    model = _model()
    return save_checkpoint(tmp_path_factory.mktemp("good") / "last.safetensors", model, _meta(model),
                           _train_state(model))


def _parts(path):
    """-> (tensors, raw metadata strings, imgclf meta as a dict, training-state skeleton as a dict)."""
    with safe_open(str(path), "pt") as f:
        raw = dict(f.metadata())
    return load_file(str(path)), raw, json.loads(raw["imgclf"]), json.loads(raw["imgclf_train_state"])


def _write(out, tensors, raw=None, meta=None, skeleton=None):
    raw = dict(raw)
    if meta is not None:
        raw["imgclf"] = json.dumps(meta)
    if skeleton is not None:
        raw["imgclf_train_state"] = json.dumps(skeleton)
    save_file(tensors, str(out), metadata=raw)
    return out


def _craft(good, out, edit=None, edit_tensors=None, edit_skeleton=None, raw_meta=None):
    tensors, raw, meta, skeleton = _parts(good)
    if edit:
        edit(meta)
    if edit_tensors:
        edit_tensors(tensors)
    if edit_skeleton:
        edit_skeleton(skeleton)
    if raw_meta is not None:
        raw.update(raw_meta)
        meta = skeleton = None
    return _write(out, tensors, raw, meta, skeleton)


def _bytes(good, out, change):
    out.write_bytes(change(good.read_bytes()))
    return out


def _header_len(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


def _set(path: str, value):
    """An editor of the meta: _set("arch.num_classes", 10**9)(meta)."""
    def edit(d):
        *parents, last = path.split(".")
        for p in parents:
            d = d[p]
        if value is _DELETE:
            del d[last]
        else:
            d[last] = value
    return edit


_DELETE = object()
_CORPUS = {  # name -> (maker(good, out), what the message says)
    "image_size_60000": (lambda g, o: _craft(g, o, lambda m: (_set("arch.image_size", 60000)(m),
                                                               _set("preprocess.image_size", 60000)(m))),
                         "arch.image_size must be an integer in 8..2,048"),
    "num_classes_1e9": (lambda g, o: _craft(g, o, _set("arch.num_classes", 10**9)), "arch.num_classes"),
    "num_classes_float": (lambda g, o: _craft(g, o, _set("arch.num_classes", 3.0)), "arch.num_classes"),
    "classes_wrong_length": (lambda g, o: _craft(g, o, _set("classes", ["a", "b"])), "2 class names"),
    "classes_repeated": (lambda g, o: _craft(g, o, _set("classes", ["a", "b", "a"])), "repeated"),
    "classes_empty_name": (lambda g, o: _craft(g, o, _set("classes", ["a", "", "c"])), "classes[1]"),
    "classes_long_name": (lambda g, o: _craft(g, o, _set("classes", ["a", "b", "c" * 1001])), "classes[2]"),
    "classes_not_list": (lambda g, o: _craft(g, o, _set("classes", "abc")), "classes must be a list"),
    "non_json_meta": (lambda g, o: _craft(g, o, raw_meta={"imgclf": '{"format": "imgclf-checkpoint", '}),
                      "not valid JSON"),
    "meta_not_object": (lambda g, o: _craft(g, o, raw_meta={"imgclf": "[1, 2]"}), "not a JSON object"),
    "meta_nested_100k": (lambda g, o: _craft(g, o, raw_meta={"imgclf": "[" * 100_000 + "]" * 100_000}),
                         "nested"),
    "meta_nested_40": (lambda g, o: _craft(g, o, _set("metrics", json.loads('{"a":' * 40 + "1" + "}" * 40))),
                       "nested more than 32"),
    "meta_too_long": (lambda g, o: _craft(g, o, _set("notes", "x" * (17 * 2**20))), "characters long"),
    "train_state_nested_100k": (lambda g, o: _craft(g, o, raw_meta={"imgclf_train_state": '{"a":' * 100_000}),
                                "nested"),
    "missing_preprocess": (lambda g, o: _craft(g, o, _set("preprocess", _DELETE)), "lacks preprocess"),
    "missing_std": (lambda g, o: _craft(g, o, _set("preprocess.std", _DELETE)), "lacks std"),
    "missing_num_classes": (lambda g, o: _craft(g, o, _set("arch.num_classes", _DELETE)), "lacks num_classes"),
    "unknown_model": (lambda g, o: _craft(g, o, _set("arch.name", "alexnet")), "not a model this imgclf knows"),
    "model_refuses_size": (lambda g, o: _craft(g, o, lambda m: (_set("arch.image_size", 8)(m),
                                                                 _set("preprocess.image_size", 8)(m))),
                           "does not build"),
    "unknown_option": (lambda g, o: _craft(g, o, _set("arch.depth", 7)), "does not build"),
    "pretrained_in_arch": (lambda g, o: _craft(g, o, _set("arch.pretrained", "imagenet")), "arch.pretrained"),
    "format_missing": (lambda g, o: _craft(g, o, _set("format", _DELETE)), "lacks its format"),
    "dropout_string": (lambda g, o: _craft(g, o, _set("arch.dropout", "half")), "arch.dropout"),
    "channels_2": (lambda g, o: _craft(g, o, _set("preprocess.channels", 2)), "preprocess.channels"),
    "channels_disagree": (lambda g, o: _craft(g, o, lambda m: (_set("preprocess.channels", 1)(m),
                                                                _set("preprocess.mean", [0.5])(m),
                                                                _set("preprocess.std", [0.5])(m))),
                          "in_channels"),
    "mean_wrong_length": (lambda g, o: _craft(g, o, _set("preprocess.mean", [0.5])), "preprocess.mean"),
    "mean_string": (lambda g, o: _craft(g, o, _set("preprocess.mean", "abc")), "preprocess.mean"),
    "std_zero": (lambda g, o: _craft(g, o, _set("preprocess.std", [0.3, 0.0, 0.3])), "preprocess.std[1]"),
    "std_nan": (lambda g, o: _craft(g, o, _set("preprocess.std", [0.3, math.nan, 0.3])), "preprocess.std[1]"),
    "resize_unknown": (lambda g, o: _craft(g, o, _set("preprocess.resize", "stretch")), "preprocess.resize"),
    "preprocess_extra_field": (lambda g, o: _craft(g, o, _set("preprocess.gamma", 2.2)), "unknown fields"),
    "size_fixed_model": (lambda g, o: _craft(g, o, _set("preprocess.image_size", 64)), "one input size"),
    "channels_last_string": (lambda g, o: _craft(g, o, _set("channels_last", "yes")), "channels_last"),
    "temperature_string": (lambda g, o: _craft(g, o, _set("temperature", "hot")), "temperature"),
    "data_image_size_huge": (lambda g, o: _craft(g, o, _set("data.image_size", 60000)), "data.image_size"),
    "data_not_dict": (lambda g, o: _craft(g, o, _set("data", [1])), "data must be a JSON object"),
    "format_version_string": (lambda g, o: _craft(g, o, _set("format_version", "1")), "format_version"),
    "shape_mismatch": (lambda g, o: _craft(g, o, edit_tensors=lambda t: t.update(
        {"head.1.weight": torch.zeros(4, 128), "head.1.bias": torch.zeros(4)})), "head.1"),
    "arch_disagrees_with_weights": (lambda g, o: _craft(g, o, lambda m: (_set("arch.num_classes", 4)(m),
                                                                          _set("classes", list("abcd"))(m))),
                                    "shape"),
    "missing_weight": (lambda g, o: _craft(g, o, edit_tensors=lambda t: t.pop("head.1.bias")), "missing"),
    "unexpected_weight": (lambda g, o: _craft(g, o, edit_tensors=lambda t: t.update(extra=torch.zeros(1))),
                          "unexpected"),
    "int_weights": (lambda g, o: _craft(g, o, edit_tensors=lambda t: t.update(
        {"head.1.bias": torch.zeros(3, dtype=torch.int32)})), "stored as"),
    "nan_weights": (lambda g, o: _craft(g, o, edit_tensors=lambda t: t["features.0.weight"].view(-1)
                                        .__setitem__(5, math.nan)), "weights are damaged"),
    "inf_weights": (lambda g, o: _craft(g, o, edit_tensors=lambda t: t["head.1.bias"]
                                        .__setitem__(0, -math.inf)), "weights are damaged"),
    "truncated": (lambda g, o: _bytes(g, o, lambda b: b[: len(b) // 2]), "truncated or garbled"),
    "truncated_in_header": (lambda g, o: _bytes(g, o, lambda b: b[:200]), "truncated or garbled"),
    "header_longer_than_file": (lambda g, o: _bytes(g, o, lambda b: struct.pack("<Q", len(b) + 100) + b[8:]),
                                "truncated or garbled"),
    "header_garbled": (lambda g, o: _bytes(g, o, lambda b: b[:8] + b"{" + b"\xff" * 50 + b[59:]),
                       "truncated or garbled"),
    "offsets_outside_file": (lambda g, o: _bytes(g, o, lambda b: b.replace(b'"data_offsets":[0,', b'"data_offsets":[9,',
                                                                           1)), "truncated or garbled"),
    "empty_file": (lambda g, o: _bytes(g, o, lambda b: b""), "truncated or garbled"),
    "train_state_missing_tensor": (lambda g, o: _craft(g, o, edit_skeleton=lambda s: s["rng"].update(
        torch={"__tensor__": "train/999"})), "train/999"),
    "train_state_model_tensor": (lambda g, o: _craft(g, o, edit_skeleton=lambda s: s["rng"].update(
        torch={"__tensor__": "head.1.bias"})), "head.1.bias"),
    "train_state_missing_key": (lambda g, o: _craft(g, o, edit_skeleton=lambda s: s.pop("epoch")), "lacks epoch"),
    "train_state_wrong_type": (lambda g, o: _craft(g, o, edit_skeleton=lambda s: s.update(step="3")),
                               "train_state.step"),
    "train_state_not_object": (lambda g, o: _craft(g, o, edit_skeleton=lambda s: s.clear()), "lacks"),
    "train_state_rng_wrong": (lambda g, o: _craft(g, o, edit_skeleton=lambda s: s["rng"].update(
        torch=s["optimizer"]["state"]["__items__"][0][1]["exp_avg"])), "rng.torch"),
    "train_state_unhashable_key": (lambda g, o: _craft(g, o, edit_skeleton=lambda s: s["optimizer"]["state"]
                                                       ["__items__"][0].__setitem__(0, [1, 2])), "mapping"),
    "train_state_param_ids": (lambda g, o: _craft(g, o, edit_skeleton=lambda s: s["optimizer"]["param_groups"][0]
                                                  .update(params=[0, 0])), "optimizer"),
}


@pytest.mark.parametrize("name", sorted(_CORPUS))
def test_crafted_checkpoint_is_refused_in_one_line(name, good, tmp_path):
    make, says = _CORPUS[name]
    path = make(good, tmp_path / f"{name}.safetensors")
    with pytest.raises(ImgclfError) as err:
        load_checkpoint(path)
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg and says in msg, msg
    assert len(msg) < 600, msg
    assert isinstance(err.value, DamagedCheckpoint) and err.value.path == path  # imgclf's, but damaged


def test_good_checkpoint_loads_and_damaged_is_picklable(good, tmp_path):
    ck = load_checkpoint(good)
    assert ck.train_state["epoch"] == 1 and ck.meta["arch"]["name"] == "seed-cnn"
    assert isinstance(ck.train_state["optimizer"]["state"][0]["exp_avg"], torch.Tensor)
    assert imgclf.load(good).classes == ["blue", "green", "red"]
    e = pickle.loads(pickle.dumps(DamagedCheckpoint(good, "test")))
    assert isinstance(e, DamagedCheckpoint) and e.path == good and e.reason == "test" and str(good) in str(e)


def test_not_imgclf_or_newer_is_not_called_damaged(good, tmp_path):
    """Foreign files and newer formats get their own advice, not DamagedCheckpoint's."""
    newer = _craft(good, tmp_path / "newer.safetensors", _set("format_version", 99))
    with pytest.raises(ImgclfError, match="upgrade imgclf") as err:
        load_checkpoint(newer)
    assert not isinstance(err.value, DamagedCheckpoint)
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, this is not a checkpoint\n")
    with pytest.raises(ImgclfError, match="not an imgclf checkpoint") as err:
        load_checkpoint(text)
    assert not isinstance(err.value, DamagedCheckpoint) and "\n" not in str(err.value)


def test_memory_error_and_odd_files_are_one_line(good, tmp_path, monkeypatch):
    import os

    import imgclf.checkpoint as ckmod

    fifo = tmp_path / "fifo.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(ImgclfError, match="not a regular file"):
        load_checkpoint(fifo)  # refused, not read (a read would wait for a writer forever)

    class Starved:
        def __init__(self, *args, **kwargs):
            self.f = safe_open(*args, **kwargs)

        def __enter__(self):
            self.inner = self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def get_tensor(self, key):
            raise MemoryError

    monkeypatch.setattr(ckmod, "safe_open", Starved)
    with pytest.raises(ImgclfError, match="not enough memory") as err:
        load_checkpoint(good)
    assert str(good) in str(err.value) and "\n" not in str(err.value)


def test_cli_on_crafted_checkpoint_exits_2_in_one_line(good, tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (22, 22), (200, 40, 40)).save(tmp_path / "red.png")
    for name in ("num_classes_1e9", "meta_nested_100k", "truncated", "nan_weights"):
        path = _CORPUS[name][0](good, tmp_path / f"{name}.safetensors")
        for args in (("predict", str(path), str(tmp_path / "red.png")), ("evaluate", str(path), "--no-progress")):
            code, out, err = run_cli(capsys, *args)
            assert code == 2 and "Traceback" not in out + err, (args, out, err)
            assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and str(path) in err, err


def test_crafted_sizes_keep_memory_small(good, tmp_path):
    """The 640 KB file asking for 60000 px images or 10^9 classes is refused before anything is allocated."""
    paths = [_CORPUS[n][0](good, tmp_path / f"{n}.safetensors") for n in ("image_size_60000", "num_classes_1e9")]
    huge = _craft(good, tmp_path / "both.safetensors", lambda m: (
        _set("arch.image_size", 60000)(m), _set("preprocess.image_size", 60000)(m),
        _set("arch.num_classes", 10**9)(m), _set("classes", [f"c{i}" for i in range(3)])(m)))
    code = ("import sys\n"
            "import imgclf\n"
            "from imgclf.errors import ImgclfError\n"
            "for p in sys.argv[1:]:\n"
            "    try:\n"
            "        imgclf.load(p)\n"
            "    except ImgclfError as e:\n"
            "        print('refused', e)\n"
            # VmHWM, not ru_maxrss: the latter keeps the high-water mark of the forked pytest before exec
            "print(next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith('VmHWM')))\n")
    proc = subprocess.run([sys.executable, "-c", code, *map(str, paths + [huge])], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert sum(line.startswith("refused") for line in lines) == 3, proc.stdout
    assert int(lines[-1]) * 1024 < 2**30, f"peak RSS {int(lines[-1]) / 1024:.0f} MB"


def test_meta_build_matches_real_build():
    """The check builds networks on the meta device with their initialisation skipped; shapes must not change."""
    from imgclf.checkpoint_check import _meta_model
    from imgclf.models import list_models

    for name in list_models():
        for args in ({"num_classes": 10}, {"num_classes": 7, "in_channels": 1, "image_size": 48}):
            meta = _meta_model({"name": name, **args}).state_dict()
            real = create_model(name, **args).state_dict()
            assert {k: (v.shape, v.dtype) for k, v in meta.items()} == {k: (v.shape, v.dtype) for k, v in real.items()}


def test_onnx_metadata_is_checked_too(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    from imgclf.onnx_runtime import load_onnx, save_onnx

    graph = helper.make_graph([helper.make_node("Identity", ["image"], ["logits"])], "g",
                              [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", 3, 22, 22])],
                              [helper.make_tensor_value_info("logits", TensorProto.UINT8, ["N", 3, 22, 22])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    meta = _meta(_model())
    save_onnx(onnx.ModelProto.FromString(model.SerializeToString()), tmp_path / "ok.onnx", {"imgclf": json.dumps(meta)})
    assert load_onnx(tmp_path / "ok.onnx", threads=1).classes == ["blue", "green", "red"]
    for name, bad in (("huge", {**meta, "arch": {**meta["arch"], "num_classes": 10**9}}),
                      ("noclasses", {k: v for k, v in meta.items() if k != "classes"}), ("deep", "[" * 100_000)):
        path = save_onnx(onnx.ModelProto.FromString(model.SerializeToString()), tmp_path / f"{name}.onnx",
                         {"imgclf": bad if isinstance(bad, str) else json.dumps(bad)})
        with pytest.raises(ImgclfError, match="imgclf metadata is damaged") as err:
            load_onnx(path, threads=1)
        assert str(path) in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------- properties
def _loads_or_refuses(path):
    """load_checkpoint returns, or raises ImgclfError; what it returns, imgclf.load can use or refuse."""
    try:
        ck = load_checkpoint(path)
    except ImgclfError as e:
        assert "\n" not in str(e) and str(path) in str(e)
        return
    assert isinstance(ck, Checkpoint)
    if "arch" in ck.meta:
        with contextlib.suppress(ImgclfError):
            imgclf.load(path)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**12), 10**12) | st.floats(allow_subnormal=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
_FIELDS = ["arch", "classes", "preprocess", "data", "channels_last", "temperature", "format", "format_version",
           "epoch", "metrics", "arch.name", "arch.num_classes", "arch.in_channels", "arch.image_size", "arch.dropout",
           "preprocess.image_size", "preprocess.channels", "preprocess.mean", "preprocess.std", "preprocess.resize",
           "data.image_size", "data.source", "data.channels"]
_TRAIN_FIELDS = ["epoch", "step", "sums", "best_score", "best_epoch", "bad_epochs", "history", "rng", "optimizer",
                 "scheduler", "rng.torch", "rng.augment", "rng.shuffle", "rng.device", "rng.cuda",
                 "optimizer.state", "optimizer.param_groups"]


@pytest.fixture(scope="module")
def good_parts(good):
    return good.read_bytes(), _parts(good)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.sampled_from(["flip", "insert", "delete", "truncate"]),
                                st.one_of(st.integers(0, 4000), st.integers(0, 10**6)), st.integers(0, 255)),
                      min_size=1, max_size=4))
def test_mutated_bytes_load_or_refuse(edits, good_parts, tmp_path_factory):
    data = bytearray(good_parts[0])
    for kind, pos, byte in edits:
        pos = pos % (len(data) + 1)
        if kind == "flip" and pos < len(data):
            data[pos] ^= byte or 1
        elif kind == "insert":
            data[pos:pos] = bytes([byte])
        elif kind == "delete":
            del data[pos:pos + 1 + byte % 4]
        elif kind == "truncate":
            del data[pos:]
    path = tmp_path_factory.getbasetemp() / "mutated.safetensors"
    path.write_bytes(bytes(data))
    _loads_or_refuses(path)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(where=st.sampled_from(["meta", "train"]), field=st.integers(0, 100), value=_JSON, whole=st.booleans())
def test_random_json_metadata_loads_or_refuses(where, field, value, whole, good_parts, tmp_path_factory):
    tensors, raw, meta, skeleton = good_parts[1]
    meta, skeleton = json.loads(json.dumps(meta)), json.loads(json.dumps(skeleton))  # fresh copies
    target, fields = (meta, _FIELDS) if where == "meta" else (skeleton, _TRAIN_FIELDS)
    if whole:
        target = value
    else:
        _set(fields[field % len(fields)], value)(target)
    if where == "meta":
        meta = target
    else:
        skeleton = target
    path = _write(tmp_path_factory.getbasetemp() / "random.safetensors", tensors, raw, meta, skeleton)
    _loads_or_refuses(path)
