"""GradICON field optimization (no network) on real crops deformed by known smooth displacements.

The pairs: a block-averaged crop of the POPI CT (3D, ``[48, 48, 52]``, about 4 x 5.9 x 5.9 mm voxels) and an axial
slice of the MNI152 T1 (2D, ``[96, 112]``, 2 mm pixels), each pulled through a known smooth displacement ``d``
(voxels): ``moving(x) = fixed(x + d(x))``, so the true maps are ``Phi_BA = x + d`` (moving -> fixed) and
``Phi_AB = (x + d)^-1`` (fixed -> moving, by fixed-point iteration). Errors are measured in voxels on the interior
(6 voxels away from the border, where the moving image still holds the matching anatomy).
"""

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED_DATA
from test_instance_optimization import slim_network
from tolerance import assert_f32_close

from monai_gradicon.coordinate_transforms import DisplacementTransform
from monai_gradicon.field_optimization import (
    FieldOptimizationResult,
    _TargetLNCC,
    image_pyramid,
    level_shapes,
    optimize_fields,
)
from monai_gradicon.losses.similarity import LNCCLoss, SquaredLNCCLoss
from monai_gradicon.maps import ddf_to_map, identity_map, map_to_ddf, sample, warp_image
from monai_gradicon.metrics import folding_percentage

