#!/usr/bin/env bash
# Test build hosts on one machine: real sshd instances, one per loopback
# address, each with its own host key, sandoff store root and signing key.
#
#   examples/testhosts.sh start N DIR   # hosts DIR/host1..hostN, then prints DIR/machines
#   examples/testhosts.sh stop DIR      # kills each sshd by the pid in its PidFile
#
# Host i listens on 127.0.0.(1+i), port $TESTHOSTS_PORT (default 2222), or on
# 127.0.0.1 port $TESTHOSTS_PORT+i-1 if that address cannot be bound.
# $TESTHOSTS_FIRST (default 1) numbers the first host, so that several sets
# can run side by side. One client key, DIR/client_ed25519, logs in as root
# to all of them; DIR/known_hosts holds their host keys and DIR/machines
# lists them in Nix's machines format.
#
# Sessions get SANDOFF_STORE_ROOT=DIR/hostI/root and a PATH starting with
# DIR/bin, where `sandoff` ($SANDOFF, or the one on PATH) is linked, through
# sshd_config's SetEnv (OpenSSH >= 8.7), so ~/.ssh and the real /nix/store
# are never touched. Nix 2.8 runs the remote program as `<program> --serve
# --write`; DIR/hostI/serve translates that to `sandoff serve --stdio --write`:
#   NIX_SSHOPTS="-p 2222 -i DIR/client_ed25519 -o UserKnownHostsFile=DIR/known_hosts" \
#     nix copy --to 'ssh://root@127.0.0.2?remote-program=DIR/host1/serve' PATH
#
# Needs root (sshd's privilege separation) and Debian's openssh-server.
set -euo pipefail

die() { echo "testhosts: $*" >&2; exit 1; }

start() {
    local n=$1 dir=$2
    [[ $n =~ ^[1-9][0-9]*$ ]] || die "N must be a positive number, not '$n'"
    [[ $(id -u) == 0 ]] || die "sshd needs root"
    local sshd=/usr/sbin/sshd
    [[ -x $sshd ]] || die "no $sshd (apt-get install openssh-server)"
    local sandoff=${SANDOFF:-$(command -v sandoff || true)}
    [[ -n $sandoff && -x $sandoff ]] || die "no sandoff binary: set SANDOFF or put it on PATH"
    local port=${TESTHOSTS_PORT:-2222} first=${TESTHOSTS_FIRST:-1}
    mkdir -p "$dir" /run/sshd
    dir=$(cd "$dir" && pwd)
    mkdir -p "$dir/bin"
    ln -sfn "$(readlink -f "$sandoff")" "$dir/bin/sandoff"
    [[ -f $dir/client_ed25519 ]] ||
        ssh-keygen -q -t ed25519 -N '' -C testhosts-client -f "$dir/client_ed25519"
    : >"$dir/machines"
    : >"$dir/known_hosts"
    : >"$dir/hosts"
    local i
    for ((i = first; i < first + n; i++)); do
        local h=$dir/host$i addr=127.0.0.$((1 + i)) p=$port
        mkdir -p "$h/root/nix/var/sandoff/keys"
        [[ -f $h/ssh_host_ed25519_key ]] ||
            ssh-keygen -q -t ed25519 -N '' -C "host$i" -f "$h/ssh_host_ed25519_key"
        cp "$dir/client_ed25519.pub" "$h/authorized_keys"
        chmod 600 "$h/authorized_keys"
        [[ -f $h/root/nix/var/sandoff/keys/signing-key.sec ]] ||
            "$sandoff" key generate "host$i-1" \
                "$h/root/nix/var/sandoff/keys/signing-key.sec" \
                "$h/root/nix/var/sandoff/keys/signing-key.pub"
        printf '#!/bin/sh\n# Nix runs "<remote-program> --serve --write".\nexec sandoff serve --stdio --write\n' >"$h/serve"
        chmod 755 "$h/serve"
        # All of 127/8 is loopback on Linux; elsewhere fall back to ports.
        if [[ $(uname -s) != Linux ]]; then
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
SetEnv SANDOFF_STORE_ROOT=$h/root PATH=$dir/bin:/usr/local/bin:/usr/bin:/bin
CFG
        "$sshd" -t -f "$h/sshd_config" || die "bad $h/sshd_config"
        "$sshd" -f "$h/sshd_config" -E "$h/sshd.log"
        local t
        for t in $(seq 50); do [[ -s $h/sshd.pid ]] && break; sleep 0.1; done
        [[ -s $h/sshd.pid ]] || die "sshd for host$i did not start: $(cat "$h/sshd.log")"
        local pub hostport=$addr
        pub=$(cat "$h/ssh_host_ed25519_key.pub")
        [[ $p == 22 ]] || hostport="[$addr]:$p"
        echo "$hostport $pub" >>"$dir/known_hosts"
        echo "ssh://root@$addr:$p x86_64-linux $dir/client_ed25519 2 1 - - $(printf '%s' "$pub" | base64 -w0)" >>"$dir/machines"
        echo "$h $addr $p" >>"$dir/hosts"
    done
    cat "$dir/machines"
}

stop() {
    local dir=$1 pidfile
    for pidfile in "$dir"/host*/sshd.pid; do
        [[ -s $pidfile ]] || continue
        kill "$(cat "$pidfile")" 2>/dev/null || true
        rm -f "$pidfile"
    done
    rm -f "$dir/hosts"
}

case ${1:-} in
start) [[ $# == 3 ]] || die "usage: $0 start N DIR"; start "$2" "$3" ;;
stop) [[ $# == 2 ]] || die "usage: $0 stop DIR"; stop "$2" ;;
*) die "usage: $0 start N DIR | stop DIR" ;;
esac
