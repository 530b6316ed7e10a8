"""Fixtures every tier may use: the namespace test bed's ``bed_factory`` comes from tests.netbed."""

pytest_plugins = ["tests.netbed"]
