#!/usr/bin/env bash
# Simulated hosts on this machine, for MPI runs across "hosts".
#
#   mpi-hosts.sh up                   make the hosts h1 .. hN
#   mpi-hosts.sh run LAUNCHER-ARGS... the launcher on h1, ranks spread
#                                     over every host
#   mpi-hosts.sh run-keep-going ...   the same, with the launcher told to
#                                     keep the job when a host is lost
#   mpi-hosts.sh kill HOST            SIGKILL every process on HOST
#   mpi-hosts.sh cut HOST             take HOST's link down (its processes
#                                     live on, cut off)
#   mpi-hosts.sh mend HOST            bring HOST's link back up
#   mpi-hosts.sh left                 list the processes left on each host;
#                                     exit 1 if there is any
#   mpi-hosts.sh down                 remove everything up made
#
# MPI_HOSTS sets how many hosts (default 2); MPI_IMPL which MPI launches
# (`openmpi`, the default: Open MPI's mpirun; `mpich`: MPICH's Hydra
# mpiexec). MPI_HOSTS_PASS names variables (separated by spaces) that
# `run` passes on to every rank, as each launcher does it (Open MPI's
# `-x`; Hydra passes its whole environment).
#
# Each host is a network namespace (procpool-h1, procpool-h2, ...) with
# one veth into a bridge (ppmpibr0) in the root namespace, on a private
# subnet (10.77.0.0/24: h1 is .1, h2 is .2, ...). Each command that runs
# "on" a host also gets its own UTS namespace, with that host's name, so
# `hostname` and MPI see separate machines. The hosts share this
# machine's filesystem, so an executable has the same path on every one,
# as on a cluster with a shared home.
#
# `run` starts the launcher inside h1 with a host list that places rank 0
# on h1, rank 1 on h2, ... and wraps around (Open MPI: MPI_HOSTS_SLOTS
# slots a host, default 2, mapped by node; MPICH: one a host, which Hydra
# cycles through). The launcher reaches the other hosts through its rsh
# launcher, with .ci/mpi-hosts-agent in place of ssh. Under Open MPI the
# runtime and MPI's own traffic go over TCP on the private subnet only
# (oob and btl tcp). MPICH (Debian's is built on UCX) leaves the choice to
# UCX, which finds that the simulated hosts share memory and uses it
# between them; UCX_TLS=tcp,self makes it use TCP only (as
# .ci/mpi-hostloss.sh does, so that a cut link cuts MPI's traffic too).
# That is not the default here because over UCX 1.13's TCP transport
# MPI_Finalize deadlocks in about a third of runs, a bare C program's too
# (docs/mpi.md). Ranks are not bound to cores: the hosts share the same
# cores, so each host's first rank would be bound to core 0.
#
# Keeping the job when a host is lost (`run-keep-going`): Open MPI 4.1
# with `--mca orte_enable_recovery 1 --mca orte_abort_on_non_zero_status
# 0`; MPICH with `-disable-auto-cleanup`. docs/mpi.md says what each then
# survives.
#
# Like ssh, the agent hands the remote side a thin environment (see
# mpi-hosts-agent).
#
# Needs root, ip (iproute2) and unshare (util-linux), and the launcher.
# Where those are missing, or the namespaces cannot be made, it prints one
# "SKIP: ..." line and exits with 77. `up` removes what it made if it
# fails half-way, and `down` is safe to run at any time.
set -uo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
AGENT="$HERE/mpi-hosts-agent"
SUBNET=10.77.0
BRIDGE=ppmpibr0
NHOSTS=${MPI_HOSTS:-2}
HOSTS=()
for ((k = 1; k <= NHOSTS; k++)); do HOSTS+=("h$k"); done
SLOTS=${MPI_HOSTS_SLOTS:-2}
IMPL=${MPI_IMPL:-openmpi}
STATE=/run/procpool-mpi-hosts
SKIP=77

ns_of() { echo "procpool-$1"; }

skip() {
  echo "SKIP: $NHOSTS simulated MPI hosts ($IMPL): $*"
  exit "$SKIP"
}

# The launcher of MPI_IMPL: its own name where both are installed (the
# plain `mpirun` is whichever the alternatives system chose).
launcher() {
  local c
  case "$IMPL" in
    openmpi)
      for c in mpirun.openmpi mpirun; do
        # (Not `| grep -q`: under pipefail, the launcher's SIGPIPE fails it.)
        if command -v "$c" >/dev/null 2>&1 && [[ $("$c" --version 2>&1) == *"Open MPI"* ]]; then
          echo "$c"
          return 0
        fi
      done
      ;;
    mpich)
      for c in mpiexec.mpich mpiexec.hydra mpiexec; do
        if command -v "$c" >/dev/null 2>&1 && [[ $("$c" --version 2>&1) == *HYDRA* ]]; then
          echo "$c"
          return 0
        fi
      done
      ;;
    *)
      echo "mpi-hosts.sh: MPI_IMPL=$IMPL: openmpi or mpich" >&2
      exit 2
      ;;
  esac
  return 1
}

