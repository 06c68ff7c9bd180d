"""TorchServe handler for the Fashion-MNIST TinyVGG: the glue between TorchServe 0.12 and
decoding.py (request body -> image bytes), preprocessing.py (image bytes -> [1, 28, 28] tensor)
and model.py (the network, sized from its state dict). TorchServe requires exactly one class
in this file; the other modules are shipped with --extra-files and imported from the model
directory, which TorchServe puts on the worker's PYTHONPATH.

Batching: the N requests TorchServe hands over in one call become one [N, 1, 28, 28] tensor
and one forward pass. A request whose input is bad gets its own 4xx status
(context.set_response_status(code, phrase, idx)) and a JSON error; the other requests of the
batch are answered normally. This works in TorchServe 0.12 because the batch-level code stays
200 and the frontend then uses each request's own status code and phrase; raising an
exception instead would fail the whole batch.

Explanations: TorchServe marks each request of /explanations/<model> with the header
`explain: True`; such a request gets the prediction and an Integrated Gradients attribution map
(captum) instead of the prediction alone. The flag is read per request, so a batch may mix both.

See model_src/README.md for inputs, preprocessing, responses, errors and configuration keys.
"""

from __future__ import annotations

import copy
import ctypes
import json
import logging
import os
import time

import model as model_module
import torch
from decoding import extract_payload, request_content_type
from errors import BadInput, one_line
from PIL import Image
from preprocessing import OPTIONS as PREPROCESSING_OPTIONS
from preprocessing import Preprocessor
from ts.torch_handler.base_handler import BaseHandler

logger = logging.getLogger(__name__)

DEFAULTS = {
    "topk": 3,
    "intra_op_threads": None,  # None: max(1, os.cpu_count() // minWorkers)
    **PREPROCESSING_OPTIONS,
    # Cost of one explanation: n_steps forward and backward passes, internal_batch_size at once.
    "explain_n_steps": 64,
    "explain_internal_batch_size": 64,
}
#: Bounds of the explanation cost keys (a bad value stops the worker at start, like a bad invert).
EXPLAIN_LIMITS = {"explain_n_steps": (2, 512), "explain_internal_batch_size": (1, 512)}


