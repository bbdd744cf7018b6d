#!/usr/bin/env bash
# One host lost in the middle of an MPI job, on the simulated hosts of
# .ci/mpi-hosts.sh (up, with MPI_HOSTS=4 and MPI_IMPL set as for it):
#
#   mpi-hostloss.sh HOW RETRIES LAUNCHER EXAMPLE
#
# runs EXAMPLE (the path of the mpi_hostloss example, built for MPI_IMPL)
# with 4 ranks, one a host (rank 0 on h1, ..., rank 2 on h3), with the
# launcher told to keep the job (`run-keep-going`), and HOSTLOSS_RETRIES
# set to RETRIES. Once the program says a quarter of its tasks are done
# (its ready file), HOW happens to h3:
#
#   none   nothing (the baseline);
#   kill   every process on h3 is SIGKILLed;
#   cut    h3's link goes down for CUT_FOR seconds (default 15), then comes
#          back. By then h3's rank must have exited by itself (it lost
#          rank 0): only the launcher's daemon may be left there.
#   fence  h3's link goes down for 8 s, but the worker ranks wait 60 s
#          before they count rank 0 as lost (HOSTLOSS_WORKER_TIMEOUT): when
#          the link comes back h3's rank still runs, though rank 0 has
#          counted it as lost (and holds the pool up: HOSTLOSS_HOLD). Rank
#          0 must fence it off: it must exit within 20 s, and nothing it
#          sends may count.
#
# LAUNCHER says what the launcher must do once the program has printed
# its result: `exit=N` (exit by itself, with status N, or one of N,M,...,
# within 30 s) or
# `may-stay` (it may not exit by itself: after 10 s it is sent SIGTERM,
# which must end it and what it started on every host).
#
# Then no process may be left on any host. Prints the program's output,
# what the launcher did and what was left; exits 0 only if the program
# printed `mpi_hostloss: ok` and all of the above held.
set -uo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
HOSTS="$HERE/mpi-hosts.sh"
how=${1:?HOW: none, kill, cut or fence}
retries=${2:?RETRIES}
# END=terminate: the program ends its pool with terminate().
export HOSTLOSS_END=${END:-join}
want=${3:?LAUNCHER: exit=N or may-stay}
example=${4:?EXAMPLE}
CUT_FOR=${CUT_FOR:-15}
LOST_HOST=h3
LOST_RANK=2

work=$(mktemp -d)
out=$work/out
lpid=
trap 'rm -rf "$work"; [ -z "$lpid" ] || kill -KILL "$lpid" 2>/dev/null' EXIT
fail=()

# With a loss, MPI's own traffic over TCP only, so that a cut link cuts
# it too (MPICH's UCX would otherwise use shared memory between the
# simulated hosts). Not without: there MPICH finalises, which over UCX's
# TCP transport deadlocks now and then (mpi-hosts.sh).
[ "$how" = none ] || export UCX_TLS=tcp,self
export HOSTLOSS_READY=$work/ready HOSTLOSS_RETRIES=$retries
export MPI_HOSTS_PASS="HOSTLOSS_READY HOSTLOSS_RETRIES HOSTLOSS_END"
if [ "$how" != none ]; then
  export HOSTLOSS_LOST_RANK=$LOST_RANK
  MPI_HOSTS_PASS+=" HOSTLOSS_LOST_RANK"
fi
if [ "$how" = fence ]; then
  # Rank 0 stays up 20 s after the tasks, so that it is there when h3's
  # rank comes back.
  export HOSTLOSS_WORKER_TIMEOUT=60 HOSTLOSS_HOLD=20
  MPI_HOSTS_PASS+=" HOSTLOSS_WORKER_TIMEOUT HOSTLOSS_HOLD"
fi

# The launcher itself: mpi-hosts.sh execs it.
bash "$HOSTS" run-keep-going -np 4 "$example" >"$out" 2>&1 &
lpid=$!
t0=$SECONDS

