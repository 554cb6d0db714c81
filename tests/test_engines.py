"""Unit tests of monai_gradicon.engines (tiny shapes, CPU)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.engines import SupervisedTrainer

from monai_gradicon import GradICONDDFNet, gradicon_network
from monai_gradicon.engines import (
    AtomicSaveHandler,
    CaseMetricAverage,
    DatalistError,
    GradICONTrainingModule,
    LoadLandmarksd,
    MetricsReportHandler,
    ModelWeightsSaver,
    PairAugmentation,
    PairPrepareBatch,
    RegistrationEvalOutputd,
    ResumableCheckpoint,
    SubjectPairDataset,
    TwoStageHandler,
    eval_outputs,
    latest_checkpoint,
    pairs_from_subjects,
    pick_loss,
    registration_datalist,
    reset_optimizer,
    train_scalars,
)
from tolerance import assert_f32_close

torch.set_num_threads(2)


def _pair(n=17, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 1, n, n, n, generator=g), torch.rand(batch, 1, n, n, n, generator=g)


# ---------------------------------------------------------------------------------------------- prepare / augment


def test_prepare_batch_returns_pair_and_drops_metadata():
    moving, fixed = _pair()
    batch = {"moving_image": MetaTensor(moving), "fixed_image": MetaTensor(fixed), "case": ["a"]}
    m, f, args, kwargs = PairPrepareBatch()(batch, device="cpu")
    assert type(m) is torch.Tensor and type(f) is torch.Tensor
    assert torch.equal(m, moving) and torch.equal(f, fixed)
    assert args[0] is f and kwargs == {}
    with pytest.raises(KeyError, match="fixed_image"):
        PairPrepareBatch()({"moving_image": moving}, device="cpu")


def test_augmentation_swap_and_identity():
    moving, fixed = _pair(batch=3)
    m, f = PairAugmentation(swap_prob=1.0, permute=False, noise_std=0.0)(moving, fixed)
    assert torch.allclose(m, fixed, atol=1e-5) and torch.allclose(f, moving, atol=1e-5)
    m, f = PairAugmentation(swap_prob=0.0, permute=False, noise_std=0.0)(moving, fixed)
    assert torch.allclose(m, moving, atol=1e-5) and torch.allclose(f, fixed, atol=1e-5)


def test_augmentation_is_shared_permutation_plus_noise():
    # a constant image stays constant; a random signed permutation keeps the multiset of values (no noise)
    moving, fixed = _pair(batch=2)
    m, f = PairAugmentation(swap_prob=0.0, permute=True, noise_std=0.0, seed=3)(moving, fixed)
    for a, b in ((m, moving), (f, fixed)):
        assert torch.allclose(a.flatten(1).sort(dim=1).values, b.flatten(1).sort(dim=1).values, atol=1e-5)
    m2, _ = PairAugmentation(swap_prob=0.0, permute=True, noise_std=0.05, seed=3)(moving, fixed)
    assert not torch.allclose(m2, m)
    # reproducible with a seed
    m3, _ = PairAugmentation(swap_prob=0.0, permute=True, noise_std=0.05, seed=3)(moving, fixed)
    assert torch.equal(m2, m3)
    with pytest.raises(ValueError):
        PairAugmentation(swap_prob=1.5)


# ---------------------------------------------------------------------------------------------- training module


def test_training_module_keys_outputs_and_growth():
    torch.manual_seed(0)
    module = GradICONTrainingModule(gradicon_network(1, 3, (17, 17, 17)))
    export = GradICONDDFNet(module.network)
    assert list(module.state_dict()) == list(export.state_dict())
    assert all(k.startswith("network.steps.") or k == "network.model_card" for k in module.state_dict())
    moving, fixed = _pair()
    module.train()
    out = module(moving, fixed)
    assert out["loss"].requires_grad and "ddf" not in out
    assert pick_loss(out) is out["loss"]
    assert out["folds_percent"].shape == ()
    module.eval()
    with torch.no_grad():
        before = module(moving, fixed)
        assert before["ddf"].shape == (1, 3, 17, 17, 17)
        old_params = {id(p) for p in module.parameters()}
        module.grow()
        assert module.num_steps == 2 and not module.network.training
        after = module(moving, fixed)
    assert torch.allclose(before["ddf"], after["ddf"], atol=1e-5)  # the new step starts at zero
    assert old_params.isdisjoint({id(p) for p in module.parameters()})
    with pytest.raises(ValueError, match="loss"):
        pick_loss(torch.zeros(1))


def test_reset_optimizer_is_a_fresh_adam():
    a = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(a.parameters(), lr=1e-3)
    a(torch.ones(1, 2)).sum().backward()
    opt.step()
    opt.param_groups[0]["lr"] = 7.0
    b = torch.nn.Linear(3, 3)
    reset_optimizer(opt, b.parameters())
    assert len(opt.state) == 0 and opt.param_groups[0]["lr"] == 1e-3
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(p) for p in b.parameters()]
    reset_optimizer(opt, a.parameters(), lr=5e-5)
    assert opt.param_groups[0]["lr"] == 5e-5 and opt.defaults["lr"] == 1e-3


# ------------------------------------------------------------------------------------------- two stages + checkpoints


def _trainer(tmp_path, max_epochs, resume=True):
    torch.manual_seed(0)
    module = GradICONTrainingModule(gradicon_network(1, 3, (17, 17, 17)))
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-4)
    data = [{"moving_image": m[0], "fixed_image": f[0]} for m, f in [_pair(seed=s) for s in range(2)]]
    stage = TwoStageHandler(module, optimizer, stage1_epochs=1, stage2_lr=3e-5)
    ckpt = ResumableCheckpoint(tmp_path / "ckpt", {"stage": stage, "model": module, "optimizer": optimizer},
                               interval=1, resume=resume)
    saver = ModelWeightsSaver(module, tmp_path / "models", stage_handler=stage, interval=1)
    trainer = SupervisedTrainer(
        device="cpu", max_epochs=max_epochs, train_data_loader=torch.utils.data.DataLoader(data, batch_size=1),
        epoch_length=1, network=module, optimizer=optimizer, loss_function=pick_loss,
        prepare_batch=PairPrepareBatch(augmentation=PairAugmentation(seed=0)), train_handlers=[stage, ckpt, saver],
    )
    return trainer, module, optimizer, stage, ckpt


def test_two_stage_training_and_resume(tmp_path):
    trainer, module, optimizer, stage, ckpt = _trainer(tmp_path, max_epochs=2)
    trainer.run()
    assert stage.stage == 2 and module.num_steps == 2
    assert set(optimizer.param_groups[0]["params"]) == set(module.parameters())
    assert optimizer.param_groups[0]["lr"] == 3e-5
    latest = latest_checkpoint(tmp_path / "ckpt")
    assert latest is not None and latest.name == "checkpoint_2.pt"
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["checkpoint_2.pt"]  # n_saved=1, no temp files
    assert (tmp_path / "models" / "model_stage1.pt").is_file() and (tmp_path / "models" / "model.pt").is_file()
    final = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert all(torch.equal(final[k], v) for k, v in module.state_dict().items())

    # a fresh process resumes: the stage-2 checkpoint grows the 1-step network before loading, epoch 3 continues
    trainer2, module2, optimizer2, stage2, ckpt2 = _trainer(tmp_path, max_epochs=3)
    seen = {}

    @trainer2.on(Events.EPOCH_STARTED)
    def _record(engine):
        seen.setdefault("epoch", engine.state.epoch)
        seen.setdefault("weights", {k: v.clone() for k, v in module2.state_dict().items()})

    trainer2.run()
    assert ckpt2.loaded_from == latest and stage2.stage == 2 and module2.num_steps == 2
    assert seen["epoch"] == 3
    assert all(torch.equal(seen["weights"][k], final[k]) for k in final)
    assert latest_checkpoint(tmp_path / "ckpt").name == "checkpoint_3.pt"
    assert len(list((tmp_path / "ckpt").iterdir())) == 1


def test_resume_with_incompatible_checkpoint_is_a_clear_error(tmp_path):
    trainer, *_ = _trainer(tmp_path, max_epochs=1)
    trainer.run()
    torch.save({"stage": {"stage": 1}, "model": {"x": torch.zeros(1)}, "optimizer": {}, "trainer": {}},
               tmp_path / "ckpt" / "checkpoint_9.pt")
    trainer2, *_ = _trainer(tmp_path, max_epochs=2)
    with pytest.raises(RuntimeError, match="does not match this configuration"):
        trainer2.run()


def test_atomic_save_handler_keeps_old_file_on_failure(tmp_path, monkeypatch):
    saver = AtomicSaveHandler(tmp_path)
    saver({"a": torch.ones(1)}, "ck.pt")

    def broken(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError):
        saver({"a": torch.zeros(1)}, "ck.pt")
    monkeypatch.undo()
    assert torch.equal(torch.load(tmp_path / "ck.pt", weights_only=True)["a"], torch.ones(1))
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]
    saver.remove("ck.pt")
    assert not (tmp_path / "ck.pt").exists()


# ---------------------------------------------------------------------------------------------- data sources


def test_datalist_errors_are_clear(tmp_path):
    with pytest.raises(DatalistError, match="not found"):
        registration_datalist("training", "lung", datalist=tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DatalistError, match="malformed JSON"):
        registration_datalist("training", "lung", datalist=bad)
    bad.write_text(json.dumps({"training": [{"fixed_image": "a.nii.gz"}]}))
    with pytest.raises(DatalistError, match="moving_image"):
        registration_datalist("training", "lung", datalist=bad)
    with pytest.raises(DatalistError, match="missing split"):
        registration_datalist("validation", "lung", datalist=bad)
    # a missing dataset folder is an error (the demo is written only into the demo folder)
    with pytest.raises(DatalistError, match="does not exist"):
        registration_datalist("training", "lung", dataset_dir=tmp_path / "nope", demo_dir=tmp_path / "demo")
    assert not (tmp_path / "nope").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatalistError, match="none of the known layouts"):
        registration_datalist("training", "brain", dataset_dir=tmp_path / "empty")
    with pytest.raises(DatalistError, match="Neither"):
        registration_datalist("training", "lung")


def test_demo_datalist_is_written_once(tmp_path):
    demo = tmp_path / "demo"
    kwargs = {"n_pairs": 2, "shape": [32, 32, 32], "n_landmarks": 5, "n_validation": 1}
    train = registration_datalist("training", "lung", dataset_dir=demo, demo_dir=demo, demo_kwargs=kwargs)
    val = registration_datalist("validation", "lung", dataset_dir=demo, demo_dir=demo, demo_kwargs=kwargs)
    assert len(train) == 1 and len(val) == 1
    assert {"fixed_image", "moving_image", "fixed_label", "fixed_landmarks"} <= set(val[0])
    assert val[0]["landmark_coordinates"] == "world_mm"
    mtime = (demo / "datalist.json").stat().st_mtime_ns
    registration_datalist("training", "lung", dataset_dir=demo, demo_dir=demo, demo_kwargs=kwargs)
    assert (demo / "datalist.json").stat().st_mtime_ns == mtime


def test_pairs_from_subjects_and_random_pairs():
    subjects = [{"image": f"s{i}.nii.gz", "label": f"l{i}.nii.gz"} for i in range(3)]
    pairs = pairs_from_subjects(subjects)
    assert [(p["moving_image"], p["fixed_image"]) for p in pairs] == [
        ("s0.nii.gz", "s1.nii.gz"), ("s1.nii.gz", "s2.nii.gz"), ("s2.nii.gz", "s0.nii.gz")]
    assert len(pairs_from_subjects(subjects[:2])) == 2
    assert pairs_from_subjects(pairs) == pairs
    with pytest.raises(DatalistError):
        pairs_from_subjects(subjects[:1])
    data = SubjectPairDataset([{"image": torch.full((1,), float(i))} for i in range(4)], num_pairs=20, seed=1)
    assert len(data) == 20
    drawn = [data[i] for i in range(20)]
    assert all(float(d["moving_image"]) != float(d["fixed_image"]) for d in drawn)
    assert len({(float(d["moving_image"]), float(d["fixed_image"])) for d in drawn}) > 3


# ---------------------------------------------------------------------------------------------- transforms


def _affine(spacing=2.0, origin=(-10.0, 5.0, 3.0)):
    a = np.diag([spacing, spacing, spacing, 1.0])
    a[:3, 3] = origin
    return torch.as_tensor(a)


def test_load_landmarks_voxel_to_world(tmp_path):
    csv_path = tmp_path / "kp.csv"
    csv_path.write_text("1,2,3\n0,0,0\n")
    image = MetaTensor(torch.zeros(1, 8, 8, 8), affine=_affine())
    out = LoadLandmarksd()({"fixed_image": image, "fixed_landmarks": str(csv_path), "landmark_coordinates": "voxel"})
    expected = torch.tensor([[-8.0, 9.0, 9.0], [-10.0, 5.0, 3.0]], dtype=torch.float64)
    assert torch.allclose(out["fixed_landmarks"], expected)
    assert "landmark_coordinates" not in out
    out = LoadLandmarksd()({"fixed_image": image, "fixed_landmarks": str(csv_path)})
    assert torch.allclose(out["fixed_landmarks"], torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], dtype=torch.float64))


def test_eval_output_identity_and_metrics(tmp_path):
    n = 9
    affine = _affine()
    fixed = MetaTensor(torch.rand(1, n, n, n), affine=affine)
    moving = MetaTensor(torch.rand(1, n, n, n), affine=affine)
    label = torch.zeros(1, n, n, n)
    label[:, 2:6, 2:6, 2:6] = 1
    moved_label = torch.roll(label, 1, dims=1)
    pts = torch.tensor([[0.0, 5.0, 3.0 + 4.0], [2.0, 9.0, 9.0]], dtype=torch.float64)
    data = {
        "fixed_image": fixed, "moving_image": moving, "image": moving.as_tensor(), "label": fixed.as_tensor(),
        "fixed_landmarks": pts, "moving_landmarks": pts + torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64),
        "fixed_label": label, "moving_label": moved_label, "case": "c1",
        "pred": {"ddf": torch.zeros(3, n, n, n), "warped": moving.as_tensor(), "loss": 0.5, "similarity": 0.4,
                 "folds_percent": torch.tensor(0.0)},
    }
    out = RegistrationEvalOutputd()(data)["eval"]
    metrics = out["metrics"]
    assert out["case"] == "c1"
    assert metrics["tre_before_mm"] == pytest.approx(2.0) and metrics["tre_after_mm"] == pytest.approx(2.0)
    assert metrics["dice_before"] == pytest.approx(metrics["dice_after"])
    assert metrics["folds_percent"] == 0.0 and metrics["loss"] == 0.5
    # a DDF of +1 voxel (2 mm) along axis 0 recovers the moving landmarks and the label shift
    data["pred"]["ddf"] = torch.zeros(3, n, n, n)
    data["pred"]["ddf"][0] = -1.0
    metrics = RegistrationEvalOutputd()(data)["eval"]["metrics"]
    assert metrics["tre_after_mm"] == pytest.approx(4.0)
    data["pred"]["ddf"][0] = 1.0
    metrics = RegistrationEvalOutputd()(data)["eval"]["metrics"]
    assert_f32_close(metrics["tre_after_mm"], 0.0, ulps=8, scale=2.0 * n)  # float32 DDF at mm coordinates
    assert metrics["dice_after"] == pytest.approx(1.0) and metrics["dice_before"] < 1.0
    # no landmarks/labels: NaN values, skipped by the averages
    for key in ("fixed_landmarks", "moving_landmarks", "fixed_label", "moving_label"):
        data.pop(key)
    processed = RegistrationEvalOutputd()(data)
    assert math.isnan(processed["eval"]["metrics"]["tre_after_mm"])
    metric = CaseMetricAverage("tre_after_mm")
    metric.reset()
    metric.update([processed])
    assert math.isnan(metric.compute())
    metric = CaseMetricAverage("loss")
    metric.reset()
    metric.update([processed, processed])
    assert metric.compute() == pytest.approx(0.5)
    assert eval_outputs([processed])[0]["case"] == "c1"


def test_metrics_report_handler_writes_csv_and_json(tmp_path):
    rows = [{"eval": {"case": f"c{i}", "metrics": {"tre_after_mm": float(i), "tre_before_mm": float("nan")}}}
            for i in range(2)]
    engine = Engine(lambda e, b: rows[b:b + 1])
    handler = MetricsReportHandler(tmp_path, prefix="evaluation_", history=True)
    handler.attach(engine)
    engine.run([0, 1], max_epochs=1)
    report = json.loads((tmp_path / "evaluation_metrics.json").read_text())
    assert report["num_cases"] == 2 and report["summary"]["tre_after_mm"]["mean"] == pytest.approx(0.5)
    assert "tre_before_mm" not in report["summary"]
    with open(tmp_path / "evaluation_metrics_per_case.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["case"] for r in table] == ["c0", "c1"] and table[1]["tre_after_mm"] == "1.0"
    assert len(json.loads((tmp_path / "evaluation_metrics_history.json").read_text())) == 1


def test_train_scalars_average_over_batch():
    out = [{"pred": {"loss": 1.0, "similarity": 0.5, "folds_percent": 0.0}, "loss": 1.0},
           {"pred": {"loss": 1.0, "similarity": 0.5, "folds_percent": 2.0}, "loss": 1.0}]
    scalars = train_scalars(out)
    assert scalars["train_loss"] == 1.0 and scalars["train_folds_percent"] == 1.0
