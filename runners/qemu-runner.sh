#!/bin/sh
# qemu-runner.sh: a VM runner in POSIX sh honouring podvm's runner contract (docs/runner-contract.md), the shared
# image cache of its section 7 included. It needs: sh, awk, python3 (JSON and URLs only), qemu-system-x86_64 (or
# $QEMU), qemu-img, flock and findmnt (util-linux), sha256sum/sha512sum and stat (coreutils), socat (the QMP
# power-down) and curl (only for an http(s) IMG_SOURCE). It builds no config drive. Extra arguments go to qemu as
# they are. Exit statuses as in shared/errors.py.
set -eu
umask 022

say() { printf '%s qemu-runner: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*" >&2; }
die() { status=$1; shift; say "ERROR $*"; exit "$status"; }

# Files this run is making: removed on any exit, SIGTERM during a download included; a started qemu is stopped.
part='' part_err='' pet_tmp='' fetcher='' qemu='' verified=''
cleanup() {
    [ -z "$fetcher" ] || kill "$fetcher" 2>/dev/null || true
    [ -z "$qemu" ] || kill -KILL "$qemu" 2>/dev/null || true
    rm -f -- ${part:+"$part"} ${part_err:+"$part_err"} ${pet_tmp:+"$pet_tmp"}
}
trap cleanup EXIT
trap 'exit 143' TERM
trap 'exit 130' INT

# parse NAME DEFAULT duration|size: $NAME read as shared/env.py reads it (30, 30s, 500ms, 2m, 1h; 512M, 20G, 20GiB),
# in milliseconds or bytes, into $value; unset or blank means DEFAULT; anything else is exit status 2 naming NAME.
parse() {
    eval "raw=\${$1-}"
    case $raw in *[![:space:]]*) ;; *) raw=$2 ;; esac
    value=$(printf '%s\n' "$raw" | awk -v kind="$3" '
        NR == 1 {
            v = $0; sub(/^[ \t]+/, "", v); sub(/[ \t]+$/, "", v)
            if (kind == "duration" && match(v, /^[0-9]+(\.[0-9]+)?/)) {
                n = substr(v, 1, RLENGTH); u = substr(v, RLENGTH + 1); sub(/^[ \t]+/, "", u)
                f = (u == "ms") ? 1 : (u == "" || u == "s") ? 1000 : (u == "m") ? 60000 : (u == "h") ? 3600000 : 0
            } else if (kind == "size" && match(v, /^[0-9]+/)) {
                n = substr(v, 1, RLENGTH); u = toupper(substr(v, RLENGTH + 1)); sub(/^[ \t]+/, "", u)
                f = (u !~ /^([KMGT]I?B?|B)?$/) ? 0 : (u == "" || u == "B") ? 1 : 1024 ^ index("KMGT", substr(u, 1, 1))
            }
        }
        END { if (NR != 1 || !f) exit 1; printf "%.0f\n", n * f }') || case $3 in
        duration) die 2 "$1='$raw': expected a duration such as 30s, 500ms or 2m" ;;
        *) die 2 "$1='$raw': expected a size such as 512M or 20G" ;;
    esac
}

