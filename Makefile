# Thin wrappers over cargo and p2prig. Everything the targets need is installed by
# ci/install-deps.sh (the `deps` target) and built into $(P2PRIG_CACHE).

CARGO    ?= cargo
KERNELS  ?= v1 v1-fixed
# The scenarios `make test` and `make vm-test` run (a name, a glob or a comma-separated list).
SCENARIOS ?= *
P2PRIG   := target/release/p2prig
RESULTS  := target/p2prig

.PHONY: all deps build artifacts vm-test test fmt-check clippy unit report-render-test vm-sigint-test clean-runs

all: build

deps:
	@./ci/install-deps.sh

# p2prig first, then rdma-core: the guest agent's verbs bindings come from its headers.
build: deps
	$(CARGO) build --release --locked -p p2prig
	$(P2PRIG) build rdma-core
	$(CARGO) build --release --workspace --locked

# QEMU, the guest kernel(s) and the initramfs, cached by input hash.
artifacts: build
	$(P2PRIG) build all $(addprefix --kernel ,$(KERNELS))

# The main job: boot the rig on each of $(KERNELS) and run every scenario, each judged
# against its expected outcome on that kernel.
vm-test: artifacts
	@mkdir -p $(RESULTS)
	$(P2PRIG) run $(addprefix --kernel ,$(KERNELS)) --scenario '$(SCENARIOS)' --junit $(RESULTS)/junit.xml

fmt-check:
	$(CARGO) fmt --all -- --check

clippy: deps
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

unit: deps
	$(CARGO) test --workspace --locked

# Ctrl-C during boot leaves no QEMU or nvme-cmb behind (needs the artifacts).
vm-sigint-test: artifacts
	$(CARGO) test --release --locked -p p2prig --test vm_sigint -- --ignored --nocapture

# The HTML report renders in headless Chromium (no VM needed).
report-render-test: deps
	$(CARGO) test --locked -p p2prig html_report_renders_in_chromium -- --ignored

test: fmt-check clippy unit report-render-test vm-test vm-sigint-test

clean-runs:
	rm -rf $(RESULTS)/runs
