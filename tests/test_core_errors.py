"""Bad input to the core gets an error that names the problem; weight files load strictly."""

from __future__ import annotations

import pytest
import torch

from monai_gradicon import maps
from monai_gradicon.losses import GradICONObjective, LNCCLoss
from monai_gradicon.networks import GradICONDDFNet, gradicon_network, gradicon_preset, min_input_size
from monai_gradicon.model_card import CardError, ModelCard
from monai_gradicon.weights import (
    WeightFileError,
    convert_weights,
    export_official_weights,
    load_network_weights,
    load_weights,
    network_to_official_state,
    save_weights,
)
from tolerance import assert_f32_close


def test_minimum_sizes():
    assert min_input_size((2, 1, 0, 0)) == 65
    assert min_input_size((1, 0)) == 33
    assert min_input_size((0,)) == 17


def test_too_small_input_names_the_minimum():
    net = gradicon_network(4, 3).eval()
    x = torch.rand(1, 1, 64, 70, 70)
    with pytest.raises(ValueError, match="minimum of 65"):
        net(x, x)


def test_preset_below_minimum_rejected():
    with pytest.raises(ValueError, match="minimum of 65"):
        gradicon_network(4, 3, input_shape=(64, 80, 80))
    assert gradicon_preset("brain").input_shape == (130, 155, 130)
    with pytest.raises(ValueError, match="Unknown preset"):
        gradicon_preset("liver")


def test_dimensionality_mismatch():
    net = gradicon_network(1, 3)
    with pytest.raises(ValueError, match="3D batch"):
        net(torch.rand(1, 1, 20, 20), torch.rand(1, 1, 20, 20))
    with pytest.raises(ValueError, match="same shape"):
        net(torch.rand(1, 1, 20, 20, 20), torch.rand(1, 1, 20, 20, 21))
    with pytest.raises(ValueError, match="channel"):
        net(torch.rand(1, 2, 20, 20, 20), torch.rand(1, 2, 20, 20, 20))


def test_ddf_net_checks_channels():
    net = GradICONDDFNet(gradicon_network(1, 2))
    with pytest.raises(ValueError, match="moving and fixed stacked"):
        net(torch.rand(1, 1, 20, 20))
    out = net(torch.rand(2, 2, 20, 24))
    assert out.shape == (2, 2, 20, 24)
    assert float(out.abs().max()) == 0.0  # fresh network: zero last layer, identity


def test_sample_errors():
    with pytest.raises(ValueError, match="normalized coordinates"):
        maps.sample(torch.rand(1, 1, 5, 5, 5), torch.rand(1, 2, 4, 4))
    with pytest.raises(ValueError, match="padding_mode"):
        maps.sample(torch.rand(1, 1, 5, 5), torch.rand(1, 2, 4, 4), padding_mode="wrap")


def test_objective_rejects_unknown_regularizer():
    with pytest.raises(ValueError, match="regularizer"):
        GradICONObjective(gradicon_network(1, 2), LNCCLoss(), regularizer="bending")


def test_noise_shape_checked():
    obj = GradICONObjective(gradicon_network(1, 2), LNCCLoss())
    x = torch.rand(1, 1, 20, 20)
    with pytest.raises(ValueError, match="noise"):
        obj(x, x, noise=torch.randn(1, 2, 10, 10))


def random_official_state(num_steps=2, dim=2):
    net = gradicon_network(num_steps, dim)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.01)
    return net, network_to_official_state(net)


def test_official_weights_roundtrip(tmp_path):
    net, state = random_official_state()
    path = tmp_path / "w.trch"
    torch.save(state, path)
    loaded, card = load_weights(path)
    assert loaded.num_steps == 2 and loaded.spatial_dims == 2
    assert loaded.state_dict().keys() == net.state_dict().keys()
    for k, v in net.state_dict().items():
        assert k == "model_card" or torch.equal(v, loaded.state_dict()[k]), k
    # a released file gets the reference's card: reference axis order, its name and hash; an unknown name leaves the
    # shape and the preprocessing open
    assert card.axis_order == "reference" and card.source_file == "w.trch" and len(card.source_sha256) == 64
    assert card.preprocessing is None and card.input_shape is None and loaded.card == card
    # export writes the released layout back, byte-equal tensors
    out = tmp_path / "exported.trch"
    export_official_weights(loaded, out)
    back = torch.load(out, weights_only=True)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_full_module_state_with_regis_net_prefix_loads():
    net, state = random_official_state()
    wrapped = {"regis_net." + k: v for k, v in state.items()}
    target = gradicon_network(2, 2)
    load_network_weights(target, wrapped)
    assert torch.equal(target.state_dict()["steps.1.unet.lastConv.weight"], net.state_dict()["steps.1.unet.lastConv.weight"])


def test_unexpected_keys_listed():
    _, state = random_official_state()
    state["netPsi.net.extraLayer.weight"] = torch.zeros(1)
    with pytest.raises(WeightFileError, match="extraLayer"):
        load_network_weights(gradicon_network(2, 2), state)


def test_missing_keys_listed():
    _, state = random_official_state()
    del state["netPsi.net.lastConv.bias"]
    with pytest.raises(WeightFileError, match=r"missing keys: steps\.1\.unet\.lastConv\.bias"):
        load_network_weights(gradicon_network(2, 2), state)


def test_wrong_step_count_rejected():
    _, state = random_official_state(num_steps=2)
    with pytest.raises(WeightFileError, match="does not fit a 4-step network"):
        load_network_weights(gradicon_network(4, 2), state)