# --- Configuration: every value is checked before anything is touched. ---
RUN_DIR=${RUN_DIR:-/run/podvm}
IMAGE_DIR=${IMAGE_DIR:-/image}
VM_DIR=${VM_DIR:-/vm}
QMP_SOCKET=${QMP_SOCKET:-$RUN_DIR/qemu-runner.qmp}
QEMU=${QEMU:-qemu-system-x86_64}
HANDSHAKE=$RUN_DIR/network.json
parse HANDSHAKE_TIMEOUT 120s duration; handshake_ms=$value
parse SHUTDOWN_TIMEOUT 60s duration; shutdown_ms=$value
parse IMG_MAX_SIZE 256G size; max_size=$value
[ "$max_size" -ge 1048576 ] || die 2 "IMG_MAX_SIZE=$IMG_MAX_SIZE: must be at least 1048576 bytes"
parse VM_MEMORY 512M size; memory_mib=$((value / 1048576))
[ "$memory_mib" -ge 16 ] || die 2 "VM_MEMORY=$VM_MEMORY: must be at least 16M"
case ${VM_CPUS:=1} in ''|*[!0-9]*) die 2 "VM_CPUS='$VM_CPUS': expected a whole number from 1 to 255" ;; esac
[ "$VM_CPUS" -ge 1 ] && [ "$VM_CPUS" -le 255 ] || die 2 "VM_CPUS=$VM_CPUS: expected a number from 1 to 255"
case ${FETCH_RETRIES:=5} in ''|*[!0-9]*) die 2 "FETCH_RETRIES='$FETCH_RETRIES': expected a whole number" ;; esac
# VNC_PASSWORD_FILE, read by the rules of shared/secrets.py and vmrunner/run/vnc.py: at most 4096 bytes read, trailing
# line ends dropped, 1 to 8 printable ASCII characters; messages name the variable and the file, never the password.
vnc_password=''
if [ -n "${VNC_PASSWORD_FILE:-}" ]; then
    vnc_password=$(python3 - "$VNC_PASSWORD_FILE" <<'PY'
import sys
source = f"VNC_PASSWORD_FILE={sys.argv[1]}"
try:
    with open(sys.argv[1], "rb") as secret:
        raw = secret.read(4097)
except OSError as err:
    sys.exit(print(f"{source}: cannot read: {err.strerror}") or 2)
password = raw.rstrip(b"\r\n")
why = (
    "larger than 4096 bytes; expected a password of at most 8" if len(raw) > 4096
    else "the VNC password is empty" if not password
    else "the VNC password holds control or non-ASCII characters; use printable ASCII"
    if any(byte < 0x20 or byte > 0x7E for byte in password)
    else f"the VNC password is {len(password)} characters long; VNC uses at most 8" if len(password) > 8
    else None
)
sys.exit(print(f"{source}: {why}") or 2) if why else print(password.decode(), end="")
PY
    ) || die 2 "$vnc_password"
fi
case ${IMG_FORMAT:=qcow2} in qcow2|raw) ;; *) die 2 "IMG_FORMAT='$IMG_FORMAT': expected qcow2 or raw" ;; esac
case ${VERIFY_BASE:=changed} in changed|always) ;; *) die 2 "VERIFY_BASE='$VERIFY_BASE': expected changed or always" ;; esac
# is_hex LENGTH VALUE: VALUE is exactly LENGTH lower-case hex digits.
is_hex() { case $2 in *[!0-9a-f]*) return 1 ;; esac; [ "${#2}" -eq "$1" ]; }
checksum=$(printf '%s' "${IMG_CHECKSUM:-}" | tr '[:upper:]' '[:lower:]')
case $checksum in
    '') ;;
    sha256:*) is_hex 64 "${checksum#sha256:}" || checksum=bad ;;
    sha512:*) is_hex 128 "${checksum#sha512:}" || checksum=bad ;;
    *) checksum=bad ;;
esac
[ "$checksum" != bad ] || die 2 "IMG_CHECKSUM='$IMG_CHECKSUM': expected sha256:<64 hex digits> or sha512:<128 hex digits>"
case ${ACCEL:=auto} in
    auto) if [ -w /dev/kvm ]; then ACCEL=kvm; else ACCEL=tcg; say "WARN /dev/kvm not usable: running under TCG"; fi ;;
    kvm|tcg) ;;
    *) die 2 "ACCEL='$ACCEL': expected auto, kvm or tcg" ;;
