"""TrainConfig: recipes chosen from the data, config files, flags over files, clear errors, help written once."""
import json

import pytest

from imgclf.config import TrainConfig, read_config_file
from imgclf.data.probe import ImageProbe
from imgclf.errors import ImgclfError

from support import run_cli


def test_defaults_are_the_fast_recipe_for_small_images():
    from imgclf.recipes import resolve
    cfg, why = resolve(TrainConfig(), probe=ImageProbe(32))
    assert (cfg.data, cfg.model, cfg.optimizer, cfg.schedule, cfg.augment) == ("cifar10", "fastnet", "muon", "linear",
                                                                              "fast")
    assert cfg.recipe == "fast" and cfg.tta == "flip+translate" and cfg.val_every == 0 and "FastNet" in why[0]
    assert resolve(TrainConfig(epochs=3), probe=ImageProbe(32))[0].epochs == 3  # the user's value wins


def test_seed_recipe_is_one_flag_away():
    from imgclf.recipes import resolve
    cfg, why = resolve(TrainConfig(recipe="seed"), probe=ImageProbe(32))
    assert (cfg.model, cfg.optimizer, cfg.batch_size, cfg.epochs, cfg.augment) == ("seed-cnn", "adam", 64, 10, "none")
    assert cfg.resolved_lr() == 1e-3 and cfg.tta is None and cfg.val_every is None
    sgd, _ = resolve(TrainConfig(recipe="seed", optimizer="sgd"), probe=ImageProbe(32))
    assert sgd.lr == 0.05  # the recipe's Adam lr is not given to another optimizer


def test_fast_recipe_leaves_mirror_images_out_for_characters(tmp_path):
    from PIL import Image

    from imgclf.data.probe import probe_images
    from imgclf.recipes import resolve
    digits, why = resolve(TrainConfig(data="mnist"), probe=ImageProbe(28, 1, mirror_safe=False))
    assert (digits.augment, digits.tta) == ("shift", "translate") and any("mirror" in w for w in why)
    grey, _ = resolve(TrainConfig(), probe=ImageProbe(28, 1))  # unknown small greyscale: taken for characters
    assert (grey.augment, grey.tta) == ("shift", "translate")
    for safe in (ImageProbe(28, 1, mirror_safe=True), ImageProbe(32, 3), ImageProbe()):  # fashion, colour, unknown
        assert (resolve(TrainConfig(), probe=safe)[0].augment, resolve(TrainConfig(), probe=safe)[0].tta) == (
            "fast", "flip+translate")
    mine, _ = resolve(TrainConfig(augment="fast"), probe=ImageProbe(28, 1, mirror_safe=False))
    assert (mine.augment, mine.tta) == ("fast", "translate")  # the user's choice wins, the rest still follows
    assert probe_images("mnist") == ImageProbe(28, 1, False) and probe_images("fashion-mnist").mirror_safe
    for i in range(3):
        (tmp_path / "a").mkdir(exist_ok=True)
        Image.new("L", (28, 28), i * 40).save(tmp_path / "a" / f"{i}.png")
    assert probe_images(str(tmp_path)) == ImageProbe(28, 1, None)
    Image.new("RGB", (28, 28)).save(tmp_path / "a" / "c.png")
    assert probe_images(str(tmp_path)).channels == 1  # most images decide


def test_durations():
    from imgclf.config import parse_duration
    assert [parse_duration(t) for t in ("300", "90s", "5m", "1.5h", 42)] == [300, 90, 300, 5400, 42]
    assert TrainConfig.from_sources(overrides={"time_budget": "2m"}).time_budget == 120
    for bad in ("5 minutes", "m", ""):
        with pytest.raises(ImgclfError, match="duration"):
            parse_duration(bad)
    with pytest.raises(ImgclfError, match="time_budget"):
        TrainConfig(time_budget=-1.0)
    with pytest.raises(ImgclfError, match="val_every"):
        TrainConfig(val_every=-1)
    with pytest.raises(ImgclfError, match="tta"):
        TrainConfig(tta="rotate")


