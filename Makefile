# Quick start:  make demo   (one local sandbox server, deployed, then curled)
#               make test   (lint, model tests, molecule, deployment tests)
SHELL := /bin/bash
VENV ?= .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
DEMO_STATE := .sandbox/demo
SANDBOX := python3 sandbox/hosts.py
DEMO := $(SANDBOX) --state-dir $(DEMO_STATE) --prefix demo-host

.PHONY: venv demo demo-destroy lint test bench clean-hosts

venv: $(VENV)/.installed
$(VENV)/.installed: requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -r requirements.txt
	touch $@

demo: venv
	$(DEMO) create --count 1
	ansible-playbook -i $(DEMO_STATE)/inventory.yml playbooks/deploy.yml
	@echo; echo "== systemctl status torchserve (on demo-host1)"
	@$(DEMO) shell demo-host1 systemctl status torchserve --no-pager --lines=0
	@port=$$($(DEMO) info demo-host1 | python3 -c 'import json,sys; print(json.load(sys.stdin)["ports"]["nginx_http_port"])'); \
	  echo; echo "== curl -T files/samples/tshirt4.jpg http://127.0.0.1:$$port/predictions/fmnist"; \
	  curl -sS -T files/samples/tshirt4.jpg http://127.0.0.1:$$port/predictions/fmnist; echo; \
	  echo; echo "Try it:       curl -T files/samples/tshirt3.jpeg http://127.0.0.1:$$port/predictions/fmnist"; \
	  echo "Shell:        $(DEMO) shell demo-host1"; \
	  echo "Remove host:  make demo-destroy"

demo-destroy:
	$(DEMO) destroy

lint: venv
	python3 -m pytest tests/test_lint.py

# One pytest run holds everything (lint, model, molecule, deployment), so its
# summary line covers the whole suite. Exit code 5 (no tests) is a failure.
test: venv
	python3 -m pytest; rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

bench: venv
	python3 benchmarks/deploy_figures.py

# Hosts the tests made, stopped by their recorded PIDs (CI calls this on exit).
clean-hosts:
	-$(SANDBOX) --state-dir .sandbox/molecule destroy
	-$(SANDBOX) --state-dir .sandbox/pytest destroy