esac
: "${IMG_SOURCE:?IMG_SOURCE is required: an http(s) URL or an absolute path of a qcow2 image}"
# The image's name in the cache, exactly as vmrunner derives it (section 7), and the source as it may be shown.
source_fields=$(python3 -c '
import hashlib, re, shlex, sys
from urllib.parse import urlsplit, urlunsplit
def host_and_port(url):
    parts = urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    return host if parts.port is None else f"{host}:{parts.port}"
def redact(text):  # as vmrunner.config.redact
    masked = re.sub(r"://[^\s\x27\"<>]*@", "://***@", text)
    try:
        if masked.startswith(("http://", "https://")) and not any(c.isspace() for c in masked):
            return urlunsplit((urlsplit(masked).scheme, host_and_port(masked), urlsplit(masked).path, "", ""))
    except ValueError:
        pass
    return re.sub(r"[?#][^\s\x27\"<>]+", "?***", masked)
source, target = sys.argv[1], sys.argv[2]
shown = redact(source)
if source.startswith(("http://", "https://")):
    parts = urlsplit(source)
    try:
        netloc = host_and_port(source)
    except ValueError:
        sys.exit(f"IMG_SOURCE={shown!r}: the URL has an invalid port")
    if not parts.hostname:
        sys.exit(f"IMG_SOURCE={shown!r}: the URL has no host")
    keyed = urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))
    file_name = parts.path.rstrip("/").rsplit("/", 1)[-1]
elif source.startswith("/"):
    keyed = source
    file_name = source.rstrip("/").rsplit("/", 1)[-1]
else:
    sys.exit(f"IMG_SOURCE={shown!r}: expected an http(s) URL or an absolute path")
if target and not re.fullmatch(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]{0,199}", target):
    sys.exit(f"IMG_TARGET={target!r}: expected a plain name: up to 200 letters, digits, \x27.\x27, \x27_\x27, \x27+\x27 or \x27-\x27")
stem = re.sub(r"[^A-Za-z0-9._+-]", "_", file_name)[:100] or "image"
name = target or f"{stem}@{hashlib.sha256(keyed.encode()).hexdigest()[:16]}"
print(" ".join(f"{k}={shlex.quote(v)}" for k, v in (("name", name), ("shown", shown))))
' "$IMG_SOURCE" "${IMG_TARGET:-}" 2>&1) || die 2 "$source_fields"
eval "$source_fields"

# --- 1. Wait for the sidecar's handshake, then read it; refuse a major version other than 1. ---
waited=0
while [ ! -e "$HANDSHAKE" ]; do
    [ "$waited" -lt "$handshake_ms" ] ||
        die 4 "$HANDSHAKE: no network handshake after ${HANDSHAKE_TIMEOUT:-120s}; is the netsidecar container running?"
    sleep 0.2
    waited=$((waited + 200))
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
queues = data.get("tap_queues", 1)  # 1.4: a multiqueue tap must be opened with that many queues
if not isinstance(queues, int) or isinstance(queues, bool) or not 1 <= queues <= 16:
    sys.exit(f"{path}: tap_queues must be an integer from 1 to 16")
print(f"QUEUES={queues}")
' "$HANDSHAKE" 2>&1) || die 4 "$fields"
eval "$fields"
say "handshake: tap $TAP ($QUEUES queue pairs), mac $MAC, VNC in pod: $VNC"
netdev="tap,id=net0,ifname=$TAP,script=no,downscript=no" nic="virtio-net-pci,netdev=net0,mac=$MAC"
if [ "$QUEUES" -gt 1 ]; then
    netdev="$netdev,queues=$QUEUES" nic="$nic,mq=on,vectors=$((2 * QUEUES + 2))"
fi

# --- 2. The shared cache (section 7): sha256/<hex>, names/, refs/, locks/, tmp/. ---
for sub in sha256 names refs locks tmp; do
    mkdir -p "$IMAGE_DIR/$sub" 2>/dev/null && [ -w "$IMAGE_DIR/$sub" ] ||
        die 2 "IMAGE_DIR=$IMAGE_DIR: cannot create or write the cache's folder $sub"
done
mount_of_cache=$(findmnt -n -o FSTYPE,OPTIONS --target "$IMAGE_DIR" 2>/dev/null || true)
case $mount_of_cache in
    nfs*nolock*|nfs*local_lock=all*|nfs*local_lock=flock*)
        die 2 "IMAGE_DIR=$IMAGE_DIR: an NFS mount whose locks hold on this node only; the shared cache needs working locks (NFSv4, or NFSv3 with lockd)" ;;
esac

