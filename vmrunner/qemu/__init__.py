"""Drivers for qemu's own interfaces: its monitor (QMP). Every layer may use them; they use nothing of podvm's."""
