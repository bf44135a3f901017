"""cmsync: a streaming sync from segment-membership events on Kafka to Campaign Monitor lists."""

# The one place the version is written: pyproject.toml reads it (dynamic version), and so do
# `cmsync --version` and the installed package's metadata.
__version__ = "0.1.0"