# lock FD PATH [WAITING]: hold flock on PATH as descriptor FD. gc removes a lock file with its base while holding
# it, so once locked the path must still name the file locked; otherwise start over on the new file.
lock() {
    while :; do
        # Never through a symbolic link planted in the shared cache (it could point into this pod's own volumes).
        [ ! -L "$2" ] || die 1 "IMAGE_DIR: $2 is a symbolic link; refused"
        eval "exec $1>>\"\$2\"" || die 1 "$2: cannot open the lock file"
        rc=0; flock -n -E 75 "$1" || rc=$?
        if [ "$rc" -eq 75 ]; then
            [ -z "${3:-}" ] || say "$3"
            rc=0; flock "$1" || rc=$?
        fi
        [ "$rc" -eq 0 ] || die 2 "IMAGE_DIR=$IMAGE_DIR: $2: flock failed (a volume without working locks?)"
        [ "$(stat -L -c %i "/proc/$$/fd/$1" 2>/dev/null)" != "$(stat -c %i "$2" 2>/dev/null)" ] || return 0
        eval "exec $1>&-"
    done
}
unlock() { eval "exec $1>&-"; }

# vet FILE FORMAT LIMIT LABEL [check]: exit status 3 naming LABEL unless qemu-img (under CPU and memory limits, the
# format given, never probed) reads FILE as FORMAT with no backing file, no external data file, no corrupt flag and
# a virtual size <= LIMIT; with "check", qemu-img check must find no errors either.
vet() {
    if ! info=$( (ulimit -t 30; ulimit -v 1048576; exec qemu-img info -f "$2" --output=json "$1") 2>/dev/null); then
        why=$( (ulimit -t 30; ulimit -v 1048576; exec qemu-img info -f "$2" "$1") 2>&1 >/dev/null | tail -n 1)
        die 3 "$4: qemu-img info -f $2 failed: $why"
    fi
    verdict=$(printf '%s' "$info" | python3 -c '
import json, sys
fmt, limit = sys.argv[1], int(sys.argv[2])
try:
    info = json.load(sys.stdin)
except ValueError:
    sys.exit("qemu-img info printed no JSON")
specific = info.get("format-specific", {}).get("data", {})
size, found, backing, data = (info.get("virtual-size"), info.get("format"), info.get("backing-filename"),
                              specific.get("data-file"))
if found != fmt:
    sys.exit(f"qemu-img reads it as {found!r}, not {fmt}")
if "backing-filename" in info or "full-backing-filename" in info:
    sys.exit(f"has a backing file ({backing!r}); refused")
if "data-file" in specific or specific.get("data-file-raw"):
    sys.exit(f"has an external data file ({data!r}); refused")
if specific.get("corrupt"):
    sys.exit("is marked corrupt; refused")
if not isinstance(size, int) or size <= 0:
    sys.exit("no valid virtual size")
if size > limit:
    sys.exit(f"virtual size {size} bytes exceeds IMG_MAX_SIZE ({limit} bytes); refused")
' "$2" "$3" 2>&1) || die 3 "$4: $verdict"
    [ "${5:-}" = check ] && [ "$2" = qcow2 ] || return 0
    # 0: clean; 3: leaked clusters only, which waste space but harm nothing.
    rc=0; out=$( (ulimit -t 30; ulimit -v 1048576; exec qemu-img check -f qcow2 "$1") 2>&1) || rc=$?
    [ "$rc" -eq 0 ] || [ "$rc" -eq 3 ] || die 3 "$4: qemu-img check found errors: $(printf '%s\n' "$out" | tail -n 1)"
}

# write_json PATH KEY VALUE...: a JSON object of strings ("outer.inner" keys nest one level), written atomically
# (temporary name beginning with ".", then rename).
write_json() {
    target=$1; shift
    python3 -c '
import json, os, sys, tempfile
path, pairs = sys.argv[1], sys.argv[2:]
record = {}
for key, value in zip(pairs[::2], pairs[1::2]):
    outer, _, inner = key.partition(".")
    if inner:
        record.setdefault(outer, {})[inner] = value
    else:
        record[key] = value
fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.", suffix=".tmp")
try:
    with os.fdopen(fd, "w") as out:
        json.dump(record, out)
        out.flush()
        os.fsync(out.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
except OSError as err:
    sys.exit(f"cannot write {path}: {err.strerror}")
finally:
    if os.path.exists(tmp):
        os.unlink(tmp)
' "$target" "$@" 2>&1 || die 1 "IMAGE_DIR=$IMAGE_DIR or VM_DIR=$VM_DIR: cannot write $target"
}

now() { date -u +%Y-%m-%dT%H:%M:%SZ; }
sha256_of() { sha256sum < "$1" | cut -c1-64; }

# resolve: the digest the configured name points to, when that base is present and matches IMG_CHECKSUM, into $hex.
resolve() {
    hex=$(python3 -c '
import json, re, sys
try:
    record = json.load(open(sys.argv[1]))
    digest = record["digest"].removeprefix("sha256:")
    known = {"sha256": digest, **record.get("checksums", {})}
except (OSError, ValueError, TypeError, KeyError, AttributeError):
    sys.exit(1)
wanted = sys.argv[2]
if not re.fullmatch(r"[0-9a-f]{64}", digest) or (wanted and known.get(wanted.split(":")[0]) != wanted.split(":")[1]):
    sys.exit(1)
print(digest)
' "$IMAGE_DIR/names/$name" "$checksum" 2>/dev/null) || hex=''
    [ -n "$hex" ] && [ -f "$IMAGE_DIR/sha256/$hex" ] || hex=''
}

# fetch: download (or copy) the configured image into tmp/, then hash, check, flush, vet, and only then store it as
# sha256/<hex> (0444) and point names/<name> at it; into $hex. Never more than IMG_MAX_SIZE bytes are written.
fetch() {
    case $IMG_SOURCE in
        /*) [ -f "$IMG_SOURCE" ] && [ -r "$IMG_SOURCE" ] || die 2 "IMG_SOURCE=$IMG_SOURCE: no such readable file" ;;
    esac
    # An unpredictable name, created exclusively (set -C): nothing planted in tmp/ is followed or overwritten.
    part=$IMAGE_DIR/tmp/$name.$$.$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n').part
    part_err=$part.err
    say "fetching $shown (name $name)"
    blocks=$(( (max_size + 511) / 512 ))
    case $IMG_SOURCE in
        http://*|https://*)
            (set -C; exec >"$part" 2>"$part_err"; ulimit -f "$blocks"
             exec curl -fsS -L --proto =http,https --proto-redir =http,https --max-filesize "$max_size" \
                 --retry "$FETCH_RETRIES" --retry-connrefused --connect-timeout 10 "$IMG_SOURCE") & ;;
        *) (set -C; exec >"$part" 2>"$part_err"; ulimit -f "$blocks"; exec cat "$IMG_SOURCE") & ;;
    esac
    fetcher=$!
    rc=0; wait "$fetcher" || rc=$?
    fetcher=''
    size=$(stat -c %s "$part" 2>/dev/null || echo 0)
    if [ "$rc" -eq 63 ] || [ "$size" -gt "$max_size" ] || { [ "$rc" -ne 0 ] && [ "$size" -ge $((blocks * 512)) ]; }; then
        die 3 "IMG_SOURCE=$shown: more than IMG_MAX_SIZE ($max_size) bytes; refused, nothing was cached"
    fi
    if [ "$rc" -ne 0 ]; then
        why=$(tail -n 1 "$part_err" | sed -e 's#://[^[:space:]]*@#://***@#g' -e 's#[?][^[:space:]]*#?***#g')
        [ "$rc" -eq 23 ] && die 1 "IMAGE_DIR=$IMAGE_DIR: cannot write $name: $why; nothing was cached"
        die 1 "IMG_SOURCE=$shown: cannot fetch: ${why:-exit status $rc}"
    fi
    sync "$part" || die 1 "IMAGE_DIR=$IMAGE_DIR: cannot flush $name to disk; nothing was cached"
    hex=$(sha256_of "$part")
    sha512=''
    case $checksum in
        sha256:*) [ "$hex" = "${checksum#sha256:}" ] ||
            die 3 "IMG_CHECKSUM: $shown has sha256:$hex, expected $checksum; nothing was cached" ;;
        sha512:*) sha512=$(sha512sum < "$part" | cut -c1-128); [ "$sha512" = "${checksum#sha512:}" ] ||
            die 3 "IMG_CHECKSUM: $shown has sha512:$sha512, expected $checksum; nothing was cached" ;;
    esac
    vet "$part" "$IMG_FORMAT" "$max_size" "$shown" check
    chmod 0444 "$part"
    lock 8 "$IMAGE_DIR/locks/$hex.lock"
    base=$IMAGE_DIR/sha256/$hex
    if [ -f "$base" ] && [ "$(sha256_of "$base")" = "$hex" ]; then
        rm -f "$part"
    else
        mv -f "$part" "$base" || die 1 "IMAGE_DIR=$IMAGE_DIR: cannot store $name"
        sync "$IMAGE_DIR/sha256" 2>/dev/null || true
    fi
    unlock 8
    part=''
    rm -f "$part_err"
    part_err=''
    verified=$hex
    write_json "$IMAGE_DIR/names/$name" digest "sha256:$hex" source "$shown" fetched_at "$(now)" \
        ${sha512:+checksums.sha512} ${sha512:+"$sha512"}
    say "cached $name as sha256:$hex"
}

# adopt HEX: a base already cached under another name, with the sha256 IMG_CHECKSUM asks for, is hashed and vetted
# instead of downloaded (one download per digest); into $hex when it is those bytes.
adopt() {
    [ "$(sha256_of "$IMAGE_DIR/sha256/$1")" = "$1" ] || return 0
    vet "$IMAGE_DIR/sha256/$1" "$IMG_FORMAT" "$max_size" "$IMAGE_DIR/sha256/$1" check
    hex=$1
    verified=$1
    write_json "$IMAGE_DIR/names/$name" digest "sha256:$1" source "$shown" fetched_at "$(now)"
    say "$name is sha256:$1, already cached: not downloaded"
}

# ensure_image: the configured image as sha256/<hex>, fetched by one runner while the others wait; into $hex.
ensure_image() {
    resolve
    [ -z "$hex" ] || return 0
    lock 9 "$IMAGE_DIR/locks/name.$name.lock" "another runner is fetching $name; waiting for it"
    resolve
    if [ -z "$hex" ] && [ "${checksum%%:*}" = sha256 ] && [ -f "$IMAGE_DIR/sha256/${checksum#sha256:}" ]; then
        adopt "${checksum#sha256:}"
    fi
    [ -n "$hex" ] || fetch
    unlock 9
}

# claim HEX: record this pet's reference to sha256/HEX under its lock; fails when the base is gone.
claim() {
    lock 8 "$IMAGE_DIR/locks/$1.lock"
    [ -f "$IMAGE_DIR/sha256/$1" ] || { unlock 8; return 1; }
    mkdir -p "$IMAGE_DIR/refs/$1"
    [ -e "$IMAGE_DIR/refs/$1/$pet_id" ] ||
        write_json "$IMAGE_DIR/refs/$1/$pet_id" pet "$pet" volume "$volume" hostname "$NAME" since "$(now)"
    unlock 8
}

# release HEX: remove this pet's reference to sha256/HEX.
release() {
    lock 8 "$IMAGE_DIR/locks/$1.lock"
    rm -f "$IMAGE_DIR/refs/$1/$pet_id"
    unlock 8
}

# --- 3. The pet, bound to its base by its own backing reference IMAGE_DIR/sha256/<hex>. ---
pet=$VM_DIR/$NAME.qcow2
trust=$VM_DIR/.$NAME.qcow2.base.qemu-runner  # this runner's own record: "<hex> <size> <inode> <ctime> <mtime>"
volume=$(cat "$VM_DIR/.podvm-volume" 2>/dev/null || true)
if ! is_hex 16 "$volume"; then
    volume=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
    printf '%s\n' "$volume" > "$VM_DIR/.podvm-volume.$$" && mv "$VM_DIR/.podvm-volume.$$" "$VM_DIR/.podvm-volume" ||
        die 1 "VM_DIR=$VM_DIR: cannot write .podvm-volume"
fi
pet_id=$NAME.$volume
# identity FILE: size, inode, ctime and mtime of FILE, read through an open (NFS revalidates attributes there); fails
# unless FILE is a regular file (never a symbolic link, FIFO or device planted in the shared cache).
identity() {
    [ -f "$1" ] && [ ! -L "$1" ] || return 1
    id=$(exec 7<"$1" && exec stat -L -c '%F|%s %i %.9Z %.9Y' /proc/self/fd/7 2>/dev/null) || return 1
    case $id in "regular file|"*) printf '%s\n' "${id#regular file|}" ;; *) return 1 ;; esac
}

if [ -e "$pet" ]; then
    binding=$(qemu-img info -U -f qcow2 --output=json "$pet" 2>/dev/null | python3 -c '
import json, sys
try:
    info = json.load(sys.stdin)
except ValueError:
    sys.exit("qemu-img info cannot read it")
print(info.get("backing-filename", ""), info.get("backing-filename-format", ""), sep="\n")
' 2>&1) || die 7 "$pet: $binding; not started"
    backing=$(printf '%s\n' "$binding" | sed -n 1p)
    base_format=$(printf '%s\n' "$binding" | sed -n 2p)
    if [ -n "$backing" ]; then
        pet_hex=${backing##*/} repoint=''
        case $backing in
            "$IMAGE_DIR/sha256/$pet_hex") ;;
            */sha256/"$pet_hex") repoint=$backing ;;  # a cache mounted elsewhere before: followed by digest
            *) pet_hex='' ;;
        esac
        is_hex 64 "$pet_hex" ||
            die 7 "$pet: its base $backing is not in $IMAGE_DIR/sha256/ (an old-layout pet: start it once with vmrunner, which migrates it); not started"
        case $base_format in qcow2|raw) ;; *) die 7 "$pet: its base has no explicit format; not started" ;; esac
        base=$IMAGE_DIR/sha256/$pet_hex
        if [ ! -f "$base" ]; then
            say "the base sha256:$pet_hex of $pet is missing; fetching $shown again"
            ensure_image
            [ "$hex" = "$pet_hex" ] ||
                die 7 "$pet: its base sha256:$pet_hex is missing and $shown is now sha256:$hex; not started"
        fi
        # The reference comes first, so gc cannot remove the base while it is being checked.
        claim "$pet_hex" || die 7 "$base: removed while $pet was starting; not started"
        base_id=$(identity "$base") || die 7 "$base: not a regular file; not started"
        resolve
        [ "$hex" = "$pet_hex" ] ||
            say "the configured image $name is ${hex:+sha256:$hex}${hex:-not cached}; $pet keeps its own base sha256:$pet_hex"
        if [ "$VERIFY_BASE" = always ] || [ -n "$repoint" ] || [ "$(cat "$trust" 2>/dev/null || true)" != "$pet_hex $base_id" ]; then
            say "hashing the base sha256:$pet_hex of $pet"
            [ "$(sha256_of "$base")" = "$pet_hex" ] || die 7 "$base: not the bytes $pet was made on (sha256:$pet_hex); not started"
            vet "$base" "$base_format" 4611686018427387904 "$base" check  # a lower IMG_MAX_SIZE never strands a pet
            if [ -n "$repoint" ]; then
                qemu-img rebase -u -f qcow2 -F "$base_format" -b "$base" "$pet" || die 1 "$pet: cannot re-point it to $base"
                say "re-pointed $pet from $repoint to $base (the same digest)"
            fi
            printf '%s %s\n' "$pet_hex" "$base_id" > "$trust.$$" && mv "$trust.$$" "$trust"
        else
            vet "$base" "$base_format" 4611686018427387904 "$base"
        fi
    fi
