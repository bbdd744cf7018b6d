#!/usr/bin/env bash
# Tests of the MPI backend (cargo feature `mpi`). .ci/run calls this once
# (not under each start method) after it installs Open MPI. This script
# installs nothing: it needs mpirun, and the MPI headers and libclang that
# the `mpi` crate builds against.
#
# The cases themselves are tests: tests/it/mpi.rs, `mpi::on_one_host` and
# `mpi::across_two_simulated_hosts` (ignored in a plain run). Each runs the
# mpi_* examples under mpirun, every run under `timeout 120`, and prints
# PASS or FAIL for each. Across hosts, .ci/mpi-hosts.sh makes two simulated
# hosts (root; where it cannot, it says SKIP and fails nothing).
set -euo pipefail
cd "$(dirname "$0")/.."

export CARGO_TERM_COLOR=never

echo "== the mpi feature: build and lints"
cargo build --release --features mpi --examples
cargo clippy --features mpi --all-targets -- -D warnings

# One at a time, on one host first (the harness would run them in the
# order of their names).
for t in mpi::on_one_host mpi::across_two_simulated_hosts; do
  echo "== $t"
  cargo test --test it -- --ignored --exact --nocapture "$t"
done
