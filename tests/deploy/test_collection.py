"""The collection as another project uses it: `ansible-galaxy collection
build`, installed into a temporary collections path, then a separate project
(only an inventory and a playbook naming the roles by FQCN, no ansible.cfg,
none of this repository's roles on any path) deploys a fresh sandbox host.
The model files come from the installed collection. Then the collection's own
playbook, run by its FQCN, finds everything in place (changed=0)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import yaml

from deploy_helpers import REPO, recap

pytestmark = pytest.mark.deploy
STATE = REPO / ".sandbox/pytest-collection"
SANDBOX = ["python3", str(REPO / "sandbox/hosts.py"), "--state-dir", str(STATE), "--prefix", "pytest-coll"]
HOST = "pytest-coll1"
FQCN = "modelserving.torchserve"

PLAYBOOK = f"""---
- name: TorchServe behind nginx, from the collection
  hosts: torchserve_servers
  become: true
  vars:
    # What one role takes from another is wired by the play.
    torchserve_java_min_major_version: 17
    torchserve_nginx_upstream_socket: "{{{{ torchserve_inference_socket }}}}"
    torchserve_nginx_upstream_socket_group: "{{{{ torchserve_inference_socket_group }}}}"
    torchserve_nginx_client_max_body_size: "{{{{ torchserve_max_request_size }}}}"
    torchserve_nginx_exposed_models: "{{{{ torchserve_models | map(attribute='name') | list }}}}"
  roles:
    - role: {FQCN}.torchserve_java
    - role: {FQCN}.torchserve
    - role: {FQCN}.torchserve_nginx
"""


def galaxy(*argv: str, cwd: Path, collections: Path | None = None) -> None:
    galaxy_bin = Path(sys.executable).with_name("ansible-galaxy")
    # Only the temporary collections path counts: a copy installed elsewhere
    # (the user's ~/.ansible) must not make the install a no-op.
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    if collections:
        env["ANSIBLE_COLLECTIONS_PATH"] = str(collections)
    r = subprocess.run([str(galaxy_bin), *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture
def collection_host():
    subprocess.run(SANDBOX + ["destroy"], check=True, timeout=300)
    subprocess.run(SANDBOX + ["create", "--count", "1"], check=True, timeout=600)
    try:
        yield json.loads(subprocess.run(SANDBOX + ["info", HOST], check=True, capture_output=True,
                                        text=True).stdout)
    finally:
        if not os.environ.get("KEEP_HOSTS"):
            subprocess.run(SANDBOX + ["destroy"], timeout=300)


def test_collection_deploys_from_another_project(collection_host, tmp_path):
    dist, collections, project = tmp_path / "dist", tmp_path / "collections", tmp_path / "project"
    galaxy("collection", "build", "--output-path", str(dist), str(REPO), cwd=tmp_path)
    tarball, = dist.glob("modelserving-torchserve-*.tar.gz")
    # Offline: community.general and community.crypto, the declared
    # dependencies, already come with the ansible package of the venv.
    galaxy("collection", "install", "--no-deps", "--force", "-p", str(collections), str(tarball), cwd=tmp_path,
           collections=collections)
    installed = collections / "ansible_collections/modelserving/torchserve"
    assert (installed / "roles/torchserve/meta/argument_specs.yml").is_file()
    assert not (installed / "tests").exists() and not (installed / "molecule").exists()

    # The user's project: the sandbox's hosts and connection settings, plus
    # group vars a user of a sandbox host would set.
    (project / "inventory/group_vars").mkdir(parents=True)
    (project / "inventory/hosts.yml").write_text(Path(collection_host["inventory"]).read_text())
    # The model: the collection's example entry, its files in the collection.
    example = yaml.safe_load((installed / "playbooks/vars/fmnist.yml").read_text())
    (project / "inventory/group_vars/torchserve_servers.yml").write_text(json.dumps({
        **example,
        "torchserve_model_src_root": str(installed),
        # The controller's wheel cache (the sandbox hosts reach no index).
        "torchserve_wheelhouse_controller_dir": str(REPO / ".cache/wheelhouse"),
        "torchserve_nginx_tls_enabled": False,
    }))
    (project / "site.yml").write_text(PLAYBOOK)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env.update(ANSIBLE_COLLECTIONS_PATH=str(collections), ANSIBLE_ROLES_PATH=str(project / "roles"),
               PATH=f"{Path(sys.executable).parent}:{env['PATH']}")

    def play(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(["ansible-playbook", "-i", "inventory", *argv], cwd=project, env=env,
                              capture_output=True, text=True, timeout=1800)

    r = play("site.yml")
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    assert f"TASK [{FQCN}.torchserve : " in r.stdout, "the roles ran from the installed collection"
    answer = requests.put(f"http://127.0.0.1:{collection_host['ports']['torchserve_nginx_http_port']}/predictions/fmnist",
                          data=(REPO / "files/samples/tshirt4.jpg").read_bytes(), timeout=60)
    assert answer.status_code == 200 and answer.json()["label"] == "T-shirt/top", answer.text

    # The collection's playbook by FQCN: its pre_tasks include the roles by
    # short name, which must resolve inside the collection.
    again = play(f"{FQCN}.deploy")
    assert again.returncode == 0, again.stdout[-6000:] + again.stderr[-3000:]
    assert f"TASK [{FQCN}.torchserve_nginx : " in again.stdout
    assert recap(again.stdout, HOST)["changed"] == 0, again.stdout[-4000:]
