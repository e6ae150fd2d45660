#!/usr/bin/env bash
# Builds a p2prig guest kernel: a pinned Linux source + kernel-patches series + config
# fragments -> bzImage.
#
#   kernel.sh <work-dir> <out-dir>
#
# Two modes: a pinned source (the default; below), or KERNEL_SRC_TREE=<a user's Linux tree>
# (`p2prig build kernel src:PATH`): that tree is built as it is, out of tree into
# <work-dir>/build with the same fragments; no download, no git, no patches, and the tree is
# never written to (kbuild refuses an O= build of a tree that has its own .config or objects:
# `make mrproper` there first).
#
# Environment (set by `p2prig build kernel FLAVOR[:variant]`, from kernel-patches/flavors/
# and kernel-patches/sources/):
#   P2PRIG_DOWNLOADS     verified downloads live here
#   P2PRIG_APT_STATE     private apt state (for apt-private.sh)
#   P2PRIG_RECIPES       directory holding apt-private.sh (default: this script's directory)
#   KERNEL_TARBALL       optional: build from this tarball instead (no checksum pin then)
#   KSRC_VERSION KSRC_DEB_PACKAGE KSRC_DEB_VERSION KSRC_DEB_SHA256 KSRC_TARBALL_IN_DEB
#   KSRC_TARBALL_SHA256  the Debian source package and the tarball inside it
#   KSRC_ORG_URL KSRC_ORG_SHA256   optional fallback tarball (upstream release), pinned
#   KSERIES              newline-separated patch directories, applied in order (git am)
#   KFRAGMENTS           newline-separated config fragments, merged in order
#   KERNEL_SRC_TREE      optional: build this Linux tree instead (KSRC_*, KSERIES unused)
# Outputs: <out-dir>/bzImage, <out-dir>/config (the final .config), <out-dir>/release.
#
# <work-dir> keeps src/ (a git repo: one base commit of the tarball + the applied series)
# and build/ (O=). Reusing it is incremental: only the patches that changed (and those
# after them) are re-applied, so an edit to one patch rebuilds only what it touches.
set -euo pipefail

step() { echo "==> $*"; }
die() {
  echo "kernel: $1" >&2
  shift
  local line
  for line in "$@"; do echo "kernel: $line" >&2; done
  exit 1
}

