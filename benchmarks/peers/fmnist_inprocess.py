"""The seam between the benchmarks and model_src/: the deployed handler, run in-process.

Every peer that must do "the same work" as the deployed TorchServe worker (the
FastAPI app, the in-process loop) goes through `load()`, which builds the
handler of model_src/handler.py the way a TorchServe worker does (its own
`initialize(context)` on a model directory holding model.py, the weights and
the labels) and then calls its `handle()` entry point, batch 1. Only
TorchServe's context object is imitated here, so a rewrite of the handler's
internals (decoding, preprocessing) is picked up unchanged; only a change of
the TorchServe contract itself would need this file to follow.
"""
from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODEL_SRC = REPO / "model_src"
WEIGHTS = REPO / "files" / "fashion_mnist_tinyvgg.pth"
LABELS = REPO / "files" / "index_to_name.json"

if str(MODEL_SRC) not in sys.path:
    sys.path.insert(0, str(MODEL_SRC))


class _Context:
    """What ts.context.Context offers a handler, for one request at a time."""

    def __init__(self, model_dir: str, yaml_config: dict):
        self.system_properties = {"model_dir": model_dir, "gpu_id": None, "batch_size": 1}
        self.manifest = {"model": {"serializedFile": WEIGHTS.name, "modelFile": "model.py", "handler": "handler.py"}}
        self.model_yaml_config = yaml_config
        self.headers: dict = {}
        self.status = (200, "OK")

    def get_all_request_header(self, idx):
        return self.headers

    def get_request_header(self, idx, key):
        return self.headers.get(key)

    def set_response_status(self, code=200, phrase="", idx=0):
        self.status = (code, phrase)

    def set_response_content_type(self, idx, value):
        pass

    def set_response_header(self, idx, key, value):
        pass


class Predictor:
    """`predict(body) -> (status, json-able result)`: the handler's decode, preprocess, forward, postprocess."""

    def __init__(self, threads: int = 1):
        logging.getLogger("handler").setLevel(logging.WARNING)  # its one info line per batch
        self._dir = tempfile.TemporaryDirectory(prefix="fmnist-model-")
        model_dir = Path(self._dir.name)
        for src in (MODEL_SRC / "model.py", WEIGHTS, LABELS):
            (model_dir / src.name).symlink_to(src)
        # The deployed model-config.yaml, with one worker and `threads` intra-op threads.
        yaml_config = {"minWorkers": 1, "maxWorkers": 1, "batchSize": 1,
                       "handler": {"topk": 3, "intra_op_threads": threads}}
        self.context = _Context(str(model_dir), yaml_config)
        from handler import FashionMNISTHandler  # model_src/handler.py

        self.handler = FashionMNISTHandler()
        self.handler.initialize(self.context)

    def predict(self, body: bytes, content_type: str = "application/octet-stream") -> tuple[int, dict]:
        ctx = self.context
        ctx.headers = {"Content-Type": content_type}
        ctx.status = (200, "OK")
        result = self.handler.handle([{"body": body}], ctx)[0]
        return ctx.status[0], result


def load(threads: int = 1) -> Predictor:
    return Predictor(threads)
