"""Decide how a run brings a running TorchServe to the wanted models.

A new version of a model the server already runs is registered beside the old
one through the management API (no restart); every other change of
config.properties, a model added or removed, or a model changed without a new
version restarts the service, as before.
"""
import json

MODEL_KEYS = ("load_models", "models")
# Keys of a models= entry that only name the file or the default: a model
# whose other keys moved needs a restart (or a new version).
FILE_KEYS = ("marName", "defaultVersion")


def _props(text):
    props = {}
    for line in (text or "").splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "!")) and "=" in line:
            key, _, value = line.partition("=")
            props[key.strip()] = value.strip()
    return props


def _models(props):
    try:
        return json.loads(props.get("models", "{}"))
    except ValueError:
        return {}


def _settings(entry):
    return {k: v for k, v in (entry or {}).items() if k not in FILE_KEYS}


def torchserve_live_models(default_results, all_results):
    """{name: {"default": version, "versions": [...]}} from the looped
    GET /models/<name> and GET /models/<name>/all results of live.yml."""
    live = {}
    for default, every in zip(default_results, all_results):
        if default.get("status") == 200 and every.get("status") == 200:
            live[default["item"]] = {"default": default["json"][0]["modelVersion"],
                                     "versions": sorted(v["modelVersion"] for v in every["json"])}
    return live


def torchserve_upgrade_plan(old_text, new_text, active, api_ok, live, models, changed_archives):
    """{"restart": [reasons], "upgrades": [{name, from, to}], "pins": {name: old models= entry}}.

    active: the unit is active; api_ok: its management API answered; live:
    torchserve_live_models(); changed_archives: names whose archive this run wrote.
    """
    plan = {"restart": [], "upgrades": [], "pins": {}}
    old, new = _props(old_text), _props(new_text)
    if not active:
        return plan  # it starts with the new config
    server = sorted(k for k in set(old) | set(new) if k not in MODEL_KEYS and old.get(k) != new.get(k))
    if server:
        plan["restart"].append("config.properties changed: " + ", ".join(server))
    if not api_ok:
        if old != new or changed_archives:
            plan["restart"].append("TorchServe does not answer on its management socket")
        return plan
    old_models, new_models = _models(old), _models(new)
    for m in models:
        name, version = m["name"], str(m["version"])
        if name not in live:
            plan["restart"].append(f"model {name} is new")
            continue
        serving = live[name]["default"]
        old_entry = old_models.get(name, {}).get(serving)
        if serving == version:
            if name in changed_archives:
                plan["restart"].append(f"archive of {name} {version} changed under the same version"
                                       " (a new version upgrades without a restart)")
            elif _settings(old_entry) != _settings(new_models.get(name, {}).get(version)):
                plan["restart"].append(f"settings of {name} {version} changed under the same version")
        elif old_entry is None:
            plan["restart"].append(f"config.properties does not describe the serving {name} {serving}")
        else:
            plan["upgrades"].append({"name": name, "from": serving, "to": version})
            plan["pins"][name] = {serving: old_entry}
    wanted = {m["name"] for m in models}
    plan["restart"] += [f"model {name} is removed" for name in sorted(set(live) - wanted)]
    if plan["restart"]:
        plan["upgrades"], plan["pins"] = [], {}  # the restart loads every new version
    return plan


def _entry(model, version):
    return {"defaultVersion": True, "marName": f"{model['name']}-{version}.mar",
            "minWorkers": int(model["workers"]), "maxWorkers": int(model["workers"]),
            "batchSize": int(model["batch_size"]), "maxBatchDelay": int(model["max_batch_delay"]),
            "responseTimeout": int(model["response_timeout"])}


def torchserve_rollback_plan(files, live, models, name, version):
    """{"rollbacks": [{name, from, to}], "errors": [...]} for playbooks/rollback.yml.

    files: find results of the model store; name: one model or "" for every
    model; version: the kept version to go back to, or "" for the newest kept
    archive other than the serving version.
    """
    plan = {"rollbacks": [], "errors": []}
    names = [m["name"] for m in models]
    if name and name not in names:
        plan["errors"].append(f"torchserve_rollback_model={name!r} is not in torchserve_models ({', '.join(names)})")
        return plan
    for n in [name] if name else names:
        if n not in live:
            plan["errors"].append(f"model {n} is not served")
            continue
        serving = live[n]["default"]
        kept = sorted((f for f in files if _version_of(f["path"], n)), key=lambda f: f["mtime"], reverse=True)
        versions = [_version_of(f["path"], n) for f in kept]
        # "Earlier" by archive age: a newer archive (e.g. a refused upgrade) is not a way back.
        born = {v: f["mtime"] for v, f in zip(versions, kept)}
        earlier = [v for v in versions if v != serving and born[v] < born.get(serving, float("inf"))]
        if version and (version == serving or version not in versions):
            plan["errors"].append(f"model {n}: no kept archive of version {version} other than the serving {serving}"
                                  f" (kept: {', '.join(versions) or 'none'})")
        elif not earlier:
            plan["errors"].append(f"model {n}: no kept archive of an earlier version (serving {serving})")
        else:
            plan["rollbacks"].append({"name": n, "from": serving, "to": version or earlier[0]})
    return plan


def torchserve_serving_pins(old_text, switched, models):
    """models= entries that describe what serves after switches: the entry of a
    switched model's new version (made from its settings), every other model's
    entry as the current config.properties has it."""
    old = _models(_props(old_text))
    pins = {m["name"]: old[m["name"]] for m in models if m["name"] in old}
    for s in switched:
        model = next(m for m in models if m["name"] == s["name"])
        pins[s["name"]] = {s["to"]: _entry(model, s["to"])}
    return pins


def torchserve_old_archives(files, name, version, keep, store, build):
    """Paths to remove: archives of `name` beyond the `keep` newest earlier
    versions (by mtime) besides `version`, their build stamps, and the
    <name>.mar of earlier releases of the role."""
    earlier = sorted((f for f in files if _version_of(f["path"], name) not in (None, str(version))),
                     key=lambda f: f["mtime"], reverse=True)
    stems = [f"{name}-{_version_of(f['path'], name)}" for f in earlier[int(keep):]] + [name]
    return [p for stem in stems for p in (f"{store}/{stem}.mar", f"{build}/{stem}.sha256")]


def _version_of(path, name):
    """The version in <store>/<name>-<version>.mar (a version has no "-"), else None."""
    base = path.rsplit("/", 1)[-1]
    if not (base.startswith(name + "-") and base.endswith(".mar")):
        return None
    version = base[len(name) + 1:-len(".mar")]
    return version if version and "-" not in version else None


class FilterModule:
    def filters(self):
        return {"torchserve_upgrade_plan": torchserve_upgrade_plan, "torchserve_live_models": torchserve_live_models,
                "torchserve_rollback_plan": torchserve_rollback_plan, "torchserve_serving_pins": torchserve_serving_pins,
                "torchserve_old_archives": torchserve_old_archives}