else
    ensure_image
    claim "$hex" || die 1 "$IMAGE_DIR/sha256/$hex: removed while $pet was being made; try again"
    # Nothing in the shared cache is trusted: a base this run did not verify itself is hashed before a pet is made.
    if [ "$verified" != "$hex" ] && ! { identity "$IMAGE_DIR/sha256/$hex" >/dev/null &&
            [ "$(sha256_of "$IMAGE_DIR/sha256/$hex")" = "$hex" ]; }; then
        say "$IMAGE_DIR/sha256/$hex does not hash to its name; fetching $shown again (a repair)"
        claimed=$hex
        lock 9 "$IMAGE_DIR/locks/name.$name.lock" "another runner is fetching $name; waiting for it"
        fetch
        unlock 9
        [ "$hex" = "$claimed" ] || { release "$claimed"; claim "$hex"; } ||
            die 1 "$IMAGE_DIR/sha256/$hex: removed while $pet was being made; try again"
    fi
    [ "$verified" = "$hex" ] || vet "$IMAGE_DIR/sha256/$hex" "$IMG_FORMAT" "$max_size" "$IMAGE_DIR/sha256/$hex" check
    pet_tmp=$VM_DIR/.$NAME.qcow2.$$.tmp
    qemu-img create -q -f qcow2 -F "$IMG_FORMAT" -b "$IMAGE_DIR/sha256/$hex" "$pet_tmp" ||
        die 1 "VM_DIR=$VM_DIR: cannot create the pet disk"
    printf '%s %s\n' "$hex" "$(identity "$IMAGE_DIR/sha256/$hex" || true)" > "$trust.$$" && mv "$trust.$$" "$trust"
    mv "$pet_tmp" "$pet"
    pet_tmp=''
    say "created pet disk $pet on sha256:$hex"
