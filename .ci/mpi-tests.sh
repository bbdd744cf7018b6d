#!/usr/bin/env bash
# Tests of the MPI backend (cargo feature `mpi`). .ci/run calls this after
# it installs Open MPI. This script installs nothing: it needs mpirun, and
# the MPI headers and libclang that the `mpi` crate builds against.
#
# Each MPI run is bounded by `timeout`, so a hang is a failure and never
# stalls CI. The last line is "N passed, M failed".
set -uo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR=never
EX="${CARGO_TARGET_DIR:-target}/release/examples"

echo "== the mpi feature: build and lints"
cargo build --release --features mpi --examples || exit 1
cargo clippy --features mpi --all-targets -- -D warnings || exit 1

MPIRUN=(mpirun)
if mpirun --version 2>&1 | grep -q "Open MPI"; then
  # Two cores here, up to four ranks.
  MPIRUN+=(--oversubscribe)
  if [ "$(id -u)" = 0 ]; then
    # Open MPI refuses to run as root without these.
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  fi
fi

passed=0
failed=0

# case NAME WANT PATTERN COMMAND...: runs COMMAND under a timeout. It
# passes if its exit status is WANT ("nonzero": any failure except a
# timeout), its output contains PATTERN and, with NOT set, lacks NOT.
# With SHOW set, a passing case's output is printed too.
case_() {
  local name=$1 want=$2 pattern=$3
  shift 3
  local out rc why=""
  out=$(mktemp)
  local t0=$SECONDS
  timeout 120 "$@" >"$out" 2>&1
  rc=$?
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    why="timed out"
  elif [ "$want" = nonzero ] && [ "$rc" = 0 ]; then
    why="exited 0; a failure was expected"
  elif [ "$want" != nonzero ] && [ "$rc" != "$want" ]; then
    why="exited $rc; $want was expected"
  elif ! grep -qF -- "$pattern" "$out"; then
    why="its output lacks: $pattern"
  elif [ -n "${NOT:-}" ] && grep -qF -- "$NOT" "$out"; then
    why="its output has: $NOT"
  fi
  if [ -z "$why" ]; then
    passed=$((passed + 1))
    echo "PASS $name ($((SECONDS - t0)) s)"
    if [ -n "${SHOW:-}" ]; then
      sed 's/^/    | /' "$out"
    fi
  else
    failed=$((failed + 1))
    echo "FAIL $name: $why"
    sed 's/^/    | /' "$out"
  fi
  rm -f "$out"
}

echo "== MPI runs"
case_ "primes over 3 ranks match a sequential count" 0 "mpi_primes: ok" \
  "${MPIRUN[@]}" -np 3 "$EX/mpi_primes"
case_ "a task that panics on a rank fails alone; the job goes on" 0 "mpi_panic: ok" \
  "${MPIRUN[@]}" -np 3 "$EX/mpi_panic"
# Crash isolation on every rank: 2 worker ranks, each hosting 2 workers
# (the examples ask for workers_per_rank(2)), so 5 processes of the
# examples and 2 fork servers on 2 cores.
case_ "a task that aborts, segfaults, exits or SIGKILLs its worker on a rank fails alone" \
  0 "mpi_crash: ok" "${MPIRUN[@]}" -np 3 "$EX/mpi_crash"
case_ "a timeout kills the remote worker; the same rank serves on" 0 "mpi_timeout: ok" \
  "${MPIRUN[@]}" -np 3 "$EX/mpi_timeout"
case_ "cancel() kills a task running on a rank; the rank serves on" 0 "mpi_cancel: ok" \
  "${MPIRUN[@]}" -np 3 "$EX/mpi_cancel"
NOT="go over MPI" case_ \
  "2,000 tasks, 5% SIGKILL their worker: exact losses, then all right with retries" \
  0 "mpi_chaos: ok" "${MPIRUN[@]}" -np 3 "$EX/mpi_chaos"
# The workers' streams go over TCP unless a rank cannot connect to rank 0;
# PROCPOOL_MPI_STREAMS=mpi makes them go in MPI messages, as they do then.
for ex in mpi_crash mpi_timeout mpi_cancel mpi_chaos mpi_shared mpi_lifecycle; do
  case_ "streams in MPI messages: $ex" 0 "$ex: ok" \
    env PROCPOOL_MPI_STREAMS=mpi "${MPIRUN[@]}" -x PROCPOOL_MPI_STREAMS -np 3 "$EX/$ex"
done
# A rank that cannot connect (rank 0 names an address nobody answers on,
# TEST-NET-1) says so and relays in MPI messages; the job is as right.
case_ "a rank that cannot reach rank 0 over TCP relays over MPI (mpi_crash exits 0)" 0 \
  "cannot connect to rank 0" \
  env PROCPOOL_MPI_ADDRS=192.0.2.1 "${MPIRUN[@]}" -x PROCPOOL_MPI_ADDRS -np 3 "$EX/mpi_crash"
case_ "SharedBufs are copied to the ranks and back" 0 "mpi_shared: ok" \
  "${MPIRUN[@]}" -np 3 "$EX/mpi_shared"
case_ "max_tasks_per_child recycles workers on their ranks; imap streams; terminate" 0 \
  "mpi_lifecycle: ok" "${MPIRUN[@]}" -np 3 "$EX/mpi_lifecycle"
