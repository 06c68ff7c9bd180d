"""TinyVGG for Fashion-MNIST (the architecture of the original article).

Two blocks of Conv(3x3, pad 1)-ReLU-Conv(3x3, pad 1)-ReLU-MaxPool(2), then
Flatten and Linear(hidden_units * 7 * 7 -> output_shape).

The attribute names (block_1, block_2, classifier) and the layer positions
inside each nn.Sequential give the state-dict keys block_1.0, block_1.2,
block_2.0, block_2.2 and classifier.1, the keys of the article's published
weights.

This file must define exactly one nn.Module subclass: torch-model-archiver's
--model-file contract (TorchServe instantiates it with no arguments).
`from_state_dict` builds it sized from a state dict, so the width is stored nowhere else.
"""

import torch
from torch import nn


class FashionMNISTModelV2(nn.Module):
    """TinyVGG: 1x28x28 grayscale image -> 10 class logits."""

    def __init__(self, input_shape: int = 1, hidden_units: int = 10, output_shape: int = 10):
        super().__init__()
        self.block_1 = nn.Sequential(
            nn.Conv2d(input_shape, hidden_units, kernel_size=3, stride=1, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden_units, hidden_units, kernel_size=3, stride=1, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
        )
        self.block_2 = nn.Sequential(
            nn.Conv2d(hidden_units, hidden_units, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden_units, hidden_units, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features=hidden_units * 7 * 7, out_features=output_shape),
        )

    def forward(self, x):
        return self.classifier(self.block_2(self.block_1(x)))


def from_state_dict(state: dict) -> FashionMNISTModelV2:
    """The model sized from a state dict's shapes, its weights loaded strictly, in eval mode."""
    first = state["block_1.0.weight"]  # [hidden_units, input_shape, 3, 3]
    last = state["classifier.1.weight"]  # [output_shape, hidden_units * 7 * 7]
    model = FashionMNISTModelV2(input_shape=first.shape[1], hidden_units=first.shape[0], output_shape=last.shape[0])
    model.load_state_dict(state, strict=True)
    return model.eval()


def load(weights_path, map_location="cpu") -> FashionMNISTModelV2:
    """A state-dict file (weights only, nothing unpickled) -> the model, sized from it."""
    return from_state_dict(torch.load(weights_path, map_location=map_location, weights_only=True))
