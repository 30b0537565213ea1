"""The registered encoder behind a real `mlflow models serve` on 127.0.0.1.

What a client can send (encoder_model.py): the uint8 pixel tensor as JSON, or encoded files
(PNG/JPEG bytes, base64 in JSON) of mixed sizes; the answers must equal in-process
`predict` (1e-5) and an independent float64 reference of the eval protocol; a malformed
request gets HTTP 400 with a message, and the worker answers the next request.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image
from sslstream.models.backbones import build_backbone, feature_dim_of
from sslstream.orchestration.tracking.encoder_model import EncoderSpec
from sslstream.orchestration.tracking.tracker import Tracker, TrackingSettings

from tests.fixtures.mlflow_server import free_port

pytestmark = [pytest.mark.mlflow_server, pytest.mark.slow, pytest.mark.timeout(300)]

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.247, 0.243, 0.261)
HEALTHY = {"eval/knn_acc": 0.5, "eval/embedding_std": 0.08, "eval/effective_rank": 40.0}


def _reference(backbone: torch.nn.Module, image: np.ndarray, size: int = 32) -> np.ndarray:
    """One image's embedding by torchvision's Resize + CenterCrop in float64 (not the
    pyfunc's code): the evaluation protocol at 32 px (shorter side to 32)."""
    from torchvision.transforms.v2 import functional as F

    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].to(torch.float64) / 255.0
    if x.shape[-2:] != (size, size):
        x = F.center_crop(F.resize(x, [size], antialias=True), [size])
    x = (x - torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(
        STD, dtype=torch.float64).view(1, 3, 1, 1)
    with torch.no_grad():
        return backbone(x.float()).numpy()[0]


@pytest.fixture(scope="module")
def served(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A registered resnet_mini (alias champion) served by `mlflow models serve`."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    torch.manual_seed(0)
    backbone = build_backbone({"name": "resnet_mini"})
    with torch.no_grad():  # BN running stats off their defaults: buffers must travel too
        for _ in range(3):
            backbone(torch.randn(8, 3, 32, 32) * 2 + 0.5)
    backbone.eval()
    spec = EncoderSpec(backbone={"name": "resnet_mini"}, feature_dim=feature_dim_of(backbone),
                       image_size=32, mean=MEAN, std=STD)
    name = f"serve-{uuid.uuid4().hex[:8]}"
    tracker = Tracker(TrackingSettings.from_config({
        "uri": mlflow_server, "experiment": f"serve-{uuid.uuid4().hex[:8]}",
        "system_metrics": False, "registry": {"name": name}}))
    assert tracker.start("serve-run", {"method": "byol"}) is not None
    decision = tracker.register_encoder(tracker.log_encoder(backbone, spec), HEALTHY,
                                        feature_dim=spec.feature_dim)
    assert decision.promoted
    tracker.end()
    uri = f"models:/{name}@champion"
    root = tmp_path_factory.mktemp("serve")
    port = free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=mlflow_server, OMP_NUM_THREADS="1")
    log_path = root / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", uri, "--env-manager",
             "local", "-h", "127.0.0.1", "-p", str(port)],
            cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while not _ping(url):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow models serve did not come up: "
                            f"{log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.5)
        with _tracking(mlflow_server):
            model = mlflow.pyfunc.load_model(uri)
        yield {"url": url, "model": model, "backbone": backbone, "proc": proc, "log": log_path}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


class _tracking:
    def __init__(self, uri: str) -> None:
        self.uri, self.old = uri, None

    def __enter__(self) -> None:
        self.old = os.environ.get("MLFLOW_TRACKING_URI")
        os.environ["MLFLOW_TRACKING_URI"] = self.uri

    def __exit__(self, *exc: object) -> None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        if self.old is not None:
            os.environ["MLFLOW_TRACKING_URI"] = self.old


