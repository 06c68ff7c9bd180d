#!/usr/bin/env python3
"""Train the TinyVGG of model.py on the real Fashion-MNIST IDX files.

Writes into --out-dir (default: files/ at the repo root):
  fashion_mnist_tinyvgg.pth  state dict (keys block_1.0 ... classifier.1)
  index_to_name.json         {"0": "T-shirt/top", ...} (TorchServe format)
  train_metrics.json         test accuracy, epochs, seconds, seed, hidden_units

Deterministic: fixed seed, fixed thread count, no DataLoader workers.
See model_src/README.md for the command that reproduces files/.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import struct
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model import FashionMNISTModelV2  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_OUT_DIR = REPO_ROOT / "files"

WEIGHTS_NAME = "fashion_mnist_tinyvgg.pth"
LABELS_NAME = "index_to_name.json"
METRICS_NAME = "train_metrics.json"

CLASS_NAMES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

SPLITS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


# --------------------------------------------------------------------------- data
def _open_idx(data_dir: Path, stem: str) -> bytes:
    """Read an IDX file, gzipped (Debian's dataset-fashion-mnist) or not."""
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx")):
        path = data_dir / name
        if path.is_file():
            raw = path.read_bytes()
            return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}[.gz] not found in {data_dir} "
        "(install the Debian package dataset-fashion-mnist or pass --data-dir)"
    )


def parse_idx(raw: bytes) -> torch.Tensor:
    """Parse an unsigned-byte IDX blob into a uint8 tensor of its shape."""
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"not an unsigned-byte IDX file (magic {raw[:4].hex()})")
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    count = math.prod(dims)
    data = raw[4 + 4 * ndim : 4 + 4 * ndim + count]
    if len(data) != count:
        raise ValueError(f"IDX file truncated: {len(data)} of {count} bytes")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).reshape(dims)


def load_split(data_dir: Path | str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (images uint8 [N,28,28], labels int64 [N]) of 'train' or 'test'."""
    img_stem, lbl_stem = SPLITS[split]
    images = parse_idx(_open_idx(Path(data_dir), img_stem))
    labels = parse_idx(_open_idx(Path(data_dir), lbl_stem)).long()
    if images.shape[0] != labels.shape[0] or tuple(images.shape[1:]) != (28, 28):
        raise ValueError(f"unexpected {split} shapes {tuple(images.shape)} / {tuple(labels.shape)}")
    return images, labels


def to_float(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [N,28,28] -> float [N,1,28,28] in [0, 1] (what ToTensor() gives)."""
    return images_u8.unsqueeze(1).float().div_(255.0)


# --------------------------------------------------------------------------- augmentation
def augment(x: torch.Tensor, gen: torch.Generator, max_shift: int, flip: bool) -> torch.Tensor:
    """Random horizontal flip and random shift (zero padding + crop), per sample."""
    n, _, h, w = x.shape
    if flip:
        mask = torch.rand(n, generator=gen) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(-1), x)
    if max_shift > 0:
        p = max_shift
        padded = F.pad(x, (p, p, p, p))
        oy = torch.randint(0, 2 * p + 1, (n,), generator=gen)
        ox = torch.randint(0, 2 * p + 1, (n,), generator=gen)
        rows = (oy[:, None] + torch.arange(h))[:, :, None]  # [n,h,1]
        cols = (ox[:, None] + torch.arange(w))[:, None, :]  # [n,1,w]
        x = padded[torch.arange(n)[:, None, None], 0, rows, cols].unsqueeze(1)
    return x


