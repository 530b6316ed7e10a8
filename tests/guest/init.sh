#!/bin/busybox sh
# The tiny test guest's /init: it reports on its serial console and over HTTP what the pod's network and the
# config drive gave it, so end-to-end tests can assert on plain key=value lines.

/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mkdir -p /proc /sys /dev /tmp /run /etc /www /mnt/boot /mnt/config
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "podvm-guest: booted"

for module in $(cat /lib/modules/order); do
    insmod "/lib/modules/$module.ko" || echo "podvm-guest: module $module failed"
done

# Devices appear asynchronously after their drivers load: wait up to ~5 s for a label to show up.
# Prints "LABEL DEVICE" for the first label found.
find_label() {
    for _ in $(seq 50); do
        for label in "$@"; do
            dev=$(findfs "LABEL=$label" 2>/dev/null) && { echo "$label $dev"; return 0; }
        done
        sleep 0.1
    done
    return 1
}

# Persistence: a counter on the guest's own boot disk, so a test sees whether the pet disk survived a restart.
counter=unknown
if found=$(find_label PODVMBOOT); then
    if mount -t vfat -o rw "${found#* }" /mnt/boot; then
        counter=$(( $(cat /mnt/boot/counter 2>/dev/null || echo 0) + 1 ))
        echo "$counter" > /mnt/boot/counter
        sync
    fi
fi
echo "podvm-guest: boot counter=$counter"

# The config drive, found by its label as cloud-init finds it.
drive_label=none drive_dev=none hostname_md= uuid= user_data=absent
if found=$(find_label config-2 cidata); then
    drive_label=${found% *} drive_dev=${found#* }
    if mount -t iso9660 -o ro "$drive_dev" /mnt/config; then
        md=/mnt/config/openstack/latest/meta_data.json
        if [ -f "$md" ]; then
            hostname_md=$(grep -o '"hostname": *"[^"]*"' "$md" | sed 's/.*"\([^"]*\)"$/\1/')
            uuid=$(grep -o '"uuid": *"[^"]*"' "$md" | sed 's/.*"\([^"]*\)"$/\1/')
            [ -f /mnt/config/openstack/latest/user_data ] && user_data=present
        elif [ -f /mnt/config/meta-data ]; then
            hostname_md=$(sed -n 's/^local-hostname: *//p' /mnt/config/meta-data)
            uuid=$(sed -n 's/^instance-id: *//p' /mnt/config/meta-data)
            [ -f /mnt/config/user-data ] && user_data=present
        fi
    fi
fi
echo "podvm-guest: config drive label=$drive_label device=$drive_dev hostname=$hostname_md user_data=$user_data"
[ -n "$hostname_md" ] && hostname "$hostname_md"

# The power button works from here on, also while DHCP is still retrying.
mkdir -p /var/log
acpid -c /etc/acpi -l /var/log/acpid.log || echo "podvm-guest: acpid failed"

ip link set lo up
ip link set eth0 up
udhcpc -i eth0 -s /etc/udhcpc.script -O search -O mtu -t 30 -T 1 -A 1 -n \
    || echo "podvm-guest: DHCP failed"
. /run/dhcp.env 2>/dev/null

cat > /www/index.html <<EOF
hostname=$hostname_md
uuid=$uuid
ip=$ip
prefix_mask=$subnet
gateway=$router
dns=$dns
search=$search
mtu=$mtu
dhcp_hostname=$dhcp_hostname
counter=$counter
user_data=$user_data
config_drive_label=$drive_label
EOF

# Known amounts of traffic and disk writes on request, for the metrics tests: /cgi-bin/bytes?KIB sends KIB KiB,
# /cgi-bin/sink reads the request body and says how many bytes arrived, /cgi-bin/write?KIB writes KIB KiB to the
# boot disk and flushes them. KIB is digits only, at most 8192.
mkdir -p /www/cgi-bin
cat > /www/cgi-bin/kib <<'EOF'
kib=${QUERY_STRING:-0}
case $kib in ''|*[!0-9]*) kib=0 ;; esac
[ "$kib" -gt 8192 ] && kib=8192
EOF
cat > /www/cgi-bin/bytes <<'EOF'
#!/bin/sh
. /www/cgi-bin/kib
printf 'Content-Type: application/octet-stream\r\n\r\n'
dd if=/dev/zero bs=1024 count="$kib" 2>/dev/null
EOF
cat > /www/cgi-bin/sink <<'EOF'
#!/bin/sh
n=$(head -c "${CONTENT_LENGTH:-0}" | wc -c)
printf 'Content-Type: text/plain\r\n\r\nreceived=%s\n' "$n"
EOF
cat > /www/cgi-bin/write <<'EOF'
#!/bin/sh
. /www/cgi-bin/kib
dd if=/dev/zero of=/mnt/boot/scratch bs=1024 count="$kib" conv=fsync 2>/dev/null && sync
printf 'Content-Type: text/plain\r\n\r\nwrote=%s\n' "$(wc -c < /mnt/boot/scratch)"
EOF
chmod +x /www/cgi-bin/bytes /www/cgi-bin/sink /www/cgi-bin/write