def _ping(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/ping", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _post(url: str, payload: object) -> tuple[int, dict]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    req = urllib.request.Request(url + "/invocations", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _encode(image: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def test_tensor_json_matches_in_process_predict(served: dict) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    status, body = _post(served["url"], {"inputs": images.tolist()})
    assert status == 200, body
    got = np.asarray(body["predictions"], dtype=np.float32)
    want = served["model"].predict(images)
    assert got.shape == want.shape == (4, 128)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    ref = np.stack([_reference(served["backbone"], im) for im in images])
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    # the named form, and a wide batch that is resized by the server
    wide = rng.integers(0, 256, (2, 40, 48, 3), dtype=np.uint8)
    status, body = _post(served["url"], {"inputs": {"images": wide.tolist()}})
    assert status == 200, body
    np.testing.assert_allclose(np.asarray(body["predictions"], np.float32),
                               served["model"].predict(wide), rtol=0, atol=1e-5)


def test_encoded_files_of_mixed_sizes(served: dict) -> None:
    rng = np.random.default_rng(1)
    shapes = [(32, 32), (40, 48), (64, 50), (20, 20), (33, 31)]  # square, wide, tall, up, odd
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    files = [_encode(im, "PNG") for im in images] + [_encode(images[2], "JPEG")]
    payload = {"inputs": {"image_bytes": [base64.b64encode(f).decode() for f in files]}}
    status, body = _post(served["url"], payload)
    assert status == 200, body
    got = np.asarray(body["predictions"], dtype=np.float32)
    assert got.shape == (len(files), 128)
    # in-process predict of the same files, and of each decoded image on its own
    np.testing.assert_allclose(got, served["model"].predict({"image_bytes": files}), atol=1e-5,
                               rtol=0)
    decoded = [np.asarray(Image.open(io.BytesIO(f)).convert("RGB")) for f in files]
    one_by_one = np.concatenate([served["model"].predict(d[None]) for d in decoded])
    np.testing.assert_allclose(got, one_by_one, atol=1e-5, rtol=0)
    ref = np.stack([_reference(served["backbone"], d) for d in decoded])
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    # the JPEG is lossy: close to, not equal to, the PNG of the same pixels
    assert not np.allclose(got[5], got[2], atol=1e-6)


@pytest.mark.parametrize("payload, words", [
    ({"inputs": (np.zeros((1, 32, 32, 3)) + 0.5).tolist()}, "float64"),  # pixels as 0..1 floats
    ({"inputs": np.zeros((2, 32, 32), dtype=int).tolist()}, "(N, H, W, 3)"),  # rank 3
    ({"inputs": np.zeros((1, 8, 8, 4), dtype=int).tolist()}, "(N, H, W, 3)"),  # RGBA
    ({"inputs": np.full((1, 8, 8, 3), 300).tolist()}, "0..255"),
    ({"inputs": {"image_bytes": [base64.b64encode(b"\x89PNG\r\n\x1a\nnot a png").decode()]}},
     "not a decodable image"),
    ({"inputs": {"image_bytes": ["%%% not base64 %%%"]}}, "not base64"),
    ({"inputs": {"pixels": [[1, 2, 3]]}}, "images or image_bytes"),
    ({"inputs": np.zeros((1, 32, 32, 3), dtype=int).tolist(), "params": {"batch_size": 0}},
     "batch_size"),
    ({"inputs": np.zeros((1, 32, 32, 3), dtype=int).tolist(), "params": {"device": "tpu"}},
     "device"),
    (b"{not json", "JSON"),
])
def test_malformed_request_is_400_and_the_worker_lives(served: dict, payload: object,
                                                       words: str) -> None:
    status, body = _post(served["url"], payload)
    assert status == 400, (status, body)
    assert words in body.get("message", ""), body
    ok, _ = _post(served["url"], {"inputs": np.zeros((1, 32, 32, 3), dtype=int).tolist()})
    assert ok == 200 and served["proc"].poll() is None
