"""model_src/train.py: the --smoke mode runs end to end and writes its three outputs."""

import json
import subprocess
import sys

import torch
from fmnist_support import DATA_DIR, MODEL_SRC, REPO, load_model


def test_train_smoke(tmp_path):
    out = tmp_path / "out"
    res = subprocess.run(
        [sys.executable, str(MODEL_SRC / "train.py"), "--smoke", "--data-dir", str(DATA_DIR), "--out-dir", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "epoch  1/1" in res.stdout  # progress per epoch
    assert sorted(p.name for p in out.iterdir()) == [
        "fashion_mnist_tinyvgg.pth",
        "index_to_name.json",
        "train_metrics.json",
    ]
    state = torch.load(out / "fashion_mnist_tinyvgg.pth", weights_only=True)
    assert state["block_1.0.weight"].shape == (20, 1, 3, 3)  # the committed recipe's width is the default
    assert load_model(out / "fashion_mnist_tinyvgg.pth")(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    labels = json.loads((out / "index_to_name.json").read_text())
    assert labels["0"] == "T-shirt/top" and labels["9"] == "Ankle boot" and len(labels) == 10
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["smoke"] is True and metrics["epochs"] == 1 and metrics["hidden_units"] == 20
    assert metrics["seed"] == 42 and 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["seconds"] > 0


def test_train_smoke_refuses_to_overwrite_files(tmp_path):
    res = subprocess.run([sys.executable, str(MODEL_SRC / "train.py"), "--smoke"], capture_output=True, text=True)
    assert res.returncode != 0 and "--out-dir" in res.stderr


def test_train_missing_dataset_is_a_clear_error(tmp_path):
    res = subprocess.run(
        [sys.executable, str(MODEL_SRC / "train.py"), "--smoke", "--data-dir", str(tmp_path), "--out-dir", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0 and "dataset-fashion-mnist" in res.stderr


def test_retraining_is_bit_identical(tmp_path):
    """The README's claim that a rerun gives bit-identical weights, on a short run: two --smoke
    runs with the same seed and threads give equal tensors."""

    def run(out, seed):
        res = subprocess.run(
            [sys.executable, str(MODEL_SRC / "train.py"), "--smoke", "--threads", "2", "--seed", str(seed),
             "--data-dir", str(DATA_DIR), "--out-dir", str(out)],
            cwd=REPO, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert res.returncode == 0, res.stdout + res.stderr
        return torch.load(out / "fashion_mnist_tinyvgg.pth", weights_only=True)

    first, second = run(tmp_path / "a", 42), run(tmp_path / "b", 42)
    assert first.keys() == second.keys() and len(first) == 10
    assert all(torch.equal(first[k], second[k]) for k in first)
