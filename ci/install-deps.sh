#!/usr/bin/env bash
# Installs every Debian/Ubuntu package that p2prig's builds, tests and VM runs need.
# Idempotent and quiet: packages already present are not touched, apt runs only when
# something is missing. Never edits the system's apt sources.
set -euo pipefail

packages=(
  # toolchain glue
  build-essential pkg-config git xz-utils zstd cpio ca-certificates curl python3 python3-venv
  # QEMU from source (reference/qemu-vfio-user.md)
  ninja-build libglib2.0-dev libpixman-1-dev flex bison libslirp-dev libfdt-dev zlib1g-dev patch
  # QEMU runtime firmware: qboot.rom and option ROMs
  qemu-system-data seabios
  # Linux kernel builds
  bc libelf-dev libssl-dev kmod
  # headless browser: the HTML report's rendering test; tshark decodes roce-target's captures
  chromium tshark
  # rdma-core for the guest (libibverbs + rxe), and bindgen's libclang for the agent's
  # verbs bindings (libibverbs-dev: their headers before rdma-core is built)
  cmake libnl-3-dev libnl-route-3-dev libudev-dev libclang-dev libibverbs-dev
  # apt keyring for the private apt configuration that fetches pinned sources
  debian-archive-keyring
)

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

if [ "${#missing[@]}" -eq 0 ]; then
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
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$log" 2>&1; then
  tail -n 30 "$log" >&2
  echo "install-deps: apt-get failed (log above). Check the package names exist on this distribution and that apt can reach its archive, then re-run 'make deps'." >&2
  rm -f "$log"
  exit 1
fi
rm -f "$log"
echo "install-deps: done"
