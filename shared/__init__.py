"""What the network sidecar and the VM runner agree on: configuration, errors, logging and the handshake.

Neither container imports the other; both import this package.
"""
