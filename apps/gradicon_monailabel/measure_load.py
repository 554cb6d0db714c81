"""Measure a real MONAI Label server under concurrent label propagations (loopback only; not a test).

Run in the MONAI Label environment from the repository root, e.g. (the numbers in docs/monailabel.md)::

    .venv-monailabel/bin/python apps/gradicon_monailabel/measure_load.py \
        --scan ../shared/data/brain_colin27_ch2/ch2bet.nii.gz --concurrent 20 --max_queue 20 \
        --uvicorn_app monai_gradicon.monailabel.server:app

It writes a demo-sized brain bundle (4 steps at 65 x 73 x 65, untrained weights: only the timing matters) into
``--work`` (a fresh folder, deleted first), starts ``monailabel start_server`` on 127.0.0.1 with this app, sends one
request alone, then ``--concurrent`` at once (each propagating ``--reference`` onto ``--scan``), polls ``/info``
every 0.5 s during the load (timeout 300 s per call), prints one JSON line (latency min / median / max of the served
requests, how many were refused, ``/info`` latencies) and stops the server. Every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.normpath(os.path.join(HERE, "..", ".."))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scan", required=True, help="the image to label (NIfTI)")
    ap.add_argument("--reference", default="atlas:mni152_2009a_2mm")
    ap.add_argument("--concurrent", type=int, default=20)
    ap.add_argument("--max_queue", type=int, default=8)
    ap.add_argument("--uvicorn_app", default="monai_gradicon.monailabel.server:app")
    ap.add_argument("--work", default="/tmp/gradicon_monailabel_load")
    ap.add_argument("--request_timeout", type=float, default=3600.0)
    args = ap.parse_args()
    if not 1 <= args.concurrent <= 64:
        sys.exit("--concurrent must be 1..64 (a bounded measurement).")

    sys.path.insert(0, os.path.join(REPO, "tests"))
    from monailabel_helpers import make_network, write_bundle

    work = os.path.abspath(args.work)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.join(work, "studies"))
    card = {"axis_order": "reference", "preprocessing": "brain", "modality": "mri"}
    write_bundle(os.path.join(work, "bundles", "brain_demo"), make_network((65, 73, 65), 4, preprocessing="brain",
                                                                           modality="mri"),
                 network_shape=(65, 73, 65), card=card)
    shutil.copy(args.scan, os.path.join(work, "studies", "scan.nii.gz"))
    shutil.copytree(HERE, os.path.join(work, "app"),
                    ignore=shutil.ignore_patterns("model", "lib", "logs", "bin", "__pycache__"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MONAI_LABEL_SESSION_PATH=os.path.join(work, "sessions"),
               MONAI_LABEL_TRACKING_ENABLED="false")
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", os.path.join(work, "app"),
           "--studies", os.path.join(work, "studies"), "--host", "127.0.0.1", "--port", str(port),
           "--uvicorn_app", args.uvicorn_app, "--conf", "models", "brain_demo",
           "--conf", "bundle_dirs", os.path.join(work, "bundles"), "--conf", "output_dir", os.path.join(work, "out"),
           "--conf", "max_queue", str(args.max_queue)]
    base = f"http://127.0.0.1:{port}"
    with open(os.path.join(work, "server.log"), "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        start = time.monotonic()
        while True:
            try:
                urllib.request.urlopen(base + "/info/", timeout=5).read()
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if proc.poll() is not None or time.monotonic() - start > 240:
                    sys.exit(f"the server did not start; see {work}/server.log")
                time.sleep(1)

        def infer() -> tuple[int, float]:
            b = uuid.uuid4().hex
            body = (f'--{b}\r\nContent-Disposition: form-data; name="params"\r\n\r\n'
                    + json.dumps({"reference": args.reference}) + f"\r\n--{b}--\r\n").encode()
            req = urllib.request.Request(f"{base}/infer/brain_demo_propagate?image=scan&output=json", data=body,
                                         method="POST", headers={"Content-Type": f"multipart/form-data; boundary={b}"})
            t = time.perf_counter()
            try:
                with urllib.request.urlopen(req, timeout=args.request_timeout) as r:
                    r.read()
                    return r.status, time.perf_counter() - t
            except urllib.error.HTTPError as e:
                return e.code, time.perf_counter() - t

        code, single = infer()
        results: list[tuple[int, float]] = []
        info: list[float] = []
        done = threading.Event()

        def poll() -> None:
            while not done.is_set():
                t = time.perf_counter()
                try:
                    urllib.request.urlopen(base + "/info/", timeout=300).read()
                    info.append(time.perf_counter() - t)
                except (urllib.error.URLError, OSError):
                    info.append(float("inf"))
                time.sleep(0.5)

        threads = [threading.Thread(target=lambda: results.append(infer())) for _ in range(args.concurrent)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        poller = threading.Thread(target=poll)
        poller.start()
        for t in threads:
            t.join(args.request_timeout)
        done.set()
        poller.join(600)
        ok = sorted(lat for c, lat in results if c == 200)
        refused = sorted(lat for c, lat in results if c != 200)
        answered = sorted(x for x in info if x != float("inf"))
        print(json.dumps({
            "uvicorn_app": args.uvicorn_app, "concurrent": args.concurrent, "max_queue": args.max_queue,
            "single_request": {"status": code, "seconds": round(single, 2)},
            "codes": sorted({c for c, _ in results}), "served": len(ok), "refused": len(refused),
            "latency_s": {"min": round(ok[0], 2), "median": round(ok[len(ok) // 2], 2), "max": round(ok[-1], 2)}
            if ok else None,
            "refused_latency_max_s": round(refused[-1], 3) if refused else None,
            "wall_s": round(time.perf_counter() - t0, 1), "info_calls": len(info),
            "info_failed": len(info) - len(answered),
            "info_latency_s": {"median": round(answered[len(answered) // 2], 3), "max": round(answered[-1], 3)}
            if answered else None,
        }))
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


if __name__ == "__main__":
    main()