POPI = os.path.join("lung_ct_popi_phase00", "popi_phase00_ct.nii.gz")
MNI = os.path.join("brain_mni152_2009a_sym", "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
MARGIN = 6


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These problems are small (~10^5 voxels): a second thread gains little, and on a busy machine every parallel
    region waits for a descheduled thread (measured with load 7 on 2 cores: 371 s with 2 threads, 30 s with 1).
    The previous setting is restored for the other modules."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def smooth_displacement(shape, amplitude, seed=0):
    """A smooth displacement ``[1, dim, *shape]`` in voxels: three Gaussian bumps (sigma a quarter of the image)
    with random directions, the largest vector about ``amplitude`` voxels; det J stays well above 0."""
    g = torch.Generator().manual_seed(seed)
    dim = len(shape)
    grid = identity_map(shape)[0] * torch.tensor([n - 1 for n in shape], dtype=torch.float32).view(
        dim, *[1] * dim)
    d = torch.zeros((1, dim, *shape))
    for _ in range(3):
        centre = torch.tensor([n * (0.3 + 0.4 * float(torch.rand((), generator=g))) for n in shape])
        width = 0.25 * min(shape)
        r2 = sum((grid[k] - centre[k]) ** 2 for k in range(dim)) / width**2
        direction = torch.randn(dim, generator=g)
        d[0] += direction.view(dim, *[1] * dim) / direction.norm() * torch.exp(-0.5 * r2)
    return d * amplitude / d.norm(dim=1).max()


def inverse_map(d):
    """``(x + d)^-1`` as a normalized map, by ``q <- x - d(q)`` (converges: |grad d| < 1)."""
    shape = tuple(d.shape[2:])
    scale = torch.tensor([n - 1 for n in shape], dtype=torch.float32).view(1, len(shape), *[1] * len(shape))
    ident = identity_map(shape)
    q = ident.clone()
    for _ in range(100):
        q = ident - sample(d / scale, q)
    return q


def interior(phi):
    sl = (slice(None), slice(None), *[slice(MARGIN, -MARGIN)] * (phi.ndim - 2))
    return phi[sl]


def voxel_error(phi, truth):
    """Mean and max ``|phi - truth|`` in voxels over the interior."""
    shape = phi.shape[2:]
    scale = torch.tensor([n - 1 for n in shape], dtype=torch.float32).view(1, len(shape), *[1] * len(shape))
    err = (interior((phi - truth) * scale)).norm(dim=1)
    return float(err.mean()), float(err.max())


def make_pair(fixed, amplitude, seed=0):
    d = smooth_displacement(tuple(fixed.shape[2:]), amplitude, seed)
    moving = warp_image(fixed, ddf_to_map(d))
    return moving, fixed, inverse_map(d), ddf_to_map(d)


def load_ct_crop(data_dir):
    """POPI CT, lung window [-1000, 0] HU -> [0, 1], a thorax block averaged to [48, 48, 52] (axes k, j, i)."""
    import nibabel as nib

    hu = np.asarray(nib.load(os.path.join(data_dir, POPI)).dataobj, dtype=np.float32).transpose(2, 1, 0)
    block = torch.from_numpy(np.ascontiguousarray(hu[20:116, 112:400, 96:408]))[None, None]
    block = F.avg_pool3d(block, (2, 6, 6))
    return ((block.clamp(-1000.0, 0.0) + 1000.0) / 1000.0).contiguous()


@pytest.fixture(scope="module")
def ct_crop():
    if not os.path.isdir(SHARED_DATA):  # the module-scoped twin of the shared_data fixture
        pytest.skip("../shared/data is not present")
    return load_ct_crop(SHARED_DATA)


@pytest.fixture(scope="module")
def ct_pair(ct_crop):
    return make_pair(ct_crop, amplitude=3.0)


@pytest.fixture(scope="module")
def ct_result(ct_pair):
    moving, fixed, _, _ = ct_pair
    return optimize_fields(moving, fixed, levels=2, iterations=(60, 40))


def test_lowers_the_loss(shared_data, ct_pair, ct_result):
    moving, fixed, _, _ = ct_pair
    assert isinstance(ct_result, FieldOptimizationResult)
    history = ct_result.history
    assert len(history) == 100
    assert [h["level"] for h in history] == [1.0] * 60 + [0.0] * 40
    for level in (1.0, 0.0):
        steps = [h for h in history if h["level"] == level]
        assert steps[-1]["loss"] < steps[0]["loss"], level
    # the registered pair is more similar than the raw pair, in both directions, at full resolution
    sim = LNCCLoss(5.0)
    raw = float(sim(moving, fixed) + sim(fixed, moving))
    shape = fixed.shape[2:]
    warped = float(sim(warp_image(moving, ct_result.phi_ab.on_grid(shape)), fixed)
                   + sim(warp_image(fixed, ct_result.phi_ba.on_grid(shape)), moving))
    assert warped < 0.5 * raw
    stamps = [h["seconds"] for h in history]
    assert stamps == sorted(stamps) and stamps[-1] <= ct_result.seconds


def test_recovers_a_known_deformation_without_folds(shared_data, ct_pair, ct_result):
    """Largest true motion 3 voxels (12-18 mm). Both maps must come within 0.5 voxel on average (identity: ~1.5):
    LNCC with a 5-voxel window localises edges to a fraction of a voxel, but the crop has flat regions (air in the
    lungs, soft tissue) where only the smoothness of the fields carries the motion, so sub-voxel rather than exact
    recovery is the claim. Measured when written: 0.29 (AB) and 0.26 (BA) voxel mean, 1.6 / 1.7 at worst (identity:
    1.3 mean, 3.0 at worst)."""
    _, _, truth_ab, truth_ba = ct_pair
    shape = truth_ab.shape[2:]
    phi_ab, phi_ba = ct_result.phi_ab.on_grid(shape), ct_result.phi_ba.on_grid(shape)
    ident = identity_map(shape)
    before_ab, _ = voxel_error(ident, truth_ab)
    before_ba, _ = voxel_error(ident, truth_ba)
    after_ab, worst_ab = voxel_error(phi_ab, truth_ab)
    after_ba, worst_ba = voxel_error(phi_ba, truth_ba)
    assert before_ab > 1.0 and before_ba > 1.0
    assert after_ab < 0.5 and after_ba < 0.5, (after_ab, after_ba)
    assert after_ab < 0.3 * before_ab and after_ba < 0.3 * before_ba
    assert worst_ab < 2.5 and worst_ba < 2.5, (worst_ab, worst_ba)
    # no folding anywhere (det J <= 0 at no voxel), in either direction
    assert float(folding_percentage(map_to_ddf(phi_ab))[0]) == 0.0
    assert float(folding_percentage(map_to_ddf(phi_ba))[0]) == 0.0


def test_the_two_fields_are_inverse_consistent(shared_data, ct_result):
    """``|Phi_AB(Phi_BA(x)) - x|`` over the interior: GradICON penalises the gradient of this error, the two
    similarity terms pin its constant part. Measured when written: 0.05 voxel mean, 0.17 at worst; bound 0.15 and
    0.6 (with lambda = 0, i.e. two independent registrations, it is 0.68 and 3.1)."""
    shape = ct_result.phi_ab.displacement.shape[2:]
    ident = identity_map(shape)
    composed = ct_result.phi_ab(ct_result.phi_ba.on_grid(shape))
    mean, worst = voxel_error(composed, ident)
    assert mean < 0.15 and worst < 0.6, (mean, worst)
    # the result holds displacement fields on the input grid, in normalized units
    assert isinstance(ct_result.phi_ab, DisplacementTransform)
    assert tuple(ct_result.phi_ab.displacement.shape) == (1, 3, *shape)
    assert not ct_result.phi_ab.displacement.requires_grad


def test_no_folds_where_the_fixed_field_of_view_ends(shared_data, ct_pair):
    """Issue 16's finding on the lung pair, on the crop: the fixed image's field of view ends before the moving
    image's (its first 6 slices set to 0, air), so there the images give no signal. With the paper's one-sided
    term ``GradICON(Phi_AB o Phi_BA)`` at lambda 1.5 (the former defaults) ``Phi_AB`` folds there (measured when
    written: 0.65 % of its voxels; 0.13 % at lambda 3); the defaults (both compositions, lambda 3) keep both maps
    fold-free and still recover the known motion where the fixed image has content."""
    moving, fixed, truth_ab, truth_ba = ct_pair
    cut = fixed.clone()
    cut[:, :, :6] = 0.0
    shape = tuple(fixed.shape[2:])

    def folds(result):
        return [float(folding_percentage(map_to_ddf(t.on_grid(shape)))[0]) for t in (result.phi_ab, result.phi_ba)]

    one_sided = optimize_fields(moving, cut, levels=2, iterations=(60, 40), symmetric=False, lmbda=1.5)
    assert folds(one_sided)[0] > 0.1, folds(one_sided)  # the finding reproduced: Phi_AB folds
    result = optimize_fields(moving, cut, levels=2, iterations=(60, 40))
    assert folds(result) == [0.0, 0.0]
    # the known motion, on the interior slices the fixed image still covers (measured: 0.31 / 0.29 voxel)
    phi_ab = result.phi_ab.on_grid(shape)
    valid = (slice(None), slice(None), slice(6 + MARGIN, None))
    assert voxel_error(phi_ab[valid], truth_ab[valid])[0] < 0.5


def test_the_symmetric_term_is_the_mean_of_both_compositions(shared_data, ct_pair):
    """With ``symmetric`` the regularizer is the mean of GradICON on ``Phi_AB o Phi_BA`` and ``Phi_BA o Phi_AB``,
    each at its own fresh jitter draw (in that order); without, the first alone. Two fields that are not inverses
    of each other (a level's bases, zero corrections), against the regularizer function called directly."""
    from monai_gradicon.losses.regularizers import gradicon_regularizer
    from monai_gradicon.field_optimization import _Level, _LevelFields

    moving, fixed, truth_ab, truth_ba = ct_pair
    shape = tuple(fixed.shape[2:])
    ident = identity_map(shape)
    scale = torch.tensor([n - 1 for n in shape], dtype=torch.float32).view(1, 3, 1, 1, 1)
    u_ab = truth_ab - ident + smooth_displacement(shape, 1.0, seed=7) / scale  # not inverse to each other
    u_ba = truth_ba - ident
    fields = _LevelFields([u_ab, u_ba], spacing=2, smoothing=1.0)
    level = _Level(moving, fixed, "lncc", 5.0, "gradicon_sparse", "border")
    with torch.no_grad():
        _, one = level.terms(fields, torch.Generator().manual_seed(1), True, 1e-3, symmetric=False)
        _, both = level.terms(fields, torch.Generator().manual_seed(1), True, 1e-3, symmetric=True)
        g = torch.Generator().manual_seed(1)
        first, second = level.points(g), level.points(g)
        ab, ba = DisplacementTransform(u_ab), DisplacementTransform(u_ba)
        expected_one = gradicon_regularizer(ab, ba, first)
        expected_both = 0.5 * (expected_one + gradicon_regularizer(ba, ab, second))
    assert_f32_close(one, expected_one, ulps=4, scale=float(expected_one))
    assert_f32_close(both, expected_both, ulps=4, scale=float(expected_both))
    assert float(both) != float(one)


def test_field_io_improves_a_network_init_and_leaves_the_network_alone(shared_data, ct_pair):
    moving, fixed, truth_ab, truth_ba = ct_pair
    shape = tuple(fixed.shape[2:])
    net = slim_network(1, shape)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        last = net.steps[0].unet.lastConv
        last.weight.copy_(torch.randn(last.weight.shape, generator=g) * 0.005)
    net.eval()
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    flags = {k: p.requires_grad for k, p in net.named_parameters()}
    with torch.no_grad():
        init_ab, init_ba = net(moving, fixed), net(fixed, moving)
        init_ab_map, init_ba_map = init_ab.on_grid(shape), init_ba.on_grid(shape)
    # an untrained network is about as far from the truth as the identity: a coarse level first
    result = optimize_fields(moving, fixed, init_ab=init_ab, init_ba=init_ba, levels=2, iterations=(40, 20), lr=0.1)
    assert [h["level"] for h in result.history] == [1.0] * 40 + [0.0] * 20
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    err_init = voxel_error(init_ab_map, truth_ab)[0] + voxel_error(init_ba_map, truth_ba)[0]
    err_io = voxel_error(result.phi_ab.on_grid(shape), truth_ab)[0] + voxel_error(result.phi_ba.on_grid(shape),
                                                                                  truth_ba)[0]
    assert err_io < 0.5 * err_init, (err_io, err_init)  # measured: 1.34 + 1.25 -> 0.39 + 0.43 voxel
    # the network is untouched: same tensors, same flags, no gradients
    for k, v in net.state_dict().items():
        assert torch.equal(before[k], v), k
    for k, p in net.named_parameters():
        assert p.requires_grad == flags[k] and p.grad is None, k
    # a map tensor as init gives the same first loss as the transform it was evaluated from
    again = optimize_fields(moving, fixed, init_ab=init_ab_map, init_ba=init_ba_map, levels=2, iterations=(1, 1),
                            lr=0.1)
    assert again.history[0]["loss"] == result.history[0]["loss"]


def test_field_io_from_a_good_init_gets_better(shared_data, ct_pair):
    """Truth plus independent smooth errors of up to 2 voxels (a stand-in for a trained network's output), the IO
    defaults (one level, lr 0.05) for 30 steps: the error must at least halve."""
    moving, fixed, truth_ab, truth_ba = ct_pair
    shape = tuple(fixed.shape[2:])
    scale = torch.tensor([n - 1 for n in shape], dtype=torch.float32).view(1, 3, 1, 1, 1)
    init_ab = truth_ab + smooth_displacement(shape, 2.0, seed=5) / scale
    init_ba = truth_ba + smooth_displacement(shape, 2.0, seed=6) / scale
    result = optimize_fields(moving, fixed, init_ab=init_ab, init_ba=init_ba, iterations=30)
    before = voxel_error(init_ab, truth_ab)[0] + voxel_error(init_ba, truth_ba)[0]
    after = voxel_error(result.phi_ab.on_grid(shape), truth_ab)[0] + voxel_error(result.phi_ba.on_grid(shape),
                                                                                 truth_ba)[0]
    assert after < 0.5 * before, (after, before)  # measured: 0.70 + 0.79 -> 0.30 + 0.25 voxel


def test_2d_brain_slice(shared_data):
    import nibabel as nib

    t1 = np.asarray(nib.load(os.path.join(shared_data, MNI)).dataobj, dtype=np.float32)
    axial = torch.from_numpy(np.ascontiguousarray(t1[2:194, 4:228, 90]))[None, None]  # (192, 224)
    fixed = F.avg_pool2d(axial, 2) / 255.0  # [1, 1, 96, 112], 2 mm
    moving, fixed, truth_ab, truth_ba = make_pair(fixed, amplitude=4.0, seed=1)
    result = optimize_fields(moving, fixed, levels=2, iterations=(60, 40))
    shape = fixed.shape[2:]
    phi_ab, phi_ba = result.phi_ab.on_grid(shape), result.phi_ba.on_grid(shape)
    # identity: 1.5 pixels mean; measured 0.33 (AB) and 0.30 (BA)
    assert voxel_error(phi_ab, truth_ab)[0] < 0.5 and voxel_error(phi_ba, truth_ba)[0] < 0.5
    assert float(folding_percentage(map_to_ddf(phi_ab))[0]) == 0.0
    assert float(folding_percentage(map_to_ddf(phi_ba))[0]) == 0.0


def test_same_seed_same_result(shared_data, ct_pair):
    moving, fixed, _, _ = ct_pair
    a = optimize_fields(moving, fixed, levels=2, iterations=(3, 2), seed=4, similarity="lncc2")
    b = optimize_fields(moving, fixed, levels=2, iterations=(3, 2), seed=4, similarity="lncc2")
    c = optimize_fields(moving, fixed, levels=2, iterations=(3, 2), seed=5, similarity="lncc2")
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    assert torch.equal(a.phi_ab.displacement, b.phi_ab.displacement)
    assert [h["loss"] for h in a.history] != [h["loss"] for h in c.history]  # another jitter


@pytest.mark.parametrize("shape, spacing, smoothing", [((25, 25, 27), 1, 1.0), ((48, 48, 52), 2, 1.0),
                                                      ((96, 112), 2, 1.5), ((33, 20, 41), 2, 0.0)])
def test_smooth_upsample_is_blur_then_interpolate(shape, spacing, smoothing):
    """The level's displacement applies blur and upsampling as one matrix per axis; it must equal the two steps
    done separately (the border-normalized Gaussian blur, then ``F.interpolate(align_corners=True)``), to float32
    rounding of values of order one, and so must its gradient (the transpose)."""
    from monai_gradicon.field_optimization import _LevelFields
    from monai_gradicon.losses.similarity import gaussian_blur

    dim = len(shape)
    bases = [torch.zeros((1, dim, *shape)), torch.zeros((1, dim, *shape))]
    fields = _LevelFields(bases, spacing, smoothing)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        fields.params[0].copy_(torch.randn(fields.params[0].shape, generator=g))
    ours = fields.displacement(0)
    v = fields.params[0]
    if smoothing > 0:
        ones = torch.ones((1, 1, *v.shape[2:]))
        v = gaussian_blur(v, smoothing) / gaussian_blur(ones, smoothing)
    if tuple(v.shape[2:]) != shape:
        v = F.interpolate(v, size=shape, mode="trilinear" if dim == 3 else "bilinear", align_corners=True)
    expected = v * torch.tensor([1.0 / (n - 1) for n in shape]).view(1, dim, *[1] * dim)
    assert tuple(ours.shape) == (1, dim, *shape)
    assert_f32_close(ours.detach(), expected.detach(), ulps=32, scale=float(expected.detach().abs().max()))
    weights = torch.randn(ours.shape, generator=g)
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), fields.params[0])
    (grad_expected,) = torch.autograd.grad((expected * weights).sum(), fields.params[0])
    assert_f32_close(grad_ours, grad_expected, ulps=64, scale=float(grad_expected.abs().max()))


