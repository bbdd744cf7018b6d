#!/usr/bin/env bash
# Two simulated hosts on this machine, for Open MPI runs across "hosts".
#
#   mpi-hosts.sh up                  make the hosts h1 and h2
#   mpi-hosts.sh run MPIRUN-ARGS...  mpirun on h1, ranks spread over h1, h2
#   mpi-hosts.sh down                remove everything up made
#
# Each host is a network namespace (procpool-h1, procpool-h2) with one
# veth into a bridge (ppmpibr0) in the root namespace, on a private subnet
# (10.77.0.0/24: h1 is .1, h2 is .2). Each command that runs "on" a host
# also gets its own UTS namespace, with that host's name, so `hostname`
# and Open MPI see two machines. The hosts share this machine's filesystem,
# so an executable has the same path on both, as on a cluster with a shared
# home.
#
# `run` starts mpirun inside h1 with a hostfile that names h1 and h2
# (MPI_HOSTS_SLOTS slots each, default 2) and maps ranks by node: rank 0
# on h1, rank 1 on h2, rank 2 on h1, ... mpirun reaches h2 through its rsh
# launcher, with .ci/mpi-hosts-agent in place of ssh. Both the runtime
# (oob) and MPI's own traffic (pml ob1, btl tcp) go over TCP on the
# private subnet only. Ranks are not bound to cores: both hosts share the
# same cores, so each host's first rank would be bound to core 0.
#
# Like ssh, the agent hands the remote side a thin environment (see
# mpi-hosts-agent); pass anything else the ranks need with mpirun's -x.
#
# Needs root, ip (iproute2) and unshare (util-linux), and Open MPI's
# mpirun. Where those are missing, or the namespaces cannot be made, it
# prints one "SKIP: ..." line and exits with 77. `up` removes what it made
# if it fails half-way, and `down` is safe to run at any time.
set -uo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
AGENT="$HERE/mpi-hosts-agent"
SUBNET=10.77.0
BRIDGE=ppmpibr0
NHOSTS=${MPI_HOSTS:-2}
HOSTS=()
for ((k = 1; k <= NHOSTS; k++)); do HOSTS+=("h$k"); done
SLOTS=${MPI_HOSTS_SLOTS:-2}
STATE=/run/procpool-mpi-hosts
SKIP=77

ns_of() { echo "procpool-$1"; }

skip() {
  echo "SKIP: two simulated MPI hosts: $*"
  exit "$SKIP"
}

need_tools() {
  [ "$(id -u)" = 0 ] || skip "needs root (network namespaces and a bridge)"
  local t
  for t in ip unshare mpirun; do
    command -v "$t" >/dev/null 2>&1 || skip "$t is not installed"
  done
  mpirun --version 2>&1 | grep -q "Open MPI" || skip "mpirun is not Open MPI"
  [ -x "$AGENT" ] || skip "$AGENT is missing or not executable"
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

run() {
  need_tools
  [ -s "$STATE/hostfile" ] && ip netns list | grep -qw "$(ns_of h1)" ||
    { echo "mpi-hosts.sh: not up; run 'mpi-hosts.sh up' first" >&2; exit 2; }
  # This runs as root only, and Open MPI refuses root without these. The
  # agent passes them on to h2.
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  # exec: a signal to this script (timeout's) reaches mpirun itself, which
  # then stops its daemons and ranks on both hosts.
  exec ip netns exec "$(ns_of h1)" unshare --uts \
    sh -c 'hostname "$0" && exec "$@"' h1 \
    mpirun --hostfile "$STATE/hostfile" --map-by node --bind-to none \
    --mca plm rsh --mca plm_rsh_agent "$AGENT" --mca plm_rsh_no_tree_spawn 1 \
    --mca oob_tcp_if_include "$SUBNET.0/24" \
    --mca pml ob1 --mca btl tcp,self --mca btl_tcp_if_include "$SUBNET.0/24" \
    "$@"
}

case "${1:-}" in
  up) up ;;
  run) shift; run "$@" ;;
  down)
    [ "$(id -u)" = 0 ] || skip "needs root (network namespaces and a bridge)"
    down
    echo "down"
    ;;
  *)
    echo "usage: $0 up | run MPIRUN-ARGS... | down" >&2
    exit 2
    ;;
esac
