"""gref-serve: loadtest."""
