# Quick start:  make demo   (one local sandbox server, deployed, then curled)
#               make test   (lint, model tests, molecule, deployment tests)
SHELL := /bin/bash
VENV ?= .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
DEMO_STATE := .sandbox/demo
SANDBOX := python3 sandbox/hosts.py
DEMO := $(SANDBOX) --state-dir $(DEMO_STATE) --prefix demo-host
FLEET_STATE := .sandbox/demo-fleet
FLEET := $(SANDBOX) --state-dir $(FLEET_STATE) --prefix fleet-host

# Debian packages: sandbox hosts (nspawn, debootstrap), the real Fashion-MNIST
# data, a JRE for the local serving tests, ssh/curl to reach the hosts, wrk
# for the serving benchmark.
APT_PACKAGES := systemd-container debootstrap dataset-fashion-mnist openjdk-17-jre-headless \
                openssh-client curl python3-venv wrk
HOST_TOOLS := systemd-nspawn debootstrap java ssh curl wrk

.PHONY: deps venv promtool demo demo-destroy demo-monitoring demo-fleet demo-fleet-destroy lint test bench bench-serving bench-sweep chaos clean-hosts

# Installs the Debian packages only when something is missing.
deps:
	@missing=0; for t in $(HOST_TOOLS); do command -v $$t >/dev/null || missing=1; done; \
	  [ -d /usr/share/datasets/fashion-mnist ] || missing=1; \
	  python3 -c 'import ensurepip' 2>/dev/null || missing=1; \
	  if [ $$missing = 1 ]; then \
	    echo "installing Debian packages: $(APT_PACKAGES)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(APT_PACKAGES) >/dev/null; \
	  fi

# promtool (rule checks and unit tests) from Debian's prometheus package,
# unpacked into .tools/: installing the package would start a Prometheus here.
PROMTOOL := .tools/promtool
promtool: $(PROMTOOL)
$(PROMTOOL):
	mkdir -p .tools
	cd .tools && { apt-get download prometheus 2>/dev/null || { apt-get update -qq && apt-get download prometheus; }; } \
	  && dpkg-deb --fsys-tarfile prometheus_*.deb | tar -x --strip-components=3 ./usr/bin/promtool \
	  && rm -f prometheus_*.deb
	$@ --version >/dev/null

venv: $(VENV)/.installed
$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -r requirements.txt
	touch $@

demo: deps venv
	$(DEMO) create --count 1
	ansible-playbook -i $(DEMO_STATE)/inventory.yml playbooks/deploy.yml
	@echo; echo "== systemctl status torchserve (on demo-host1)"
	@$(DEMO) shell demo-host1 systemctl status torchserve --no-pager --lines=0
	@port=$$($(DEMO) info demo-host1 | python3 -c 'import json,sys; print(json.load(sys.stdin)["ports"]["torchserve_nginx_http_port"])'); \
	  echo; echo "== curl -T files/samples/tshirt4.jpg http://127.0.0.1:$$port/predictions/fmnist"; \
	  curl -sS -T files/samples/tshirt4.jpg http://127.0.0.1:$$port/predictions/fmnist; echo; \
	  echo; echo "Try it:       curl -T files/samples/tshirt3.jpeg http://127.0.0.1:$$port/predictions/fmnist"; \
	  echo "Shell:        $(DEMO) shell demo-host1"; \
	  echo "Remove host:  make demo-destroy"

