"""The export stage's one frozen config."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExportConfig:
    """How `python -m export build` turns a checkpoint into a bundle."""

    # 17: LayerNormalization is one op; 20: so is the tanh GELU, which onnxruntime fuses
    # into one FastGelu kernel (8 elementwise nodes at 17). onnxruntime >= 1.17 runs 20.
    opset: int = 20
    fp16: bool = False  # also write *.fp16.onnx (the GPU path)
    label: str = ""  # human part of the version; "" = today's UTC date, YYYYMMDD
    items_path: str = ""  # items.parquet (model.log_io.write_items); "" = no item table
    item_batch: int = 65_536  # item-tower rows per ORT run when embedding the item table
    check_full: bool = True  # onnx.checker full_check (shape inference) on every graph
    simplify: bool = True  # fold static shape arithmetic (export/simplify.py)
    # the encoder graph also runs the decoder's first (BOS) pass: one onnxruntime call per
    # batch less (k = 10 at n = 4: encoder + 2 decoder calls instead of 3)
    first_pass: bool = True
    # fp32 encoder/decoder attention and residual LayerNorms as onnxruntime's fused
    # com.microsoft kernels (export/fused.py): about half the nodes per graph
    fused_ops: bool = True
    # greedy.onnx (export/greedy.py): the whole fp32 greedy decode in one onnxruntime call,
    # composed from the encoder (needs first_pass) and decoder graphs
    one_call: bool = True

    def __post_init__(self) -> None:
        if self.opset < 17:
            raise ValueError(f"opset={self.opset}: the bundle needs opset 17+")
        if self.item_batch < 1:
            raise ValueError(f"item_batch={self.item_batch} must be >= 1")
