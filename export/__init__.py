"""gref-serve: export. torch -> ONNX bundle (`build`), parity against torch (`verify`),
item embeddings into Redis (`publish`). The bundle contract lives in contract/bundle.py."""
