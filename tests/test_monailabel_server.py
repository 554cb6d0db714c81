"""Integration test against a real MONAI Label server (``monailabel start_server``) on 127.0.0.1.

Skipped unless ``monailabel`` is importable by the running interpreter, or ``GRADICON_MONAILABEL_PYTHON`` names a
Python that has it (e.g. ``.venv-monailabel/bin/python``). Run it with::

    .venv-monailabel/bin/python -m pytest tests/test_monailabel_server.py -s

The server serves a 1-step 33^3 stand-in bundle from a temporary folder (same contract as ``gradicon_lung`` /
``gradicon_brain``) and a small label atlas through a copy of ``apps/gradicon_monailabel``, started as the docs say
(``--uvicorn_app monai_gradicon.monailabel.server:app``). It registers a pair through ``/infer``, propagates the
atlas's labels onto a scan the way the 3D Slicer plugin asks for it (MONAI Label's own client, the plugin's params),
sends bad requests that must answer 4xx with a message (and leave no uploaded file behind), measures ``/info`` and
per-client latency under concurrent requests, and stops the server.
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

from monailabel_helpers import (
    LABEL_NAMES,
    SlicerPlugin,
    make_network,
    slicer_plugin_path,
    write_atlas,
    write_bundle,
    write_nifti,
    write_pair,
)

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
            return os.path.abspath(candidate)  # the server runs with another working directory
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

    def get(self, path: str, timeout: float = 30) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.base + path, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def infer(self, model: str, query: dict[str, str], params: dict | str | None = None,
              files: dict[str, str] | None = None) -> tuple[int, bytes, float]:
        body, ctype = _multipart({"params": params if isinstance(params, str) else json.dumps(params or {})},
                                 files or {})
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
    write_atlas(str(root / "atlases"))
    (root / "tmp").mkdir()
    app_dir = root / "app"
    shutil.copytree(APP_DIR, app_dir, ignore=shutil.ignore_patterns("model", "lib", "logs", "bin", "__pycache__"))
    port = _free_port()
    env = dict(os.environ)
    env.update({
        "MONAI_LABEL_SESSION_PATH": str(root / "sessions"),
        "MONAI_LABEL_TRACKING_ENABLED": "false",
        "PYTHONUNBUFFERED": "1",
        "TMPDIR": str(root / "tmp"),  # where MONAI Label puts uploads: checked for leftovers
    })
    cmd = [
        PYTHON, "-m", "monailabel.main", "start_server",
        "--app", str(app_dir), "--studies", str(root / "studies"),
        "--host", "127.0.0.1", "--port", str(port),
        "--uvicorn_app", "monai_gradicon.monailabel.server:app",
        "--conf", "models", "tiny",
        "--conf", "bundle_dirs", str(root / "bundles"),
        "--conf", "atlas_dirs", str(root / "atlases"),
        "--conf", "output_dir", str(root / "out"),
        "--conf", "max_upload_mb", "1",
        "--conf", "max_queue", "16",
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


def _uploads_left(server, settle_s: float = 0.0) -> list[str]:
    """MONAI Label's temporary upload files in the server's TMPDIR; with ``settle_s``, wait (bounded) for the ones
    a successful request deletes after its response was sent."""
    deadline = time.monotonic() + settle_s
    while True:
        left = sorted(f for f in os.listdir(server.root / "tmp") if f.startswith("tmp") and f.endswith(".nii.gz"))
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.1)


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, tmp_path):
    flat = write_nifti(str(tmp_path / "flat.nii.gz"), np.random.rand(40, 36).astype(np.float32) * 100, np.eye(4))
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"this is not a NIfTI file")
    existing = str(server.root / "studies" / "fixed.nii.gz")
    cases = [
        ({}, None, 400, "fixed image"),                                  # missing fixed image
        ({"fixed_image": "no_such_id"}, None, 404, "no_such_id"),         # unknown image id
        ({"fixed_image": existing}, None, 404, "server paths are not accepted"),  # a server path: not looked at
        ({"fixed_image": "/no/such/file.nii.gz"}, None, 404, "server paths are not accepted"),
        ({"fixed_image": "fixed", "io_iterations": "many"}, None, 400, "io_iterations"),
        ({"fixed_image": "fixed", "io_iterations": 50}, None, 400, "between 0 and 5"),
        ({"fixed_image": "fixed", "padding_mode": "reflect"}, None, 400, "padding_mode"),
        ({}, {"label": flat}, 422, "2D"),                                 # 2D vs 3D (uploaded fixed image)
        ({}, {"label": str(junk)}, 422, "Cannot read"),                   # unreadable upload
        ({"image": "moving", "fixed_image": "fixed"}, None, 400, "may not set ['image']"),
    ]
    assert _uploads_left(server, settle_s=10) == []
    for params, files, status, needle in cases:
        code, body, seconds = server.infer("tiny", {"image": "moving", "output": "json"}, params, files)
        assert code == status, (params, code, body[:300])
        detail = json.loads(body)["detail"]
        assert needle in detail, (params, detail)
        if status == 400:
            assert seconds < 2.0, (params, seconds)  # answered before any network work
        assert _uploads_left(server) == [], params  # a rejected upload is deleted before the answer
    code, body, _ = server.infer("no_such_model", {"image": "moving", "output": "json"}, {"fixed_image": "fixed"})
    assert code == 404 and "tiny" in json.loads(body)["detail"]
    # no image at all: 400 (MONAI Label itself answers 500); params that are not JSON: 400 (MONAI Label: 500)
    code, body, _ = server.infer("tiny", {"output": "json"}, {"fixed_image": "fixed"})
    assert code == 400 and "No image" in json.loads(body)["detail"]
    code, body, _ = server.infer("tiny", {"image": "moving", "output": "json"}, "{not json")
    assert code == 400 and "not valid JSON" in json.loads(body)["detail"]
    # a body over max_upload_mb (1 MB here) is refused from its Content-Length, before any of it is sent (the
    # headers go alone; the answer comes without the server waiting for the body), and so is one without a length
    for header, status, needle in ((f"Content-Length: {1024 * 1024 + 10}", 413, "max_upload_mb"),
                                   ("Transfer-Encoding: chunked", 411, "Content-Length")):
        with socket.create_connection(("127.0.0.1", int(server.base.rsplit(":", 1)[1])), timeout=30) as sock:
            sock.sendall(f"POST /infer/tiny?image=moving HTTP/1.1\r\nHost: 127.0.0.1\r\n{header}\r\n"
                         "Content-Type: multipart/form-data; boundary=x\r\n\r\n".encode())
            reply = ""
            while "\r\n\r\n" not in reply or len(reply.split("\r\n\r\n", 1)[1]) < int(
                    reply.lower().split("content-length:", 1)[1].split("\r\n", 1)[0]):
                chunk = sock.recv(65536).decode("latin-1")
                assert chunk, reply  # the server closed before a complete answer
                reply += chunk
        assert reply.startswith(f"HTTP/1.1 {status}"), reply[:200]
        assert needle in reply
    assert _uploads_left(server) == []
    # still serving: a good request after the bad ones
    code, body, _ = server.infer("tiny", {"image": "moving", "output": "image"}, {"fixed_image": "fixed"})
    assert code == 200 and _nifti(body).shape == nib.load(server.root / "studies" / "fixed.nii.gz").shape
    assert server.proc.poll() is None


# ---- label propagation as the 3D Slicer plugin runs it -------------------------------------------------------------


def test_propagation_through_the_server_as_slicer_runs_it(server, tmp_path):
    """The plugin's steps: /info -> a segmentation model -> params from its options (first choice of a list) plus
    result_extension .nrrd / result_dtype uint8 -> MONAI Label's client -> a label file and label_names."""
    sitk = pytest.importorskip("SimpleITK")
    client_module = pytest.importorskip("monailabel.client", reason="the test process needs monailabel's client")
    prefix = subprocess.run([PYTHON, "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True,
                            timeout=60).stdout.strip()
    plugin = SlicerPlugin(slicer_plugin_path(prefix))
    MONAILabelClient = client_module.MONAILabelClient
    client = MONAILabelClient(server.base, tmpdir=str(tmp_path))
    info = client.info()
    model = info["models"]["tiny_propagate"]
    assert model["type"] in plugin.segmentation_types() and info["models"]["tiny"]["type"] not in \
        plugin.segmentation_types()
    assert set(LABEL_NAMES) <= set(info["labels"])  # the app's labels: the plugin creates these segments
    params = plugin.params_from_config(model["config"])
    assert params["reference"] == "atlas:blobatlas"
    params.update(plugin.infer_params())
    start = time.perf_counter()
    result_file, result = client.infer("tiny_propagate", "fixed", params)
    seconds = time.perf_counter() - start
    img = sitk.ReadImage(result_file)
    scan = sitk.ReadImage(str(server.root / "studies" / "fixed.nii.gz"))
    assert img.GetPixelID() == sitk.sitkUInt8 and img.GetSize() == scan.GetSize()
    np.testing.assert_allclose(img.GetOrigin(), scan.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(img.GetDirection(), scan.GetDirection(), atol=1e-6)
    values = sorted({int(v) for v in np.unique(sitk.GetArrayFromImage(img))} - {0})
    names = plugin.segment_names(result, model)
    by_value = {v: n for n, v in LABEL_NAMES.items()}
    assert names == [by_value[v] for v in values] and len(names) >= 2
    # the same labels as the pipeline gives in-process
    from monai_gradicon.monailabel import load_bundle
    from monai_gradicon.pipeline import register

    atlas = server.root / "atlases" / "blobatlas"
    ref = register(server.root / "studies" / "fixed.nii.gz", atlas / "image.nii.gz",
                   load_bundle(server.root / "bundles" / "tiny").network, inverse=False, device="cpu")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img).transpose(2, 1, 0),
                                  ref.warp(atlas / "label.nii.gz", labels=True))
    print(f"\n/infer/tiny_propagate (Slicer's client, .nrrd uint8): {seconds:.2f} s; segments {names}")


