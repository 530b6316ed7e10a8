"""Namespace tier: the bed fixtures come from tests.netbed."""

pytest_plugins = ["tests.netbed"]
