"""The bundles' optimize.json (no network weights): the same registration as the Python API's method "optimize"
(one pipeline behind every door), on the bundles' synthetic demo data at a tiny size."""

from __future__ import annotations


import numpy as np
import pytest
from monai.bundle import ConfigParser

from bundle_helpers import DEMO_DATA, make_tmp_bundle, quiet
from monai_gradicon.io import read_displacement_field
from monai_gradicon.pipeline import register
from monai_gradicon.pipeline.transforms import OptimizeRegistrationd

OPTIONS = {"opt_levels": 1, "opt_iterations": [4], "input_shape": [20, 20, 20]}


@pytest.mark.parametrize("name", ["gradicon_lung", "gradicon_brain"])
def test_optimize_config_equals_the_python_api(tmp_path, name):
    quiet()
    bundle = make_tmp_bundle(name, tmp_path)
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "optimize.json"))
    parser.update({"bundle_root": str(bundle), "demo_dataset": DEMO_DATA[name], "device": "cpu", **OPTIONS})
    written = parser.get_parsed_content("optimize")[0]
    assert written and all(len(files) == 4 for files in written)
    pair = parser.get_parsed_content("data")[0]
    masks = {}
    if name == "gradicon_lung":
        masks = {"fixed_mask": pair.get("fixed_label"), "moving_mask": pair.get("moving_label")}
    api = register(pair["fixed_image"], pair["moving_image"], None, **masks,
                   preprocessing="lung_ct" if name == "gradicon_lung" else "brain", method="optimize",
                   input_shape=tuple(OPTIONS["input_shape"]), opt_levels=1, opt_iterations=[4], device="cpu")
    field, _ = read_displacement_field(written[0]["displacement_mm"])
    inverse, _ = read_displacement_field(written[0]["inverse_displacement_mm"])
    assert np.abs(api.displacement).max() > 1e-3  # it moved
    np.testing.assert_array_equal(field, api.displacement)
    np.testing.assert_array_equal(inverse, api.inverse_displacement)


def test_bad_optimize_options_fail_when_the_config_is_parsed():
    with pytest.raises(ValueError, match="opt_lambda"):
        OptimizeRegistrationd(preprocessing="lung_ct", opt_lambda=-1.0)
    with pytest.raises(ValueError):
        OptimizeRegistrationd(preprocessing="no_such_preprocessing")
    with pytest.raises(TypeError, match="no network card"):
        OptimizeRegistrationd(preprocessing="brain").settings()
