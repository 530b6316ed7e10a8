"""The VM's own disk: created once, grown, bound to the exact base it was made on."""
