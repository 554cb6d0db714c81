"""Model-zoo style tests of the GradICON bundles (bundles/gradicon_lung, bundles/gradicon_brain).

Each bundle is copied (configs only) to a temporary folder and trained there at a tiny size (33^3, 2-step network,
one iteration, synthetic demo data), then every workflow and MONAI bundle tool is exercised on the result:
check_properties + run for train / evaluate / inference, verify_metadata (offline schema), verify_net_in_out,
ckpt_export (trace) and monai.bundle.load with a full tensor count.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigWorkflow, ckpt_export, verify_metadata, verify_net_in_out
from monai.data import load_net_with_metadata

import monai.bundle
from bundle_helpers import (
    BUNDLES,
    DEMO_DATA,
    INFER_OVERRIDES,
    REPO,
    SCHEMA,
    TINY_SIZE,
    TRAIN_OVERRIDES,
    make_tmp_bundle,
    quiet,
)
from monai_gradicon import WeightFileError
from monai_gradicon.bundle_utils import check_all_weights_loaded, load_bundle_network
from monai_gradicon.weights import load_weights

NAMES = ["gradicon_lung", "gradicon_brain"]
KEY_METRIC = {"gradicon_lung": "val_mtre_mm", "gradicon_brain": "val_dice"}

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::DeprecationWarning",
                                        "ignore::FutureWarning")


def _workflow(bundle: Path, configs: list[str], workflow_type: str, **overrides) -> ConfigWorkflow:
    quiet()
    files = [str(bundle / "configs" / c) for c in configs]
    return ConfigWorkflow(
        config_file=files if len(files) > 1 else files[0],
        meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=str(bundle / "configs" / "logging.conf"),
        workflow_type=workflow_type,
        **overrides,
    )


def _run(workflow: ConfigWorkflow) -> None:
    workflow.initialize()
    assert workflow.check_properties() == []
    workflow.run()
    workflow.finalize()


@pytest.fixture(scope="module", params=NAMES)
def trained(request, tmp_path_factory):
    """A tmp copy of the bundle trained for one iteration on its tiny demo dataset."""
    name = request.param
    bundle = make_tmp_bundle(name, tmp_path_factory.mktemp("bundles"))
    wf = _workflow(bundle, ["train.json"], "train", bundle_root=str(bundle), demo_dataset=DEMO_DATA[name],
                   **TRAIN_OVERRIDES)
    _run(wf)
    return name, bundle


def test_train_outputs(trained):
    name, bundle = trained
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert all(k.startswith("network.") for k in state) and len(state) == 47 * TRAIN_OVERRIDES["stage1_num_steps"] + 1
    # the model card says how the weights were trained, and agrees with the bundle's metadata
    _, card = load_weights(bundle / "models" / "model.pt")
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())["model_card"]
    assert card.input_shape == tuple(TINY_SIZE) and card.num_steps == TRAIN_OVERRIDES["stage1_num_steps"]
    assert {k: getattr(card, k) for k in meta} == meta
    assert list((bundle / "eval" / "checkpoints").glob("checkpoint_*.pt"))
    assert list((bundle / "eval" / "images").glob("*.png"))
    assert list((bundle / "eval" / "tensorboard").glob("events.out.tfevents.*"))
    history = json.loads((bundle / "eval" / "validation_metrics_history.json").read_text())
    assert history[-1]["epoch"] == 1 and KEY_METRIC[name] in history[-1]["engine_metrics"]
    summary = history[-1]["summary"]
    if name == "gradicon_lung":
        assert summary["tre_before_mm"]["mean"] > 0 and np.isfinite(summary["tre_after_mm"]["mean"])
    else:
        assert 0 < summary["dice_before"]["mean"] <= 1 and 0 < summary["dice_after"]["mean"] <= 1
    assert "folds_percent" in summary
    assert (bundle / "demo_data" / "datalist.json").is_file()


def test_evaluate_workflow(trained):
    name, bundle = trained
    # evaluate.json merges on inference.json: the same pipeline, plus metrics on the original grids
    wf = _workflow(bundle, ["inference.json", "evaluate.json"], "eval", bundle_root=str(bundle),
                   demo_dataset=DEMO_DATA[name], **INFER_OVERRIDES)
    _run(wf)
    report = json.loads((bundle / "eval" / "evaluation_metrics.json").read_text())
    assert report["num_cases"] >= 1
    assert (bundle / "eval" / "evaluation_metrics_per_case.csv").read_text().startswith("case,epoch,")
    key = "tre_after_mm" if name == "gradicon_lung" else "dice_after"
    assert key in report["summary"] and np.isfinite(report["summary"][key]["mean"])
    assert "folds_percent" in report["summary"] and list((bundle / "eval" / "images").glob("evaluation_*.png"))


def test_inference_workflow(trained):
    name, bundle = trained
    wf = _workflow(bundle, ["inference.json"], "infer", bundle_root=str(bundle), demo_dataset=DEMO_DATA[name],
                   **INFER_OVERRIDES)
    _run(wf)
    out_dir = bundle / "eval" / "inference"
    fields = sorted(out_dir.glob("*_displacement_mm.nii.gz"))
    assert fields
    for path in fields:
        case = path.name[: -len("_displacement_mm.nii.gz")]
        assert (out_dir / f"{case}_ddf_voxels.nii.gz").is_file() and (out_dir / f"{case}_warped.nii.gz").is_file()
    datalist = json.loads((bundle / "demo_data" / "datalist.json").read_text())
    first = datalist["validation"][0]
    fixed_name = first.get("fixed_image") or datalist["validation"][1]["image"]
    fixed = nib.load(bundle / "demo_data" / fixed_name)
    stem = Path(fixed_name).name.split(".")[0]
    case = [p for p in fields if p.name.split("_to_")[1].startswith(stem)][0].name[: -len("_displacement_mm.nii.gz")]
    warped = nib.load(out_dir / f"{case}_warped.nii.gz")
    assert warped.shape == fixed.shape and np.allclose(warped.affine, fixed.affine)
    field = nib.load(out_dir / f"{case}_displacement_mm.nii.gz")  # ITK / Slicer convention
    assert field.shape == (*fixed.shape, 1, 3) and int(field.header["intent_code"]) == 1007
    ddf = nib.load(out_dir / f"{case}_ddf_voxels.nii.gz")  # MONAI Warp convention
    assert ddf.shape == (*fixed.shape, 3)
    assert np.isfinite(field.get_fdata()).all() and np.isfinite(ddf.get_fdata()).all()


def test_verify_metadata_offline():
    quiet()
    for name in NAMES:
        verify_metadata(meta_file=str(BUNDLES / name / "configs" / "metadata.json"), filepath=str(SCHEMA))


def test_verify_metadata_rejects_missing_key(tmp_path):
    quiet()
    meta = json.loads((BUNDLES / "gradicon_lung" / "configs" / "metadata.json").read_text())
    meta.pop("required_packages_version")
    path = tmp_path / "metadata.json"
    path.write_text(json.dumps(meta))
    with pytest.raises(Exception, match="required_packages_version"):
        verify_metadata(meta_file=str(path), filepath=str(SCHEMA))


def test_verify_net_in_out(trained):
    _, bundle = trained
    quiet()
    verify_net_in_out(net_id="network_def", meta_file=str(bundle / "configs" / "metadata.json"),
                      config_file=str(bundle / "configs" / "inference.json"), device="cpu", **INFER_OVERRIDES)


def test_ckpt_export_trace(trained, tmp_path):
    _, bundle = trained
    quiet()
    ts_path = tmp_path / "model.ts"
    ckpt_export(net_id="network_def", filepath=str(ts_path), ckpt_file=str(bundle / "models" / "model.pt"),
                meta_file=str(bundle / "configs" / "metadata.json"),
                config_file=str(bundle / "configs" / "inference.json"), use_trace=True,
                input_shape=[1, 2, *TINY_SIZE], **INFER_OVERRIDES)
    module, meta, extra = load_net_with_metadata(str(ts_path), more_extra_files=("inference.json",))
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 3
    eager = load_bundle_network(bundle, net_override={"network#num_steps": INFER_OVERRIDES["num_steps"],
                                                      "network#input_shape": TINY_SIZE}).eval()
    x = torch.rand(1, 2, *TINY_SIZE)
    with torch.no_grad():
        assert torch.allclose(module(x), eager(x), atol=1e-4)


def test_monai_bundle_load_every_tensor(trained):
    name, bundle = trained
    quiet()
    override = {"network#num_steps": INFER_OVERRIDES["num_steps"], "network#input_shape": TINY_SIZE}
    net = monai.bundle.load(name=name, bundle_dir=str(bundle.parent), workflow_type="inference", device="cpu",
                            source="github", net_override=override)
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert len(net.state_dict()) == len(state) == 47 * INFER_OVERRIDES["num_steps"] + 1  # + the model card
    assert net.network.card == load_weights(bundle / "models" / "model.pt")[1]
    assert check_all_weights_loaded(net, state) == len(state)
    # MONAI's loader silently leaves a mismatched network untrained; our helper refuses it
    bad = monai.bundle.load(name=name, bundle_dir=str(bundle.parent), workflow_type="inference", device="cpu",
                            source="github", net_override={"network#num_steps": 3, "network#input_shape": [65] * 3})
    with pytest.raises(WeightFileError, match="missing"):
        check_all_weights_loaded(bad, state)
    with pytest.raises(WeightFileError):
        load_bundle_network(bundle, net_override={"network#num_steps": 3, "network#input_shape": [65] * 3})


def test_convert_released_weights(tmp_path):
    from monai_gradicon import gradicon_network
    from monai_gradicon.networks import GradICONDDFNet
    from monai_gradicon.weights import network_to_official_state

    torch.manual_seed(0)
    source = gradicon_network(1, 3)
    for p in source.parameters():
        p.data.normal_()
    official = tmp_path / "lung_model_weights_step_2.trch"
    torch.save(network_to_official_state(source), official)
    bundle = make_tmp_bundle("gradicon_lung", tmp_path / "b")
    res = subprocess.run([sys.executable, "-m", "monai_gradicon.bundle_utils", "convert", "--weights", str(official),
                          "--bundle_dir", str(bundle)], capture_output=True, text=True)
    assert res.returncode == 0 and "48 tensors" in res.stdout, res.stderr
    state = torch.load(bundle / "models" / "model.pt", weights_only=True)
    target = GradICONDDFNet(gradicon_network(1, 3))
    target.load_state_dict(state, strict=True)
    assert check_all_weights_loaded(target, state) == 48
    assert torch.equal(target.network.steps[0].unet.lastConv.weight, source.steps[0].unet.lastConv.weight)
    card = target.network.card
    assert (card.axis_order, card.preprocessing, card.input_shape) == ("reference", "lung_ct", (175, 175, 175))
    assert card.source_file == official.name and len(card.source_sha256) == 64
    # the existing model.pt is never replaced silently, and the released file never
    res = subprocess.run([sys.executable, "-m", "monai_gradicon.bundle_utils", "convert", "--weights", str(official),
                          "--bundle_dir", str(bundle)], capture_output=True, text=True)
    assert res.returncode == 2 and "already exists" in res.stderr
    res = subprocess.run([sys.executable, "-m", "monai_gradicon.bundle_utils", "convert", "--weights", str(official),
                          "--output", str(official), "--overwrite"], capture_output=True, text=True)
    assert res.returncode == 2 and "is the input file" in res.stderr
    # weights of another model do not go into this bundle: the card contradicts its metadata
    brain = tmp_path / "brain_model_weights_step_2.trch"
    brain.write_bytes(official.read_bytes())
    res = subprocess.run([sys.executable, "-m", "monai_gradicon.bundle_utils", "convert", "--weights", str(brain),
                          "--bundle_dir", str(bundle), "--overwrite"], capture_output=True, text=True)
    assert res.returncode == 2 and "preprocessing: the card says 'brain'" in res.stderr
    (tmp_path / "junk.trch").write_bytes(b"not a torch file")
    res = subprocess.run([sys.executable, "-m", "monai_gradicon.bundle_utils", "convert", "--weights",
                          str(tmp_path / "junk.trch"), "--output", str(tmp_path / "x.pt")],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "error:" in res.stderr and "junk.trch" in res.stderr


def _cli(args: list[str], cwd: Path, env_extra: dict | None = None, timeout: int = 600):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.update(env_extra or {})
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def _overrides_cli(overrides: dict) -> list[str]:
    args = []
    for k, v in overrides.items():
        args += [f"--{k}", json.dumps(v) if not isinstance(v, bool) else str(v)]
    return args


def test_cli_training_alias_and_missing_datalist(tmp_path):
    """The README's command form (``run training`` alias, train.json + demo.json merged) on a tiny grid, and a
    missing datalist failing with a clear message."""
    bundle = make_tmp_bundle("gradicon_lung", tmp_path)
    configs = str([str(bundle / "configs" / "train.json"), str(bundle / "configs" / "demo.json")])
    base = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", configs,
            "--bundle_root", str(bundle)]
    res = _cli(base + _overrides_cli(dict(TRAIN_OVERRIDES, demo_dataset=DEMO_DATA["gradicon_lung"])), cwd=REPO)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert (bundle / "models" / "model.pt").is_file() and list((bundle / "eval" / "images").glob("*.png"))
    res = _cli([sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
                str(bundle / "configs" / "train.json"), "--bundle_root", str(bundle),
                "--datalist", str(tmp_path / "nope.json")], cwd=REPO)
    assert res.returncode != 0
    assert "datalist JSON not found" in (res.stdout + res.stderr) and "--dataset_dir" in (res.stdout + res.stderr)


@pytest.mark.parametrize("name", NAMES)
def test_multi_gpu_train_gloo(name, tmp_path):
    """torchrun with 2 CPU processes (gloo): DDP, DistributedSampler, rank-0 logging and files."""
    bundle = make_tmp_bundle(name, tmp_path)
    demo = dict(DEMO_DATA[name])
    if name == "gradicon_lung":
        demo.update(n_pairs=4, n_validation=2)
    else:
        demo.update(n_subjects=5, n_validation=2)
    overrides = dict(TRAIN_OVERRIDES, demo_dataset=demo, spatial_size=[17, 17, 17], stage1_num_steps=1,
                     two_stage=True, stage2_iterations=1)
    configs = str([str(bundle / "configs" / "train.json"), str(bundle / "configs" / "multi_gpu_train.json")])
    args = ["torchrun", "--standalone", "--nnodes=1", "--nproc_per_node=2", "-m", "monai.bundle", "run", "training",
            "--config_file", configs, "--bundle_root", str(bundle)] + _overrides_cli(overrides)
    res = _cli(args, cwd=REPO)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-4000:]
    assert log.count("Epoch: 1/2, Iter: 1/1") == 1  # StatsHandler on rank 0 only
    assert "GradICON stage 2 starts" in log
    assert (bundle / "models" / "model.pt").is_file()
    assert len(list((bundle / "eval" / "tensorboard").iterdir())) == 1
    per_case = (bundle / "eval" / "validation_metrics_per_case.csv").read_text().strip().splitlines()
    assert len(per_case) == 1 + 2  # header + one validation pair per rank, gathered on rank 0