case_ "ranks that run different binaries are refused" nonzero \
  "do not all run the same executable" \
  "${MPIRUN[@]}" -np 1 "$EX/mpi_primes" : -np 2 "$EX/mpi_panic"
case_ "without mpirun: a clear error, no hang" 2 "needs at least 2 MPI ranks" \
  "$EX/mpi_primes"
case_ "one rank: a clear error, no hang" nonzero "needs at least 2 MPI ranks" \
  "${MPIRUN[@]}" -np 1 "$EX/mpi_primes"
SHOW=1 case_ "the benchmark runs (MPI beside local)" 0 "MPI, 2 worker ranks" \
  "${MPIRUN[@]}" -np 3 "$EX/mpi_bench"
SHOW=1 case_ "a bare MPI ping-pong, for beside the benchmark" 0 "mpi_pingpong: ok" \
  "${MPIRUN[@]}" -np 2 "$EX/mpi_pingpong"

# The same runs again, with the ranks spread over two simulated hosts:
# network namespaces on a bridge, each with its own hostname, and ranks
# that reach each other over TCP only (.ci/mpi-hosts.sh). Rank 0 is on
# h1, rank 1 on h2, rank 2 on h1, and so on. It needs root; where it
# cannot run, it says SKIP and fails nothing.
echo "== MPI runs across two simulated hosts"
HOSTS_SH=.ci/mpi-hosts.sh
trap 'bash "$HOSTS_SH" down >/dev/null 2>&1' EXIT
bash "$HOSTS_SH" up
up_rc=$?
if [ "$up_rc" = 77 ]; then
  echo "(skipped: the runs across two hosts; see the SKIP line above)"
elif [ "$up_rc" != 0 ]; then
  failed=$((failed + 1))
  echo "FAIL two simulated hosts: mpi-hosts.sh up exited $up_rc"
else
  ACROSS=(bash "$HOSTS_SH" run --oversubscribe)
  # The hostnames 3 ranks report, sorted and unique, on one line.
  case_ "across hosts: 3 ranks land on both hosts" 0 "h1,h2" \
    bash -c 'set -o pipefail; "$@" hostname | sort -u | paste -sd, -' _ "${ACROSS[@]}" -np 3
  case_ "across hosts: primes over 3 ranks match a sequential count" 0 "mpi_primes: ok" \
    "${ACROSS[@]}" -np 3 "$EX/mpi_primes"
  case_ "across hosts: a task that panics on a rank fails alone" 0 "mpi_panic: ok" \
    "${ACROSS[@]}" -np 3 "$EX/mpi_panic"
  case_ "across hosts: a task that crashes its worker on a rank fails alone" 0 "mpi_crash: ok" \
    "${ACROSS[@]}" -np 3 "$EX/mpi_crash"
  case_ "across hosts: a timeout kills the remote worker; the rank serves on" 0 \
    "mpi_timeout: ok" "${ACROSS[@]}" -np 3 "$EX/mpi_timeout"
  case_ "across hosts: cancel() kills a task running on a rank" 0 "mpi_cancel: ok" \
    "${ACROSS[@]}" -np 3 "$EX/mpi_cancel"
  NOT="go over MPI" case_ "across hosts: 2,000 tasks, 5% SIGKILL their worker" 0 \
    "mpi_chaos: ok" "${ACROSS[@]}" -np 3 "$EX/mpi_chaos"
  case_ "across hosts, streams in MPI messages: 2,000 tasks, 5% SIGKILL their worker" 0 \
    "mpi_chaos: ok" env PROCPOOL_MPI_STREAMS=mpi "${ACROSS[@]}" -x PROCPOOL_MPI_STREAMS \
    -np 3 "$EX/mpi_chaos"
  case_ "across hosts: ranks that cannot reach rank 0 over TCP relay over MPI (mpi_chaos exits 0)" \
    0 "cannot connect to rank 0" env PROCPOOL_MPI_ADDRS=192.0.2.1 "${ACROSS[@]}" \
    -x PROCPOOL_MPI_ADDRS -np 3 "$EX/mpi_chaos"
  case_ "across hosts: SharedBufs are copied to the ranks and back" 0 "mpi_shared: ok" \
    "${ACROSS[@]}" -np 3 "$EX/mpi_shared"
  case_ "across hosts: max_tasks_per_child, imap streams, terminate" 0 \
    "mpi_lifecycle: ok" "${ACROSS[@]}" -np 3 "$EX/mpi_lifecycle"
  case_ "across hosts: ranks that run different binaries are refused" nonzero \
    "do not all run the same executable" \
    "${ACROSS[@]}" -np 1 "$EX/mpi_primes" : -np 2 "$EX/mpi_panic"
  SHOW=1 case_ "across hosts: the benchmark runs" 0 "MPI, 2 worker ranks" \
    "${ACROSS[@]}" -np 3 "$EX/mpi_bench"
  SHOW=1 case_ "across hosts: a bare MPI ping-pong between h1 and h2" 0 \
    "ranks: 0 on h1, 1 on h2" \
    "${ACROSS[@]}" -np 2 "$EX/mpi_pingpong"
  bash "$HOSTS_SH" down
fi

echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
