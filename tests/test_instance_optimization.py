"""Instance optimization: it lowers the loss, restores the network exactly, and is reproducible."""

import pytest
import torch

from monai_gradicon.instance_optimization import instance_optimize, preserved_state
from monai_gradicon.losses.objective import GradICONObjective
from monai_gradicon.networks.registration import gradicon_network

SHAPE = (24, 24, 24)


SLIM = {"down_channels": (8, 16, 16, 32, 32), "up_channels": (8, 16, 16, 16, 16)}


def slim_network(num_steps=1, shape=SHAPE, seed=0, **card):
    """A GradICON network with narrow UNets: same code paths, a fraction of the cost. ``card``: model card fields
    (axis_order, preprocessing, ...)."""
    torch.manual_seed(seed)
    return gradicon_network(num_steps, 3, shape, **SLIM, **card)


def blob_pair(shift=2.0):
    z, y, x = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in SHAPE], indexing="ij")
    c = (SHAPE[0] - 1) / 2

    def blob(dx):
        return torch.exp(-((z - c) ** 2 + (y - c) ** 2 + (x - c - dx) ** 2) / 30.0)[None, None]

    return blob(shift), blob(-shift)


def snapshot(net):
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def test_io_lowers_the_loss_and_restores_everything():
    net = slim_network()
    # make BatchNorm statistics and the last layer non-trivial so that restoring them is really tested
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.9, 1.1)
    net.train()
    net.steps[0].unet.downConvs[0].weight.requires_grad_(False)
    before = snapshot(net)
    moving, fixed = blob_pair()
    result = instance_optimize(net, moving, fixed, steps=6, lr=1e-3, progress=False)
    assert len(result.history) == 6
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    after = snapshot(net)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert net.training and all(m.training for m in net.modules())
    assert not net.steps[0].unet.downConvs[0].weight.requires_grad
    # the returned transforms hold the fine-tuned result, not the restored network's
    with torch.no_grad():
        plain = net.eval()(moving, fixed).on_grid(SHAPE)
    assert (result.phi_ab.on_grid(SHAPE) - plain).abs().max() > 1e-5


def test_io_is_reproducible():
    moving, fixed = blob_pair()
    net = slim_network()
    a = instance_optimize(net, moving, fixed, steps=3, lr=1e-3, progress=False, seed=5)
    b = instance_optimize(net, moving, fixed, steps=3, lr=1e-3, progress=False, seed=5)
    assert torch.equal(a.phi_ab.on_grid(SHAPE), b.phi_ab.on_grid(SHAPE))
    assert torch.equal(a.phi_ba.on_grid(SHAPE), b.phi_ba.on_grid(SHAPE))
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]


class _FailingObjective(GradICONObjective):
    calls = 0

    def forward(self, *args, **kwargs):
        type(self).calls += 1
        if type(self).calls == 2:
            raise RuntimeError("boom")
        return super().forward(*args, **kwargs)


def test_weights_restored_after_an_error():
    net = slim_network()
    before = snapshot(net)
    moving, fixed = blob_pair()
    with pytest.raises(RuntimeError, match="boom"):
        instance_optimize(net, moving, fixed, steps=3, lr=1e-2, objective=_FailingObjective(net), progress=False)
    for k, v in snapshot(net).items():
        assert torch.equal(before[k], v), k


def test_bad_arguments():
    net = slim_network()
    moving, fixed = blob_pair()
    with pytest.raises(ValueError, match="steps >= 1"):
        instance_optimize(net, moving, fixed, steps=0)
    with pytest.raises(ValueError, match="learning rate"):
        instance_optimize(net, moving, fixed, steps=1, lr=0)
    with pytest.raises(ValueError, match="must wrap"):
        instance_optimize(net, moving, fixed, steps=1, objective=GradICONObjective(slim_network()))


def test_preserved_state_restores_modes():
    net = slim_network()
    net.eval()
    before = snapshot(net)
    with preserved_state(net):
        net.train()
        with torch.no_grad():
            next(net.parameters()).add_(1.0)
    assert not net.training
    for k, v in snapshot(net).items():
        assert torch.equal(before[k], v), k