def test_own_adam_is_torch_adam_step_for_step():
    """``_Adam`` exists only to skip the ``torch._dynamo`` import of ``torch.optim``; its updates must be those of
    ``torch.optim.Adam`` (default CPU path) exactly, including steps where the gradient changes sign and scale."""
    from monai_gradicon.field_optimization import _Adam

    g = torch.Generator().manual_seed(0)
    start = [torch.randn((1, 3, 5, 6, 7), generator=g), torch.randn((1, 3, 4, 4, 4), generator=g)]
    ours = [t.clone().requires_grad_(True) for t in start]
    theirs = [t.clone().requires_grad_(True) for t in start]
    opt_ours, opt_theirs = _Adam(ours, lr=0.1), torch.optim.Adam(theirs, lr=0.1)
    for step in range(6):
        grads = [torch.randn(t.shape, generator=g) * 10.0 ** (step % 3 - 1) for t in start]
        for params in (ours, theirs):
            for p, grad in zip(params, grads):
                p.grad = grad.clone()
        opt_ours.step()
        opt_theirs.step()
        for a, b in zip(ours, theirs):
            assert torch.equal(a, b), step
    opt_ours.zero_grad()
    assert all(p.grad is None for p in ours)


def test_cached_target_lncc_is_the_loss_modules_value():
    g = torch.Generator().manual_seed(0)
    pred = torch.rand((1, 1, 20, 22, 24), generator=g)
    target = torch.rand((1, 1, 20, 22, 24), generator=g)
    for squared, module in ((False, LNCCLoss(5.0)), (True, SquaredLNCCLoss(5.0))):
        ours = _TargetLNCC(target, 5.0, squared)(pred)
        assert_f32_close(ours, module(pred, target), ulps=16, scale=1.0, what=f"squared={squared}")


