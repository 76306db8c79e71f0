"""FastNet: the whitening layer decorrelates patches; its bias trains early, then freezes."""
import torch

import imgclf
from imgclf.checkpoint import load_checkpoint
from imgclf.models import create_model
from imgclf.training.callbacks import Callback


def test_whitening_layer_decorrelates_patches():
    torch.manual_seed(0)
    # correlated channels: a shared component plus a little noise
    base = torch.randn(64, 1, 16, 16)
    x = torch.cat([base + 0.1 * torch.randn(64, 1, 16, 16) for _ in range(3)], dim=1)
    model = create_model("fastnet-s", num_classes=3, image_size=16)
    model.init_from_data(x)
    w = model.whiten.weight.detach()
    out = torch.nn.functional.conv2d(x, w[: len(w) // 2])  # the first half: the eigenvector filters
    flat = out.permute(0, 2, 3, 1).reshape(-1, out.shape[1])
    cov = flat.T @ flat / len(flat)
    # unit variance where the data has variance, no correlation between the outputs
    assert torch.allclose(cov, torch.diag(torch.diag(cov)), atol=0.05)
    assert cov.diag().max() <= 1.01
    assert torch.equal(w[len(w) // 2:], -w[: len(w) // 2])  # each filter and its negation
    assert not model.whiten.weight.requires_grad


def test_whitening_bias_trains_early_then_freezes(tiny_folder, tmp_path):
    """FastNet's whitening bias trains for stem_bias_epochs (3), its lr decaying to 0, then stops needing a
    gradient; a run stopped after that resumes to the uninterrupted run's weights."""
    class Record(Callback):
        def __init__(self, stop_at=None):
            self.bias, self.stop_at = [], stop_at

        def on_step_end(self, trainer, epoch, step, loss):
            if (epoch, step) == self.stop_at:
                trainer.request_stop()

        def on_epoch_end(self, trainer, row):
            self.bias.append(trainer.model.whiten.bias.detach().clone())
            self.needs_grad = trainer.model.whiten.bias.requires_grad

    kw = dict(data=str(tiny_folder), model="fastnet-s", epochs=5, batch_size=16, project=str(tmp_path),
              progress=False, tta="none")
    rec = Record()
    full = imgclf.train(name="full", callbacks=[rec], **kw)
    b = rec.bias
    assert not torch.equal(b[0], b[1]) and not torch.equal(b[1], b[2])  # epochs 2 and 3 still move it
    assert torch.equal(b[2], b[3]) and torch.equal(b[3], b[4]) and not rec.needs_grad  # frozen from epoch 4
    mid = imgclf.train(name="mid", callbacks=[Record(stop_at=(3, 1))], **kw)
    assert mid.status == "interrupted"
    imgclf.train(resume=mid.run_dir, progress=False)
    a, c = (load_checkpoint(r / "last.safetensors").state_dict for r in (full.run_dir, mid.run_dir))
    assert all(torch.equal(a[k], c[k]) for k in a)