# ---- crash safety (tests/e2e/test_crash_safety.py) ----------------------------------------------------------
# /cgi-bin/pattern?KIB writes KIB KiB of random bytes to /mnt/boot/pattern, flushes them (fsync, then sync) and only
# then answers their sha256: data the guest flushed, which must survive any kill. At boot the page reports the
# checksum of what is on the disk (pattern_sha256=, "none" without a pattern). /cgi-bin/churn starts writing to
# /mnt/boot/churn without end, so a kill lands in the middle of writes; /cgi-bin/fill?KIB writes KIB KiB of random
# bytes to a new file (the disk must grow) and answers once they are flushed.
pattern_sha256=none
[ -f /mnt/boot/pattern ] && pattern_sha256=$(sha256sum /mnt/boot/pattern | cut -d' ' -f1)
echo "pattern_sha256=$pattern_sha256" >> /www/index.html
echo "podvm-guest: pattern_sha256=$pattern_sha256"
cat > /www/cgi-bin/pattern <<'EOF'
#!/bin/sh
. /www/cgi-bin/kib
dd if=/dev/urandom of=/mnt/boot/pattern bs=1024 count="$kib" conv=fsync 2>/dev/null && sync
printf 'Content-Type: text/plain\r\n\r\npattern_sha256=%s\n' "$(sha256sum /mnt/boot/pattern | cut -d' ' -f1)"
EOF
cat > /www/cgi-bin/churn <<'EOF'
#!/bin/sh
( while true; do dd if=/dev/urandom of=/mnt/boot/churn bs=64k count=32 conv=fsync 2>/dev/null; done ) \
    </dev/null >/dev/null 2>&1 &
printf 'Content-Type: text/plain\r\n\r\nchurning=1\n'
EOF
cat > /www/cgi-bin/fill <<'EOF'
#!/bin/sh
. /www/cgi-bin/kib
file=$(mktemp /mnt/boot/fillXXXXXX)
dd if=/dev/urandom of="$file" bs=1024 count="$kib" conv=fsync 2>/dev/null && sync
printf 'Content-Type: text/plain\r\n\r\nfilled=%s\n' "$(wc -c < "$file")"
EOF
# /cgi-bin/ramfill?MIB fills MIB MiB of the guest's RAM with non-zero pages (a tmpfs of its own; qemu's migration
# stream skips zero pages only), so a saved state is as large as a busy guest's.
cat > /www/cgi-bin/ramfill <<'EOF'
#!/bin/sh
mib=${QUERY_STRING:-0}
case $mib in ''|*[!0-9]*) mib=0 ;; esac
mkdir -p /ram && { grep -q ' /ram ' /proc/mounts || mount -t tmpfs -o size=95% tmpfs /ram; }
head -c 1048576 /dev/urandom > /ram/block
i=0; while [ "$i" -lt "$mib" ]; do cat /ram/block; i=$((i + 1)); done > /ram/fill
printf 'Content-Type: text/plain\r\n\r\nfilled=%s\n' "$(wc -c < /ram/fill)"
EOF
chmod +x /www/cgi-bin/pattern /www/cgi-bin/churn /www/cgi-bin/fill /www/cgi-bin/ramfill
# ---- end of crash safety --------------------------------------------------------------------------------------
# ---- Known data for the backup tests (one block) ----------------------------------------------------------------
# /cgi-bin/put?NAME writes 256 KiB of the line "podvm-data NAME" to data/NAME on the boot disk and flushes it (NAME:
# 1-16 lower-case letters and digits); /cgi-bin/files lists every data file as NAME:MD5, and the page does at boot
# (data=...), so a test restoring a backup sees exactly which writes the disk holds.
mkdir -p /mnt/boot/data
cat > /www/cgi-bin/files <<'EOF'
#!/bin/sh
for f in /mnt/boot/data/*; do
    [ -f "$f" ] && printf '%s:%s,' "${f##*/}" "$(md5sum < "$f" | cut -d' ' -f1)"
