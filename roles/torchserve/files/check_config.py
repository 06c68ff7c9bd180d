#!/usr/bin/python3
"""Check a TorchServe config.properties before it replaces the old one.

TorchServe has no checker of its own and starts with a broken file, only to
fail later (or not bind at all). Exit 1 with one line per problem.
"""
import json
import re
import sys

REQUIRED = ("inference_address", "management_address", "metrics_address",
            "grpc_inference_port", "grpc_management_port", "model_store", "load_models", "models")
ADDRESS = re.compile(r"^(unix:/\S+|https?://[^:/\s]+(:\d{1,5})?)$")


def check(path: str) -> list[str]:
    props, problems = {}, []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith(("#", "!")):
                continue
            key, sep, value = line.partition("=")
            if not sep or not key.strip():
                problems.append(f"line {n}: not key=value: {line!r}")
            elif key.strip() in props:
                problems.append(f"line {n}: {key.strip()} set twice")
            else:
                props[key.strip()] = value.strip()
    problems += [f"missing {k}" for k in REQUIRED if k not in props]
    for key in ("inference_address", "management_address", "metrics_address"):
        if key in props and not ADDRESS.match(props[key]):
            problems.append(f"{key}: not an address TorchServe accepts: {props[key]!r}")
    ports = []
    for key in ("grpc_inference_port", "grpc_management_port"):
        if key in props:
            if not props[key].isdigit() or not 1 <= int(props[key]) <= 65535:
                problems.append(f"{key}: not a port: {props[key]!r}")
            ports.append(props[key])
    if len(ports) == 2 and ports[0] == ports[1]:
        problems.append(f"grpc ports are equal ({ports[0]})")
    if "models" in props:
        try:
            models = json.loads(props["models"])
        except ValueError as e:
            problems.append(f"models: not JSON: {e}")
        else:
            # Archives are <name>-<version>.mar, each the marName of one models= entry.
            mars = {v.get("marName") for versions in models.values() if isinstance(versions, dict)
                    for v in versions.values() if isinstance(v, dict)}
            for mar in props.get("load_models", "").split(","):
                mar = mar.strip()
                if mar and mar not in mars and mar.removesuffix(".mar") not in models:
                    problems.append(f"load_models names {mar.removesuffix('.mar')!r} but models has no entry for it")
    return problems


if __name__ == "__main__":
    found = check(sys.argv[1])
    for p in found:
        print(f"config.properties: {p}", file=sys.stderr)
    sys.exit(1 if found else 0)
