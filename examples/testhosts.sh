#!/usr/bin/env bash
# Test build hosts on one machine: real sshd instances, one per loopback
# address (or network namespace), each with its own host key, store root and
# signing key.
#
#   examples/testhosts.sh start N DIR      # hosts DIR/host1..hostN, then prints DIR/machines
#   examples/testhosts.sh start-nix N DIR  # the same with TESTHOSTS_KIND=nix
#   examples/testhosts.sh stop DIR         # kills each sshd and its sessions by pid
#
# Kinds of host (TESTHOSTS_KIND):
#   sandoff (default)  sessions run `sandoff serve --stdio --write` on
#       SANDOFF_STORE_ROOT=DIR/hostI/root, signing with the key in
#       DIR/hostI/root/nix/var/sandoff/keys/signing-key.{sec,pub}. The
#       machines line has no remote-program: `sandoff` is on the session's PATH.
#   nix  sessions run a stock Nix 2.8 `nix-store --serve --write` on the
#       chroot store DIR/hostI/root, with NIX_CONF_DIR=DIR/hostI/nixconf
#       (store = that root, sandbox = true, build-users-group empty, so Nix
#       builds in its sandbox as root mapped to an unprivileged uid, never
#       racing another store for the system's build users, no substituters,
#       secret-key-files = DIR/hostI/root/nix/var/nix/keys/signing-key.sec,
#       so Nix signs what it builds). The machines line carries
#       `?remote-program=DIR/hostI/serve`.
# Either way DIR/hostI/signing-key.pub holds the host's public signing key
# (`name:base64`) for clients to trust, DIR/hostI/machine its machines line,
# and DIR/hostI/serve is the remote program (Nix runs `<program> --serve
# --write`; on sandoff hosts the script ignores its arguments, on Nix hosts
# it passes them to nix-store, so that a client can also ask it
# `--print-fixed-path` to learn its store directory).
#
# Host i listens on 127.0.0.(1+i), port $TESTHOSTS_PORT (default 2222), or on
# 127.0.0.1 port $TESTHOSTS_PORT+i-1 if not on Linux.
# $TESTHOSTS_FIRST (default 1) numbers the first host, so that several sets
# can run side by side. One client key, DIR/client_ed25519, logs in as root
# to all of them; DIR/known_hosts holds their host keys, DIR/machines lists
# them in Nix's machines format and DIR/hosts has one line `HOME ADDR PORT`
# per host.
#
# TESTHOSTS_NETNS=1 starts host i's sshd in its own network namespace
# `sandoff-thI`, joined to this one by a veth pair: `sthIh` here with
# 10.77.I.1/24, `sthIn` inside with 10.77.I.2/24, where sshd listens. Cutting
# the link (`ip link set sthIh down`) makes a dead link for tests of
# timeouts and keepalives; `up` restores it. DIR/hostI/netns holds the
# namespace's name. Needs I <= 255.
#
# TESTHOSTS_LINK=RATE:RTT (e.g. 100mbit:40ms; implies TESTHOSTS_NETNS) joins
# the namespace by a shaped link instead: examples/delayline.py carries the
# packets between two TUN devices (`slIa` here with 10.77.I.1, `slIb` inside
# with 10.77.I.2) after the serialisation time at RATE plus half of RTT each
# way, as netem would (this kernel may lack netem). Its pid is in
# DIR/hostI/delayline.pid; `stop` kills it.
#
# The machines lines take these from the environment (one value for all N):
#   TESTHOSTS_SYSTEMS    system types, comma-separated (default x86_64-linux)
#   TESTHOSTS_MAX_JOBS   slots (default 2)
#   TESTHOSTS_SPEED      speed factor (default 1)
#   TESTHOSTS_FEATURES   supported features, comma-separated (default none)
#   TESTHOSTS_MANDATORY  mandatory features, comma-separated (default none)
#
# TESTHOSTS_STORE_DIR (default /nix/store) is the logical store directory the
# hosts name their paths in, e.g. /gnu/store: sandoff hosts get it as
# SANDOFF_STORE_DIR, Nix hosts serve the chroot store
# `local?root=DIR/hostI/root&store=<dir>&real=DIR/hostI/root<dir>` with
# NIX_STORE_DIR=<dir> (a Nix chroot store otherwise keeps its files in
# <root>/nix/store whatever its directory). A client must use the same
# directory: sandoff clients check it before sending anything.
#
# Sessions get, through sshd_config's SetEnv (OpenSSH >= 8.7), so ~/.ssh
# and the real /nix/store are never touched:
#   SANDOFF_STORE_ROOT=DIR/hostI/root and SANDOFF_STORE_DIR (sandoff hosts),
#   NIX_CONF_DIR and NIX_STORE_DIR (nix hosts)
#   PATH starting with DIR/bin, where `sandoff` ($SANDOFF, or the one on PATH)
#       is linked
#       (on sandoff hosts DIR/hostI/bin comes first: its `nix-store` runs
#       `sandoff serve` for `nix-store --serve`, so that `nix-copy-closure
#       --to` and plain `ssh://` Nix stores work against the host)
#   SANDOFF_USER_POOL_DIR=${SANDOFF_USER_POOL_DIR:-/run/sandoff/userpool}
#       and SANDOFF_BUILD_USERS_GROUP (if set): build users are system-wide,
#       so every sandoff on this machine, hosts and the local client alike,
#       must lock them in the same directory; give the client the same value.
# The machines lines write the port into the URI (ssh://root@ADDR:PORT),
# which sandoff reads; Nix 2.8's own client wants it in NIX_SSHOPTS instead.
# To try it with Nix's own client:
#   NIX_SSHOPTS="-p 2222 -i DIR/client_ed25519 -o UserKnownHostsFile=DIR/known_hosts" \
#     nix copy --to 'ssh://root@127.0.0.2?remote-program=DIR/host1/serve' PATH
#
# Needs root (sshd's privilege separation) and Debian's openssh-server; the
# nix kind needs nix-store (Debian nix-bin), TESTHOSTS_NETNS needs iproute2.
set -euo pipefail

