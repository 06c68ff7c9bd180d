"""`--check --diff` changes nothing: on a deployed host it predicts no change
(same files, same TorchServe process); on a server no playbook has touched
(a minimal Debian: no python3-apt, no JRE, no nginx) it runs to the end,
predicts the install, and the host is exactly as before."""
import pytest

from deploy_helpers import recap

pytestmark = pytest.mark.deploy


def bare_state(host) -> str:
    """Everything a run would touch on a fresh host: packages, users, the trees
    the roles write, the enabled units, and what listens in the host's own
    port block (the hosts share the machine's ports with others)."""
    block = host.ports["ssh"] - 22
    return host.ssh(
        "dpkg-query -W -f '${Package} ${Version} ${db:Status-Status}\\n' | sort | sha256sum;"
        " cat /etc/passwd /etc/group | sha256sum;"
        " find /etc /opt /var/cache /var/lib/systemd /usr/local -xdev -printf '%p %s %m %U %G %l\\n'"
        " 2>/dev/null | sort | sha256sum;"
        " ls /etc/systemd/system/multi-user.target.wants;"
        f" ss -Hltn '( sport >= :{block} and sport <= :{block + 99} )' | awk '{{print $4}}' | sort;"
        " python3 -c 'import apt' 2>&1 | tail -1").stdout


def task_status(output: str, task: str) -> str:
    """ok / changed / skipping / fatal: how a task ended in ansible-playbook's output."""
    chunk = output.split(f"TASK [{task}]", 1)[1].split("\nTASK [", 1)[0]
    for line in chunk.splitlines():
        word = line.split(":", 1)[0]
        if word in ("ok", "changed", "skipping", "fatal"):
            return word
    raise AssertionError(f"no result for {task}:\n{chunk}")


def test_check_diff_on_deployed_host_changes_nothing(deployed_host):
    before = deployed_host.state()
    r = deployed_host.playbook("--check", "--diff")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    counts = recap(r.stdout, deployed_host.name)
    assert counts["changed"] == 0 and counts["failed"] == 0, counts
    assert deployed_host.state() == before


def test_check_diff_on_fresh_host_runs_to_the_end_and_changes_nothing(fresh_host):
    before = bare_state(fresh_host)
    assert "No module named 'apt'" in before  # really a minimal Debian, as the issue describes
    r = fresh_host.playbook("--check", "--diff")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    counts = recap(r.stdout, fresh_host.name)
    assert counts["failed"] == 0 and counts["changed"] > 0, counts
    # The installs are predicted (apt-get --simulate) as changes, not skipped.
    for task in ("torchserve_java : Predict: Install the JRE", "torchserve : Predict: Install Python venv support",
                 "torchserve_nginx : Predict: Install nginx, its njs module and logrotate", "torchserve : Write config.properties"):
        assert task_status(r.stdout, task) == "changed", task
    assert bare_state(fresh_host) == before
