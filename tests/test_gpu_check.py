"""The prepared GPU check (bench/gpu_check.py) in its CPU-sized mode: every section is reported, none fails.

``python bench/gpu_check.py --device cpu --quick`` runs the same code as the one-call GPU check (bench/gpu_check.sh on
the lent machine) at 65³ with one repeat (training at batch 2), on the synthetic register pair, within a time budget:
a section that would not fit is recorded as skipped with that reason, so the test stays bounded on a busy machine
(there only the first sections run; on an idle 2-core machine all but ``compile`` are expected to fit).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu_check.py"
SECTIONS = ("inference", "training", "agreement", "instance_optimization", "field_optimization", "register", "ddp",
            "compile")
BUDGET_S = 120


def _reference_importable() -> bool:
    try:
        import icon_registration  # noqa: F401
    except Exception:
        return False
    return True


def test_gpu_check_cpu_quick(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--json", str(out / "gpu_check.json"),
           "--table", str(out / "gpu_check.txt"), "--budget-s", str(BUDGET_S), "--workdir", str(tmp_path / "work")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=BUDGET_S + 450,
                          check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]

    report = json.loads((out / "gpu_check.json").read_text())
    assert report["device"] == "cpu" and report["quick"] and report["plan"]["size"] == 65
    for key in ("machine", "versions", "goals", "table_text", "duration_s"):
        assert key in report, key
    versions = report["versions"]
    assert versions["torch"] and versions["monai"] and versions["monai_gradicon_source_sha256"]
    assert (out / "gpu_check.txt").read_text().strip() == report["table_text"].strip()
    assert report["table_text"] in proc.stdout

    sections = report["sections"]
    assert tuple(sections) == SECTIONS
    for name, rec in sections.items():
        assert rec["status"] in ("ok", "skipped"), f"{name}: {rec.get('error', '')[-2000:]}"
        if rec["status"] == "skipped":
            assert rec["reason"], name
    # compile is measured on CUDA only; the first two sections always fit the budget
    assert sections["compile"]["status"] == "skipped" and "quick" in sections["compile"]["reason"]

    inference = sections["inference"]
    assert inference["status"] == "ok"
    for variant in ("fp32", "bf16"):
        row = inference["variants"][variant]
        assert row["status"] == "ok" and row["median_s"] > 0 and row["map_finite"], (variant, row)

    training = sections["training"]
    assert training["status"] == "ok"
    rows = {(r["impl"], r["variant"], r["batch"]): r for r in training["rows"]}
    ours = rows[("ours", "default", 2)]
    assert ours["status"] == "ok" and ours["loss_finite"] and ours["pairs_per_s"] > 0 and ours["parameters"] > 7e7
    reference = rows[("reference", "default", 2)]
    if _reference_importable():
        assert reference["status"] == "ok", reference
        assert "batch2:default" in training["throughput_ratio_vs_reference"]
        # same weights and images: the first training losses agree (the jitter is drawn differently)
        assert abs(reference["first_loss"] - ours["first_loss"]) < 0.05 * abs(reference["first_loss"])
    else:
        assert reference["status"] == "skipped" and "icon_registration" in reference["reason"]

    agreement = sections["agreement"]
    if agreement["status"] == "ok":
        bf16 = agreement["bf16_vs_fp32"]
        assert 0 < bf16["max_map_diff_voxels"] < 0.5 and bf16["rel_diff_loss"] < 0.05
        assert agreement["cuda_vs_cpu"]["status"] == "skipped"
        if _reference_importable():
            assert agreement["ours_vs_reference"]["max_map_diff_voxels"] < 1e-3
    if sections["instance_optimization"]["status"] == "ok":
        assert sections["instance_optimization"]["one_step_call"]["median_s"] > 0
    if sections["field_optimization"]["status"] == "ok":
        assert sections["field_optimization"]["per_step_s"] > 0
    if sections["register"]["status"] == "ok":
        run = sections["register"]["runs"][0]
        assert run["status"] == "ok" and "original_grids" in run["timings_seconds"] and run["device"] == "cpu"
        assert "synthetic" in sections["register"]["pair"]
    if sections["ddp"]["status"] == "ok":
        assert sections["ddp"]["backend_expected"] == "gloo" and all(sections["ddp"]["checks"].values())

    # the goals are stated, and judged only on a GPU at 175³
    goals = report["goals"]
    assert set(goals) == {"inference_175_bf16_ms", "training_throughput_ratio"}
    assert all(g["met"] is None and "not applicable" in g.get("note", "") for g in goals.values() if g["value"])
