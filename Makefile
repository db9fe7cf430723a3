# sluicegate: the two set-up commands are `make run` and `make test` (see README.md).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Debian packages the tests need: nginx (test backend), promtool (metrics lint), curl,
# nftables + iproute2 (TPROXY interception in test namespaces), iperf3 (stream tests),
# redis-server (cluster-wide rate limits), etcd-server (cluster config store).
TEST_PACKAGES := nginx-light prometheus curl nftables iproute2 iperf3 redis-server etcd-server
BENCH_PACKAGES := nginx-light haproxy wrk curl

.PHONY: run test venv deps lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# The quickstart: a demo upstream on 127.0.0.1:9081 and the gateway on :9080.
run: $(STAMP)
	@$(PY) examples/echo_upstream.py --listen 127.0.0.1:9081 & echo_pid=$$!; \
	trap 'kill $$echo_pid 2>/dev/null' EXIT; \
	echo "try: curl http://127.0.0.1:9080/echo/hi"; \
	$(VENV)/bin/sluicegate run -c examples/quickstart.yaml

# Installs missing Debian packages only (idempotent), then nothing else.
deps:
	@missing=""; for p in $(TEST_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

test: deps $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench examples

bench: $(STAMP)
	@missing=""; for p in $(BENCH_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi
	$(PY) -m pip install -q -e '.[bench]'
	bench/http_proxy.sh

clean:
	rm -rf $(VENV) build src/*.egg-info
