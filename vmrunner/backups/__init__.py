"""Live backups of the VM's disks as qcow2 chains: planned as data, applied through QMP, restored."""
