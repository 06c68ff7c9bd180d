"""The article's handler, written for the benchmark: decode, grayscale, resize to 28x28, forward.

BaseHandler does the rest as it does for any TorchServe model: it builds the
model class of model.py with no arguments (the article's 10 hidden units),
loads the state dict, runs the forward pass under no_grad and reads
index_to_name.json. No size checks, no background handling, no per-request
errors: a bad image fails the whole batch, as in the article.
"""
import io

import torch
from PIL import Image
from ts.torch_handler.base_handler import BaseHandler


class ArticleHandler(BaseHandler):
    def preprocess(self, data):
        images = []
        for row in data:
            body = row.get("data") or row.get("body")
            img = Image.open(io.BytesIO(body)).convert("L").resize((28, 28))
            images.append(torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(1, 28, 28))
        return torch.stack(images).float().div(255.0)

    def postprocess(self, data):
        return [{"label": self.mapping[str(i)]} for i in data.argmax(1).tolist()]