need_tools() {
  [ "$(id -u)" = 0 ] || skip "needs root (network namespaces and a bridge)"
  local t
  for t in ip unshare; do
    command -v "$t" >/dev/null 2>&1 || skip "$t is not installed"
  done
  launcher >/dev/null || skip "no $IMPL launcher (mpirun of Open MPI, mpiexec of MPICH's Hydra)"
  [ -x "$AGENT" ] || skip "$AGENT is missing or not executable"
}

hosts_up() {
  [ -s "$STATE/hostfile" ] && ip netns list | grep -qw "$(ns_of h1)" ||
    { echo "mpi-hosts.sh: not up; run 'mpi-hosts.sh up' first" >&2; exit 2; }
}

down() {
  local h ns pids
  # Every host an earlier `up` made, whatever MPI_HOSTS it had.
  for h in $(ip netns list 2>/dev/null | sed -n 's/^procpool-\(h[0-9]*\).*/\1/p') "${HOSTS[@]}"; do
    ns=$(ns_of "$h")
    if ip netns list 2>/dev/null | grep -qw "$ns"; then
      # Whatever is left on the host is from a run of this script: a rank
      # or daemon that outlived its mpirun.
      pids=$(ip netns pids "$ns" 2>/dev/null)
      if [ -n "$pids" ]; then
        # shellcheck disable=SC2086
        kill -TERM $pids 2>/dev/null
        sleep 0.5
        pids=$(ip netns pids "$ns" 2>/dev/null)
        # shellcheck disable=SC2086
        [ -z "$pids" ] || kill -KILL $pids 2>/dev/null
      fi
      ip netns del "$ns" 2>/dev/null
    fi
    ip link del "pp-$h" 2>/dev/null
    rm -rf "/etc/netns/$ns"
  done
  ip link del "$BRIDGE" 2>/dev/null
  rmdir /etc/netns 2>/dev/null
  rm -rf "$STATE"
  return 0
}

# step DESCRIPTION COMMAND...: runs COMMAND; if it fails, removes what up
# made so far and skips with DESCRIPTION.
step() {
  local what=$1 err
  shift
  if ! err=$("$@" 2>&1); then
    down
    skip "cannot $what: ${err:-"$*" failed}"
  fi
}

up() {
  need_tools
  down
  step "make the bridge $BRIDGE" ip link add "$BRIDGE" type bridge
  # Bridged frames skip iptables (a FORWARD policy of DROP, as Docker sets,
  # would otherwise drop them); an old kernel without the option is fine.
  ip link set "$BRIDGE" type bridge nf_call_iptables 0 2>/dev/null
  step "bring up the bridge" ip link set "$BRIDGE" up
  mkdir -p "$STATE"
  : >"$STATE/hostfile"
  : >"$STATE/hostfile.mpich"
  local i=1 h ns hosts_file
  hosts_file=$(printf '127.0.0.1 localhost\n::1 localhost\n')
  for h in "${HOSTS[@]}"; do
    hosts_file+=$(printf '\n%s.%d %s' "$SUBNET" "$i" "$h")
    i=$((i + 1))
  done
  i=1
  for h in "${HOSTS[@]}"; do
    ns=$(ns_of "$h")
    step "make the network namespace $ns" ip netns add "$ns"
    step "make a veth into $ns" \
      ip link add "pp-$h" type veth peer name eth0 netns "$ns"
    step "attach pp-$h to the bridge" ip link set "pp-$h" master "$BRIDGE" up
    step "address $h" ip -n "$ns" addr add "$SUBNET.$i/24" dev eth0
    step "bring up eth0 in $ns" ip -n "$ns" link set eth0 up
    step "bring up lo in $ns" ip -n "$ns" link set lo up
    # `ip netns exec` mounts these over /etc/hosts: h1 and h2 resolve.
    mkdir -p "/etc/netns/$ns"
    printf '%s\n' "$hosts_file" >"/etc/netns/$ns/hosts"
    echo "$h slots=$SLOTS" >>"$STATE/hostfile"
    echo "$h:1" >>"$STATE/hostfile.mpich"
    i=$((i + 1))
  done
  step "enter a host with its own hostname (unshare --uts)" \
    ip netns exec "$(ns_of h1)" unshare --uts sh -c 'hostname h1'
  if command -v ping >/dev/null 2>&1; then
    step "reach h2 from h1 over the bridge" \
      ip netns exec "$(ns_of h1)" ping -c 1 -W 2 "$SUBNET.2"
  fi
  echo "up: hosts ${HOSTS[*]} on $SUBNET.0/24 (bridge $BRIDGE), hostfile $STATE/hostfile"
}