def test_pyramid_shapes_and_alignment():
    assert level_shapes((175, 175, 175), 3) == [(45, 45, 45), (88, 88, 88), (175, 175, 175)]
    assert level_shapes((48, 48, 52), 2) == [(25, 25, 27), (48, 48, 52)]
    # coarse voxel j sits at the normalized position j / (n - 1): a linear ramp stays the same ramp away from the
    # border (the anti-aliasing kernel, 5 input voxels wide, is symmetric), and a constant stays constant everywhere
    ramp = identity_map((33, 41))[:, 1:]
    for level in image_pyramid(ramp, level_shapes((33, 41), 3)):
        expected = identity_map(level.shape[2:])[:, 1:]
        assert_f32_close(level[..., 2:-2, 2:-2], expected[..., 2:-2, 2:-2], ulps=64, scale=1.0)
    for level in image_pyramid(torch.full((1, 1, 33, 41), 0.7), level_shapes((33, 41), 3)):
        assert_f32_close(level, torch.full_like(level, 0.7), ulps=8, scale=1.0)


def _pair(shape=(20, 20, 20)):
    g = torch.Generator().manual_seed(0)
    return torch.rand((1, 1, *shape), generator=g), torch.rand((1, 1, *shape), generator=g)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"lmbda": -1.0}, ValueError, "lmbda must be a finite number >= 0"),
        ({"lmbda": float("nan")}, ValueError, "lmbda"),
        ({"iterations": 0}, ValueError, "at least one iteration"),
        ({"iterations": (0,)}, ValueError, "at least one iteration"),
        ({"iterations": (5, 5)}, ValueError, "2 entries but levels=1"),
        ({"iterations": 2.5}, TypeError, "iterations"),
        ({"levels": 2}, ValueError, "levels=2 is too many for an image of shape"),
        ({"levels": 0}, ValueError, "levels must be a whole number >= 1"),
        ({"lr": 0.0}, ValueError, "lr must be a positive finite number"),
        ({"sigma": -1.0}, ValueError, "sigma must be a positive"),
        ({"smoothing": -0.5}, ValueError, "smoothing must be"),
        ({"field_spacing": 0}, ValueError, "field_spacing entries must be >= 1"),
        ({"similarity": "mi"}, ValueError, "similarity must be one of"),
        ({"regularizer": "icon"}, ValueError, "regularizer must be one of"),
        ({"padding_mode": "wrap"}, ValueError, "padding_mode must be one of"),
        ({"symmetric": "yes"}, TypeError, "symmetric must be True or False"),
        ({"lmbda": True}, ValueError, "lmbda must be a finite number >= 0"),
    ],
)
def test_bad_settings_fail_before_any_work(kwargs, error, match):
    moving, fixed = _pair()
    settings = {"levels": 1, "iterations": 1, **kwargs}
    with pytest.raises(error, match=match):
        optimize_fields(moving, fixed, **settings)