fi

# --- 4. qemu on the sidecar's tap with the sidecar's MAC; the serial console on stdout. ---
# A VNC password reaches qemu through a pipe on its stdin: never in argv, a file or the log.
display="-display none"
if [ "$VNC" = yes ] && [ -n "$vnc_password" ]; then
    display="-vga std -object secret,id=vncpass,file=/dev/stdin,format=raw -vnc :0,password-secret=vncpass"
elif [ "$VNC" = yes ]; then
    display="-vga std -vnc :0"
    say "WARN VNC on TCP 5900 has no password: anyone who reaches the pod on 5900 gets the VM's screen and keyboard;" \
        "set VNC_PASSWORD_FILE (at most 8 characters) or NO_VNC=true in both containers"
fi
rm -f "$QMP_SOCKET"
stopping=no
trap 'stopping=yes' TERM INT
# shellcheck disable=SC2086  # $display is several words on purpose
printf '%s' "$vnc_password" | "$QEMU" -nodefaults -accel "$ACCEL" -smp "$VM_CPUS" -m "$memory_mib" $display \
    -drive "file=$pet,format=qcow2,if=virtio" \
    -netdev "$netdev" -device "$nic" \
    -serial stdio -monitor none -qmp "unix:$QMP_SOCKET,server=on,wait=off" "$@" &