# run [--keep-going] LAUNCHER-ARGS...
run() {
  local keep=0 l v
  if [ "${1:-}" = --keep-going ]; then
    keep=1
    shift
  fi
  need_tools
  hosts_up
  l=$(launcher)
  local cmd=("$l")
  case "$IMPL" in
    openmpi)
      # This runs as root only, and Open MPI refuses root without these.
      # The agent passes them on to the other hosts.
      export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
      cmd+=(--hostfile "$STATE/hostfile" --map-by node --bind-to none
        --mca plm rsh --mca plm_rsh_agent "$AGENT" --mca plm_rsh_no_tree_spawn 1
        --mca oob_tcp_if_include "$SUBNET.0/24"
        --mca pml ob1 --mca btl tcp,self --mca btl_tcp_if_include "$SUBNET.0/24")
      [ "$keep" = 0 ] ||
        cmd+=(--mca orte_enable_recovery 1 --mca orte_abort_on_non_zero_status 0)
      for v in ${MPI_HOSTS_PASS:-}; do cmd+=(-x "$v"); done
      ;;
    mpich)
      # Hydra hands its own environment to every rank (through its
      # proxies, not the agent), MPI_HOSTS_PASS included. UCX picks its
      # transports unless UCX_TLS says: see above.
      export UCX_NET_DEVICES=${UCX_NET_DEVICES:-all}
      cmd+=(-f "$STATE/hostfile.mpich" -launcher rsh -launcher-exec "$AGENT" -iface eth0)
      [ "$keep" = 0 ] || cmd+=(-disable-auto-cleanup)
      ;;
  esac
  # exec: a signal to this script (timeout's) reaches the launcher itself,
  # which then stops its daemons and ranks on every host.
  exec ip netns exec "$(ns_of h1)" unshare --uts \
    sh -c 'hostname "$0" && exec "$@"' h1 "${cmd[@]}" "$@"
}

host_ns() {
  local h=${1:-}
  [ -n "$h" ] && ip netns list | grep -qw "$(ns_of "$h")" ||
    { echo "mpi-hosts.sh: no host '$h'" >&2; exit 2; }
  ns_of "$h"
}

# What is left on each host: a line per host with processes on it.
left() {
  local ns h pids any=0
  for ns in $(ip netns list 2>/dev/null | sed -n 's/^\(procpool-h[0-9]*\).*/\1/p' | sort); do
    h=${ns#procpool-}
    pids=$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')
    if [ -n "$pids" ]; then
      any=1
      # shellcheck disable=SC2086
      echo "$h: $(ps -o pid=,comm= -p ${pids// /,} 2>/dev/null | awk '{print $2 "(" $1 ")"}' | paste -sd' ' -)"
    fi
  done
  [ "$any" = 0 ] && echo "left: nothing on any host"
  return "$any"
}

case "${1:-}" in
  up) up ;;
  run) shift; run "$@" ;;
  run-keep-going) shift; run --keep-going "$@" ;;
  kill)
    # Every process on the host at once, as when a machine fails: its
    # launcher daemon, its ranks, their fork servers and workers.
    ns=$(host_ns "${2:-}")
    pids=$(ip netns pids "$ns")
    # shellcheck disable=SC2086
    [ -z "$pids" ] || kill -KILL $pids
    echo "killed on ${2}: $(echo $pids | wc -w) processes"
    ;;
  cut)
    host_ns "${2:-}" >/dev/null
    ip link set "pp-$2" down && echo "cut: $2"
    ;;
  mend)
    ns=$(host_ns "${2:-}")
    ip link set "pp-$2" up || exit 1
    # What the hosts learnt while it was cut off (neighbours that did not
    # answer) would keep them apart for a while: "No route to host".
    for n in $(ip netns list | sed -n 's/^\(procpool-h[0-9]*\).*/\1/p'); do
      ip -n "$n" neigh flush all 2>/dev/null
    done
    if command -v ping >/dev/null 2>&1; then
      for _ in 1 2 3 4 5 6 7 8 9 10; do
        ip netns exec "$ns" ping -c 1 -W 1 "$SUBNET.1" >/dev/null 2>&1 && break
      done
    fi
    echo "mended: $2"
    ;;
  left) left ;;
  down)
    [ "$(id -u)" = 0 ] || skip "needs root (network namespaces and a bridge)"
    down
    echo "down"
    ;;
  *)
    echo "usage: $0 up | run ARGS... | run-keep-going ARGS... | kill HOST | cut HOST | mend HOST | left | down" >&2
    exit 2
    ;;
esac