alive() { kill -0 "$lpid" 2>/dev/null; }
# Waits up to $1 seconds for the command after it to succeed.
wait_for() {
  local limit=$1 t=$SECONDS
  shift
  until "$@"; do
    [ $((SECONDS - t)) -lt "$limit" ] || return 1
    sleep 0.1
  done
}
verdict() { grep -q "^mpi_hostloss: " "$out" || ! alive; }
ready() { [ -e "$HOSTLOSS_READY" ] || ! alive; }
rank_gone() {
  local names
  names=$(ps -o comm= -p "$(ip netns pids "procpool-$LOST_HOST" | paste -sd, -)" 2>/dev/null)
  [[ $'\n'$names != *$'\n'$(basename "$example" | cut -c1-15)* ]]
}

if [ "$how" != none ]; then
  wait_for 60 ready
  if [ -e "$HOSTLOSS_READY" ]; then
    echo "-- ready after $((SECONDS - t0)) s: $how $LOST_HOST"
    case "$how" in
      kill) bash "$HOSTS" kill "$LOST_HOST" ;;
      cut)
        bash "$HOSTS" cut "$LOST_HOST"
        sleep "$CUT_FOR"
        if rank_gone; then
          echo "-- after ${CUT_FOR} s cut off, rank $LOST_RANK had exited by itself"
        else
          fail+=("rank $LOST_RANK was still running on $LOST_HOST ${CUT_FOR} s after its link was cut")
        fi
        bash "$HOSTS" mend "$LOST_HOST"
        ;;
      fence)
        bash "$HOSTS" cut "$LOST_HOST"
        sleep 8
        if rank_gone; then
          fail+=("rank $LOST_RANK had exited while cut off: nothing to fence")
        fi
        bash "$HOSTS" mend "$LOST_HOST"
        if wait_for 20 rank_gone; then
          echo "-- once its link was back, rank $LOST_RANK was fenced off: it exited"
        else
          fail+=("rank $LOST_RANK still ran 20 s after its link came back")
        fi
        ;;
      *) echo "HOW: none, kill, cut or fence" >&2; exit 2 ;;
    esac
  else
    fail+=("the program did not create its ready file")
  fi
fi

wait_for 120 verdict || fail+=("no result within 120 s")
case "$want" in
  exit=*)
    code=${want#exit=}
    if wait_for 30 eval '! alive'; then
      wait "$lpid"
      rc=$?
      echo "-- the launcher exited $rc by itself"
      [[ ",$code," == *",$rc,"* ]] || fail+=("the launcher exited $rc; $code was expected")
    else
      fail+=("the launcher did not exit within 30 s of the result")
      kill -TERM "$lpid"
    fi
    ;;
  may-stay)
    if wait_for 10 eval '! alive'; then
      wait "$lpid"
      echo "-- the launcher exited $? by itself"
    else
      kill -TERM "$lpid"
      if wait_for 30 eval '! alive'; then
        wait "$lpid"
        echo "-- the launcher did not exit by itself; SIGTERM ended it ($?)"
      else
        fail+=("the launcher did not end within 30 s of SIGTERM")
      fi
    fi
    ;;
  *) echo "LAUNCHER: exit=N or may-stay" >&2; exit 2 ;;
esac
alive || lpid=

if wait_for 15 bash "$HOSTS" left >/dev/null; then
  echo "-- nothing was left on any host"
else
  fail+=("processes were left on the hosts: $(bash "$HOSTS" left | paste -sd';' -)")
fi
echo "-- the program's output:"
cat "$out"
grep -q "^mpi_hostloss: ok" "$out" || fail+=("the program did not print mpi_hostloss: ok")
if [ ${#fail[@]} -gt 0 ]; then
  printf 'mpi-hostloss.sh: FAILED: %s\n' "${fail[@]}"
  exit 1
fi
echo "mpi-hostloss.sh: $how $LOST_HOST, retries $retries, $HOSTLOSS_END: passed"
