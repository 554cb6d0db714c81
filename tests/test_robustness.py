"""Nothing lost, nothing silently wrong: each test reproduces a failure reported in issue 13 first.

* a NaN in a training image, or a diverging learning rate, stops training with an error naming the iteration and
  the loss terms, and the weights / ``model.pt`` / the resumable checkpoint keep the last good state;
* nothing non-finite is ever written as weights;
* starting over (``resume=False``) never deletes checkpoints, and a later resume continues the new run;
* bundle booleans given as text (``--two_stage false``) mean what they say;
* a diverging instance optimization is an error, the network is restored, and nothing looks like a result.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from monai.engines import SupervisedTrainer

from monai_gradicon import gradicon_network
from monai_gradicon.config import config_bool
from monai_gradicon.engines import (
    GradICONTrainingModule,
    ModelWeightsSaver,
    NonFiniteGuard,
    NonFiniteTrainingError,
    PairPrepareBatch,
    ResumableCheckpoint,
    TwoStageHandler,
    latest_checkpoint,
    pick_loss,
)
from monai_gradicon.errors import NonFiniteResultError
from monai_gradicon.io import Image
from monai_gradicon.pipeline import register

torch.set_num_threads(2)


def _pair(n=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, n, n, n, generator=g), torch.rand(1, n, n, n, generator=g)


def _trainer(tmp_path, data, max_epochs, lr=1e-4, guard=None, resume=True, epoch_length=1):
    torch.manual_seed(0)
    module = GradICONTrainingModule(gradicon_network(1, 3, (17, 17, 17)))
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    stage = TwoStageHandler(module, optimizer, stage1_epochs=max_epochs, enabled=False)
    ckpt = ResumableCheckpoint(tmp_path / "ckpt", {"stage": stage, "model": module, "optimizer": optimizer},
                               interval=1, resume=resume)
    saver = ModelWeightsSaver(module, tmp_path / "models", stage_handler=stage, interval=1)
    handlers = [stage, *([guard] if guard is not None else []), ckpt, saver]
    trainer = SupervisedTrainer(
        device="cpu", max_epochs=max_epochs, train_data_loader=torch.utils.data.DataLoader(data, batch_size=1),
        epoch_length=epoch_length, network=module, optimizer=optimizer, loss_function=pick_loss,
        prepare_batch=PairPrepareBatch(), train_handlers=handlers,
    )
    return trainer, module, ckpt


def _finite(state):
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_nan_image_stops_training_and_keeps_the_last_good_weights(tmp_path):
    good = [{"moving_image": m, "fixed_image": f} for m, f in [_pair(seed=0)]]
    m, f = _pair(seed=1)
    m[0, 3, 4, 5] = float("nan")
    bad = [{"moving_image": m, "fixed_image": f}]
    # epoch 1 trains on the good pair and saves; epoch 2 meets the NaN pair
    trainer, module, _ = _trainer(tmp_path, good + bad, max_epochs=2, guard=NonFiniteGuard(patience=0))
    saved = {}

    @trainer.on(__import__("ignite.engine", fromlist=["Events"]).Events.EPOCH_COMPLETED)
    def _keep(engine):
        saved.update({k: v.clone() for k, v in module.state_dict().items()})

    with pytest.raises(NonFiniteTrainingError, match=r"iteration 2 .*the loss is nan .*similarity"):
        trainer.run()
    assert _finite(module.state_dict())
    assert all(torch.equal(saved[k], v) for k, v in module.state_dict().items())  # the bad step changed nothing
    model = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert _finite(model) and all(torch.equal(model[k], saved[k]) for k in model)
    ckpt = torch.load(latest_checkpoint(tmp_path / "ckpt"), weights_only=True)
    assert latest_checkpoint(tmp_path / "ckpt").name == "checkpoint_1.pt" and _finite(ckpt["model"])


def test_patience_skips_bad_iterations_and_diverging_loss_stops(tmp_path):
    m, f = _pair(seed=1)
    m[0, 0, 0, 0] = float("inf")
    good = {"moving_image": _pair(seed=0)[0], "fixed_image": _pair(seed=0)[1]}
    guard = NonFiniteGuard(patience=1)
    trainer, module, _ = _trainer(tmp_path, [{"moving_image": m, "fixed_image": f}, good], max_epochs=2, guard=guard)
    trainer.run()  # one bad iteration in a row is within the patience: skipped, training goes on
    assert guard.skipped == [1] and _finite(module.state_dict())
    # a learning rate that makes the loss explode is caught by loss_limit before it reaches the weights
    guard = NonFiniteGuard(patience=0, loss_limit=0.5)  # every loss of this pair is above 0.5: "diverged"
    trainer, module, _ = _trainer(tmp_path / "b", [good], max_epochs=1, guard=guard)
    with pytest.raises(NonFiniteTrainingError, match="exceeds loss_limit"):
        trainer.run()
    assert not (tmp_path / "b" / "models" / "model.pt").exists()
    with pytest.raises(ValueError, match="patience"):
        NonFiniteGuard(patience=-1)


def test_non_finite_weights_are_never_written(tmp_path):
    module = GradICONTrainingModule(gradicon_network(1, 3, (17, 17, 17)))
    saver = ModelWeightsSaver(module, tmp_path)
    saver()
    before = (tmp_path / "model.pt").read_bytes()
    with torch.no_grad():
        module.network.steps[0].unet.lastConv.bias.fill_(float("nan"))
    with pytest.raises(NonFiniteTrainingError, match="Refusing to write"):
        saver()
    assert (tmp_path / "model.pt").read_bytes() == before


def test_starting_over_keeps_the_old_checkpoints_and_resumes_the_new_run(tmp_path):
    data = [{"moving_image": m, "fixed_image": f} for m, f in [_pair(seed=s) for s in range(2)]]
    trainer, *_ = _trainer(tmp_path, data, max_epochs=3)
    trainer.run()
    assert latest_checkpoint(tmp_path / "ckpt").name == "checkpoint_3.pt"  # the earlier run got further
    trainer, module, ckpt = _trainer(tmp_path, data, max_epochs=1, resume="false")  # text from the command line
    trainer.run()
    assert ckpt.archived_to is not None and (ckpt.archived_to / "checkpoint_3.pt").is_file()
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("checkpoint_*.pt")) == ["checkpoint_1.pt"]
    # a later resume continues the NEW run (epoch 1 done), not the earlier one
    trainer, module, ckpt = _trainer(tmp_path, data, max_epochs=2)
    trainer.run()
    assert ckpt.loaded_from.name == "checkpoint_1.pt" and trainer.state.epoch == 2
    assert (ckpt.archived_to is None) and (tmp_path / "ckpt" / "previous_run_1" / "checkpoint_3.pt").is_file()


@pytest.mark.parametrize("text,value", [("false", False), ("False", False), ("0", False), ("true", True),
                                        ("True", True), (1, True), (False, False)])
def test_config_booleans_mean_what_they_say(text, value):
    assert config_bool(text, "two_stage") is value


def test_ambiguous_booleans_are_errors():
    for text in ("no", "flase", "", None, 2):
        with pytest.raises(ValueError, match="two_stage must be true or false"):
            config_bool(text, "two_stage")


def test_bundle_two_stage_false_from_the_command_line(tmp_path):
    """``--two_stage false`` arrives as the string 'false': the final network has the stage-1 step count."""
    from monai.bundle import ConfigParser

    from bundle_helpers import BUNDLES

    parser = ConfigParser()
    parser.read_config(str(BUNDLES / "gradicon_lung" / "configs" / "train.json"))
    parser["two_stage"] = "false"
    assert parser.get_parsed_content("final_num_steps") == parser["stage1_num_steps"]
    parser["two_stage"] = "maybe"
    with pytest.raises(Exception) as err:
        parser.get_parsed_content("final_num_steps", lazy=False)
    causes, exc = [], err.value
    while exc is not None:  # MONAI wraps the config's error; ours is in the chain
        causes.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    assert any("two_stage must be true or false, got 'maybe'" in c for c in causes)


def test_diverging_instance_optimization_is_an_error_and_restores_the_network():
    from test_instance_optimization import slim_network

    rng = np.random.default_rng(0)
    fixed = Image(rng.random((24, 24, 24)).astype(np.float32), np.eye(4))
    moving = Image(rng.random((24, 24, 24)).astype(np.float32), np.eye(4))
    net = slim_network(1, (24, 24, 24), preprocessing="none")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(NonFiniteResultError, match="Instance optimization diverged at step"):
        register(fixed, moving, net, io_iterations=5, io_lr=1e6)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_non_finite_field_is_an_error_not_a_result(tmp_path):
    from test_instance_optimization import slim_network

    rng = np.random.default_rng(0)
    fixed = Image(rng.random((24, 24, 24)).astype(np.float32), np.eye(4))
    net = slim_network(1, (24, 24, 24), preprocessing="none")
    with torch.no_grad():
        net.steps[0].unet.lastConv.bias.fill_(float("inf"))
    with pytest.raises(NonFiniteResultError, match="non-finite value"):
        register(fixed, fixed, net)
    assert math.isfinite(1.0) and not os.listdir(tmp_path)
