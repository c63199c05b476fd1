"""gref-serve: export."""
