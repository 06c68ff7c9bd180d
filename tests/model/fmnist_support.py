"""Helpers and fixtures of the model tests (model_src/, files/); conftest.py re-exports the fixtures.

Nothing here skips: a missing dataset, Java or TorchServe is a test failure
with a message saying what is missing.
"""

from __future__ import annotations

import functools
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests
import torch

REPO = Path(__file__).resolve().parents[2]
MODEL_SRC = REPO / "model_src"
FILES = REPO / "files"
FIXTURES = REPO / "tests" / "fixtures"
VENV_BIN = Path(sys.executable).parent
DATA_DIR = Path(os.environ.get("FMNIST_DATA_DIR", "/usr/share/datasets/fashion-mnist"))

WEIGHTS = FILES / "fashion_mnist_tinyvgg.pth"
LABELS = FILES / "index_to_name.json"
METRICS = FILES / "train_metrics.json"
SAMPLES = FILES / "samples"
SEED_WEIGHTS = FIXTURES / "fashion_mnist_model.pth"

MODEL_NAME = "fmnist"
MODEL_ENTRY = REPO / "playbooks/vars/fmnist.yml"
RENDER_MODEL_CONFIG = REPO / "tests/model/render_model_config.yml"


def _role_model_entry() -> dict:
    import yaml

    models = yaml.safe_load(MODEL_ENTRY.read_text())["torchserve_models"]
    return next(m for m in models if m["name"] == MODEL_NAME)


@functools.lru_cache(maxsize=1)
def model_config_yaml() -> str:
    """The model-config.yaml the torchserve role renders for the model, from its
    own template and the model entry (tests/model/render_model_config.yml)."""
    with tempfile.TemporaryDirectory() as tmp:
        dest = Path(tmp) / "model-config.yaml"
        r = subprocess.run([str(VENV_BIN / "ansible-playbook"), str(RENDER_MODEL_CONFIG),
                            "-e", f"model={MODEL_NAME}", "-e", f"dest={dest}"],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"rendering the role's model-config failed:\n{r.stdout[-3000:]}{r.stderr[-2000:]}")
        return dest.read_text()


MIN_WORKERS = _role_model_entry()["workers"]
#: The example entry's batching (playbooks/vars/fmnist.yml), what the served model must report.
BATCH_SIZE, MAX_BATCH_DELAY = _role_model_entry()["batch_size"], _role_model_entry()["max_batch_delay"]

if str(MODEL_SRC) not in sys.path:
    sys.path.insert(0, str(MODEL_SRC))

import model  # noqa: E402  (model_src/model.py)
import train  # noqa: E402  (model_src/train.py)
from errors import BadInput  # noqa: E402  (model_src/errors.py)
from handler import FashionMNISTHandler  # noqa: E402  (model_src/handler.py)
from model import FashionMNISTModelV2  # noqa: E402

#: What the archive holds besides model.py, the weights and the handler (--extra-files): the
#: handler's own modules and the labels, as the deployment's model entry lists them.
EXTRA_FILES = _role_model_entry()["extra_files"]


# --------------------------------------------------------------------------- data and model
@pytest.fixture(scope="session")
def test_set():
    """(images uint8 [10000,28,28], labels [10000]) of the real Fashion-MNIST test split."""
    try:
        return train.load_split(DATA_DIR, "test")
    except FileNotFoundError as e:
        pytest.fail(f"Fashion-MNIST is missing: {e}. On Debian: apt-get install dataset-fashion-mnist", pytrace=False)


def load_model(weights: Path = WEIGHTS) -> torch.nn.Module:
    """The model sized from the state dict and loaded strictly, as the handler does (model.load)."""
    return model.load(weights)


@pytest.fixture(scope="session")
def committed_model():
    return load_model(WEIGHTS)


@pytest.fixture(scope="session")
def direct_predictions(committed_model, test_set):
    """The committed model's own predictions on the whole test set (indices)."""
    images, _ = test_set
    return train.predict(committed_model, train.to_float(images))


def png_bytes(img_u8: torch.Tensor) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.frombytes("L", (28, 28), bytes(img_u8.flatten().tolist())).save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- handler with a fake context
class FakeContext:
    """The parts of ts.context.Context the handler uses, recording statuses and headers."""

    def __init__(self, model_dir, yaml_config=None, request_headers=None):
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": None, "batch_size": 8}
        self.manifest = {"model": {"serializedFile": WEIGHTS.name, "modelFile": "model.py", "handler": "handler.py"}}
        if yaml_config is not None:
            self.model_yaml_config = yaml_config
        self.request_headers = request_headers or {}
        self.statuses: dict[int, tuple[int, str]] = {}
        self.response_headers: dict[int, dict] = {}

    def get_all_request_header(self, idx):
        return self.request_headers.get(idx, {})

    def get_request_header(self, idx, key):
        return self.request_headers.get(idx, {}).get(key)

    def set_response_status(self, code=200, phrase="", idx=0):
        self.statuses[idx] = (code, phrase)

    def set_response_content_type(self, idx, value):
        self.response_headers.setdefault(idx, {})["content-type"] = value


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """What TorchServe unpacks from the .mar: model.py, the weights, the extra files."""
    d = tmp_path_factory.mktemp("model_dir")
    shutil.copy(MODEL_SRC / "model.py", d)
    shutil.copy(WEIGHTS, d)
    for name in EXTRA_FILES:
        shutil.copy(REPO / name, d)
    return d


@pytest.fixture(scope="session")
def handler(model_dir):
    h = FashionMNISTHandler()
    h.initialize(FakeContext(model_dir, yaml_config=yaml_dict()))
    return h