done
EOF
cat > /www/cgi-bin/put <<'EOF'
#!/bin/sh
name=$QUERY_STRING
case $name in ''|*[!a-z0-9]*) printf 'Status: 400\r\nContent-Type: text/plain\r\n\r\nbad name\n'; exit 0 ;; esac
[ ${#name} -gt 16 ] && { printf 'Status: 400\r\nContent-Type: text/plain\r\n\r\nname too long\n'; exit 0; }
yes "podvm-data $name" | head -c 262144 > /mnt/boot/data/.tmp && sync \
    && mv /mnt/boot/data/.tmp "/mnt/boot/data/$name" && sync
printf 'Content-Type: text/plain\r\n\r\nput=%s\n' "$name"
EOF
chmod +x /www/cgi-bin/files /www/cgi-bin/put
echo "data=$(/bin/sh /www/cgi-bin/files)" >> /www/index.html
# qemu-guest-agent on its virtio-serial port (found by name: no udev here), so a backup can freeze the file systems.
agent_port=
for port in /sys/class/virtio-ports/*; do
    [ "$(cat "$port/name" 2>/dev/null)" = org.qemu.guest_agent.0 ] && agent_port=/dev/${port##*/}
done
# FAT, the boot disk's file system, cannot be frozen: a small ext2 in RAM (on a loop device) gives the agent one that
# can. /cgi-bin/agent?stop stops the agent (SIGSTOP: it holds its port and never answers), ?cont resumes it.
dd if=/dev/zero of=/run/freezable.img bs=1M count=4 2>/dev/null && losetup /dev/loop0 /run/freezable.img \
    && mke2fs -q /dev/loop0 >/dev/null && mkdir -p /mnt/freezable && mount -t ext2 /dev/loop0 /mnt/freezable \
    || echo "podvm-guest: no ext2"
cat > /www/cgi-bin/agent <<'EOF'
#!/bin/sh
case $QUERY_STRING in stop) kill -STOP "$(cat /run/qga.pid)" ;; cont) kill -CONT "$(cat /run/qga.pid)" ;; esac
printf 'Content-Type: text/plain\r\n\r\nagent=%s\n' "$QUERY_STRING"
EOF
chmod +x /www/cgi-bin/agent
if [ -n "$agent_port" ]; then
    mkdir -p /var/run
    qemu-ga -d -m virtio-serial -p "$agent_port" -t /run -f /run/qga.pid -l /var/log/qga.log \
        && echo "podvm-guest: agent on $agent_port" || echo "podvm-guest: agent failed"
else
    echo "podvm-guest: no agent port"
fi
# ---- end of the backup tests' block ------------------------------------------------------------------------------

