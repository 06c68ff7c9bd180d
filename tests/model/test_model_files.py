"""The model definition, the article's weights, and the committed files/ artefacts."""

import json

import torch
from fmnist_support import (
    LABELS,
    METRICS,
    MODEL_SRC,
    SAMPLES,
    SEED_WEIGHTS,
    WEIGHTS,
    FashionMNISTModelV2,
    load_model,
    train,
)

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip


def test_default_constructor_shapes():
    model = FashionMNISTModelV2()  # TorchServe builds it with no arguments
    x = torch.zeros(5, 1, 28, 28)
    assert model.block_1(x).shape == (5, 10, 14, 14)
    assert model.block_2(model.block_1(x)).shape == (5, 10, 7, 7)
    assert model(x).shape == (5, 10)
    assert model.classifier[1].in_features == 10 * 7 * 7


def test_width_is_a_constructor_argument():
    model = FashionMNISTModelV2(input_shape=1, hidden_units=16, output_shape=10)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert model.state_dict()["block_1.0.weight"].shape == (16, 1, 3, 3)


def test_exactly_one_module_class_in_model_py():
    # torch-model-archiver --model-file / TorchServe: exactly one class in the file.
    import ast

    tree = ast.parse((MODEL_SRC / "model.py").read_text())
    assert [n.name for n in tree.body if isinstance(n, ast.ClassDef)] == ["FashionMNISTModelV2"]


def test_state_dict_keys_match_the_article():
    keys = set(FashionMNISTModelV2().state_dict())
    expected = {f"{layer}.{p}" for layer in ("block_1.0", "block_1.2", "block_2.0", "block_2.2", "classifier.1") for p in ("weight", "bias")}
    assert keys == expected


def test_article_weights_load_strict():
    state = torch.load(SEED_WEIGHTS, map_location="cpu", weights_only=True)
    model = FashionMNISTModelV2()
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert model(torch.zeros(1, 1, 28, 28)).shape == (1, 10)


def test_label_file_is_torchserve_index_to_name():
    mapping = json.loads(LABELS.read_text())
    assert mapping == {str(i): name for i, name in enumerate(FASHION_MNIST_CLASSES)}
    assert train.CLASS_NAMES == FASHION_MNIST_CLASSES


def test_committed_weights_and_metrics_agree():
    state = torch.load(WEIGHTS, map_location="cpu", weights_only=True)
    metrics = json.loads(METRICS.read_text())
    hidden = state["block_1.0.weight"].shape[0]
    assert metrics["hidden_units"] == hidden
    assert set(metrics) >= {"test_accuracy", "epochs", "seconds", "seed", "hidden_units"}
    assert metrics["test_accuracy"] >= 0.91
    assert metrics["smoke"] is False
    assert 30_000 <= WEIGHTS.stat().st_size <= 110_000
    assert (SAMPLES / "tshirt3.jpeg").is_file() and (SAMPLES / "tshirt4.jpg").is_file()


def test_committed_weights_accuracy_on_real_test_set(committed_model, test_set):
    images, labels = test_set
    assert len(images) == 10_000
    acc = train.evaluate(committed_model, train.to_float(images), labels)
    assert acc >= 0.91, f"test accuracy {acc:.4f} < 0.91"
    # The metrics file tells the truth about these very weights.
    assert abs(acc - json.loads(METRICS.read_text())["test_accuracy"]) < 1e-3


def test_article_weights_accuracy_is_what_the_article_says(test_set):
    images, labels = test_set
    acc = train.evaluate(load_model(SEED_WEIGHTS), train.to_float(images), labels)
    assert 0.88 <= acc <= 0.90, acc  # the article reports 0.892