def yaml_dict():
    import yaml

    return yaml.safe_load(model_config_yaml())


# --------------------------------------------------------------------------- a real TorchServe
def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _check_java() -> None:
    java = shutil.which("java")
    if java is None:
        pytest.fail("java not found on PATH: TorchServe 0.12 needs Java 17 (apt-get install openjdk-17-jre-headless)", pytrace=False)
    out = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
    try:
        version = out.split('"')[1]
        major = int(version.split(".")[0]) if not version.startswith("1.") else int(version.split(".")[1])
    except (IndexError, ValueError):
        pytest.fail(f"cannot read the Java version from: {out!r}", pytrace=False)
    if major < 17:
        pytest.fail(f"TorchServe 0.12 needs Java 17, found {version}", pytrace=False)


class Server:
    def __init__(self, root: Path, ports: list[int], proc: subprocess.Popen):
        self.root = root
        self.proc = proc
        self.inference_port, self.management_port, self.metrics_port, self.grpc_inf, self.grpc_mgmt = ports
        self.url = f"http://127.0.0.1:{self.inference_port}"
        self.predict_url = f"{self.url}/predictions/{MODEL_NAME}"
        self.management_url = f"http://127.0.0.1:{self.management_port}"
        self.log_dir = root / "logs"

    def log_tail(self, name="ts_log.log", n=60) -> str:
        for path in (self.log_dir / name, self.root / "torchserve.out"):
            if path.exists():
                return f"--- {path}:\n" + "\n".join(path.read_text(errors="replace").splitlines()[-n:])
        return "(no log)"

    def model_log(self) -> str:
        path = self.log_dir / "model_log.log"
        return path.read_text(errors="replace") if path.exists() else ""


def build_mar(export_dir: Path, config_path: Path) -> Path:
    """torch-model-archiver exactly as the deployment runs it (from the repo root)."""
    export_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        str(VENV_BIN / "torch-model-archiver"),
        "--model-name", MODEL_NAME,
        "--version", "1.0",
        "--model-file", "model_src/model.py",
        "--serialized-file", "files/fashion_mnist_tinyvgg.pth",
        "--handler", "model_src/handler.py",
        "--extra-files", ",".join(EXTRA_FILES),
        "-c", str(config_path),
        "--export-path", str(export_dir),
    ]  # fmt: skip
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, f"torch-model-archiver failed:\n{res.stdout}\n{res.stderr}"
    mar = export_dir / f"{MODEL_NAME}.mar"
    assert mar.is_file(), f"no {mar} after torch-model-archiver"
    return mar


def _wait_ready(server: Server, timeout: float = 180.0) -> None:
    """Poll /ping and the management API until every worker is READY (no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            pytest.fail(f"torchserve exited with {server.proc.returncode} before it was ready\n{server.log_tail()}", pytrace=False)
        try:
            ping = requests.get(f"{server.url}/ping", timeout=2)
            desc = requests.get(f"{server.management_url}/models/{MODEL_NAME}", timeout=2)
            if ping.status_code == 200 and desc.status_code == 200:
                workers = desc.json()[0].get("workers", [])
                ready = [w for w in workers if w.get("status") == "READY"]
                if len(ready) >= MIN_WORKERS:
                    return
                last = f"workers: {[w.get('status') for w in workers]}"
            else:
                last = f"/ping {ping.status_code}, /models/{MODEL_NAME} {desc.status_code}"
        except requests.RequestException as e:
            last = f"{type(e).__name__}"
        time.sleep(0.25)  # polling interval, not a readiness guess
    pytest.fail(f"torchserve not ready after {timeout}s ({last})\n{server.log_tail()}", pytrace=False)


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """A real TorchServe on free loopback ports serving the .mar built from model_src/ and files/."""
    _check_java()
    torchserve = VENV_BIN / "torchserve"
    if not torchserve.exists():
        pytest.fail(f"{torchserve} missing: install requirements.txt into the venv", pytrace=False)
    root = tmp_path_factory.mktemp("torchserve")
    config_yaml = root / "model-config.yaml"
    config_yaml.write_text(model_config_yaml())
    store = root / "model_store"
    build_mar(store, config_yaml)
    for sub in ("logs", "tmp"):
        (root / sub).mkdir()

    ports = _free_ports(5)
    (root / "config.properties").write_text(
        "\n".join(
            [
                f"inference_address=http://127.0.0.1:{ports[0]}",
                f"management_address=http://127.0.0.1:{ports[1]}",
                f"metrics_address=http://127.0.0.1:{ports[2]}",
                f"grpc_inference_port={ports[3]}",
                f"grpc_management_port={ports[4]}",
                "grpc_inference_address=127.0.0.1",
                "grpc_management_address=127.0.0.1",
                f"model_store={store}",
                f"load_models={MODEL_NAME}.mar",
                "disable_system_metrics=true",
                "default_response_timeout=30",
                "",
            ]
        )
    )
    env = dict(
        os.environ,
        LOG_LOCATION=str(root / "logs"),
        METRICS_LOCATION=str(root / "logs"),
        TEMP=str(root / "tmp"),
        PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    out = open(root / "torchserve.out", "wb")
    proc = subprocess.Popen(
        [
            str(torchserve), "--start", "--foreground", "--ncs", "--disable-token-auth",
            "--ts-config", str(root / "config.properties"),
        ],
        cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    srv = Server(root, ports, proc)
    try:
        _wait_ready(srv)
        yield srv
    finally:
        # The wrapper alone would orphan java: stop the whole process group we created.
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        # Wait for the rest of the group (java, workers) to be gone too.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out.close()


def labels() -> dict:
    return json.loads(LABELS.read_text())