# ---- UEFI and TPM (tests/e2e/test_uefi.py, one block) ----------------------------------------------------------
# The page reports the firmware (uefi or bios), Secure Boot's state (1 on, 0 off), the test variables PodvmX the
# guest keeps in its firmware's store (efivars=A:value,B:value; "none" without any), the TPM's major version (tpm=,
# "none") and what the RTC read (rtc=HH:MM:SS). /cgi-bin/efivar?X.VALUE (X one capital letter, VALUE 1-16 lower-case
# letters and digits) writes the variable PodvmX once: busybox has no chattr, and an existing variable stays
# immutable. /cgi-bin/tpm?HEX sends one raw TPM command to /dev/tpm0 and answers the response in hex.
firmware=bios secure_boot=none efivars=none tpm=none
if [ -d /sys/firmware/efi ]; then
    firmware=uefi
    mount -t efivarfs efivarfs /sys/firmware/efi/efivars || echo "podvm-guest: no efivarfs"
    sb=/sys/firmware/efi/efivars/SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c
    [ -f "$sb" ] && secure_boot=$(tail -c 1 "$sb" | od -An -tu1 | tr -d ' ')
    found=
    for var in /sys/firmware/efi/efivars/Podvm?-6a1c5b2e-2f0f-4f7e-9d35-0c8b7f0d9a11; do
        [ -f "$var" ] || continue
        name=${var#/sys/firmware/efi/efivars/Podvm}
        found="$found${found:+,}${name%%-*}:$(tail -c +5 "$var")"
    done
    efivars=${found:-none}
fi
rtc=$(cat /sys/class/rtc/rtc0/time 2>/dev/null || echo none)
[ -e /sys/class/tpm/tpm0 ] && tpm=$(cat /sys/class/tpm/tpm0/tpm_version_major 2>/dev/null || echo unknown)
printf 'firmware=%s\nsecure_boot=%s\nefivars=%s\ntpm=%s\nrtc=%s\n' "$firmware" "$secure_boot" "$efivars" "$tpm" "$rtc" \
    >> /www/index.html
echo "podvm-guest: firmware=$firmware secure_boot=$secure_boot efivars=$efivars tpm=$tpm"
cat > /www/cgi-bin/efivar <<'EOF'
#!/bin/sh
name=${QUERY_STRING%%.*} value=${QUERY_STRING#*.}
bad() { printf 'Status: 400\r\nContent-Type: text/plain\r\n\r\n%s\n' "$1"; exit 0; }
case $name in [A-Z]) ;; *) bad "bad name" ;; esac
case $value in ''|*[!a-z0-9]*) bad "bad value" ;; esac
[ ${#value} -gt 16 ] && bad "value too long"
var=/sys/firmware/efi/efivars/Podvm$name-6a1c5b2e-2f0f-4f7e-9d35-0c8b7f0d9a11
# One write: attributes (non-volatile, boot and run time access) and the value.
printf '\007\000\000\000%s' "$value" > "/tmp/efivar.$name"
cat "/tmp/efivar.$name" > "$var" && result=$(tail -c +5 "$var") || result=failed
printf 'Content-Type: text/plain\r\n\r\nefivar=%s\n' "$result"
EOF
cat > /www/cgi-bin/tpm <<'EOF'
#!/bin/sh
hex=$QUERY_STRING
case $hex in ''|*[!0-9a-f]*) printf 'Status: 400\r\nContent-Type: text/plain\r\n\r\nbad command\n'; exit 0 ;; esac
exec 3<>/dev/tpm0
printf "$(echo "$hex" | sed 's/../\\x&/g')" >&3
response=$(dd bs=4096 count=1 <&3 2>/dev/null | od -An -tx1 -v | tr -d ' \n')
printf 'Content-Type: text/plain\r\n\r\nresponse=%s\n' "$response"
EOF
chmod +x /www/cgi-bin/efivar /www/cgi-bin/tpm
# ---- end of UEFI and TPM ------------------------------------------------------------------------------------------

# ---- RAM only (tests/e2e/test_suspend.py, one block) --------------------------------------------------------------
# /cgi-bin/ram?VALUE keeps VALUE in RAM only (a file on the initramfs) and /cgi-bin/ram reads it back with what
# only a boot changes: the kernel's boot_id, and the uptime, which goes on across a suspend and resume.
cat > /www/cgi-bin/ram <<'EOF'
#!/bin/sh
case $QUERY_STRING in *[!a-z0-9]*) printf 'Status: 400\r\nContent-Type: text/plain\r\n\r\nbad value\n'; exit 0 ;; esac
[ -n "$QUERY_STRING" ] && echo "$QUERY_STRING" > /run/ram-marker
printf 'Content-Type: text/plain\r\n\r\nram=%s\nboot_id=%s\nuptime=%s\n' "$(cat /run/ram-marker 2>/dev/null)" \
    "$(cat /proc/sys/kernel/random/boot_id)" "$(cut -d' ' -f1 /proc/uptime)"
EOF
chmod +x /www/cgi-bin/ram
# ---- end of RAM only -----------------------------------------------------------------------------------------------

# ---- CD-ROMs (tests/e2e/test_cdrom.py, one block) -------------------------------------------------------------
# /cgi-bin/cdroms reads each CD-ROM drive's ISO 9660 volume label from the disc itself at every call (sector 16,
# bytes 40-71, past the page cache), so a disc changed on the running VM shows: cdroms=sr0:config-2,sr1:LABEL
# ("-" for a drive without a disc).
cat > /www/cgi-bin/cdroms <<'EOF'
#!/bin/sh
found=
for dev in /dev/sr*; do
    [ -b "$dev" ] || continue
    label=$(dd if="$dev" bs=2048 skip=16 count=1 iflag=direct 2>/dev/null | dd bs=1 skip=40 count=32 2>/dev/null \
        | tr -d ' ')
    found="$found${found:+,}${dev#/dev/}:${label:--}"