def _return_big_buffers_to_the_system() -> None:
    """glibc serves big allocations from the heap once one was freed (its mmap threshold moves up
    to 32 MB), and a heap seldom shrinks: after a few multi-MB bodies or images the worker kept
    them. Fixed at 1 MB, every buffer that big is its own mapping and is returned when freed."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


class FashionMNISTHandler(BaseHandler):
    """Image classifier handler: any common image format -> Fashion-MNIST label (and, on the
    explanations route, an attribution map)."""

    def __init__(self):
        super().__init__()
        self.config = dict(DEFAULTS)
        self.labels: list[str] = []
        self.preprocessor = Preprocessor()
        self._integrated_gradients = None

    # ------------------------------------------------------------------ setup
    def initialize(self, context):
        """Load the state dict (width inferred from its shapes), the labels and the config."""
        self.context = context
        model_dir = context.system_properties.get("model_dir")
        yaml_config = getattr(context, "model_yaml_config", None) or {}
        self.config = self._read_config(yaml_config)
        self.preprocessor = Preprocessor(**{key: self.config[key] for key in PREPROCESSING_OPTIONS})

        threads = self.config["intra_op_threads"]
        if not threads:
            min_workers = yaml_config.get("minWorkers") or 1
            try:
                min_workers = max(1, int(min_workers))
            except (TypeError, ValueError):
                min_workers = 1
            threads = max(1, (os.cpu_count() or 1) // min_workers)
        self.config["intra_op_threads"] = int(threads)
        torch.set_num_threads(int(threads))
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # already set (e.g. a second handler in the same process)
            pass
        Image.MAX_IMAGE_PIXELS = self.config["max_image_pixels"]
        _return_big_buffers_to_the_system()
        # The worker json.loads()es application/json and decodes text/* bodies before the handler
        # runs (any JSON, any depth; a traceback per failure). This worker serves only this
        # model: hand every body over as bytes and classify it here (read per request).
        os.environ["TS_DECODE_INPUT_REQUEST"] = "false"

        self.device = torch.device("cpu")
        self.map_location = "cpu"
        manifest = getattr(context, "manifest", None) or {}
        serialized = manifest.get("model", {}).get("serializedFile", "fashion_mnist_tinyvgg.pth")
        self.model_pt_path = os.path.join(model_dir, serialized)
        self.model = model_module.load(self.model_pt_path).to(self.device)
        # Explanations need gradients with respect to the input only.
        self.model.requires_grad_(False)
        # Batches go through a channels-last copy: oneDNN then runs the convolutions ~2.5x
        # cheaper per image at batch 8 (measured 185 vs 460 us of CPU), while a lone image is
        # cheapest in the default layout (310 vs 360 us). Same weights, same answers.
        self.batch_model = copy.deepcopy(self.model).to(memory_format=torch.channels_last)

        labels_path = os.path.join(model_dir, "index_to_name.json")
        if not os.path.isfile(labels_path):
            raise RuntimeError(f"label file missing from the archive: {labels_path} (pass it with --extra-files)")
        with open(labels_path, encoding="utf-8") as f:
            mapping = json.load(f)
        n_out = self.model.classifier[-1].out_features
        missing = [i for i in range(n_out) if str(i) not in mapping]
        if missing:
            raise RuntimeError(f"{labels_path} has no label for class indices {missing}")
        self.mapping = mapping
        self.labels = [str(mapping[str(i)]) for i in range(n_out)]
        self.config["topk"] = max(1, min(int(self.config["topk"]), n_out))

        self.initialized = True
        logger.info(
            "fmnist handler ready: hidden_units=%d classes=%d threads=%d topk=%d max_image_pixels=%d "
            "explain_n_steps=%d explain_internal_batch_size=%d",
            self.model.block_1[0].out_channels,
            n_out,
            threads,
            self.config["topk"],
            self.config["max_image_pixels"],
            self.config["explain_n_steps"],
            self.config["explain_internal_batch_size"],
        )

    @staticmethod
    def _read_config(yaml_config: dict) -> dict:
        cfg = dict(DEFAULTS)
        section = yaml_config.get("handler") if isinstance(yaml_config, dict) else None
        if isinstance(section, dict):
            for key in DEFAULTS:
                if section.get(key) is not None:
                    cfg[key] = section[key]
        cfg["topk"] = int(cfg["topk"])
        # Validated (and normalised) the way preprocessing reads them.
        cfg.update(Preprocessor(**{key: cfg[key] for key in PREPROCESSING_OPTIONS}).options)
        for key, (low, high) in EXPLAIN_LIMITS.items():
            cfg[key] = int(cfg[key])
            if not low <= cfg[key] <= high:
                raise ValueError(f"handler.{key} must be between {low} and {high}, not {cfg[key]}")
        return cfg

    # ------------------------------------------------------------------ steps
    def image_to_tensor(self, data: bytes) -> torch.Tensor:
        """Image bytes -> [1, 28, 28] with this handler's limits (preprocessing.py)."""
        return self.preprocessor.image_to_tensor(data)

    def preprocess(self, data):
        """List of request rows -> list of tensors [1,28,28] or BadInput, one per row."""
        items = []
        for idx, row in enumerate(data):
            try:
                payload = extract_payload(row, request_content_type(self.context, idx))
                items.append(self.image_to_tensor(payload))
            except BadInput as e:
                items.append(e)
            except Exception as e:  # noqa: BLE001 - never let one request fail the batch
                items.append(BadInput("bad_input", "unexpected " + one_line(e)))
        return items

    def inference(self, data, *args, **kwargs):
        """[N,1,28,28] -> class probabilities [N, classes], one forward pass."""
        data = data.to(self.device)
        model = self.model
        if data.shape[0] > 1:
            model, data = self.batch_model, data.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            return torch.softmax(model(data), dim=1).cpu()

    def postprocess(self, data):
        k = self.config["topk"]
        out = []
        for probs in data:
            top_p, top_i = probs.topk(k)
            best = int(top_i[0])
            out.append(
                {
                    "label": self.labels[best],
                    "index": best,
                    "probabilities": {self.labels[int(i)]: round(float(p), 6) for p, i in zip(top_p, top_i)},
                }
            )
        return out

    def attribute(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Integrated Gradients of each input for its target class, from a black image (the
        dataset's background): [K,1,28,28] -> [K,1,28,28]. Costs explain_n_steps forward and
        backward passes per input, explain_internal_batch_size of them at a time."""
        if self._integrated_gradients is None:
            from captum.attr import IntegratedGradients  # only workers that explain pay the import

            self._integrated_gradients = IntegratedGradients(self.model)
        with torch.enable_grad():
            attributions = self._integrated_gradients.attribute(
                inputs.to(self.device),
                baselines=torch.zeros_like(inputs),
                target=targets,
                n_steps=self.config["explain_n_steps"],
                internal_batch_size=self.config["explain_internal_batch_size"],
            )
        return attributions.detach().cpu()

    # ------------------------------------------------------------------ TorchServe entry point
    def handle(self, data, context):
        """Entry point: one call per batch; returns one JSON-able dict per request, in order."""
        self.context = context
        start = time.perf_counter()
        items = self.preprocess(data)
        good = [i for i, item in enumerate(items) if isinstance(item, torch.Tensor)]
        results = [None] * len(items)
        infer_ms = explain_ms = 0.0
        explained, maps = [], []
        if good:
            t0 = time.perf_counter()
            probs = self.inference(torch.stack([items[i] for i in good]))
            infer_ms = (time.perf_counter() - t0) * 1000
            for i, res in zip(good, self.postprocess(probs)):
                results[i] = res
            explained = [n for n, i in enumerate(good) if self._is_explanation(context, i)]
        if explained:
            t0 = time.perf_counter()
            targets = torch.tensor([results[good[n]]["index"] for n in explained])
            try:
                maps = self.attribute(torch.stack([items[good[n]] for n in explained]), targets)
            except Exception as e:  # noqa: BLE001 - the batch's predictions still get answered
                failed = BadInput("explanation_failed", one_line(e))
                for n in explained:
                    items[good[n]] = failed
            explain_ms = (time.perf_counter() - t0) * 1000
            for n, attribution in zip(explained, maps):
                results[good[n]].update(
                    method="integrated_gradients",
                    n_steps=self.config["explain_n_steps"],
                    attributions=[[float(f"{v:.4g}") for v in row] for row in attribution[0].tolist()],
                )
        for idx, item in enumerate(items):
            if isinstance(item, BadInput):
                results[idx] = item.body()
                self._set_status(context, idx, item.code, item.phrase)
            self._set_json(context, idx)
        # One line per batch, whatever the batch held: the bad requests' details go into it.
        bad = "; ".join(f"#{i} {item.log_text()}" for i, item in enumerate(items) if isinstance(item, BadInput))
        errors = sum(isinstance(item, BadInput) for item in items)
        logger.info(
            "fmnist batch size=%d ok=%d errors=%d explained=%d forward_ms=%.2f explain_ms=%.2f total_ms=%.2f%s",
            len(items),
            len(items) - errors,
            errors,
            len(maps),
            infer_ms,
            explain_ms,
            (time.perf_counter() - start) * 1000,
            f" bad: {bad}" if bad else "",
        )
        return results

    @staticmethod
    def _is_explanation(context, idx: int) -> bool:
        """TorchServe's frontend sets `explain: True` on requests of /explanations/<model>."""
        try:
            return context.get_request_header(idx, "explain") == "True"
        except Exception:  # noqa: BLE001 - a context without request processors (tests, tools)
            return False

    @staticmethod
    def _set_status(context, idx: int, code: int, phrase: str) -> None:
        try:
            context.set_response_status(code, phrase, idx)
        except Exception:  # noqa: BLE001 - a context without request processors (tests, tools)
            logger.debug("could not set the status of request %d", idx, exc_info=True)

    @staticmethod
    def _set_json(context, idx: int) -> None:
        try:
            context.set_response_content_type(idx, "application/json")
        except Exception:  # noqa: BLE001
            logger.debug("could not set the content type of request %d", idx, exc_info=True)
