"""A model given as a prebuilt .mar (built on the controller) is deployed next
to one built on the host; both answer through nginx and TorchServe's own model
list (over the management socket) holds both; then the default deployment is
restored and TorchServe no longer holds the prebuilt one."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from deploy_helpers import REPO, recap

pytestmark = pytest.mark.deploy
FMNIST = {
    "name": "fmnist", "version": "1.0", "model_file": "model_src/model.py",
    "serialized_file": "files/fashion_mnist_tinyvgg.pth", "handler": "model_src/handler.py",
    "extra_files": ["model_src/decoding.py", "model_src/preprocessing.py", "model_src/errors.py",
                    "files/index_to_name.json"], "workers": 1,
    "smoke_test": {"image": "files/samples/tshirt4.jpg", "label": "T-shirt/top"},
}


def served_models(host) -> list[str]:
    status, body = host.management("/models")
    assert status == 200, body
    return sorted(m["modelName"] for m in body["models"])


def test_prebuilt_mar_is_served_beside_a_host_built_one(deployed_host, host_ca, tmp_path):
    archiver = Path(sys.executable).with_name("torch-model-archiver")
    subprocess.run([str(archiver), "--model-name", "fmnist-prebuilt", "--version", "2.0",
                    "--model-file", "model_src/model.py", "--serialized-file", "files/fashion_mnist_tinyvgg.pth",
                    "--handler", "model_src/handler.py", "--extra-files", ",".join(FMNIST["extra_files"]),
                    "--export-path", str(tmp_path)], cwd=REPO, check=True)
    prebuilt = {"name": "fmnist-prebuilt", "version": "2.0", "mar": str(tmp_path / "fmnist-prebuilt.mar"),
                "workers": 1, "smoke_test": {"image": "files/samples/tshirt3.jpeg", "label": "T-shirt/top"}}
    extra = tmp_path / "models.json"
    # Two models share the JVM heap: their queues must fit it too (preflight),
    # 2 x 60 x 6.25 MiB = 750 of the 768 MiB it allows.
    extra.write_text(json.dumps({"torchserve_models": [FMNIST, prebuilt], "torchserve_job_queue_size": 60}))
    try:
        r = deployed_host.playbook("-e", f"@{extra}")
        assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:]
        assert deployed_host.ssh("test -f /opt/torchserve/model-store/fmnist-prebuilt-2.0.mar").returncode == 0
        assert served_models(deployed_host) == ["fmnist", "fmnist-prebuilt"]
        assert deployed_host.management("/models/fmnist-prebuilt")[1][0]["modelVersion"] == "2.0"
        for model in ("fmnist", "fmnist-prebuilt"):
            ok = requests.put(f"{deployed_host.https}/predictions/{model}", verify=host_ca, timeout=30,
                              data=(REPO / "files/samples/tshirt4.jpg").read_bytes())
            assert ok.status_code == 200 and ok.json()["label"] == "T-shirt/top", (model, ok.text)
        again = deployed_host.playbook("-e", f"@{extra}")
        assert again.returncode == 0 and recap(again.stdout, deployed_host.name)["changed"] == 0, again.stdout[-3000:]
    except BaseException:
        deployed_host.playbook()  # put the default back for the other tests; the failure above is the report
        raise
    restored = deployed_host.playbook()
    assert restored.returncode == 0, restored.stdout[-4000:]
    # TorchServe itself no longer holds the model, not just nginx's list of exposed ones.
    assert served_models(deployed_host) == ["fmnist"]
    gone = requests.put(f"{deployed_host.https}/predictions/fmnist-prebuilt", verify=host_ca, timeout=30,
                        data=(REPO / "files/samples/tshirt4.jpg").read_bytes())
    assert gone.status_code == 404
