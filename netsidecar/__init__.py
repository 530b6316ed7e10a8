"""The privileged network sidecar: bridge, tap, nftables 1:1 NAT and DHCP that let a VM assume the pod's IP."""