qemu=$!
say "qemu started (pid $qemu, accel $ACCEL)"

# --- 5. SIGTERM: ACPI power-down over QMP, SHUTDOWN_TIMEOUT for the guest to power off, then a hard stop. ---
status=0
wait "$qemu" || status=$?
if [ "$stopping" = no ]; then
    qemu=''
    [ "$status" -eq 0 ] && { say "the guest powered off"; exit 0; }
    die 5 "qemu exited with status $status"
fi
say "SIGTERM: ACPI power-down, waiting up to ${SHUTDOWN_TIMEOUT:-60s}"
printf '{"execute":"qmp_capabilities"}\n{"execute":"system_powerdown"}\n' |
    socat -t 1 - "UNIX-CONNECT:$QMP_SOCKET" >/dev/null 2>&1 || say "WARN QMP power-down could not be sent"
waited=0
while kill -0 "$qemu" 2>/dev/null; do
    if [ "$waited" -ge "$shutdown_ms" ]; then
        kill -KILL "$qemu" 2>/dev/null || true
        wait "$qemu" 2>/dev/null || true
        qemu=''
        die 6 "the guest did not power off within ${SHUTDOWN_TIMEOUT:-60s}: qemu killed"
    fi
    sleep 0.2
    waited=$((waited + 200))
done
wait "$qemu" 2>/dev/null || true
qemu=''
say "the guest powered off (ACPI)"
exit 0
