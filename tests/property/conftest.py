"""The property tier's Hypothesis profiles: derandomized (the same examples on every run and machine), bounded, no
example database on disk, so the tier takes seconds and a failure reproduces exactly. ``PODVM_HYPOTHESIS=thorough``
runs many more examples (a few minutes) after a parser changes."""

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "podvm",
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=False,
    max_examples=100,
)
settings.register_profile("thorough", settings.get_profile("podvm"), max_examples=1000)
settings.load_profile(os.environ.get("PODVM_HYPOTHESIS", "podvm"))