def test_default_levels_fit_a_thin_image():
    """A chest CT of 48 slices (pyradiomics lung1) capped to a 175 x 175 x 48 working grid: the default 3 levels
    would make a 13-slice coarsest level, so the default takes as many levels as fit (2 here, the default
    iterations of the two finest levels); asked for explicitly, 3 levels are still refused with the reason."""
    from monai_gradicon.field_optimization import check_field_options

    options = check_field_options((175, 175, 48), from_init=False)
    assert options.levels == 2 and options.iterations == (50, 25) and options.field_spacing == (1, 2)
    assert check_field_options((175, 175, 58), from_init=False).levels == 3
    assert check_field_options((175, 175, 57), from_init=False).levels == 2
    assert check_field_options((175, 175, 29), from_init=False).levels == 1
    with pytest.raises(ValueError, match=r"levels=3 is too many for an image of shape \(175, 175, 48\)"):
        check_field_options((175, 175, 48), from_init=False, levels=3)
    with pytest.raises(ValueError, match="too small"):
        check_field_options((175, 175, 15), from_init=False)


def test_bad_inputs_fail_clearly():
    moving, fixed = _pair()
    with pytest.raises(ValueError, match=r"shape \(12, 20, 20\) is too small"):
        optimize_fields(moving[:, :, :12], fixed[:, :, :12], levels=1)
    with pytest.raises(ValueError, match="same shape"):
        optimize_fields(moving, fixed[:, :, :18], levels=1)
    with pytest.raises(ValueError, match="batch 1"):
        optimize_fields(torch.cat([moving, moving]), torch.cat([fixed, fixed]), levels=1)
    bad = moving.clone()
    bad[0, 0, 3, 4, 5] = float("nan")
    with pytest.raises(ValueError, match="moving contains non-finite values"):
        optimize_fields(bad, fixed, levels=1)
    ident = identity_map((20, 20, 20))
    with pytest.raises(ValueError, match="given together"):
        optimize_fields(moving, fixed, init_ab=ident, levels=1)
    with pytest.raises(ValueError, match=r"init_ba must give a map of shape \(1, 3, 20, 20, 20\)"):
        optimize_fields(moving, fixed, init_ab=ident, init_ba=identity_map((20, 20, 19)))
    inf_map = ident.clone()
    inf_map[0, 1, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="init_ab contains non-finite"):
        optimize_fields(moving, fixed, init_ab=inf_map, init_ba=ident)
    with pytest.raises(TypeError, match="init_ab must be a CoordinateTransform or a map tensor"):
        optimize_fields(moving, fixed, init_ab=ident.numpy(), init_ba=ident)


def test_a_non_finite_loss_is_an_error_naming_the_step():
    moving, fixed = _pair()
    # an absurd learning rate: the first update throws the fields to ~1e30 voxels, the GradICON term overflows
    with pytest.raises(FloatingPointError, match=r"at step 1 \(level 0"):
        optimize_fields(moving, fixed, levels=1, iterations=5, lr=1e30)


def test_dtype_and_device_follow_the_inputs():
    moving, fixed = _pair()
    result = optimize_fields(moving.double(), fixed.double(), levels=1, iterations=2)
    assert result.phi_ab.displacement.dtype == torch.float64 and result.phi_ba.displacement.device == moving.device
    assert len(result.history) == 2 and all(math.isfinite(h["loss"]) for h in result.history)