die() { echo "testhosts: $*" >&2; exit 1; }

# A machines-file field from a comma-separated list: "-" when empty.
field() { if [[ -n $1 ]]; then printf '%s' "$1"; else printf -- '-'; fi; }

# Creates namespace sandoff-th$1 joined by a link shaped as $2 (RATE:RTT) by
# examples/delayline.py, whose pid and log go to host directory $3; prints
# the inside address.
make_shaped_netns() {
    local i=$1 link=$2 h=$3 ns=sandoff-th$1
    ((i <= 255)) || die "TESTHOSTS_LINK needs host numbers <= 255, not $i"
    command -v python3 >/dev/null || die "TESTHOSTS_LINK needs python3"
    ip netns del "$ns" 2>/dev/null || true
    ip netns add "$ns"
    local fifo
    fifo=$(mktemp -u)
    mkfifo "$fifo"
    python3 "$(dirname "$0")/delayline.py" "$ns" "$i" "${link%%:*}" "${link##*:}" >"$fifo" 2>"$h/delayline.log" &
    echo $! >"$h/delayline.pid"
    local ready
    read -r ready <"$fifo" || true
    rm -f "$fifo"
    [[ $ready == ready ]] || die "the shaped link for host $i did not come up: $(cat "$h/delayline.log")"
    echo "10.77.$i.2"
}

# Creates namespace sandoff-th$1 with its veth pair; prints the inside address.
make_netns() {
    local i=$1 ns=sandoff-th$1
    ((i <= 255)) || die "TESTHOSTS_NETNS needs host numbers <= 255, not $i"
    command -v ip >/dev/null || die "TESTHOSTS_NETNS needs ip (apt-get install iproute2)"
    # A namespace left by a run that was not stopped would hold the names.
    ip netns del "$ns" 2>/dev/null || true
    ip link del "sth${i}h" 2>/dev/null || true
    ip netns add "$ns"
    ip link add "sth${i}h" type veth peer name "sth${i}n"
    ip link set "sth${i}n" netns "$ns"
    ip addr add "10.77.$i.1/24" dev "sth${i}h"
    ip link set "sth${i}h" up
    ip netns exec "$ns" ip addr add "10.77.$i.2/24" dev "sth${i}n"
    ip netns exec "$ns" ip link set "sth${i}n" up
    ip netns exec "$ns" ip link set lo up
    echo "10.77.$i.2"
}