# The demo server with its metrics listener and public explanations on, plus a
# second host with Prometheus scraping it. The scrape password is generated
# once into $(DEMO_STATE)/metrics.yml (mode 600).
DEMO_MON_STATE := .sandbox/demo-monitoring
DEMO_MON := $(SANDBOX) --state-dir $(DEMO_MON_STATE) --prefix demo-mon --group torchserve_monitoring
demo-monitoring: deps venv
	$(DEMO) create --count 1
	$(DEMO_MON) create --count 1
	@[ -s $(DEMO_STATE)/metrics.yml ] || { umask 077; python3 -c 'import secrets; print("torchserve_metrics_enabled: true"); \
	  print("torchserve_metrics_password: " + secrets.token_urlsafe(24)); print("torchserve_nginx_explanations_models: [fmnist]")' \
	  > $(DEMO_STATE)/metrics.yml; }
	ansible-playbook -i $(DEMO_STATE)/inventory.yml -i $(DEMO_MON_STATE)/inventory.yml playbooks/deploy.yml -e @$(DEMO_STATE)/metrics.yml
	@web=$$($(DEMO_MON) info demo-mon1 | python3 -c 'import json,sys; print(json.load(sys.stdin)["ports"]["torchserve_monitoring_port"])'); \
	  ports=$$($(DEMO) info demo-host1 | python3 -c 'import json,sys; p=json.load(sys.stdin)["ports"]; print(p["torchserve_nginx_http_port"], p["torchserve_metrics_port"])'); \
	  http=$${ports% *}; metrics=$${ports#* }; \
	  echo; echo "Prometheus:   http://127.0.0.1:$$web  (Status > Targets, Alerts)"; \
	  echo "Query:        curl -s 'http://127.0.0.1:$$web/api/v1/query?query=sum(ts_inference_requests_total)'"; \
	  echo "Metrics:      curl -k -u prometheus:PASSWORD https://127.0.0.1:$$metrics/metrics/torchserve   (also /metrics/nginx, /metrics/node;"; \
	  echo "              the password is in $(DEMO_STATE)/metrics.yml)"; \
	  echo "Explanation:  curl -T files/samples/tshirt4.jpg http://127.0.0.1:$$http/explanations/fmnist"; \
	  echo "Remove hosts: make demo-destroy"

demo-destroy:
	$(DEMO) destroy
	-$(DEMO_MON) destroy
	rm -f $(DEMO_STATE)/metrics.yml

# Three servers behind one HAProxy balancer, all local sandbox hosts.
demo-fleet: deps venv
	$(FLEET) create --count 3 --balancers 1
	ansible-playbook -i $(FLEET_STATE)/inventory.yml playbooks/deploy.yml
	@port=$$($(FLEET) info fleet-host-lb1 | python3 -c 'import json,sys; print(json.load(sys.stdin)["ports"]["torchserve_balancer_http_port"])'); \
	  echo; echo "== curl -T files/samples/tshirt4.jpg http://127.0.0.1:$$port/predictions/fmnist  (through the balancer)"; \
	  curl -sS -T files/samples/tshirt4.jpg http://127.0.0.1:$$port/predictions/fmnist; echo; \
	  echo; echo "Balancer:     http://127.0.0.1:$$port/predictions/fmnist"; \
	  echo "Servers:      $(FLEET) list"; \
	  echo "Roll a change: ansible-playbook -i $(FLEET_STATE)/inventory.yml playbooks/deploy.yml -e torchserve_vmargs=-Xmx1200m"; \
	  echo "Remove fleet: make demo-fleet-destroy"

demo-fleet-destroy:
	$(FLEET) destroy

lint: deps venv promtool
	python3 -m pytest tests/test_lint.py tests/test_monitoring_rules.py

# One pytest run holds everything (lint, model, molecule, deployment), so its
# summary line covers the whole suite. Exit code 5 (no tests) is a failure.
test: deps venv promtool
	python3 -m pytest; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

# Deployment figures on a fresh sandbox host, then the serving figures on the
# same host (benchmarks/results/serving.md and the plots). KEEP_HOSTS=1 keeps it.
bench: deps venv
	KEEP_HOSTS=1 python3 benchmarks/deploy_figures.py || { $(SANDBOX) --state-dir .sandbox/bench destroy; exit 1; }
	python3 benchmarks/serving.py

bench-serving: deps venv
	python3 benchmarks/serving.py

# Settings sweep of the deployed TorchServe (no nginx); prints the best.
bench-sweep: deps venv
	python3 benchmarks/serving.py --sweep

# The chaos scenario of tests/deploy/test_chaos.py on its own host, as a table.
chaos: deps venv
	python3 benchmarks/chaos_figures.py

# Hosts the tests made, stopped by their recorded PIDs (CI calls this on exit).
clean-hosts:
	-$(SANDBOX) --state-dir .sandbox/molecule destroy
	-$(SANDBOX) --state-dir .sandbox/pytest destroy
	-$(SANDBOX) --state-dir .sandbox/pytest-fresh destroy
	-$(SANDBOX) --state-dir .sandbox/chaos destroy
	-$(SANDBOX) --state-dir .sandbox/bench destroy
	-$(SANDBOX) --state-dir .sandbox/pytest-collection destroy
	-$(SANDBOX) --state-dir .sandbox/pytest-monitoring --group torchserve_monitoring destroy
	-$(SANDBOX) --state-dir .sandbox/pytest-fleet destroy
	-$(SANDBOX) --state-dir .sandbox/pytest-upgrade destroy
