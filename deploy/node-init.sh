#!/bin/sh
# weavepy node set-up: what the DaemonSet's init container does on each node before the agent
# starts. It runs privileged, in the host's network namespace, with the host's CNI directories,
# /opt/weavepy and /lib/modules mounted at their host paths. It is idempotent: it runs again at
# every agent (re)start and upgrade.
#
#   1. load the kernel modules the data paths use (a module may be built in: a failure to load
#      one is a note, not an error; the agent reports what is really missing);
#   2. turn on IPv4 forwarding, and let bridged pod traffic through iptables (kube-proxy's
#      Service rules must see pod-to-pod traffic on the weavepy bridge);
#   3. copy the self-contained Python runtime for the CNI plugin (deploy/host-python.py) to
#      RUNTIME_DIR/python-ID: the host may have no Python. A new runtime goes beside the old
#      one, so a plugin that is running during an upgrade keeps its interpreter; only the two
#      newest are kept;
#   4. install weavepy-cni and the network configuration list, pointing at that runtime.
#
# With --uninstall it does the reverse (the init container of `weavepy manifest --uninstall`):
# removes the network configuration list, then the plugin, then every runtime it copied; with
# --state-dir (and --run-dir), `weavepy reset` also removes the node's weavepy devices, pod
# veths and state. Sysctls and modules stay as they are (other software may rely on them).
set -eu

cni_bin_dir=/opt/cni/bin
cni_conf_dir=/etc/cni/net.d
runtime_dir=/opt/weavepy
socket=/run/weavepy/cni.sock
uninstall=0
state_dir=
run_dir=
# the names `weavepy install-cni` writes (weavepy/cni/install.py; tests/deploy checks they agree)
plugin_name=weavepy-cni
conflist_name=10-weavepy.conflist
bundled=${WEAVEPY_HOST_RUNTIME:-/usr/lib/weavepy/host-python}  # built by host-python.py

log() { echo "node-init: $*" >&2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --cni-bin-dir) cni_bin_dir=$2; shift 2 ;;
        --cni-conf-dir) cni_conf_dir=$2; shift 2 ;;
        --runtime-dir) runtime_dir=$2; shift 2 ;;
        --socket) socket=$2; shift 2 ;;
        --uninstall) uninstall=1; shift ;;
        --state-dir) state_dir=$2; shift 2 ;;
        --run-dir) run_dir=$2; shift 2 ;;
        *) log "unknown argument: $1"; exit 2 ;;
    esac
done

if [ "$uninstall" = 1 ]; then
    # the runtime stops calling the plugin once its configuration is gone
    for file in "$cni_conf_dir/$conflist_name" "$cni_bin_dir/$plugin_name"; do
        if [ -e "$file" ]; then rm -f "$file" && log "removed $file"; fi
    done
    for old in "$runtime_dir"/python-*; do
        if [ -e "$old" ]; then rm -rf "$old" && log "removed the runtime $old"; fi
    done
    if [ -n "$state_dir" ]; then
        weavepy reset --force --state-dir "$state_dir" --run-dir "${run_dir:-/run/weavepy}"
    fi
    exit 0
fi

for module in vxlan tun br_netfilter; do
    modprobe "$module" 2>/dev/null || log "note: could not load module $module (built in?)"
done

sysctl -q -w net.ipv4.ip_forward=1
if [ -e /proc/sys/net/bridge/bridge-nf-call-iptables ]; then
    sysctl -q -w net.bridge.bridge-nf-call-iptables=1
else
    log "note: br_netfilter is not available; Services may not work for pod-to-pod traffic"
fi

runtime_id=$(cat "$bundled/ID")
target="$runtime_dir/python-$runtime_id"
mkdir -p "$runtime_dir"
if [ ! -x "$target/bin/python3" ]; then
    rm -rf "$target.partial"
    cp -a "$bundled" "$target.partial"
    mv "$target.partial" "$target"
    log "installed the CNI plugin's Python runtime in $target"
fi
touch "$target"
# keep the two newest runtimes (this one and the previous, for plugins still running)
ls -1dt "$runtime_dir"/python-* 2>/dev/null | tail -n +3 | while read -r old; do
    rm -rf "$old" && log "removed the old runtime $old"
done

exec weavepy install-cni --bin-dir "$cni_bin_dir" --conf-dir "$cni_conf_dir" \
    --interpreter "$target/bin/python3" --socket "$socket"
