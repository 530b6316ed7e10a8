"""The shared, content-addressed cache of base images (docs/runner-contract.md, "The image cache").

Bases live under ``sha256/<hex>`` and are never written again; ``names/<name>`` says which digest a configured image
means now; ``refs/<hex>/<pet-id>`` keeps a base alive while a pet is made on it; ``locks/`` serialises downloads and
references across pods and nodes. Nothing here is trusted when a pet starts: every pod shares the cache's uid, so the
pet's own volume keeps the record its start is checked against (see ``vmrunner.pet.binding``).
"""
