#!/usr/bin/env bash
# Builds libibverbs and the rxe provider of rdma-core 56.1 (Debian 13's source package) with
# guest-image/rdma-core/*.patch applied, for the guest initramfs and the agent's bindings.
#
#   rdma-core.sh <work-dir> <out-dir>
#
# Environment (set by `p2prig build rdma-core`):
#   P2PRIG_DOWNLOADS    verified source files live here
#   P2PRIG_APT_STATE    private apt state for Debian source packages
#   P2PRIG_PATCHES      folder of the provider patches (applied in name order)
#   RDMA_CORE_TARBALL   optional: use this upstream-layout tarball instead of downloading
#
# Output:
#   <out>/rootfs/...    files at the paths the guest needs them: libibverbs.so.1, the rxe
#                       provider in libibverbs' compiled-in provider directory, and
#                       /etc/libibverbs.d/rxe.driver in its compiled-in config directory
#   <out>/include/...   the public headers (infiniband/, rdma/) for bindgen
#   <out>/BUILD-INFO    version, source checksum, patches, compiled-in paths
set -euo pipefail

work=$1 out=$2
here=$(cd "$(dirname "$0")" && pwd)
downloads=${P2PRIG_DOWNLOADS:?}
patches=${P2PRIG_PATCHES:?}
mkdir -p "$work" "$out" "$downloads"

# Debian 12 (bookworm) has 44.0-2, but its .orig tarball is not on every mirror; trixie's
# 56.1-1 is a stable suite's package (checksums from trixie's Sources index).
deb_version=56.1-1
deb_orig=rdma-core_56.1.orig.tar.gz
deb_orig_sha=63ce7f2baa7242c2dbc76375dac957c420187dd27f8c5e148efc07971ee522a8
deb_debian=rdma-core_56.1-1.debian.tar.xz
deb_debian_sha=4e27344a0ecfd591bd1081486a2006d2edb52782d209cd744da7faf3b8f0ded4
# Where the guest finds things; compiled into libibverbs (IBV_CONFIG_DIR, VERBS_PROVIDER_DIR).
libdir=lib/x86_64-linux-gnu

step() { echo "==> $*"; }
verified() { [ -f "$1" ] && echo "$2  $1" | sha256sum -c --status; }

fetch_debian() {
  verified "$downloads/$deb_orig" "$deb_orig_sha" && verified "$downloads/$deb_debian" "$deb_debian_sha" && return 0
  step "downloading Debian source package rdma-core $deb_version"
  local tmp; tmp=$(mktemp -d "$downloads/.rdma-core.XXXXXX")
  # apt-get may fail on a file we do not use (some mirrors lack the .dsc); what counts is that
  # the two pinned files arrived with the right checksums.
  (cd "$tmp" && "$here/apt-private.sh" "${P2PRIG_APT_STATE:?}" source "rdma-core=$deb_version") || true
  for f in "$deb_orig:$deb_orig_sha" "$deb_debian:$deb_debian_sha"; do
    if [ ! -f "$tmp/${f%%:*}" ]; then
      echo "rdma-core: ${f%%:*} was not downloaded" >&2; rm -rf "$tmp"; return 1
    fi
    if ! verified "$tmp/${f%%:*}" "${f#*:}"; then
      echo "rdma-core: checksum mismatch for ${f%%:*}; refusing to build from it" >&2; rm -rf "$tmp"; exit 1
    fi
    mv "$tmp/${f%%:*}" "$downloads/"
  done
  rm -rf "$tmp"
}

