"""Campaign Monitor: the async API client and a faithful local simulator."""
