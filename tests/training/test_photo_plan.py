"""The photo plan: epochs by the folder's size; with a time budget, the crops, frozen depth and epochs that fit."""
import dataclasses

import pytest
import torch

from imgclf import models as imgclf_models
from imgclf.config import TrainConfig
from imgclf.data.probe import ImageProbe
from imgclf.errors import ImgclfError
from imgclf.recipes import resolve
from imgclf.training import photo_plan as P

CPU = torch.device("cpu")


def recipe_cfg(**kw) -> tuple[TrainConfig, TrainConfig]:
    user = TrainConfig(data="photos", **kw)
    return resolve(user, probe=ImageProbe(375))[0], user


def test_epochs_follow_the_folders_size():
    assert P.recipe_epochs(863, 32, 6, 1) == 6        # 27 steps x 5 = 135: the recipe's own
    assert P.recipe_epochs(180, 32, 6, 1) == 1 + 20   # 6 steps an epoch: raised towards 120 steps, at most 20
    assert P.recipe_epochs(1000, 32, 6, 1) == 6
    assert P.recipe_epochs(13_500, 32, 6, 1) == 1 + 2  # at most 40,000 images seen ...
    assert P.recipe_epochs(200_000, 32, 6, 1) == 1 + 2  # ... but never fewer than 2 epochs


@pytest.fixture
def speeds(monkeypatch):
    """Speeds as a fixed function of the frozen depth and crop size (nothing measured): 60 img/s at 128 px with
    5 blocks frozen, 1.5x that with 9, in proportion to the pixels; 100 img/s inference."""
    measured = []

    def train_ips(self, freeze, size):
        measured.append(freeze)
        return 60.0 * (1.5 if freeze == 9 else 1.0) * (128 / size) ** 2

    monkeypatch.setattr(P._Speeds, "train_ips", train_ips)
    monkeypatch.setattr(P._Speeds, "eval_ips", lambda self: 100.0)
    return measured


def plan(seconds_left, n_train=1000, **kw):
    """Planned with ``seconds_left`` of a time budget (None: no budget) left at the time of planning."""
    cfg, user = recipe_cfg(**kw) if seconds_left is None else recipe_cfg(time_budget=1000.0, **kw)
    return P.plan_photos(cfg, user, n_train, 200, 4, 160, CPU,
                         elapsed=lambda: 0.0 if seconds_left is None else 1000.0 - seconds_left)


def test_without_a_budget_the_recipe_is_timed(speeds):
    p = plan(None)
    assert (p.cfg.epochs, p.cfg.progressive, p.cfg.freeze_blocks) == (6, "0.8:0.8", 5)
    # features 10 s, 4 epochs at 128 px (1000/60 each), 1 at 160 px (1000/(60*0.64)), 2 s of evaluation, files
    expected = 10 + 4 * 1000 / 60 + 1000 / (60 * 0.64) + 2 + P.END_SECONDS + 81 / 100  # + the ETA's 2 megapixels
    assert p.seconds == pytest.approx(expected)
    assert p.end_seconds == pytest.approx(2 + P.END_SECONDS)
    assert p.describe(160) == ("efficientnet-lite0, 1 head-only epoch(s) + 5 fine-tuning (128px x4 -> 160px x1), "
                               "stem + 4 blocks frozen, tested at 160px")


