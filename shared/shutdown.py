"""The pod's shutdown budget, the one place both containers and the manifests take it from.

On SIGTERM the runner gives the guest ``SHUTDOWN_TIMEOUT`` to power off through ACPI, then stops qemu hard within
:data:`HARD_STOP_GRACE`. With ``ON_STOP=suspend`` it first tries to save the VM for up to ``SUSPEND_TIMEOUT``, and
falls back to that shutdown when the save fails: :func:`stop_budget` is the sum. The guest needs its network all
that time (a database flushing to a remote peer, an NFS unmount), so the sidecar, which gets SIGTERM at the same
moment in a plain Pod, reads the same settings and keeps the network while the VM holds its tap for up to
:func:`network_hold` of that budget, then needs :data:`TEARDOWN_GRACE` to remove what it made. The pod's
``terminationGracePeriodSeconds`` must be at least :func:`grace_period`; a test checks every manifest against it.
"""

import math

from shared.env import Env

SHUTDOWN_TIMEOUT = 60.0  # default seconds the guest gets to power off after the ACPI button
SUSPEND_TIMEOUT = 30.0  # default seconds a save (ON_STOP=suspend) may take before the guest is shut down instead
ON_STOP = ("shutdown", "suspend")
QUIT_TIMEOUT = 1.0  # seconds qemu's monitor gets to answer ``quit`` once SHUTDOWN_TIMEOUT is over
QUIT_GRACE = 5.0  # seconds qemu gets to exit after ``quit`` or SIGTERM before it is killed
HARD_STOP_GRACE = QUIT_TIMEOUT + QUIT_GRACE  # after SHUTDOWN_TIMEOUT, qemu is gone within this
TEARDOWN_GRACE = 10.0  # seconds the sidecar may take to stop dnsmasq and remove its rules and links


def shutdown_timeout(env: Env) -> float:
    """``SHUTDOWN_TIMEOUT``, read the same way by both containers."""
    return env.duration("SHUTDOWN_TIMEOUT", SHUTDOWN_TIMEOUT)


def on_stop(env: Env) -> str:
    """``ON_STOP``: what SIGTERM does to the VM, ``shutdown`` (ACPI) or ``suspend`` (saved, resumed next start)."""
    return env.choice("ON_STOP", "shutdown", ON_STOP)


def suspend_timeout(env: Env) -> float:
    """``SUSPEND_TIMEOUT``: how long a save may take before the guest runs again and is shut down."""
    return env.duration("SUSPEND_TIMEOUT", SUSPEND_TIMEOUT)


def stop_budget(env: Env) -> float:
    """Longest the runner's stop takes before its hard stop: a save that fails at its deadline, then the shutdown."""
    budget = shutdown_timeout(env)
    return budget + suspend_timeout(env) if on_stop(env) == "suspend" else budget


def network_hold(timeout: float) -> float:
    """Longest the sidecar keeps the network after SIGTERM while the VM holds its tap, for a runner whose stop
    takes ``timeout`` (:func:`stop_budget`): until qemu is surely gone."""
    return timeout + HARD_STOP_GRACE


def grace_period(timeout: float) -> int:
    """The smallest ``terminationGracePeriodSeconds`` under which neither container is killed before it is done."""
    return math.ceil(network_hold(timeout) + TEARDOWN_GRACE)
