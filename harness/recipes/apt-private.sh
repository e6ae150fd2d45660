#!/usr/bin/env bash
# Downloads Debian source or binary packages through a private apt configuration kept in
# the cache, without touching the system's apt sources or installing anything.
#
#   apt-private.sh <state-dir> source <pkg>=<version>   # apt-get source --download-only
#   apt-private.sh <state-dir> download <pkg>[=<version>] # apt-get download (a .deb)
#
# Files land in the current directory. The archive URI is the one the system already uses.
set -euo pipefail

state=$1 mode=$2 spec=$3
mkdir -p "$state/lists/partial" "$state/archives/partial"

uri=$(grep -hoE '^(URIs:|deb(-src)?)\s+[^ ]*(https?://[^ ]+/debian)\b' \
        /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
      | grep -oE 'https?://[^ ]+/debian$' | head -n1 || true)
if [ -z "$uri" ]; then
  echo "apt-private: no Debian archive URI found in the system's apt sources;" \
       "set QEMU_TARBALL / KERNEL_TARBALL to a local file instead" >&2
  exit 1
fi
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[ -r "$keyring" ] || { echo "apt-private: $keyring missing: install debian-archive-keyring (make deps)" >&2; exit 1; }

cat >"$state/sources.list" <<LIST
deb-src [signed-by=$keyring] $uri sid main
deb-src [signed-by=$keyring] $uri trixie main
deb [signed-by=$keyring] $uri trixie-backports main
deb [signed-by=$keyring] $uri bookworm main
deb [signed-by=$keyring] ${uri%/debian}/debian-security bookworm-security main
LIST

opts=(-o "Dir::Etc::SourceList=$state/sources.list" -o Dir::Etc::SourceParts=-
      -o "Dir::State::Lists=$state/lists" -o "Dir::Cache::Archives=$state/archives"
      -o Dir::State::Status=/var/lib/dpkg/status -o APT::Sandbox::User=root
      -o Acquire::Retries=3 -q)

# Refresh the private lists at most once an hour.
stamp=$state/lists/.updated
if [ ! -f "$stamp" ] || [ -n "$(find "$stamp" -mmin +60)" ]; then
  apt-get "${opts[@]}" update >/dev/null
  touch "$stamp"
fi

case $mode in
  source) apt-get "${opts[@]}" source --download-only "$spec" ;;
  download) apt-get "${opts[@]}" download "$spec" ;;
  *) echo "apt-private: unknown mode '$mode' (source|download)" >&2; exit 2 ;;
esac