src=$work/src
series=$(cd "$patches" && ls -1 ./*.patch 2>/dev/null | sort | xargs -r sha256sum | sha256sum | cut -d' ' -f1)
want=${RDMA_CORE_TARBALL:+tarball:$(sha256sum "$RDMA_CORE_TARBALL" | cut -d' ' -f1)}
want="${want:-pinned:$deb_orig_sha} patches:$series"
# The stamp names the source and the patches; anything else means a fresh tree and build.
if [ "$(cat "$src/.p2prig-unpacked" 2>/dev/null)" != "$want" ]; then
  rm -rf "$src" "$work/build"; mkdir -p "$src"
  if [ -n "${RDMA_CORE_TARBALL:-}" ]; then
    step "unpacking $RDMA_CORE_TARBALL"
    tar -xf "$RDMA_CORE_TARBALL" -C "$src" --strip-components=1
  elif fetch_debian; then
    step "unpacking $deb_orig"
    tar -xzf "$downloads/$deb_orig" -C "$src" --strip-components=1
    # Debian's own patches touch only the mana provider, which is not built.
  else
    echo "rdma-core: could not download Debian's rdma-core $deb_version source package." >&2
    echo "rdma-core: fetch an rdma-core 56.1 tarball yourself and run with RDMA_CORE_TARBALL=/path/to/it" >&2
    exit 1
  fi
  for p in "$patches"/*.patch; do
    [ -e "$p" ] || continue
    step "applying $(basename "$p")"
    patch -d "$src" -p1 -s --no-backup-if-mismatch <"$p"
  done
  echo "$want" >"$src/.p2prig-unpacked"
fi

build=$work/build
if [ ! -f "$build/build.ninja" ]; then
  step "configuring"
  rm -rf "$build"; mkdir -p "$build"
  # -ffile-prefix-map keeps the work directory out of the binaries (reproducible output).
  (cd "$build" && CFLAGS="-O2 -g -ffile-prefix-map=$src=. -ffile-prefix-map=$build=." \
    cmake -GNinja "$src" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
      -DCMAKE_INSTALL_PREFIX=/usr -DCMAKE_INSTALL_LIBDIR="$libdir" \
      -DCMAKE_INSTALL_SYSCONFDIR=/etc -DCMAKE_INSTALL_RUNDIR=/run \
      -DNO_MAN_PAGES=1 -DNO_PYVERBS=1 -DENABLE_STATIC=0 -DENABLE_VALGRIND=0)
fi

# The provider ABI version is part of the provider's file name (librxe-rdmav34.so).
pabi=$(sed -n 's/^set(IBVERBS_PABI_VERSION "\([0-9]*\)")/\1/p' "$src/CMakeLists.txt")
step "compiling libibverbs and the rxe provider"
ninja -C "$build" -j"$(nproc)" lib/libibverbs.so.1 "lib/librxe-rdmav$pabi.so"

step "collecting"
rm -rf "$out/rootfs" "$out/include"
config_dir=$(sed -n 's/^#define IBV_CONFIG_DIR "\(.*\)"$/\1/p' "$build/include/config.h")
provider_dir=$(sed -n 's/^#define VERBS_PROVIDER_DIR "\(.*\)"$/\1/p' "$build/include/config.h")
[ "$config_dir" = /etc/libibverbs.d ] && [ "$provider_dir" = "/usr/$libdir/libibverbs" ] || {
  echo "rdma-core: unexpected compiled-in paths: config '$config_dir', providers '$provider_dir'" >&2; exit 1; }
mkdir -p "$out/rootfs/usr/$libdir/libibverbs" "$out/rootfs$config_dir" "$out/include"
strip --strip-unneeded -o "$out/rootfs/usr/$libdir/libibverbs.so.1" "$(readlink -f "$build/lib/libibverbs.so.1")"
strip --strip-unneeded -o "$out/rootfs$provider_dir/librxe-rdmav$pabi.so" "$build/lib/librxe-rdmav$pabi.so"
printf 'driver rxe\n' >"$out/rootfs$config_dir/rxe.driver"
# build/include holds symlinks into the source tree; copy what they point at.
cp -rL "$build/include/infiniband" "$build/include/rdma" "$out/include/"
{
  echo "rdma-core $deb_version"
  echo "source $want"
  echo "config_dir $config_dir"
  echo "provider_dir $provider_dir"
  echo "provider librxe-rdmav$pabi.so"
} >"$out/BUILD-INFO"
step "built $(cd "$out" && find rootfs -type f | sort | tr '\n' ' ')"
