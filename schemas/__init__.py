"""The event schemas, installed as the package ``consumer.schemas`` (see pyproject.toml).

This folder is the single source of truth the contract names; the package exists only so that
the schema ships in the wheel and is read with ``importlib.resources`` wherever it is installed.
"""
