"""Integration test against a real MONAI Label server (``monailabel start_server``) on 127.0.0.1.

Skipped unless ``monailabel`` is importable by the running interpreter, or ``GRADICON_MONAILABEL_PYTHON`` names a
Python that has it (e.g. ``.venv-monailabel/bin/python``). Run it with::

    .venv-monailabel/bin/python -m pytest tests/test_monailabel_server.py -s

The server serves a 1-step 33^3 stand-in bundle from a temporary folder (same contract as ``gradicon_lung`` /
``gradicon_brain``) through a copy of ``apps/gradicon_monailabel``. It registers a pair through ``/infer``, checks the
warped image, sends bad requests (missing fixed image, 2D vs 3D, unreadable file, unknown id) that must answer 4xx
with a message, checks the server still serves, and stops the server.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import nibabel as nib
import numpy as np
import pytest

from monailabel_helpers import make_network, write_bundle, write_nifti, write_pair

APP_DIR = os.path.join(os.path.dirname(__file__), "..", "apps", "gradicon_monailabel")
STARTUP_TIMEOUT_S = 180
REQUEST_TIMEOUT_S = 300


def _monailabel_python() -> str | None:
    if importlib.util.find_spec("monailabel") is not None:
        return sys.executable
    candidate = os.environ.get("GRADICON_MONAILABEL_PYTHON")
    if candidate and os.path.isfile(candidate):
        ok = subprocess.run([candidate, "-c", "import monailabel"], capture_output=True, timeout=120)
        if ok.returncode == 0:
            return candidate
    return None


PYTHON = _monailabel_python()
pytestmark = pytest.mark.skipif(
    PYTHON is None,
    reason="monailabel is not importable (install monai-gradicon[monailabel] into its own venv, see "
    "docs/monailabel.md, or set GRADICON_MONAILABEL_PYTHON)",
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _multipart(fields: dict[str, str], files: dict[str, str]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for name, value in fields.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, path in files.items():
        with open(path, "rb") as f:
            data = f.read()
        out.write(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{os.path.basename(path)}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n".encode()
        )
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


class Server:
    def __init__(self, port: int, proc: subprocess.Popen, log_path: str) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.proc = proc
        self.log_path = log_path

    def log_tail(self, n: int = 60) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.base + path, timeout=30) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def infer(self, model: str, query: dict[str, str], params: dict | None = None,
              files: dict[str, str] | None = None) -> tuple[int, bytes, float]:
        body, ctype = _multipart({"params": json.dumps(params or {})}, files or {})
        url = f"{self.base}/infer/{model}?{urllib.parse.urlencode(query)}"
        req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": ctype})
        start = time.perf_counter()
        try:
            with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as r:
                return r.status, r.read(), time.perf_counter() - start
        except urllib.error.HTTPError as e:
            return e.code, e.read(), time.perf_counter() - start


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("monailabel_server")
    write_bundle(str(root / "bundles" / "tiny"), make_network(scale=0.05))
    write_pair(str(root / "studies"))
    app_dir = root / "app"
    shutil.copytree(APP_DIR, app_dir, ignore=shutil.ignore_patterns("model", "lib", "logs", "bin", "__pycache__"))
    port = _free_port()
    env = dict(os.environ)
    env.update({
        "MONAI_LABEL_SESSION_PATH": str(root / "sessions"),
        "MONAI_LABEL_TRACKING_ENABLED": "false",
        "PYTHONUNBUFFERED": "1",
    })
    cmd = [
        PYTHON, "-m", "monailabel.main", "start_server",
        "--app", str(app_dir), "--studies", str(root / "studies"),
        "--host", "127.0.0.1", "--port", str(port),
        "--conf", "models", "tiny",
        "--conf", "bundle_dirs", str(root / "bundles"),
        "--conf", "output_dir", str(root / "out"),
    ]
    log_path = str(root / "server.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(root))
    srv = Server(port, proc, log_path)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:  # bounded readiness loop
            if proc.poll() is not None:
                pytest.fail(f"monailabel exited with {proc.returncode} during startup:\n{srv.log_tail()}")
            try:
                status, _ = srv.get("/info/")
                if status == 200:
                    break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"monailabel did not answer /info/ within {STARTUP_TIMEOUT_S} s:\n{srv.log_tail()}")
            time.sleep(1.0)
        srv.root = root
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


def _nifti(data: bytes):
    raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    return nib.Nifti1Image.from_bytes(raw)


def test_info_lists_the_registration_task(server):
    status, body = server.get("/info/")
    assert status == 200
    info = json.loads(body)
    assert info["models"]["tiny"]["type"] == "registration"
    assert info["models"]["tiny"]["dimension"] == 3


def test_register_pair_through_infer(server):
    fixed = nib.load(server.root / "studies" / "fixed.nii.gz")
    status, body, seconds = server.infer("tiny", {"image": "moving", "output": "image"}, {"fixed_image": "fixed"})
    assert status == 200, body[:500]
    warped = _nifti(body)
    assert warped.shape == fixed.shape
    assert warped.get_data_dtype() == np.float32
    np.testing.assert_allclose(warped.affine, fixed.affine, atol=1e-5)
    data = np.asarray(warped.dataobj)
    assert np.isfinite(data).all() and data.max() > data.min()
    print(f"\n/infer (register, output=image): HTTP {status} in {seconds:.2f} s")

    # the same request in-process gives the same image (the server ran our pipeline, not a segmentation path)
    from monai_gradicon.monailabel import load_bundle, register_files

    bundle = load_bundle(server.root / "bundles" / "tiny")
    ref = register_files(bundle, server.root / "studies" / "moving.nii.gz", server.root / "studies" / "fixed.nii.gz",
                         server.root / "ref_w.nii.gz", server.root / "ref_d.nii.gz")
    np.testing.assert_allclose(data, np.asarray(nib.load(ref["warped_image"]).dataobj), atol=1e-4)


def test_result_json_has_the_ddf(server):
    status, body, seconds = server.infer("tiny", {"image": "moving", "output": "json"}, {"fixed_image": "fixed"})
    assert status == 200, body[:500]
    result = json.loads(body)
    assert result["ddf_units"] == "mm" and "LPS" in result["ddf_convention"]
    ddf = nib.load(result["ddf"])
    assert ddf.shape == (*nib.load(server.root / "studies" / "fixed.nii.gz").shape, 1, 3)
    assert os.path.isfile(result["warped_image"])
    print(f"\n/infer (output=json): HTTP {status} in {seconds:.2f} s; server latencies {result['latencies']}")


def test_upload_pair_and_stream_ddf(server):
    studies = server.root / "studies"
    status, body, _ = server.infer(
        "tiny", {"output": "image"}, {"result": "ddf", "ddf_units": "voxel"},
        files={"file": str(studies / "moving.nii.gz"), "label": str(studies / "fixed.nii.gz")},
    )
    assert status == 200, body[:500]
    assert _nifti(body).shape == (*nib.load(studies / "fixed.nii.gz").shape, 3)


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, tmp_path):
    flat = write_nifti(str(tmp_path / "flat.nii.gz"), np.random.rand(40, 36).astype(np.float32) * 100, np.eye(4))
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"this is not a NIfTI file")
    cases = [
        ({}, 400, "fixed image"),                          # missing fixed image
        ({"fixed_image": flat}, 422, "2D"),                 # 2D vs 3D
        ({"fixed_image": str(junk)}, 422, "Cannot read"),   # unreadable file
        ({"fixed_image": "no_such_id"}, 404, "no_such_id"),  # unknown image id
        ({"fixed_image": "fixed", "io_iterations": "many"}, 400, "io_iterations"),
    ]
    for params, status, needle in cases:
        code, body, _ = server.infer("tiny", {"image": "moving", "output": "json"}, params)
        assert code == status, (params, code, body[:300])
        detail = json.loads(body)["detail"]
        assert needle in detail, (params, detail)
    code, body, _ = server.infer("no_such_model", {"image": "moving", "output": "json"}, {"fixed_image": "fixed"})
    assert code == 404 and "tiny" in json.loads(body)["detail"]
    # still serving: a good request after the bad ones
    code, body, _ = server.infer("tiny", {"image": "moving", "output": "image"}, {"fixed_image": "fixed"})
    assert code == 200 and _nifti(body).shape == nib.load(server.root / "studies" / "fixed.nii.gz").shape
    assert server.proc.poll() is None