def test_a_budget_shrinks_the_crops_then_freezes_more_then_cuts_epochs(speeds):
    full = plan(None).seconds
    as_is = dataclasses.replace(plan(None).cfg, time_budget=1000.0)
    assert plan(full / P.SAFETY + 1).cfg == as_is  # it fits: the recipe as it is
    smaller = plan(full * 0.85 / P.SAFETY).cfg  # the recipe's epochs on smaller crops
    assert smaller.epochs == 6 and smaller.progressive in ("0.7:0.8", "0.6:0.8") and smaller.freeze_blocks == 5
    assert 9 not in speeds  # a deeper frozen backbone was not measured: it was not needed
    tight = plan(71 / P.SAFETY).cfg  # 21 s of features and evaluation; 5 epochs fit only with more frozen
    assert tight.freeze_blocks == 9
    assert (tight.progressive, tight.epochs) == ("0.6:0.8", 6)  # 4 x 6.3 s at 96 px + 17.4 s at 160 px
    tighter = plan(41 / P.SAFETY).cfg  # as many epochs as fit: the last one, at full size
    assert (tighter.freeze_blocks, tighter.epochs) == (9, 2)
    with pytest.raises(ImgclfError, match="raise --time-budget"):
        plan(20)


def test_a_budget_keeps_what_the_user_set(speeds):
    p = plan(60 / P.SAFETY, freeze_blocks=5, progressive="0.8:0.8")
    assert (p.cfg.freeze_blocks, p.cfg.progressive) == (5, "0.8:0.8") and p.cfg.epochs < 6
    assert plan(None, epochs=4).cfg.epochs == 4  # the user's epochs are not the folder's rule's


def test_a_run_longer_than_the_default_budget_is_planned_to_fit_it(speeds):
    big = plan(None, n_train=20_000)  # 2 fine-tuning epochs would take about 18 minutes
    assert big.cfg.time_budget == P.DEFAULT_BUDGET and big.seconds <= P.DEFAULT_BUDGET
    assert big.cfg.epochs == 3 and big.cfg.freeze_blocks == 9
    assert any("planned to end within 14 min" in w for w in big.why)
    assert plan(None, n_train=20_000, epochs=3).cfg.time_budget is None  # the user's epochs stand
    huge = plan(None, n_train=30_000)  # nothing fits 14 minutes: the cheapest plan, said, and no budget
    assert (huge.cfg.epochs, huge.cfg.freeze_blocks, huge.cfg.time_budget) == (2, 9, None)
    assert any("even with 1 epoch" in w for w in huge.why)


def test_speeds_are_measured_on_the_device():
    cfg, _ = recipe_cfg()
    s = P._Speeds(dataclasses.replace(cfg, epochs=2, progressive="0.5:0.5"), 3, 64, CPU)
    assert s.train_ips(5, 32) > 0 and s.eval_ips() > 0
    assert set(s.measured) == {(5, 64)}  # 2 epochs: the only fine-tuning epoch is the last, at full size
    assert s.train_ips(5, 32) == pytest.approx(s.measured[(5, 64)] * 2 ** P.SMALLER_EXPONENT)  # others scaled
    assert s.train_ips(5, 128) == pytest.approx(s.measured[(5, 64)] / 4)  # a larger one by its pixels


def test_a_model_with_nothing_frozen_is_timed_training_not_inference():
    """seed-cnn has no frozen blocks (freeze_blocks None): its training speed is measured, not its inference's."""
    cfg, _ = recipe_cfg(model="seed-cnn")
    s = P._Speeds(dataclasses.replace(cfg, epochs=2, progressive=None, freeze_blocks=None), 3, 32, CPU)
    assert s.train_ips(None, 32) > 0
    assert set(s.measured) == {(0, 32)} and s.eval is None


def test_the_model_the_run_trains_is_the_one_timed():
    """A pruned checkpoint to fine-tune is timed as it is (narrower), not as its full-width namesake; a head of
    other classes is replaced first, as the run does."""
    cfg, _ = recipe_cfg()
    built = []

    def narrow():
        built.append(1)
        return imgclf_models.create_model("seed-cnn-bn", num_classes=7, image_size=32)

    s = P._Speeds(dataclasses.replace(cfg, epochs=2, progressive=None, freeze_blocks=None), 3, 32, CPU, build=narrow)
    assert s.train_ips(None, 32) > 0 and s.eval_ips() > 0 and len(built) == 2
    assert s._model(None).num_classes == 3