def test_wrong_dimension_rejected():
    _, state = random_official_state(num_steps=2, dim=2)
    with pytest.raises(WeightFileError, match="wrong shape"):
        load_network_weights(gradicon_network(2, 3), state)


def test_our_checkpoint_recognised(tmp_path):
    net, _ = random_official_state()
    path = tmp_path / "model.pt"
    torch.save({"network." + k: v for k, v in net.state_dict().items()}, path)
    target = load_network_weights(gradicon_network(2, 2), path)
    assert torch.equal(target.state_dict()["steps.0.unet.downConvs.0.weight"], net.state_dict()["steps.0.unet.downConvs.0.weight"])


def test_model_card_travels_with_the_weights(tmp_path):
    """save_weights -> load_weights gives the same tensors and the same card, in the bundle layout (network.*)."""
    net = gradicon_network(2, 2, (40, 36), axis_order="file", preprocessing="brain", modality="mri", name="test net")
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.01)
    save_weights(net, tmp_path / "w.pt")
    raw = torch.load(tmp_path / "w.pt", weights_only=True)
    assert all(k.startswith("network.") for k in raw) and "network.model_card" in raw
    loaded, card = load_weights(tmp_path / "w.pt")
    assert card == net.card == loaded.card
    assert card.axis_order == "file" and card.input_shape == (40, 36) and card.preprocessing == "brain"
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in net.state_dict().items())
    # the card survives stage 1 -> stage 2 with one more step
    assert net.with_final_step().card == card.replace(num_steps=3)


def test_weights_without_card_are_refused_with_the_fix(tmp_path):
    net, _ = random_official_state()
    state = {k: v for k, v in net.state_dict().items() if k != "model_card"}
    torch.save(state, tmp_path / "old.pt")
    with pytest.raises(WeightFileError, match="(?s)no model card.*convert-weights"):
        load_weights(tmp_path / "old.pt")
    with pytest.raises(WeightFileError, match="--axis_order, --input_shape, --preprocessing"):
        convert_weights(tmp_path / "old.pt", tmp_path / "new.pt")
    path, card = convert_weights(tmp_path / "old.pt", tmp_path / "new.pt", axis_order="file", input_shape=(40, 40),
                                 preprocessing="none")
    loaded, got = load_weights(path)
    assert got == card and card.axis_order == "file" and card.source_file == "old.pt"
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in state.items())


def test_card_contradictions_are_errors(tmp_path):
    net, state = random_official_state(num_steps=1, dim=3)
    torch.save(state, tmp_path / "lung_model_weights_step_2.trch")
    _, card = load_weights(tmp_path / "lung_model_weights_step_2.trch")
    assert (card.preprocessing, card.input_shape, card.modality) == ("lung_ct", (175, 175, 175), "ct")
    with pytest.raises(CardError, match="preprocessing: the card says 'lung_ct', you asked for 'brain'"):
        convert_weights(tmp_path / "lung_model_weights_step_2.trch", tmp_path / "x.pt", preprocessing="brain")
    with pytest.raises(CardError, match="destination requires"):
        convert_weights(tmp_path / "lung_model_weights_step_2.trch", tmp_path / "x.pt",
                        expect={"preprocessing": "brain", "modality": "mri"})
    with pytest.raises(CardError, match="num_steps 4 vs the network's 2"):
        gradicon_network(2, 2).card = ModelCard(num_steps=4, spatial_dims=2)
    with pytest.raises(CardError, match="axis_order"):
        ModelCard(axis_order="zyx")
    with pytest.raises(CardError, match="preprocessing"):
        ModelCard(preprocessing="hu_window")


def test_non_finite_weights_are_refused(tmp_path):
    net, state = random_official_state()
    state["netPsi.net.lastConv.bias"] = torch.full_like(state["netPsi.net.lastConv.bias"], float("nan"))
    torch.save(state, tmp_path / "nan.trch")
    with pytest.raises(WeightFileError, match="non-finite.*lastConv.bias"):
        load_weights(tmp_path / "nan.trch")


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_network_weights(gradicon_network(1, 2), tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(WeightFileError, match="bad.pt"):
        load_network_weights(gradicon_network(1, 2), bad)


def test_with_final_step_starts_at_stage1_solution():
    torch.manual_seed(0)
    stage1 = gradicon_network(3, 2).eval()
    for step in stage1.steps:
        torch.nn.init.normal_(step.unet.lastConv.weight, std=1e-3)
    stage2 = stage1.with_final_step().eval()
    assert stage2.levels == (2, 1, 0, 0)
    x, y = torch.rand(1, 1, 65, 70), torch.rand(1, 1, 65, 70)
    with torch.no_grad():
        # equal up to float32 rounding (stage 2 interpolates stage 1's finest field at the grid nodes)
        assert_f32_close(stage2(x, y).on_grid((65, 70)), stage1(x, y).on_grid((65, 70)), ulps=4, scale=1.0)


def test_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    net = gradicon_network(1, 3)
    torch.nn.init.normal_(net.steps[0].unet.lastConv.weight, std=1e-2)
    a, b = torch.rand(2, 1, 20, 20, 20), torch.rand(2, 1, 20, 20, 20)
    noise = torch.randn(1, 3, 20, 20, 20)
    grads = []
    for ckpt in (False, True):
        net.zero_grad()
        net.set_checkpointing(ckpt)
        GradICONObjective(net, LNCCLoss(3))(a, b, noise=noise).loss.backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    for g0, g1 in zip(*grads):
        assert_f32_close(g1, g0, ulps=64, scale=max(float(g0.abs().max()), 1e-12))
