"""gref-serve: model."""
