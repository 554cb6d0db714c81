"""GradICON without a network through the registration pipeline (``method="optimize"``) and field-level instance
optimization after a network (``io_method="fields"``).

The pair: the MNI152 T1 at 3 mm (65 x 77 x 63, tests/test_affine.py's fixture) as the fixed image and the same image
pulled through a known smooth displacement ``d`` (voxels, tests/test_field_optimization.py's generator) as the moving
image: ``moving(y) = fixed(y + d(y))`` on the same grid, so the true moving -> fixed map of world points is
``A (y + d(y))`` (``A`` the voxel-to-world affine). Errors are measured at brain voxels away from the border.
"""

import json

import numpy as np
import pytest
import torch
from test_affine import brain  # noqa: F401 (a fixture)
from test_field_optimization import smooth_displacement
from test_instance_optimization import slim_network
from tolerance import assert_f32_close

from monai_gradicon.affine import transform_points
from monai_gradicon.field_optimization import DEFAULT_LMBDA, optimize_fields
from monai_gradicon.io import Image
from monai_gradicon.maps import identity_map, sample
from monai_gradicon.networks.registration import map_to_file_order, to_network_axes
from monai_gradicon.pipeline import OUTPUT_FILES, prepare_pair, read_pair
from monai_gradicon.pipeline import register as register_pair

AMPLITUDE = 4.0  # voxels (12 mm): beyond what a few smoothing iterations at full resolution would find


@pytest.fixture(scope="module")
def deformed(brain):  # noqa: F811 (the fixture imported above)
    t1, mask, _ = brain
    shape = t1.shape
    d = smooth_displacement(shape, AMPLITUDE, seed=3)  # [1, 3, *S] voxels
    scale = torch.tensor([n - 1 for n in shape], dtype=torch.float32).view(1, 3, 1, 1, 1)
    moving = sample(torch.from_numpy(t1.array)[None, None].float(), identity_map(shape) + d / scale)[0, 0].numpy()
    inner = np.zeros(shape, bool)
    inner[6:-6, 6:-6, 6:-6] = True
    voxels = np.argwhere(mask & inner).astype(np.float64)[::7]
    truth = voxels + d[0].numpy()[(slice(None), *voxels.astype(int).T)].T  # moving voxel -> fixed voxel
    return t1, Image(moving.astype(np.float32), t1.affine), transform_points(t1.affine, voxels), \
        transform_points(t1.affine, truth)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_optimize_without_a_network_recovers_a_known_deformation(deformed, tmp_path):
    fixed, moving, points, truth = deformed
    before = np.linalg.norm(points - truth, axis=1)
    r = register_pair(fixed, moving, None, method="optimize", preprocessing="unigradicon_mri", opt_levels=2,
                      opt_iterations=(60, 20))
    assert r.settings.method == "optimize" and r.settings.input_shape == fixed.shape  # under the 175 cap
    err = np.linalg.norm(r.moving_to_fixed(points) - truth, axis=1)
    # a 12 mm field recovered to about a voxel (3 mm), the identity being ~6 mm off on average here
    assert before.mean() > 4.0 and err.mean() < 0.35 * before.mean(), (before.mean(), err.mean())
    assert r.folds_percent == 0.0
    # the two directions are one transform and its inverse, to a fraction of a voxel
    back = r.fixed_to_moving(r.moving_to_fixed(points))
    assert np.linalg.norm(back - points, axis=1).mean() < 1.0
    paths = r.save(tmp_path / "out")
    summary = json.loads(open(paths[OUTPUT_FILES["summary"]]).read())
    assert summary["settings"]["method"] == "optimize" and summary["model_card"] is None
    assert summary["settings"]["field_optimization"]["iterations"] == [60, 20]
    # the default lambda is recorded as the value used, not as "default"
    assert summary["settings"]["field_optimization"]["lambda"] == DEFAULT_LMBDA
    assert "optimize" in summary["timings_seconds"]


def test_field_io_is_optimize_fields_started_from_the_network(deformed):
    """The pipeline's field IO is exactly :func:`optimize_fields` from the network's two transforms on the prepared
    network inputs (same seed), and the network's weights are not touched."""
    fixed, moving, _, _ = deformed
    net = slim_network(1, (24, 24, 24), 0)
    with torch.no_grad():
        net.steps[0].unet.lastConv.weight.normal_(0.0, 2e-3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    r = register_pair(fixed, moving, net, preprocessing="unigradicon_mri", io_iterations=4, io_method="fields",
                      transform_scheme="exact")
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert r.settings.io_lr == 0.05 and r.settings.io_method == "fields"  # the field IO's default rate
    assert len(r.transforms.io_history) == 4
    settings = r.settings
    prepared = prepare_pair(read_pair(fixed, moving), settings, net)
    moving_net = to_network_axes(prepared.moving_net, settings.axis_order)  # the network's axis order
    fixed_net = to_network_axes(prepared.fixed_net, settings.axis_order)
    net.eval()  # as the pipeline runs it
    with torch.no_grad():
        phi_ab, phi_ba = net(moving_net, fixed_net), net(fixed_net, moving_net)
    direct = optimize_fields(moving_net, fixed_net, init_ab=phi_ab, init_ba=phi_ba, iterations=4, lr=0.05, seed=0)
    for name, ours, theirs in (("Phi_AB", r.transforms.phi_ab, direct.phi_ab),
                               ("Phi_BA", r.transforms.phi_ba, direct.phi_ba)):
        expected = map_to_file_order(theirs.on_grid(settings.input_shape), settings.axis_order)
        assert_f32_close(ours.on_grid(settings.file_order_shape), expected, ulps=4, scale=1.0,
                         what=f"field IO {name}")
    forward = register_pair(fixed, moving, net, preprocessing="unigradicon_mri", transform_scheme="exact")
    assert not np.allclose(forward.displacement, r.displacement)  # the IO did change the transform


def test_settings_are_checked_before_any_work(deformed):
    fixed, moving, _, _ = deformed
    net = slim_network(1, (24, 24, 24), 0)
    cases = [
        (dict(network=net, method="optimize", preprocessing="none"), "uses no network"),
        (dict(network=None, method="optimize"), "needs the preprocessing"),
        (dict(network=None, method="optimize", preprocessing="none", io_iterations=3), "opt_iterations"),
        (dict(network=None, method="optimize", preprocessing="none", opt_levels=5), "too many"),
        (dict(network=None, method="optimize", preprocessing="none", opt_lambda=-1.0), "^opt_lambda must be"),  # names the setting the user set
        (dict(network=None, method="optimize", preprocessing="none", opt_similarity="mi"), "similarity"),
        (dict(network=None, method="optimize", preprocessing="none", opt_iterations=0), "at least one iteration"),
        (dict(network=net, preprocessing="none", io_iterations=2, io_method="everything"), "io_method"),
        (dict(network=net, preprocessing="none", io_iterations=2, io_method="fields",
              io_objective=lambda n: None), "io_objective"),
        (dict(network=None, preprocessing="none"), "GradICONNetwork"),
    ]
    for kwargs, message in cases:
        network = kwargs.pop("network")
        with pytest.raises((ValueError, TypeError), match=message):
            register_pair(fixed, moving, network, **kwargs)
