#!/usr/bin/env bash
# Tests of the MPI backend (cargo feature `mpi`) under one implementation:
#
#   mpi-tests.sh openmpi    Open MPI (mpirun)
#   mpi-tests.sh mpich      MPICH (Hydra's mpiexec)
#
# .ci/run calls it once for each (not under each start method) after it
# installs both. This script installs nothing: it needs the launcher, and
# the MPI headers and libclang that the `mpi` crate builds against. It
# builds against the implementation's own compiler wrapper (MPICC), and
# for MPICH into a target directory of its own (target/mpich): the `mpi`
# crate's build does not notice a change of implementation.
#
# The cases themselves are tests: tests/it/mpi.rs (ignored in a plain
# run), on one host, across two simulated hosts and across four with one
# lost part-way. Each runs the mpi_* examples under the launcher, every
# run under `timeout`, and prints PASS or FAIL for each. Here a launcher,
# root or the simulated hosts that cannot be had fail the run
# (PROCPOOL_MPI_REQUIRED): CI must not pass by skipping.
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR=never
export PROCPOOL_MPI_REQUIRED=${PROCPOOL_MPI_REQUIRED:-1}
impl=${1:?usage: mpi-tests.sh openmpi|mpich}

case "$impl" in
  openmpi)
    wrapper=mpicc.openmpi
    target=target
    tests=(on_one_host across_two_simulated_hosts across_four_simulated_hosts)
    ;;
  mpich)
    wrapper=mpicc.mpich
    target=target/mpich
    tests=(mpich_on_one_host mpich_across_two_simulated_hosts mpich_across_four_simulated_hosts)
    ;;
  *)
    echo "mpi-tests.sh: $impl: openmpi or mpich" >&2
    exit 2
    ;;
esac
command -v "$wrapper" >/dev/null 2>&1 || { echo "mpi-tests.sh: $wrapper is not installed" >&2; exit 1; }

t0=$SECONDS
echo "== the mpi feature against $impl: build"
MPICC=$wrapper CARGO_TARGET_DIR=$target cargo build --release --features mpi --examples
if [ "$impl" = openmpi ]; then
  echo "== the mpi feature: lints"
  MPICC=$wrapper cargo clippy --features mpi --all-targets -- -D warnings
fi
echo "-- build: $((SECONDS - t0)) s"

# One at a time, on one host first (the harness would run them in the
# order of their names).
for t in "${tests[@]}"; do
  t0=$SECONDS
  echo "== mpi::$t"
  cargo test --test it -- --ignored --exact --nocapture "mpi::$t"
  echo "-- mpi::$t: $((SECONDS - t0)) s"
done
