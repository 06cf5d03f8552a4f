"""The equilibrium-propagation example (examples/contrastive_digits.py): a one-epoch smoke run on
the synthetic stand-in (scikit-learn is not a test dependency), and one batch's update through
geokern equal to the autograd-based update that published EqProp code makes."""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import contrastive_digits as ex  # noqa: E402


def test_one_epoch_smoke_run():
    args = ["--data", "synthetic", "--epochs", "1", "--hidden", "32", "--t-free", "10", "--t-nudge", "4",
            "--device", "cpu", "--no-progress", "--plot", ""]
    results = ex.main(args)
    assert set(results) == {"geokern", "autograd"}
    (acc_g, t_g), (acc_a, t_a) = results["geokern"], results["autograd"]
    assert len(acc_g) == len(t_g) == 1 and t_g[0] > 0
    assert acc_g[0] > 0.5, f"geokern-trained network at {acc_g[0]:.3f} after one epoch (chance: 0.1)"
    assert abs(acc_g[0] - acc_a[0]) <= 0.02, f"the two updates diverged: {acc_g[0]:.3f} vs {acc_a[0]:.3f}"


def test_geokern_step_equals_the_autograd_step():
    x, y, *_ = ex.load_data("synthetic", seed=3)
    x, y = x[:16], torch.nn.functional.one_hot(y[:16], 10).float()
    nets = [ex.EqPropNet(n_hidden=24, seed=5) for _ in range(2)]
    _, plus, minus = nets[0].phases(x, y, 0.5, 10, 4)
    ex.geokern_step(nets[0], x, plus, minus, lr=0.1, beta=0.5)
    for p in nets[1].params():
        p.requires_grad_(True)
    ex.autograd_step(nets[1], torch.optim.SGD(nets[1].params(), lr=0.1), x, plus, minus, 0.5)
    start = ex.EqPropNet(n_hidden=24, seed=5)
    for name, g, a, s in zip(("W1", "b1", "W2", "b2"), nets[0].params(), nets[1].params(), start.params()):
        assert not torch.equal(g, s), f"{name} not updated"
        torch.testing.assert_close(g - s, a.detach() - s, rtol=1e-5, atol=1e-7, msg=f"{name}: geokern vs autograd")
