"""Integrations with other frameworks (``rpc_tasks.contrib.django``)."""
