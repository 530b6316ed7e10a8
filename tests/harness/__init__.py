"""The one test harness every tier and the benchmarks use; fixtures stay in the tiers' ``conftest.py`` files.

- ``paths``: where the repository, the project's commands and the component entry points are.
- ``wait``: ``until`` polls a condition with a deadline (the one wait helper).
- ``ids``: ``fresh_id`` gives each test bed an id unique in this process and across concurrent processes.
- ``netbed``: network namespaces wired like a cluster node, the real sidecar, a VM stand-in (its docstring).
- ``pod``: processes, the runner as uid 10001 in a pod, the runner's environment (``runner_env``), guest checks.
- ``scenario``: ``pod_scenario``, the whole pod (bed, sidecar, image server, volumes, runners, teardown, logs).
- ``httpserver``: an image server of our own that can lie the ways image servers lie.
- ``samples``, ``strategies``: sample data and Hypothesis strategies; ``portforward``, ``rfb``, ``taprelay``:
  a kubectl port-forward stand-in, a VNC viewer's login, the relay behind the sidecar's tap.
"""