# --------------------------------------------------------------------------- train / eval
@torch.inference_mode()
def predict(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (predict(model, x) == y).float().mean().item()


def write_outputs(out_dir: Path, model: torch.nn.Module, metrics: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    torch.save(state, out_dir / WEIGHTS_NAME)
    labels = {str(i): name for i, name in enumerate(CLASS_NAMES)}
    (out_dir / LABELS_NAME).write_text(json.dumps(labels, indent=2) + "\n")
    (out_dir / METRICS_NAME).write_text(json.dumps(metrics, indent=2) + "\n")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="dir with the IDX files (.gz or not)")
    ap.add_argument("--out-dir", type=Path, default=None, help=f"output dir (default {DEFAULT_OUT_DIR})")
    ap.add_argument("--hidden-units", type=int, default=20, help="width; 10 is the article's (reaches ~0.90)")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.005, help="peak learning rate of the one-cycle schedule")
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--label-smoothing", type=float, default=0.0)
    ap.add_argument("--max-shift", type=int, default=1, help="random shift in pixels (0 = off)")
    ap.add_argument("--no-flip", action="store_true", help="disable random horizontal flips")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="fast check: 1 epoch on 2,000 training / 1,000 test images; requires --out-dir",
    )
    args = ap.parse_args(argv)
    if args.smoke:
        if args.out_dir is None:
            ap.error("--smoke needs --out-dir (it must not overwrite the committed files/)")
        args.epochs = 1
    if args.out_dir is None:
        args.out_dir = DEFAULT_OUT_DIR
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    gen = torch.Generator().manual_seed(args.seed)

    t0 = time.time()
    train_u8, train_y = load_split(args.data_dir, "train")
    test_u8, test_y = load_split(args.data_dir, "test")
    if args.smoke:
        train_u8, train_y = train_u8[:2000], train_y[:2000]
        test_u8, test_y = test_u8[:1000], test_y[:1000]
    train_x, test_x = to_float(train_u8), to_float(test_u8)
    print(f"data: {len(train_x)} train / {len(test_x)} test images from {args.data_dir}", flush=True)

    model = FashionMNISTModelV2(input_shape=1, hidden_units=args.hidden_units, output_shape=len(CLASS_NAMES))
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(train_x) / args.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=steps_per_epoch, pct_start=0.25
    )
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"model: TinyVGG hidden_units={args.hidden_units} ({n_params} params); "
        f"AdamW lr={args.lr} one-cycle, {args.epochs} epochs, batch {args.batch_size}, "
        f"shift={args.max_shift} flip={not args.no_flip}, seed {args.seed}, {args.threads} threads",
        flush=True,
    )

    test_acc = float("nan")
    for epoch in range(1, args.epochs + 1):
        te = time.time()
        model.train()
        perm = torch.randperm(len(train_x), generator=gen)
        total_loss, correct = 0.0, 0
        for i in range(0, len(train_x), args.batch_size):
            idx = perm[i : i + args.batch_size]
            xb = augment(train_x[idx], gen, args.max_shift, not args.no_flip)
            yb = train_y[idx]
            logits = model(xb)
            loss = F.cross_entropy(logits, yb, label_smoothing=args.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total_loss += loss.item() * len(idx)
            correct += (logits.argmax(1) == yb).sum().item()
        test_acc = evaluate(model, test_x, test_y)
        print(
            f"epoch {epoch:2d}/{args.epochs}  loss {total_loss / len(train_x):.4f}  "
            f"train_acc {correct / len(train_x):.4f}  test_acc {test_acc:.4f}  "
            f"lr {sched.get_last_lr()[0]:.5f}  {time.time() - te:.1f}s",
            flush=True,
        )

    seconds = round(time.time() - t0, 1)
    metrics = {
        "test_accuracy": round(test_acc, 4),
        "test_images": len(test_x),
        "epochs": args.epochs,
        "seconds": seconds,
        "seed": args.seed,
        "hidden_units": args.hidden_units,
        "batch_size": args.batch_size,
        "optimizer": f"AdamW(lr={args.lr}, weight_decay={args.weight_decay}) + OneCycleLR",
        "augmentation": {"max_shift": args.max_shift, "hflip": not args.no_flip},
        "label_smoothing": args.label_smoothing,
        "threads": args.threads,
        "torch": torch.__version__,
        "smoke": bool(args.smoke),
    }
    write_outputs(args.out_dir, model, metrics)
    print(f"test accuracy {test_acc:.4f} in {seconds}s; wrote {WEIGHTS_NAME}, {LABELS_NAME}, {METRICS_NAME} to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
