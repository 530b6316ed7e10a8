"""Running the VM: the run plan, qemu's argv, the config drive, the supervisor and what lives beside qemu."""
