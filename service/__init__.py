"""gref-serve: service."""