start() {
    local n=$1 dir=$2
    [[ $n =~ ^[1-9][0-9]*$ ]] || die "N must be a positive number, not '$n'"
    [[ $(id -u) == 0 ]] || die "sshd needs root"
    local kind=${TESTHOSTS_KIND:-sandoff}
    [[ $kind == sandoff || $kind == nix ]] || die "TESTHOSTS_KIND must be sandoff or nix, not '$kind'"
    local sshd=/usr/sbin/sshd
    [[ -x $sshd ]] || die "no $sshd (apt-get install openssh-server)"
    local sandoff=${SANDOFF:-$(command -v sandoff || true)}
    if [[ $kind == sandoff ]]; then
        [[ -n $sandoff && -x $sandoff ]] || die "no sandoff binary: set SANDOFF or put it on PATH"
    else
        command -v nix-store >/dev/null || die "no nix-store (apt-get install nix-bin)"
    fi
    local port=${TESTHOSTS_PORT:-2222} first=${TESTHOSTS_FIRST:-1}
    local netns=${TESTHOSTS_NETNS:-}
    [[ $netns == 1 ]] || netns=
    local systems features mandatory
    systems=$(field "${TESTHOSTS_SYSTEMS:-x86_64-linux}")
    features=$(field "${TESTHOSTS_FEATURES:-}")
    mandatory=$(field "${TESTHOSTS_MANDATORY:-}")
    local max_jobs=${TESTHOSTS_MAX_JOBS:-2} speed=${TESTHOSTS_SPEED:-1}
    local store_dir=${TESTHOSTS_STORE_DIR:-/nix/store}
    [[ $store_dir =~ ^(/[A-Za-z0-9._+-]+)+$ ]] ||
        die "TESTHOSTS_STORE_DIR must be an absolute directory without a trailing slash, not '$store_dir'"
    [[ $max_jobs =~ ^[0-9]+$ ]] || die "TESTHOSTS_MAX_JOBS must be a number, not '$max_jobs'"
    local pool=${SANDOFF_USER_POOL_DIR:-/run/sandoff/userpool}
    mkdir -p "$dir" /run/sshd "$pool"
    dir=$(cd "$dir" && pwd)
    mkdir -p "$dir/bin"
    [[ -z $sandoff ]] || ln -sfn "$(readlink -f "$sandoff")" "$dir/bin/sandoff"
    [[ -f $dir/client_ed25519 ]] ||
        ssh-keygen -q -t ed25519 -N '' -C testhosts-client -f "$dir/client_ed25519"
    : >"$dir/machines"
    : >"$dir/known_hosts"
    : >"$dir/hosts"
    local path_common=$dir/bin:/usr/local/bin:/usr/bin:/bin
    local setenv_common="SANDOFF_USER_POOL_DIR=$pool"
    if [[ -n ${SANDOFF_BUILD_USERS_GROUP:-} ]]; then
        setenv_common+=" SANDOFF_BUILD_USERS_GROUP=$SANDOFF_BUILD_USERS_GROUP"
    fi
    local i
    for ((i = first; i < first + n; i++)); do
        local h=$dir/host$i addr=127.0.0.$((1 + i)) p=$port setenv uri
        mkdir -p "$h/root"
        [[ -f $h/ssh_host_ed25519_key ]] ||
            ssh-keygen -q -t ed25519 -N '' -C "host$i" -f "$h/ssh_host_ed25519_key"
        cp "$dir/client_ed25519.pub" "$h/authorized_keys"
        chmod 600 "$h/authorized_keys"
        if [[ $kind == sandoff ]]; then
            local keys=$h/root/nix/var/sandoff/keys
            mkdir -p "$keys"
            [[ -f $keys/signing-key.sec ]] ||
                "$sandoff" key generate "host$i-1" "$keys/signing-key.sec" "$keys/signing-key.pub"
            cp "$keys/signing-key.pub" "$h/signing-key.pub"
            printf '#!/bin/sh\n# Nix runs "<remote-program> --serve --write".\nexec sandoff serve --stdio --write\n' >"$h/serve"
            # What `nix-copy-closure --to` and Nix's default ssh:// store
            # run: `nix-store --serve --write`, served by sandoff here.
            mkdir -p "$h/bin"
            printf '#!/bin/sh\n# testhosts.sh: a sandoff host serves Nix clients that run "nix-store --serve [--write]".\ncase "$1" in --serve) ;; *) echo "this host runs sandoff, not nix-store" >&2; exit 1 ;; esac\nshift\nexec sandoff serve --stdio "$@"\n' >"$h/bin/nix-store"
            chmod 755 "$h/bin/nix-store"
            setenv="SANDOFF_STORE_ROOT=$h/root SANDOFF_STORE_DIR=$store_dir PATH=$h/bin:$path_common $setenv_common"
        else
            local keys=$h/root/nix/var/nix/keys store=$h/root
            [[ $store_dir == /nix/store ]] ||
                store="local?root=$h/root&store=$store_dir&real=$h/root$store_dir"
            mkdir -p "$keys" "$h/nixconf"
            cat >"$h/nixconf/nix.conf" <<CONF
# testhosts.sh: a Nix 2.8 build host on its own chroot store.
store = $store
sandbox = true
build-users-group =
substituters =
secret-key-files = $keys/signing-key.sec
# Nix checks requiredSystemFeatures against its own list: offer what the
# machine line offers, besides Nix's defaults.
system-features = benchmark big-parallel nixos-test kvm ${TESTHOSTS_FEATURES:+${TESTHOSTS_FEATURES//,/ }} ${TESTHOSTS_MANDATORY:+${TESTHOSTS_MANDATORY//,/ }}
experimental-features = nix-command
CONF
            [[ -f $keys/signing-key.sec ]] ||
                NIX_CONF_DIR=$h/nixconf NIX_STORE_DIR=$store_dir nix-store --generate-binary-cache-key \
                    "host$i-1" "$keys/signing-key.sec" "$keys/signing-key.pub"
            chmod 600 "$keys/signing-key.sec"
            cp "$keys/signing-key.pub" "$h/signing-key.pub"
            printf '#!/bin/sh\n# Nix runs "<remote-program> --serve --write"; sandoff may ask "--print-fixed-path ..." first.\nexport NIX_CONF_DIR=%s NIX_STORE_DIR=%s\nunset NIX_REMOTE\nexec nix-store "$@" --store '"'"'%s'"'"'\n' \
                "$h/nixconf" "$store_dir" "$store" >"$h/serve"
            setenv="NIX_CONF_DIR=$h/nixconf NIX_STORE_DIR=$store_dir PATH=$path_common $setenv_common"
        fi
        chmod 755 "$h/serve"
        rm -f "$h/netns"
        local run=()
        if [[ -n ${TESTHOSTS_LINK:-} ]]; then
            addr=$(make_shaped_netns "$i" "$TESTHOSTS_LINK" "$h")
            echo "sandoff-th$i" >"$h/netns"
            run=(ip netns exec "sandoff-th$i")
        elif [[ -n $netns ]]; then
            addr=$(make_netns "$i")
            echo "sandoff-th$i" >"$h/netns"
            run=(ip netns exec "sandoff-th$i")
        elif [[ $(uname -s) != Linux ]]; then
            # All of 127/8 is loopback on Linux; elsewhere fall back to ports.
            addr=127.0.0.1 p=$((port + i - first))
        fi
        cat >"$h/sshd_config" <<CFG
Port $p
ListenAddress $addr
HostKey $h/ssh_host_ed25519_key
PidFile $h/sshd.pid
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
UsePAM no
StrictModes no
AuthorizedKeysFile $h/authorized_keys
SetEnv $setenv
CFG
        "$sshd" -t -f "$h/sshd_config" || die "bad $h/sshd_config"
        rm -f "$h/sshd.pid"
        "${run[@]}" "$sshd" -f "$h/sshd_config" -E "$h/sshd.log"
        for _ in $(seq 50); do [[ -s $h/sshd.pid ]] && break; sleep 0.1; done
        [[ -s $h/sshd.pid ]] || die "sshd for host$i did not start: $(cat "$h/sshd.log")"
        local pub hostport=$addr
        pub=$(cat "$h/ssh_host_ed25519_key.pub")
        [[ $p == 22 ]] || hostport="[$addr]:$p"
        echo "$hostport $pub" >>"$dir/known_hosts"
        uri="ssh://root@$addr:$p"
        [[ $kind == sandoff ]] || uri+="?remote-program=$h/serve"
        echo "$uri $systems $dir/client_ed25519 $max_jobs $speed $features $mandatory $(printf '%s' "$pub" | base64 -w0)" |
            tee "$h/machine" >>"$dir/machines"
        echo "$h $addr $p" >>"$dir/hosts"
    done
    cat "$dir/machines"
}

# Prints pid $1 and all its descendants, parents first, from /proc.
descendants() {
    local -A kids=()
    local f line pid rest ppid
    for f in /proc/[0-9]*/stat; do
        { read -r line <"$f"; } 2>/dev/null || continue
        pid=${line%% *}
        # The command name may hold spaces and parentheses: cut at the last ')'.
        rest=${line##*) }
        read -r _ ppid _ <<<"$rest"
        kids[$ppid]+=" $pid"
    done
    local queue=("$1") p
    while ((${#queue[@]})); do
        p=${queue[0]}
        queue=("${queue[@]:1}")
        echo "$p"
        # shellcheck disable=SC2206 # a space-separated list of pids
        queue+=(${kids[$p]:-})
    done
}

# Stops sshd $1 and every session under it: stopped first so that none
# can fork past the walk, then killed.
kill_tree() {
    local pids
    mapfile -t pids < <(descendants "$1")
    kill -STOP "${pids[@]}" 2>/dev/null || true
    mapfile -t pids < <(descendants "$1")
    kill -KILL "${pids[@]}" 2>/dev/null || true
}

stop() {
    local dir=$1 h
    for h in "$dir"/host*; do
        [[ -d $h ]] || continue
        if [[ -s $h/sshd.pid ]]; then
            local pid comm
            pid=$(cat "$h/sshd.pid")
            comm=$(cat "/proc/$pid/comm" 2>/dev/null || true)
            # A stale pid file may name a reused pid: only ever kill an sshd.
            [[ $comm != sshd ]] || kill_tree "$pid"
            rm -f "$h/sshd.pid"
        fi
        if [[ -s $h/delayline.pid ]]; then
            local dpid
            dpid=$(cat "$h/delayline.pid")
            # Only ever the delay line this script started.
            grep -q delayline.py "/proc/$dpid/cmdline" 2>/dev/null && kill "$dpid" 2>/dev/null || true
            rm -f "$h/delayline.pid"
        fi
        if [[ -s $h/netns ]]; then
            local ns i
            ns=$(cat "$h/netns")
            i=${ns#sandoff-th}
            ip netns del "$ns" 2>/dev/null || true
            ip link del "sth${i}h" 2>/dev/null || true
            rm -f "$h/netns"
        fi
    done
    rm -f "$dir/hosts"
}

case ${1:-} in
start) [[ $# == 3 ]] || die "usage: $0 start N DIR"; start "$2" "$3" ;;
start-nix) [[ $# == 3 ]] || die "usage: $0 start-nix N DIR"; TESTHOSTS_KIND=nix start "$2" "$3" ;;
stop) [[ $# == 2 ]] || die "usage: $0 stop DIR"; stop "$2" ;;
*) die "usage: $0 start N DIR | start-nix N DIR | stop DIR" ;;
esac
