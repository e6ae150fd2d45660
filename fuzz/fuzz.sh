#!/usr/bin/env bash
# Builds and runs the AFL++ targets of fuzz/ through cargo-afl (installed by `make deps`
# into $P2PRIG_TOOLS/afl; see fuzz/README.md).
#   fuzz/fuzz.sh build               build every target (incremental)
#   fuzz/fuzz.sh smoke               each target FUZZ_SECONDS (30) over its corpus; fails on a
#                                    crash or a hang (an execution over 5 s)
#   fuzz/fuzz.sh run TARGET [ARGS]   one target until stopped, ARGS passed to afl-fuzz
#                                    (e.g. -E 10000000 to stop after 10 M executions)
# Runs nice'd, one afl-fuzz at a time, without a terminal (AFL_NO_UI), as CI needs it.
set -euo pipefail

cd "$(dirname "$0")"
# Each target and its dictionary (fuzz/dict/<name>.dict). A new target is one line here.
targets=(
  control_lines:json-lines
  agent_rpc:json-lines
  target_control:json-lines
  roce_frame:roce_frame
  vhost_user:
  vfio_user:vfio_user
)

tools=${P2PRIG_TOOLS:-${P2PRIG_CACHE:-$HOME/.cache/p2prig}/tools}/afl
if [ ! -x "$tools/bin/cargo-afl" ]; then
  echo "fuzz: cargo-afl is not in $tools: run 'make deps' (ci/install-deps.sh installs it)." >&2
  exit 1
fi
export PATH="$tools/bin:$PATH"
# Where cargo-afl keeps the AFL++ it built (per rustc version).
export XDG_DATA_HOME="$tools/data"
# Not the workspace's target directory: every crate here is built instrumented.
export CARGO_TARGET_DIR=${FUZZ_TARGET_DIR:-$PWD/../target/fuzz}
# No terminal in CI; no CPU governor or core binding to insist on on a shared machine; a
# core_pattern that pipes to a crash handler (systemd, apport) only delays crash reports.
export AFL_NO_UI=1 AFL_SKIP_CPUFREQ=1 AFL_NO_AFFINITY=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1
bins="$CARGO_TARGET_DIR/release"

build() {
  nice -n 15 cargo afl build --release --locked --quiet
}

dict_args() {
  local dict=${1#*:}
  [ -n "$dict" ] && echo "-x dict/$dict.dict"
  return 0
}

stat_of() {
  sed -n "s/^$2 *: //p" "$1/default/fuzzer_stats"
}

smoke() {
  local seconds=${FUZZ_SECONDS:-30} failed=0 entry name out crashes hangs
  local saved="$CARGO_TARGET_DIR/findings"
  for entry in "${targets[@]}"; do
    name=${entry%%:*}
    out=$(mktemp -d)
    # shellcheck disable=SC2046 # the dictionary option is two words or none
    if ! nice -n 15 cargo afl fuzz -i "corpus/$name" -o "$out" $(dict_args "$entry") \
        -t 5000 -V "$seconds" "$bins/$name" >"$out/log" 2>&1; then
      tail -n 20 "$out/log" >&2
      echo "fuzz: $name: afl-fuzz failed (log above; a seed that crashes stops it at once)" >&2
      failed=1
      rm -rf "$out"
      continue
    fi
    crashes=$(stat_of "$out" saved_crashes)
    hangs=$(stat_of "$out" saved_hangs)
    printf 'fuzz: %-15s %9s execs %7s/s  corpus %5s  crashes %s  hangs %s\n' "$name" \
      "$(stat_of "$out" execs_done)" "$(stat_of "$out" execs_per_sec)" \
      "$(stat_of "$out" corpus_count)" "$crashes" "$hangs"
    if [ "$crashes" != 0 ] || [ "$hangs" != 0 ]; then
      rm -rf "${saved:?}/$name"
      mkdir -p "$saved/$name"
      cp -r "$out/default/crashes" "$out/default/hangs" "$saved/$name/"
      echo "fuzz: $name: inputs kept in $saved/$name; replay one with: $bins/$name < FILE" >&2
      failed=1
    fi
    rm -rf "$out"
  done
  return "$failed"
}

case ${1:-} in
  build) build ;;
  smoke) build && smoke ;;
  run)
    name=${2:?usage: fuzz/fuzz.sh run TARGET [afl-fuzz options]}
    shift 2
    entry=$(printf '%s\n' "${targets[@]}" | grep "^$name:") || {
      echo "fuzz: no target $name" >&2
      exit 1
    }
    build
    out="$CARGO_TARGET_DIR/out/$name"
    mkdir -p "$CARGO_TARGET_DIR/out"
    echo "fuzz: $name: findings and the grown corpus in $out"
    # A second run of a target goes on from where the first stopped.
    export AFL_AUTORESUME=1
    # shellcheck disable=SC2046
    exec nice -n 15 cargo afl fuzz -i "corpus/$name" -o "$out" $(dict_args "$entry") "$@" "$bins/$name"
    ;;
  *)
    sed -n '2,9s/^# \{0,1\}//p' "$0" >&2
    exit 2
    ;;
esac
