# sluicegate: the two set-up commands are `make run` and `make test` (see README.md).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Debian packages the tests need: nginx (test backend), promtool (metrics lint), curl,
# nftables + iproute2 (TPROXY interception in test namespaces), iperf3 (stream tests),
# redis-server (cluster-wide rate limits), etcd-server (cluster config store), chromium
# (the dashboard's page, driven headless by Playwright).
TEST_PACKAGES := nginx-light prometheus curl nftables iproute2 iperf3 redis-server etcd-server libbpf1 chromium
BENCH_PACKAGES := nginx-light haproxy wrk curl

.PHONY: run test venv deps lint bench clean bpf bpf-tools bpf-objects

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
	CASES="direct sluicegate" bench/ai.sh   # the AI gateway; bench/ai.sh alone adds LiteLLM

# eBPF objects (src/sluicegate/bpf/obj/*.bpf.o) are committed: users need no compiler, only
# libbpf1 at run time. `make bpf` rebuilds them: it installs the toolchain when missing,
# generates vmlinux.h from this kernel's BTF (CO-RE: the objects relocate on other kernels;
# vmlinux.h is large and .gitignored) and compiles each src/NAME.bpf.c.
BPF_PACKAGES := clang llvm libbpf-dev bpftool
BPF_DIR := src/sluicegate/bpf
BPF_SOURCES := $(wildcard $(BPF_DIR)/src/*.bpf.c)
BPF_OBJECTS := $(patsubst $(BPF_DIR)/src/%.bpf.c,$(BPF_DIR)/obj/%.bpf.o,$(BPF_SOURCES))
BPF_CFLAGS := -O2 -g -target bpf -D__TARGET_ARCH_x86 -Wall -Werror -I$(BPF_DIR)/src

bpf: bpf-tools
	@$(MAKE) --no-print-directory bpf-objects

bpf-objects: $(BPF_OBJECTS)

# The XDP filter's rate-limit buckets are shared by every CPU: compare-and-swap needs the
# BPF v3 instruction set (kernel 5.12+).
$(BPF_DIR)/obj/xdp_filter.bpf.o: BPF_CFLAGS += -mcpu=v3

bpf-tools:
	@missing=""; for p in $(BPF_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

$(BPF_DIR)/src/vmlinux.h:
	bpftool btf dump file /sys/kernel/btf/vmlinux format c > $@.tmp && mv $@.tmp $@

$(BPF_DIR)/obj/%.bpf.o: $(BPF_DIR)/src/%.bpf.c $(wildcard $(BPF_DIR)/src/*.h) | $(BPF_DIR)/src/vmlinux.h
	@mkdir -p $(dir $@)
	clang $(BPF_CFLAGS) -c $< -o $@
	llvm-strip -g $@ 2>/dev/null || true

clean:
	rm -rf $(VENV) build src/*.egg-info