done
printf 'Content-Type: text/plain\r\n\r\ncdroms=%s\n' "$found"
EOF
chmod +x /www/cgi-bin/cdroms
# ---- end of CD-ROMs -------------------------------------------------------------------------------------------

# ---- Data disks (tests/e2e/test_data_disks.py, one block) --------------------------------------------------------
# Each disk is found by the serial qemu gives it (/sys/block/*/serial: no udev here, so no /dev/disk/by-id).
# /cgi-bin/disks lists every disk with a serial and the marker in its first sector, read past the page cache:
# disks=db:VALUE,share:VALUE ("-" without a marker); /cgi-bin/mark?SERIAL.VALUE writes "podvm-mark VALUE" there and
# flushes it (VALUE: 1-16 lower-case letters and digits); /cgi-bin/diskfill?SERIAL.KIB writes KIB KiB of random
# bytes after the disk's first MiB and flushes them (filled=BYTES), so a data disk can fill its volume.
cat > /www/cgi-bin/serial <<'EOF'
for block in /sys/block/*; do
    [ "$(cat "$block/serial" 2>/dev/null)" = "$1" ] && { echo "/dev/${block##*/}"; exit 0; }
done
exit 1
EOF
cat > /www/cgi-bin/disks <<'EOF'
#!/bin/sh
found=
for block in /sys/block/*; do
    serial=$(cat "$block/serial" 2>/dev/null) && [ -n "$serial" ] || continue
    mark=$(dd if="/dev/${block##*/}" bs=512 count=1 iflag=direct 2>/dev/null | tr -d '\000' | head -n 1)
    case $mark in "podvm-mark "*) mark=${mark#podvm-mark } ;; *) mark=- ;; esac
    found="$found${found:+,}$serial:$mark"
done
printf 'Content-Type: text/plain\r\n\r\ndisks=%s\n' "$found"
EOF
cat > /www/cgi-bin/mark <<'EOF'
#!/bin/sh
serial=${QUERY_STRING%%.*} value=${QUERY_STRING#*.}
bad() { printf 'Status: 400\r\nContent-Type: text/plain\r\n\r\n%s\n' "$1"; exit 0; }
case $value in ''|*[!a-z0-9]*) bad "bad value" ;; esac
[ ${#value} -gt 16 ] && bad "value too long"
dev=$(sh /www/cgi-bin/serial "$serial") || bad "no such disk"
printf 'podvm-mark %s\n' "$value" | dd of="$dev" bs=512 count=1 conv=sync,fsync 2>/dev/null && sync
printf 'Content-Type: text/plain\r\n\r\nmark=%s:%s\n' "$serial" "$value"
EOF
cat > /www/cgi-bin/diskfill <<'EOF'
#!/bin/sh
serial=${QUERY_STRING%%.*} kib=${QUERY_STRING#*.}
bad() { printf 'Status: 400\r\nContent-Type: text/plain\r\n\r\n%s\n' "$1"; exit 0; }
case $kib in ''|*[!0-9]*) bad "bad size" ;; esac
dev=$(sh /www/cgi-bin/serial "$serial") || bad "no such disk"
dd if=/dev/urandom of="$dev" bs=1024 seek=1024 count="$kib" conv=fsync 2>/dev/null && sync
printf 'Content-Type: text/plain\r\n\r\nfilled=%s\n' "$((kib * 1024))"
EOF
chmod +x /www/cgi-bin/disks /www/cgi-bin/mark /www/cgi-bin/diskfill
# ---- end of data disks -------------------------------------------------------------------------------------------

httpd -h /www -p 80

# --- consoles: a shell on the serial port and one on the screen (tty1), each restarted when it exits, so a line
# typed into either console gets an answer (the browser console tests). ---
for tty in ttyS0 tty1; do
    (while true; do setsid -c sh -i </dev/$tty >/dev/$tty 2>&1; sleep 1; done) &
done
# --- end of consoles ---

echo "podvm-guest: ready ip=$ip"
while true; do sleep 3600; done
