#!/bin/sh
# Run by acpid on the ACPI power button (qemu's system_powerdown): a clean, logged shutdown.
echo "podvm-guest: ACPI power button, shutting down" > /dev/console
sync
umount /mnt/boot 2>/dev/null
umount /mnt/config 2>/dev/null
echo "podvm-guest: disk unmounted, powering off" > /dev/console
poweroff -f
