"""Django tests run with ``--ds=project.test_settings`` (see the Makefile's ``test`` target)."""

pytest_plugins = ["rpc_tasks.testing"]