def test_photo_recipe_for_large_images():
    from imgclf.recipes import resolve
    cfg, why = resolve(TrainConfig(data="photos"), probe=ImageProbe(375))
    assert (cfg.recipe, cfg.model, cfg.pretrained, cfg.image_size) == ("photo", "efficientnet-lite0", "imagenet", 160)
    assert cfg.freeze_epochs == 1 and cfg.augment == "photo"
    assert (cfg.freeze_blocks, cfg.progressive) == (5, "0.8:0.8")  # less work per epoch
    assert cfg.val_every == 0  # the run keeps the last epoch's weights, as fine_tune does
    assert any("160px" in w for w in why)
    small, _ = resolve(TrainConfig(data="photos"), probe=ImageProbe(100))
    assert small.image_size == 96
    # photos of about 150 px (their median shorter side 143-150): 144 px, not 128
    assert {resolve(TrainConfig(data="photos"), probe=ImageProbe(n))[0].image_size for n in (143, 150)} == {144}
    mine, _ = resolve(TrainConfig(data="photos", model="seed-cnn"), probe=ImageProbe(375))
    assert mine.model == "seed-cnn" and mine.pretrained is None and mine.freeze_blocks is None
    # from scratch: no head-only epoch; one input size (flatten -> dense): no progressive resizing
    assert (mine.freeze_epochs, mine.progressive) == (0, "none")
    fast, _ = resolve(TrainConfig(data="photos", model="fastnet"), probe=ImageProbe(375))
    assert (fast.freeze_epochs, fast.progressive) == (0, "0.8:0.8")  # any size: the recipe's crops stay
    larger, _ = resolve(TrainConfig(data="photos", model="efficientnet-lite2"), probe=ImageProbe(375))
    assert (larger.pretrained, larger.freeze_blocks) == ("imagenet", 5)  # it has ImageNet weights too
    scratch, _ = resolve(TrainConfig(data="photos", pretrained="none"), probe=ImageProbe(375))
    assert scratch.freeze_blocks is None  # nothing pretrained to keep
    # a short --epochs shortens the recipe's head-only phase; the user's own --freeze-epochs is checked
    quick, why = resolve(TrainConfig(recipe="photo", epochs=1), probe=ImageProbe(375))
    assert quick.freeze_epochs == 0 and any("0 head-only epochs" in w for w in why)
    assert resolve(TrainConfig(recipe="photo", epochs=2), probe=ImageProbe(375))[0].freeze_epochs == 1
    with pytest.raises(ImgclfError, match="freeze-epochs"):
        resolve(TrainConfig(recipe="photo", epochs=2, freeze_epochs=2), probe=ImageProbe(375))


def test_file_then_overrides(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('epochs = 3\nbatch-size = 32\nlr = 1\nmodel = "resnet18"\n')
    cfg = TrainConfig.from_sources(f, {"epochs": 5, "model": None})
    assert cfg.epochs == 5            # flag beats file
    assert cfg.batch_size == 32       # file beats default; dashes accepted
    assert cfg.model == "resnet18"    # None override = not given
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)


def test_unknown_key_names_nearest(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text("epoch = 3\n")
    with pytest.raises(ImgclfError, match="did you mean 'epochs'"):
        TrainConfig.from_sources(f)
    with pytest.raises(ImgclfError, match="did you mean 'batch_size'"):
        TrainConfig.from_sources(overrides={"bach_size": 3})


@pytest.mark.parametrize("bad, match", [
    ({"epochs": 0}, "epochs must be at least 1"),
    ({"optimizer": "rmsprop"}, "optimizer must be one of"),
    ({"val_split": 1.5}, "val_split"),
    ({"lr": -1.0}, "lr must be a positive"),
    ({"epochs": "ten"}, "must be int"),
    ({"name": "a/b"}, "plain folder name"),
])
def test_bad_values_are_clear(bad, match):
    with pytest.raises(ImgclfError, match=match):
        TrainConfig(**bad)


def test_toml_round_trip(tmp_path):
    cfg = TrainConfig(epochs=3, lr=0.01, data="some dir/with \"quotes\"", restore_best=False, image_size=40)
    f = tmp_path / "config.toml"
    f.write_text(cfg.to_toml())
    assert TrainConfig.from_sources(f) == cfg


def test_json_config_and_bad_files(tmp_path):
    j = tmp_path / "c.json"
    j.write_text(json.dumps({"epochs": 2}))
    assert TrainConfig.from_sources(j).epochs == 2
    bad = tmp_path / "bad.toml"
    bad.write_text("epochs = = 2")
    with pytest.raises(ImgclfError, match="not valid"):
        read_config_file(bad)
    with pytest.raises(ImgclfError, match="not found"):
        read_config_file(tmp_path / "missing.toml")


def test_every_setting_is_described_once_and_the_cli_shows_it(capsys):
    """Each TrainConfig field's comment in config.py is its description; `imgclf train --help` shows that
    text, so a flag's help is written in one place."""
    from dataclasses import fields

    from imgclf.config import TrainConfig, field_help

    helps = field_help()
    assert set(helps) == {f.name for f in fields(TrainConfig)} and all(len(h) > 8 for h in helps.values())
    assert helps["progressive"].endswith('the rest full; "none".')  # a comment continued over two lines
    code, out, _ = run_cli(capsys, "train", "--help")
    flat = " ".join(out.split())
    assert code == 0 and " ".join(helps["time_budget"].split()) in flat and " ".join(helps["data"].split()) in flat
