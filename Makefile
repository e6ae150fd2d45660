# Thin wrappers over cargo and p2prig. Everything the targets need is installed by
# ci/install-deps.sh (the `deps` target) and built into $(P2PRIG_CACHE).

CARGO    ?= cargo
# The kernel flavors `make vm-test` (and so `make test`) boots: each tiny variant runs every
# scenario, its debug variant the debug-only ones (map-leak). FLAVORS=upstream picks others.
FLAVORS  ?= v1 v1-fixed
# A Linux source tree to run the suite on instead of FLAVORS (your patches; expected to pass).
KERNEL_SRC ?=
# `make vm-test-full`: every scenario on the tiny and the debug variant of each of these.
FULL_FLAVORS ?= v1 v1-fixed upstream upstream-fixed
# The scenarios the vm-test targets run (a name, a glob or a comma-separated list).
SCENARIOS ?= *
# Extra `p2prig run` options, e.g. RUN_ARGS='--seed 0x5eed --repeat 5'.
RUN_ARGS ?=
P2PRIG   := target/release/p2prig
# Tools the checks need that are not Debian packages (actionlint, cargo-afl), installed by
# `make deps`.
export P2PRIG_TOOLS ?= $(or $(P2PRIG_CACHE),$(HOME)/.cache/p2prig)/tools
# The browser of the render test: Debian's chromium, else the runner image's google-chrome.
export CHROME ?= $(shell command -v chromium || command -v google-chrome || echo chromium)
RESULTS  := target/p2prig
# The fuzz targets' build: apart from target/release, every crate in it is instrumented.
FUZZ_TARGET_DIR ?= $(CURDIR)/target/fuzz
VM_KERNELS = $(if $(KERNEL_SRC),--kernel-src $(KERNEL_SRC),$(addprefix --kernel ,$(FLAVORS)))

.PHONY: all deps build artifacts vm-test vm-test-full test fmt-check clippy unit lint fuzz-smoke report-render-test vm-sigint-test vm-shell-test vm-fuzz-smoke clean-runs

all: build

deps:
	@./ci/install-deps.sh

# p2prig first, then rdma-core: the guest agent's verbs bindings come from its headers.
build: deps
	$(CARGO) build --release --locked -p p2prig
	$(P2PRIG) build rdma-core
	$(CARGO) build --release --workspace --locked

# QEMU, the first flavor's tiny kernel and the initramfs, cached by input hash (what the
# SIGINT test boots); `p2prig run` builds any other kernel it needs, with progress.
artifacts: build
	$(P2PRIG) build all --kernel $(firstword $(FLAVORS))

# The main job: boot the rig on each flavor (or KERNEL_SRC) and run every scenario, each judged
# against its expected outcome on that kernel; debug-only scenarios run on the debug variants.
vm-test: artifacts
	@mkdir -p $(RESULTS)
	$(P2PRIG) run $(VM_KERNELS) --debug-variants --scenario '$(SCENARIOS)' --junit $(RESULTS)/junit.xml $(RUN_ARGS)

# The whole matrix: every scenario on both variants of every flavor (7.3 trees included:
# about an hour of kernel builds from a cold cache on 2 cores; not part of `make test`).
vm-test-full: build
	@mkdir -p $(RESULTS)
	$(P2PRIG) run $(addprefix --kernel ,$(FULL_FLAVORS) $(addsuffix :debug,$(FULL_FLAVORS))) --scenario '$(SCENARIOS)' --junit $(RESULTS)/junit-full.xml $(RUN_ARGS)

# fuzz/ is a workspace of its own (built instrumented by cargo-afl, in $(FUZZ_TARGET_DIR)).
fmt-check:
	$(CARGO) fmt --all -- --check
	$(CARGO) fmt --manifest-path fuzz/Cargo.toml -- --check

clippy: deps
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings
	CARGO_TARGET_DIR=$(FUZZ_TARGET_DIR) $(CARGO) clippy --manifest-path fuzz/Cargo.toml --all-targets --locked -- -D warnings

unit: deps
	$(CARGO) test --workspace --locked

# shellcheck over the scripts and the workflows' run: blocks, actionlint over the workflows.
lint: deps
	./ci/lint.sh

# Coverage-guided fuzzing (fuzz/README.md): each AFL++ target 30 s over its corpus in
# fuzz/corpus/; a crash or a hang fails. `fuzz/fuzz.sh run TARGET` fuzzes one for longer.
fuzz-smoke: deps
	FUZZ_TARGET_DIR=$(FUZZ_TARGET_DIR) ./fuzz/fuzz.sh smoke

# Ctrl-C during boot leaves no QEMU or nvme-cmb behind (needs the artifacts).
vm-sigint-test: artifacts
	$(CARGO) test --release --locked -p p2prig --test vm_sigint -- --ignored --nocapture

# p2prig shell through tmux: operations answer, exit leaves nothing behind (needs the artifacts).
vm-shell-test: artifacts
	$(CARGO) test --release --locked -p p2prig --test vm_shell -- --ignored --nocapture

# `p2prig fuzz` for 60 s on v1-fixed from an empty corpus with a fixed seed: a finding (a
# divergence from the revoke model, a kernel report, a hang) fails (needs the artifacts).
vm-fuzz-smoke: artifacts
	rm -rf $(RESULTS)/fuzz-smoke-corpus
	$(P2PRIG) fuzz --kernel v1-fixed --time 60s --seed 0x5eed --corpus $(RESULTS)/fuzz-smoke-corpus

# The HTML report renders in headless Chromium (no VM needed).
report-render-test: deps
	$(CARGO) test --locked -p p2prig html_report_renders_in_chromium -- --ignored

test: fmt-check clippy unit lint fuzz-smoke report-render-test vm-test vm-sigint-test vm-shell-test vm-fuzz-smoke

clean-runs:
	rm -rf $(RESULTS)/runs
