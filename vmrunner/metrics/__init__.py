"""The runner's figures and the pod's one metrics endpoint (``METRICS_PORT``, served with prometheus_client).

The runner serves because it is the unprivileged container: a bug in an HTTP server here costs less than in the
sidecar. It reports what it knows itself (the VM's state, qemu's CPU and memory from /proc, block I/O from QMP
``query-blockstats``, the image fetch, the pet's boots and past shutdowns) and adds the network figures the sidecar
hands over in ``RUN_DIR`` (read bounded and checked, see :mod:`shared.figures`).

:func:`vmrunner.metrics.sources.gather` is the one source: the endpoint calls it at every scrape and
``vmrunner status`` prints its result.
The ``run`` process keeps its state in ``RUN_DIR/vmrunner-state.json`` so that ``status`` (another process) sees the
same figures; queries go to qemu's second QMP monitor, ``status.sock``, so a scrape never delays the shutdown.
Nothing secret is reported: the image by its cache name and digest, never ``IMG_SOURCE`` (which may hold
credentials).
"""
