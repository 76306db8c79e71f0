"""Muon: Newton-Schulz orthogonalisation (bf16 only where native) and the optimizer on a small problem."""
import torch

from imgclf.training.optim import Muon, orthogonalize


def test_orthogonalize_flattens_the_spectrum():
    torch.manual_seed(0)
    g = torch.randn(64, 576) @ torch.diag(torch.logspace(-3, 0, 576))  # very uneven singular values
    s = torch.linalg.svdvals(orthogonalize(g, steps=5).float())
    assert s.min() > 0.3 and s.max() < 1.3  # roughly semi-orthogonal, as Muon needs (not exactly 1)
    tall = orthogonalize(torch.randn(300, 20))
    assert tall.shape == (300, 20)


def test_orthogonalize_runs_in_bf16_only_where_it_is_native(monkeypatch):
    """AVX2-only CPUs emulate bf16 matrix products (50x slower than float32 there): the iteration uses float32."""
    from imgclf.training import optim

    for native, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        optim._native_bf16.cache_clear()
        monkeypatch.setattr(optim, "native_bf16", lambda device, native=native: native)
        assert optim.iteration_dtype(torch.device("cpu")) == dtype
        assert orthogonalize(torch.randn(8, 16)).dtype == dtype
    optim._native_bf16.cache_clear()


def test_muon_fits_a_small_problem_and_normalizes_filters():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16, bias=False), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                              torch.nn.Linear(16, 2))
    x, y = torch.randn(256, 8), (torch.randn(256, 8).sum(1) > 0).long()
    y = (x[:, 0] + x[:, 1] > 0).long()
    opt = Muon([{"params": [net[0].weight], "muon": True, "lr": 0.05, "momentum": 0.6, "normalize": True},
                {"params": [p for p in net.parameters() if p is not net[0].weight], "lr": 0.1, "momentum": 0.9}])
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2
    # each output row was rescaled to unit norm (on average) before the last step, then moved by lr x ~1/sqrt(8)
    assert abs(net[0].weight.norm().item() - 16 ** 0.5) < 0.5
