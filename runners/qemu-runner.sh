#!/bin/sh
# qemu-runner.sh: a minimal VM runner honouring podvm's runner contract (docs/runner-contract.md) with plain
# qemu and qemu-img. It needs: sh, python3 (to read the handshake's JSON), qemu-system-x86_64, qemu-img,
# socat (for the QMP power-down) and curl (only for an http(s) IMG_SOURCE). It builds no config drive.
# Extra arguments are passed to qemu as they are.
set -eu

RUN_DIR=${RUN_DIR:-/run/podvm}
IMAGE_DIR=${IMAGE_DIR:-/image}
VM_DIR=${VM_DIR:-/vm}
HANDSHAKE_TIMEOUT=${HANDSHAKE_TIMEOUT:-120}
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-60}
VM_CPUS=${VM_CPUS:-1}
VM_MEMORY=${VM_MEMORY:-512M}
ACCEL=${ACCEL:-auto}
QMP_SOCKET=${QMP_SOCKET:-$RUN_DIR/qemu-runner.qmp}
HANDSHAKE=$RUN_DIR/network.json

say() { printf '%s qemu-runner: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2; }
die() { status=$1; shift; say "ERROR $*"; exit "$status"; }  # exit statuses as in shared/errors.py

: "${IMG_SOURCE:?IMG_SOURCE is required: an http(s) URL or an absolute path of a qcow2 image}"
case $ACCEL in
    auto) if [ -w /dev/kvm ]; then ACCEL=kvm; else ACCEL=tcg; say "WARN /dev/kvm not usable: running under TCG"; fi ;;
    kvm|tcg) ;;
    *) die 2 "ACCEL='$ACCEL': expected auto, kvm or tcg" ;;
esac

# 1. Wait for the sidecar's handshake, then read it; refuse a major version other than 1.
waited=0
while [ ! -e "$HANDSHAKE" ]; do
    [ "$waited" -ge "$((HANDSHAKE_TIMEOUT * 5))" ] &&
        die 4 "$HANDSHAKE: no network handshake after ${HANDSHAKE_TIMEOUT}s; is the netsidecar container running?"
    sleep 0.2
    waited=$((waited + 1))
done
fields=$(python3 -c '
import json, re, shlex, sys
path = sys.argv[1]
try:
    data = json.load(open(path))
except (OSError, ValueError) as err:
    sys.exit(f"{path}: unreadable handshake: {err}")
version = data.get("version") if isinstance(data, dict) else None
if not isinstance(version, str) or not re.fullmatch(r"\d+\.\d+", version):
    sys.exit(f"{path}: missing or malformed version (expected MAJOR.MINOR)")
if version.split(".")[0] != "1":
    sys.exit(f"{path}: handshake version {version} is not supported (this runner speaks 1.x)")
for name in ("tap", "mac", "hostname", "vnc_in_pod"):
    if name not in data:
        sys.exit(f"{path}: missing field {name!r}")
print("TAP=" + shlex.quote(data["tap"]), "MAC=" + shlex.quote(data["mac"]), "NAME=" + shlex.quote(data["hostname"]))
print("VNC=yes" if data["vnc_in_pod"] is True else "VNC=no")
' "$HANDSHAKE" 2>&1) || die 4 "$fields"
eval "$fields"
say "handshake: tap $TAP, mac $MAC, VNC in pod: $VNC"

# 2. The base image: a local file, or fetched once into the cache (temporary name, then renamed).
case $IMG_SOURCE in
    http://*|https://*)
        base=$IMAGE_DIR/${IMG_TARGET:-$(basename "${IMG_SOURCE%%\?*}")}
        if [ ! -e "$base" ]; then
            say "fetching $IMG_SOURCE"
            curl -fsSL --retry 3 -o "$base.part.$$" "$IMG_SOURCE" || { rm -f "$base.part.$$"; die 1 "IMG_SOURCE: cannot fetch $IMG_SOURCE"; }
            mv "$base.part.$$" "$base"
            chmod a-w "$base"
        fi ;;
    /*) base=$IMG_SOURCE; [ -r "$base" ] || die 2 "IMG_SOURCE=$base: no such readable file" ;;
    *) die 2 "IMG_SOURCE='$IMG_SOURCE': expected an http(s) URL or an absolute path" ;;
esac

# 3. Vet it: qcow2 by declaration, never probed; no backing file, no external data file.
info=$(ulimit -t 10; ulimit -v 1048576; qemu-img info -f qcow2 --output=json "$base" 2>&1) || die 3 "$base: not a valid qcow2 image: $info"
case $info in
    *'"backing-filename"'*|*'"data-file"'*) die 3 "$base: refused: the image has a backing file or an external data file" ;;
esac

# 4. The pet overlay, created once and then always used as it is.
pet=$VM_DIR/$NAME.qcow2
if [ ! -e "$pet" ]; then
    qemu-img create -q -f qcow2 -F qcow2 -b "$base" "$pet.tmp.$$" && mv "$pet.tmp.$$" "$pet"
    say "created pet disk $pet on $base"
fi

# 5. qemu on the sidecar's tap with the sidecar's MAC; the serial console on stdout.
if [ "$VNC" = yes ]; then display="-vga std -vnc :0"; else display="-display none"; fi
rm -f "$QMP_SOCKET"
stopping=no
trap 'stopping=yes' TERM INT
# shellcheck disable=SC2086  # $display is two words on purpose
qemu-system-x86_64 -nodefaults -accel "$ACCEL" -smp "$VM_CPUS" -m "$VM_MEMORY" $display \
    -drive "file=$pet,format=qcow2,if=virtio" \
    -netdev "tap,id=net0,ifname=$TAP,script=no,downscript=no" -device "virtio-net-pci,netdev=net0,mac=$MAC" \
    -serial stdio -monitor none -qmp "unix:$QMP_SOCKET,server=on,wait=off" "$@" </dev/null &
qemu=$!
say "qemu started (pid $qemu, accel $ACCEL)"

# 6. SIGTERM: ACPI power-down over QMP, up to SHUTDOWN_TIMEOUT for the guest to power off, then a hard stop.
status=0
wait "$qemu" || status=$?
if [ "$stopping" = no ]; then
    [ "$status" -eq 0 ] && { say "the guest powered off"; exit 0; }
    die 5 "qemu exited with status $status"
fi
say "SIGTERM: ACPI power-down, waiting up to ${SHUTDOWN_TIMEOUT}s"
printf '{"execute":"qmp_capabilities"}\n{"execute":"system_powerdown"}\n' |
    socat -t 1 - "UNIX-CONNECT:$QMP_SOCKET" >/dev/null 2>&1 || say "WARN QMP power-down could not be sent"
ticks=0
while kill -0 "$qemu" 2>/dev/null; do
    if [ "$ticks" -ge "$((SHUTDOWN_TIMEOUT * 5))" ]; then
        kill -KILL "$qemu" 2>/dev/null || true
        wait "$qemu" 2>/dev/null || true
        die 6 "the guest did not power off within ${SHUTDOWN_TIMEOUT}s: qemu killed"
    fi
    sleep 0.2
    ticks=$((ticks + 1))
done
wait "$qemu" 2>/dev/null || true
say "the guest powered off (ACPI)"
exit 0