[ $# -eq 2 ] || die "usage: kernel.sh <work-dir> <out-dir>"
work=$(mkdir -p "$1" && cd "$1" && pwd)
out=$(mkdir -p "$2" && cd "$2" && pwd)
here=$(cd "$(dirname "$0")" && pwd)
recipes=${P2PRIG_RECIPES:-$here}
src=$work/src
build=$work/build

src_tree=${KERNEL_SRC_TREE:-}
if [ -n "$src_tree" ]; then
  [ -f "$src_tree/Makefile" ] && [ -f "$src_tree/Kconfig" ] && [ -d "$src_tree/arch/x86" ] ||
    die "KERNEL_SRC_TREE=$src_tree is not a Linux source tree (no Makefile, Kconfig or arch/x86)"
  src=$(cd "$src_tree" && pwd)
  [ -z "${KSERIES:-}" ] || die "KSERIES is set with KERNEL_SRC_TREE: a user's tree is built without patches"
  [ ! -e "$src/.config" ] && [ ! -e "$src/include/config" ] ||
    die "$src has an in-tree configuration or build (.config, include/config)" \
        "kbuild cannot build it out of tree then: run 'make -C $src mrproper' (it deletes that build) or pass a clean copy"
fi

for tool in git make gcc flex bison bc xz tar sha256sum awk flock cmp; do
  command -v "$tool" >/dev/null ||
    die "'$tool' is missing on this host" "install the kernel build dependencies (p2prig doctor / ci/install-deps.sh)"
done

# One build per work dir at a time.
exec 9>"$work/.lock"
flock -n 9 || die "another build is using $work" "wait for it to finish, or use another work dir"

verified() { [ -f "$1" ] && echo "$2  $1" | sha256sum -c --status; }

# gc.auto/maintenance.auto off: an automatic `git gc` after the base commit would repack the
# whole tree in the background, holding the work dir's lock (fd 9 is inherited) and a core.
git_src() {
  git -C "$src" -c user.name="p2prig" -c user.email="p2prig@localhost" \
      -c gc.auto=0 -c maintenance.auto=false -c commit.gpgsign=false -c core.hooksPath=/dev/null -c advice.mergeConflict=false -c advice.amWorkDir=false "$@"
}

# ---------------------------------------------------------------------------------------
# Pinned-source mode only (up to the Config section): download, unpack, apply the series.
# ---------------------------------------------------------------------------------------
if [ -z "$src_tree" ]; then

# ---------------------------------------------------------------------------------------
# Source: which tarball, and the key that identifies it.
# ---------------------------------------------------------------------------------------
if [ -n "${KERNEL_TARBALL:-}" ]; then
  [ -f "$KERNEL_TARBALL" ] || die "KERNEL_TARBALL=$KERNEL_TARBALL does not exist"
  tarball=$(readlink -f -- "$KERNEL_TARBALL")
  step "using $tarball (KERNEL_TARBALL: no checksum pin)"
  source_key="tarball sha256=$(sha256sum "$tarball" | cut -d' ' -f1)"
else
  : "${P2PRIG_DOWNLOADS:?set P2PRIG_DOWNLOADS to the download cache directory}"
  : "${KSRC_VERSION:?set KSRC_VERSION (kernel-patches/sources/<source>.toml: version)}"
  mkdir -p "$P2PRIG_DOWNLOADS"
  tarball=""
  if [ -n "${KSRC_DEB_PACKAGE:-}" ]; then
    : "${KSRC_DEB_VERSION:?KSRC_DEB_PACKAGE is set but KSRC_DEB_VERSION is not}"
    : "${KSRC_DEB_SHA256:?KSRC_DEB_PACKAGE is set but KSRC_DEB_SHA256 is not}"
    : "${KSRC_TARBALL_IN_DEB:?KSRC_DEB_PACKAGE is set but KSRC_TARBALL_IN_DEB is not}"
    : "${KSRC_TARBALL_SHA256:?KSRC_DEB_PACKAGE is set but KSRC_TARBALL_SHA256 is not}"
    source_key="debian $KSRC_DEB_PACKAGE=$KSRC_DEB_VERSION tarball sha256=$KSRC_TARBALL_SHA256"
    deb_tarball=$P2PRIG_DOWNLOADS/${KSRC_DEB_PACKAGE}_${KSRC_DEB_VERSION//:/%3a}.tar.xz
  fi
  if [ -n "${KSRC_ORG_URL:-}" ]; then
    : "${KSRC_ORG_SHA256:?KSRC_ORG_URL is set but KSRC_ORG_SHA256 is not}"
    org_tarball=$P2PRIG_DOWNLOADS/$(basename "$KSRC_ORG_URL")
    [ -n "${KSRC_DEB_PACKAGE:-}" ] || source_key="url $KSRC_ORG_URL sha256=$KSRC_ORG_SHA256"
  fi
  [ -n "${source_key:-}" ] ||
    die "no kernel source given: set KSRC_DEB_* or KSRC_ORG_URL (kernel-patches/sources/*.toml), or KERNEL_TARBALL"
fi

# Downloads the Debian package into a temporary dir, checks the .deb and the tarball in
# it, and keeps only the tarball.
fetch_debian() {
  verified "$deb_tarball" "$KSRC_TARBALL_SHA256" && return 0
  step "downloading Debian package $KSRC_DEB_PACKAGE=$KSRC_DEB_VERSION"
  [ -x "$recipes/apt-private.sh" ] || { echo "kernel: $recipes/apt-private.sh not found (set P2PRIG_RECIPES)" >&2; return 1; }
  : "${P2PRIG_APT_STATE:?set P2PRIG_APT_STATE to the private apt state directory}"
  local tmp deb
  tmp=$(mktemp -d "$P2PRIG_DOWNLOADS/.linux.XXXXXX")
  if ! (cd "$tmp" && "$recipes/apt-private.sh" "$P2PRIG_APT_STATE" download \
          "$KSRC_DEB_PACKAGE=$KSRC_DEB_VERSION" >"$tmp/apt.log" 2>&1); then
    echo "kernel: apt could not download $KSRC_DEB_PACKAGE=$KSRC_DEB_VERSION:" >&2
    tail -n 5 "$tmp/apt.log" >&2
    rm -rf "$tmp"
    return 1
  fi
  deb=$(find "$tmp" -maxdepth 1 -name '*.deb' | head -n1)
  [ -n "$deb" ] || { rm -rf "$tmp"; echo "kernel: apt downloaded no .deb" >&2; return 1; }
  if ! verified "$deb" "$KSRC_DEB_SHA256"; then
    local got; got=$(sha256sum "$deb" | cut -d' ' -f1)
    rm -rf "$tmp"
    die "checksum mismatch for $(basename "$deb"): expected $KSRC_DEB_SHA256, got $got" \
        "refusing to build from it; if Debian really republished the package, update kernel-patches/sources/*.toml"
  fi
  step "extracting $KSRC_TARBALL_IN_DEB"
  if command -v dpkg-deb >/dev/null; then
    dpkg-deb --fsys-tarfile "$deb" | tar -xO -f - "./$KSRC_TARBALL_IN_DEB" >"$tmp/tarball"
  else
    local data
    data=$(cd "$tmp" && ar t "$deb" | grep '^data\.tar')
    (cd "$tmp" && ar x "$deb" "$data")
    tar -xO -f "$tmp/$data" "./$KSRC_TARBALL_IN_DEB" >"$tmp/tarball"
  fi
  if ! verified "$tmp/tarball" "$KSRC_TARBALL_SHA256"; then
    local got; got=$(sha256sum "$tmp/tarball" | cut -d' ' -f1)
    rm -rf "$tmp"
    die "checksum mismatch for $KSRC_TARBALL_IN_DEB in $(basename "$deb"): expected $KSRC_TARBALL_SHA256, got $got" \
        "refusing to build from it; check kernel-patches/sources/*.toml"
  fi
  mv "$tmp/tarball" "$deb_tarball"
  rm -rf "$tmp"
}

fetch_org() {
  verified "$org_tarball" "$KSRC_ORG_SHA256" && return 0
  step "downloading $KSRC_ORG_URL"
  command -v curl >/dev/null || { echo "kernel: curl is missing" >&2; return 1; }
  curl -fsSL --retry 3 -o "$org_tarball.part" "$KSRC_ORG_URL" || { rm -f "$org_tarball.part"; return 1; }
  if ! verified "$org_tarball.part" "$KSRC_ORG_SHA256"; then
    local got; got=$(sha256sum "$org_tarball.part" | cut -d' ' -f1)
    rm -f "$org_tarball.part"
    die "checksum mismatch for $KSRC_ORG_URL: expected $KSRC_ORG_SHA256, got $got" \
        "refusing to build from it; check kernel-patches/sources/*.toml"
  fi
  mv "$org_tarball.part" "$org_tarball"
}

# ---------------------------------------------------------------------------------------
# Unpack once per source into src/ as a git repo with one base commit (tag p2prig-base).
# ---------------------------------------------------------------------------------------
source_stamp=$work/source.key
if [ -d "$src/.git" ] && [ -f "$source_stamp" ] && [ "$(cat "$source_stamp")" = "$source_key" ] &&
   git_src rev-parse -q --verify p2prig-base >/dev/null; then
  step "source: $source_key (already unpacked)"
else
  if [ -z "${tarball:-}" ]; then
    if [ -n "${KSRC_DEB_PACKAGE:-}" ] && fetch_debian; then
      tarball=$deb_tarball
    elif [ -n "${KSRC_ORG_URL:-}" ] && fetch_org; then
      tarball=$org_tarball
      source_key="url $KSRC_ORG_URL sha256=$KSRC_ORG_SHA256"
    else
      die "could not get Linux $KSRC_VERSION (Debian package ${KSRC_DEB_PACKAGE:-none}, fallback URL ${KSRC_ORG_URL:-none})" \
          "download a linux-$KSRC_VERSION source tarball yourself and run with KERNEL_TARBALL=/path/to/it"
    fi
  fi
  step "unpacking $(basename "$tarball") into $src (source changed: build dir wiped)"
  rm -rf "$src" "$build" "$source_stamp" "$work/series.applied"
  mkdir -p "$src"
  tar -xf "$tarball" -C "$src" --strip-components=1 --no-same-owner
  [ -f "$src/Makefile" ] && [ -d "$src/arch/x86" ] || die "$tarball does not look like a Linux source tree"
  step "creating the base commit"
  git_src init -q
  # -f: Debian's top-level .gitignore ignores every top-level entry.
  git_src add -A -f
  git_src commit -q --no-verify -m "base: $source_key"
  git_src tag p2prig-base
  echo "$source_key" >"$source_stamp"
fi

# ---------------------------------------------------------------------------------------
# Series: git am every patch of every series dir, re-applying only from the first patch
# that differs from what src/ already has.
# ---------------------------------------------------------------------------------------
patches=()
while IFS= read -r dir; do
  [ -n "$dir" ] || continue
  [ -d "$dir" ] || die "series directory $dir does not exist (KSERIES)"
  found=0
  while IFS= read -r p; do
    [ -n "$p" ] || continue
    patches+=("$p")
    found=1
  done < <(find "$dir" -maxdepth 1 -type f -name '*.patch' ! -name '0000-cover-letter.patch' | LC_ALL=C sort)
  [ $found = 1 ] || die "series directory $dir has no *.patch files"
done <<<"${KSERIES:-}"

applied=$work/series.applied   # lines: <patch sha256> <commit> <patch path>
head_now=$(git_src rev-parse HEAD)
base=$(git_src rev-parse p2prig-base)
old_sums=() old_commits=()
if [ -f "$applied" ]; then
  while read -r sum commit _; do old_sums+=("$sum"); old_commits+=("$commit"); done <"$applied"
fi
expected_head=$base
[ ${#old_commits[@]} -eq 0 ] || expected_head=${old_commits[-1]}
if [ "$head_now" != "$expected_head" ] || [ -d "$src/.git/rebase-apply" ] ||
   [ -n "$(git_src status --porcelain --untracked-files=no)" ]; then
  step "src/ was changed outside this recipe: resetting to the base commit"
  [ -d "$src/.git/rebase-apply" ] && git_src am --abort || true
  git_src reset -q --hard "$base"
  old_sums=() old_commits=()
  : >"$applied"
fi

keep=0 keep_commit=$base
for i in "${!patches[@]}"; do
  [ "$i" -lt ${#old_sums[@]} ] || break
  sum=$(sha256sum "${patches[$i]}" | cut -d' ' -f1)
  [ "$sum" = "${old_sums[$i]}" ] || break
  keep=$((i + 1)) keep_commit=${old_commits[$i]}
done

if [ "$keep" -eq ${#patches[@]} ] && [ "$keep" -eq ${#old_sums[@]} ]; then
  step "series: ${#patches[@]} patches already applied"
else
  step "series: keeping $keep applied patches, applying $(( ${#patches[@]} - keep ))"
  [ "$(git_src rev-parse HEAD)" = "$keep_commit" ] || git_src reset -q --hard "$keep_commit"
  head -n "$keep" "$applied" >"$applied.new" 2>/dev/null || true
  mv "$applied.new" "$applied"
  for ((i = keep; i < ${#patches[@]}; i++)); do
    p=${patches[$i]}
    step "git am $(basename "$(dirname "$p")")/$(basename "$p")"
    if ! git_src am -q --no-3way "$p"; then
      git_src am --abort || true
      die "patch $p does not apply to $source_key (on top of the ${i} patches before it)" \
          "fix or rebase that patch (the tree before it is in $src, HEAD), then run this again"
    fi
    echo "$(sha256sum "$p" | cut -d' ' -f1) $(git_src rev-parse HEAD) $p" >>"$applied"
  done
fi

else
  step "source: $src (KERNEL_SRC_TREE: built as it is, out of tree, no patches)"
fi

# ---------------------------------------------------------------------------------------
# Config: tinyconfig + fragments + olddefconfig, then every fragment line must hold.
# ---------------------------------------------------------------------------------------
fragments=()
while IFS= read -r f; do
  [ -n "$f" ] || continue
  [ -f "$f" ] || die "config fragment $f does not exist (KFRAGMENTS)"
  fragments+=("$f")
done <<<"${KFRAGMENTS:-}"

kmake() {
  make -C "$src" O="$build" KBUILD_BUILD_USER=p2prig KBUILD_BUILD_HOST=p2prig LOCALVERSION= "$@"
}

mkdir -p "$build"
[ -f "$build/.config" ] && cp -p "$build/.config" "$build/.config.prev"
step "configuring: tinyconfig + ${#fragments[@]} fragments + olddefconfig"
kmake -s tinyconfig >/dev/null
if [ ${#fragments[@]} -gt 0 ]; then
  (cd "$src" && scripts/kconfig/merge_config.sh -m -O "$build" "$build/.config" "${fragments[@]}") >"$build/merge_config.log" 2>&1 ||
    die "merge_config.sh failed; see $build/merge_config.log"
fi
kmake -s olddefconfig >/dev/null

# Later fragments override earlier ones, so the last mention of an option is the one that
# must hold. "is not set" also holds when the option is absent from .config.
missing=$(awk '
  FILENAME != config {
    if (match($0, /^CONFIG_[A-Za-z0-9_]+=/)) {
      sym = substr($0, 1, RLENGTH - 1); want[sym] = substr($0, RLENGTH + 1)
    } else if ($0 ~ /^# CONFIG_[A-Za-z0-9_]+ is not set$/) {
      sym = $2; want[sym] = "n"
    } else next
    from[sym] = FILENAME ":" FNR
    next
  }
  match($0, /^CONFIG_[A-Za-z0-9_]+=/) { have[substr($0, 1, RLENGTH - 1)] = substr($0, RLENGTH + 1) }
  END {
    for (sym in want) {
      got = (sym in have) ? have[sym] : "n"
      if (got != want[sym])
        printf "%s: wanted %s, final .config has %s (%s)\n", sym, \
          (want[sym] == "n" ? "not set" : want[sym]), (got == "n" ? "not set" : got), from[sym]
    }
  }' config="$build/.config" "${fragments[@]}" "$build/.config" | LC_ALL=C sort)
if [ -n "$missing" ]; then
  echo "$missing" | sed 's/^/kernel:   /' >&2
  die "$(echo "$missing" | wc -l) config option(s) did not stick after olddefconfig (listed above)" \
      "an unmet dependency usually explains it: check with 'make -C $src O=$build menuconfig' (search with /) and add the dependency to the fragment"
fi

# An unchanged configuration keeps its old mtime, so kbuild sees nothing to redo.
if [ -f "$build/.config.prev" ]; then
  if cmp -s "$build/.config" "$build/.config.prev"; then
    mv "$build/.config.prev" "$build/.config"
  else
    rm -f "$build/.config.prev"
  fi
fi

# ---------------------------------------------------------------------------------------
# Build and publish.
# ---------------------------------------------------------------------------------------
jobs=$(nproc)
step "building bzImage (make -j$jobs)"
start=$(date +%s)
kmake -j"$jobs" bzImage || die "the kernel build failed (output above)" \
  "a compile error in a patched file points at the series; fix the patch and run again (the build is incremental)"
step "built in $(( $(date +%s) - start )) s"

release=$(kmake -s --no-print-directory kernelrelease)
cp "$build/arch/x86/boot/bzImage" "$out/bzImage.tmp" && mv "$out/bzImage.tmp" "$out/bzImage"
cp "$build/.config" "$out/config.tmp" && mv "$out/config.tmp" "$out/config"
echo "$release" >"$out/release.tmp" && mv "$out/release.tmp" "$out/release"
step "done: Linux $release, $out/bzImage ($(stat -c %s "$out/bzImage") bytes)"
