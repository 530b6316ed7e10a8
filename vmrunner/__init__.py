"""The unprivileged VM runner: image cache, pet overlay, config drive and qemu on the sidecar's tap."""
