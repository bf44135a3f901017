"""cmsync: a streaming sync from segment-membership events on Kafka to Campaign Monitor lists."""

__version__ = "0.1.0"
