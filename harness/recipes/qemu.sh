#!/usr/bin/env bash
# Builds qemu-system-x86_64 10.2.2 with the vfio-user client (reference/qemu-vfio-user.md).
#
#   qemu.sh <work-dir> <out-dir>
#
# Environment (set by `p2prig build qemu`):
#   P2PRIG_DOWNLOADS  verified source files live here
#   P2PRIG_APT_STATE  private apt state for Debian source packages
#   QEMU_TARBALL      optional: use this upstream-layout tarball instead of downloading
# The work dir is reused between runs with the same sources, so a rebuild is incremental.
set -euo pipefail

work=$1 out=$2
here=$(cd "$(dirname "$0")" && pwd)
downloads=${P2PRIG_DOWNLOADS:?}
mkdir -p "$work" "$out" "$downloads"

version=10.2.2
deb_version=1:10.2.2+ds-1
deb_orig=qemu_10.2.2+ds.orig.tar.xz
deb_orig_sha=be05230fe47a6937cd29f28f562932c8125f9c93c2a82c625198f7a4aa601dfb
deb_debian=qemu_10.2.2+ds-1.debian.tar.xz
deb_debian_sha=ddf75aceab4f8f77374f3cb34fc97b41514895aeb293ce8b2ddd5e072bb0f5c0
upstream=qemu-$version.tar.xz
upstream_url=https://download.qemu.org/$upstream
# Pinned from a published build recipe of the same release; not re-measured here (no route).
upstream_sha=784b296ff29c1417aa72323abcb2d2ea9ab9771724f577dcd785c3b04f21e176

step() { echo "==> $*"; }
verified() { [ -f "$1" ] && echo "$2  $1" | sha256sum -c --status; }

fetch_debian() {
  verified "$downloads/$deb_orig" "$deb_orig_sha" && verified "$downloads/$deb_debian" "$deb_debian_sha" && return 0
  step "downloading Debian source package qemu $deb_version"
  local tmp; tmp=$(mktemp -d "$downloads/.qemu.XXXXXX")
  if ! (cd "$tmp" && "$here/apt-private.sh" "${P2PRIG_APT_STATE:?}" source "qemu=$deb_version" >/dev/null 2>&1); then
    rm -rf "$tmp"; return 1
  fi
  for f in "$deb_orig:$deb_orig_sha" "$deb_debian:$deb_debian_sha"; do
    if ! verified "$tmp/${f%%:*}" "${f#*:}"; then
      echo "qemu: checksum mismatch for ${f%%:*}; refusing to build from it" >&2; rm -rf "$tmp"; exit 1
    fi
    mv "$tmp/${f%%:*}" "$downloads/"
  done
  rm -rf "$tmp"
}

fetch_upstream() {
  verified "$downloads/$upstream" "$upstream_sha" && return 0
  step "downloading $upstream_url"
  curl -fsSL --retry 3 -o "$downloads/$upstream.part" "$upstream_url" || return 1
  if ! verified "$downloads/$upstream.part" "$upstream_sha"; then
    echo "qemu: checksum mismatch for $upstream; refusing to build from it" >&2
    rm -f "$downloads/$upstream.part"; exit 1
  fi
  mv "$downloads/$upstream.part" "$downloads/$upstream"
}

src=$work/src
# The stamp names the source the tree came from; another source means a fresh tree and build.
want=${QEMU_TARBALL:+tarball:$(sha256sum "$QEMU_TARBALL" | cut -d' ' -f1)}
want=${want:-pinned:$deb_orig_sha}
if [ "$(cat "$src/.p2prig-unpacked" 2>/dev/null)" != "$want" ]; then
  rm -rf "$src" "$work/build"; mkdir -p "$src"
  if [ -n "${QEMU_TARBALL:-}" ]; then
    step "unpacking $QEMU_TARBALL"
    tar -xf "$QEMU_TARBALL" -C "$src" --strip-components=1
  elif fetch_debian; then
    step "unpacking $deb_orig"
    tar -xJf "$downloads/$deb_orig" -C "$src" --strip-components=1
    # The +ds tarball lacks firmware blobs; Debian's own patches keep meson from wanting them.
    tar -xJf "$downloads/$deb_debian" -C "$work" debian/patches
    for p in skip-unpack-edk2-blobs.patch skip-install-dtb.patch; do
      patch -d "$src" -p1 -s <"$work/debian/patches/$p"
    done
  elif fetch_upstream; then
    step "unpacking $upstream"
    tar -xJf "$downloads/$upstream" -C "$src" --strip-components=1
  else
    echo "qemu: could not download QEMU $version (neither Debian's source package nor $upstream_url)." >&2
    echo "qemu: download a qemu-$version tarball yourself and run with QEMU_TARBALL=/path/to/it" >&2
    exit 1
  fi
  echo "$want" >"$src/.p2prig-unpacked"
fi

venv=$work/venv
if [ ! -x "$venv/bin/meson" ]; then
  step "creating a Python venv with meson 1.9.0"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check meson==1.9.0 pycotap==1.3.1
fi

build=$work/build
if [ ! -f "$build/build.ninja" ]; then
  step "configuring"
  rm -rf "$build"; mkdir -p "$build"
  (cd "$build" && "$src/configure" --target-list=x86_64-softmmu --without-default-features \
     --disable-install-blobs --enable-kvm --enable-tcg --enable-vhost-user --enable-vhost-net \
     --enable-vhost-kernel --enable-slirp --enable-pixman --python="$venv/bin/python3")
fi

step "compiling qemu-system-x86_64"
ninja -C "$build" -j"$(nproc)" qemu-system-x86_64

mkdir -p "$out/bin"
strip -o "$out/bin/qemu-system-x86_64" "$build/qemu-system-x86_64"
"$out/bin/qemu-system-x86_64" -device help | grep -q '"vfio-user-pci"' || {
  echo "qemu: the built binary has no vfio-user-pci device; check the configure log in $build" >&2
  exit 1
}
step "built $("$out/bin/qemu-system-x86_64" --version | head -n1)"
