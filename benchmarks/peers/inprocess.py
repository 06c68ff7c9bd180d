#!/usr/bin/env python3
"""The in-process limit: the deployed handler's decode + preprocess + forward + postprocess in a loop.

Batch 1, one torch thread per process, no server. With --procs N, N such
loops run at once for the same seconds (the machine's limit for this work
with one process per core). Prints one JSON line: calls/s over all
processes, per-call latency percentiles (ms), non-200 answers, CPU ms per call.

    inprocess.py --procs 2 --seconds 10 --warmup 2 FILE...
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _loop(bodies, warmup, seconds, barrier, out):
    import torch

    import fmnist_inprocess

    torch.set_num_threads(1)
    predictor = fmnist_inprocess.load(threads=1)
    i, end = 0, time.perf_counter() + warmup
    while time.perf_counter() < end:
        predictor.predict(bodies[i % len(bodies)])
        i += 1
    barrier.wait()
    lat, errors = [], 0
    cpu = time.process_time()
    start = time.perf_counter()
    end = start + seconds
    now = start
    while now < end:
        status, _ = predictor.predict(bodies[i % len(bodies)])
        i += 1
        errors += status != 200
        t = time.perf_counter()
        lat.append(t - now)
        now = t
    out.put((len(lat), now - start, errors, lat, time.process_time() - cpu))


def percentile(sorted_values, q):
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(round(q / 100 * (len(sorted_values) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--procs", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("files", nargs="+")
    args = ap.parse_args()
    bodies = [Path(f).read_bytes() for f in args.files]
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(args.procs), ctx.Queue()
    procs = [ctx.Process(target=_loop, args=(bodies, args.warmup, args.seconds, barrier, out)) for _ in range(args.procs)]
    for p in procs:
        p.start()
    results = [out.get() for _ in procs]
    for p in procs:
        p.join()
    calls = sum(r[0] for r in results)
    lat = sorted(x * 1000 for r in results for x in r[3])
    print(json.dumps({
        "rps": sum(r[0] / r[1] for r in results),
        "requests": calls,
        "errors": sum(r[2] for r in results),
        "p50": percentile(lat, 50), "p95": percentile(lat, 95), "p99": percentile(lat, 99),
        # CPU time per call (the loop's process): what a busy machine distorts least.
        "cpu_ms": {"workers": sum(r[4] for r in results) * 1000 / max(1, calls)},
    }))


if __name__ == "__main__":
    main()