# ---- responsiveness under load ---------------------------------------------------------------------------------

CONCURRENT = 8


def test_info_answers_and_each_client_gets_its_own_queue_position(server):
    """CONCURRENT registrations at once (loopback, bounded in count and time): /info keeps answering in under a
    second, and the first client gets its result long before the last (not all at the end of the backlog)."""
    import threading

    latencies: list[float] = []
    statuses: list[int] = []
    info_latencies: list[float] = []
    done = threading.Event()

    def client():
        code, body, seconds = server.infer("tiny", {"image": "moving", "output": "json"}, {"fixed_image": "fixed"})
        statuses.append(code)
        latencies.append(seconds)

    threads = [threading.Thread(target=client) for _ in range(CONCURRENT)]
    start = time.perf_counter()
    for t in threads:
        t.start()

    def poll_info():
        while not done.is_set() and time.perf_counter() - start < REQUEST_TIMEOUT_S:
            t0 = time.perf_counter()
            status, _ = server.get("/info/", timeout=10)
            info_latencies.append(time.perf_counter() - t0)
            assert status == 200
            time.sleep(0.2)

    poller = threading.Thread(target=poll_info)
    poller.start()
    for t in threads:
        t.join(REQUEST_TIMEOUT_S)
    done.set()
    poller.join(30)
    total = time.perf_counter() - start
    lat = sorted(latencies)
    print(f"\n{CONCURRENT} concurrent registrations: latency min {lat[0]:.2f} s, median {lat[len(lat) // 2]:.2f} s, "
          f"max {lat[-1]:.2f} s (all done in {total:.2f} s); /info during the load: {len(info_latencies)} calls, "
          f"max {max(info_latencies):.3f} s, median {sorted(info_latencies)[len(info_latencies) // 2]:.3f} s")
    assert statuses == [200] * CONCURRENT
    assert len(info_latencies) >= 3 and max(info_latencies) < 1.0
    assert lat[0] < 0.5 * lat[-1]  # served one after another, each answered when done
