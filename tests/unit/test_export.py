"""export/: the bundle (graphs, manifest, item table, fp16 variant), the shape folding,
and `python -m export build / verify` on a tiny random model (tests/support/bundle.py)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from contract.bundle import (
    GRAPHS,
    GREEDY_INPUTS,
    GREEDY_OUTPUTS,
    LATEST,
    SCHEMA_VERSION,
    graph_file,
    load_bundle,
    sha256_file,
)
from contract.config import ModelConfig
from contract.features import hash_items
from contract.ids import ID_KEY_NAME
from export.__main__ import main as export_main
from export.build import build_bundle, content_hash
from export.config import ExportConfig
from export.graphs import example_inputs, export_graph, graph_module
from export.verify import ParityConfig, verify_bundle
from model.checkpoint import tensors_digest
from model.network import GenReranker
from tests.support.bundle import BUNDLE_CFG as CFG
from tests.support.bundle import N_ITEMS, SCHEMA, make_checkpoint, make_items


def test_bundle_files_manifest_and_latest(tiny_bundle: tuple[Path, GenReranker]) -> None:
    path, _ = tiny_bundle
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["schema_version"] == SCHEMA_VERSION
    assert re.fullmatch(r"test-[0-9a-f]{8}", manifest["version"])
    assert path.name == manifest["version"]
    assert (path.parent / LATEST).read_text().strip() == manifest["version"]
    assert manifest["label"] == "test" and manifest["created"].endswith("Z")
    assert "git" in manifest  # {"commit", "dirty"} in a checkout, None outside one
    assert ModelConfig.from_dict(manifest["model_config"]) == CFG
    assert manifest["model"]["heads"] == 3 and manifest["model"]["dec_layers"] == 2
    assert manifest["model"]["max_candidates"] == 256
    assert manifest["hashing"] == {"name": SCHEMA.hash_name, "salt": SCHEMA.hash_salt,
                                   "id_keys": ID_KEY_NAME}  # fmt: skip
    assert manifest["opset"] >= 17
    assert manifest["training"]["meta"]["valid"]["ndcg@10"] == 0.42
    assert manifest["parity"] is None  # until `verify`
    assert manifest["item_table"]["count"] == N_ITEMS
    expected = {graph_file(g, p) for g in GRAPHS for p in ("fp32", "fp16")}
    expected |= {"item_embeddings.npy", "item_ids.npy", "greedy.onnx"}  # greedy: fp32 only
    assert set(manifest["files"]) == expected
    greedy = manifest["graphs"]["fp32"]["greedy"]
    assert [i["name"] for i in greedy["inputs"]] == GREEDY_INPUTS
    assert [o["name"] for o in greedy["outputs"]] == GREEDY_OUTPUTS
    assert "greedy" not in manifest["graphs"]["fp16"]
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_file(path / name)
        assert entry["size"] == (path / name).stat().st_size
    dec = manifest["graphs"]["fp32"]["decoder"]
    outputs = {o["name"]: o for o in dec["outputs"]}
    assert outputs["head_scores"]["shape"] == ["batch", 3, "candidates"]
    assert manifest["exporter"]["fused_ops"] is True  # the default: com.microsoft kernels
    assert outputs["present.1.value"]["shape"] == ["batch", 2, "past_plus_steps", 8]
    inputs = {i["name"]: i for i in dec["inputs"]}
    assert inputs["past_key_values.0.key"]["shape"] == ["batch", 2, "past", 8]
    assert inputs["tokens"]["dtype"] == "int64" and inputs["cand_mask"]["dtype"] == "bool"
    fp16 = {i["name"]: i for i in manifest["graphs"]["fp16"]["decoder"]["inputs"]}
    assert fp16["z"]["dtype"] == "float16"


def test_onnx_checker_and_model_config_metadata(tiny_bundle: tuple[Path, GenReranker]) -> None:
    path, _ = tiny_bundle
    for name in GRAPHS:
        for precision in ("fp32", "fp16"):
            proto = onnx.load(str(path / graph_file(name, precision)))
            onnx.checker.check_model(proto, full_check=True)
            assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) >= 17
            props = {p.key: p.value for p in proto.metadata_props}
            assert ModelConfig.from_dict(json.loads(props["gref.model_config"])) == CFG
            assert props["gref.graph"] == name and props["gref.precision"] == precision


def test_item_table_is_the_item_tower_of_the_items(
    tiny_bundle: tuple[Path, GenReranker], tmp_path: Path
) -> None:
    path, model = tiny_bundle
    ids, cat, dense = make_items(tmp_path / "again.parquet")
    assert np.load(path / "item_ids.npy", allow_pickle=False).tolist() == ids.tolist()
    emb = np.load(path / "item_embeddings.npy", allow_pickle=False)
    assert emb.dtype == np.float32 and emb.shape == (N_ITEMS, CFG.d_model)
    h = hash_items(SCHEMA, ids, cat, dense)
    with torch.no_grad():
        ref = model.item_tower(*(torch.from_numpy(a) for a in (h.item_id, h.item_cat,
                                                                h.item_dense)))  # fmt: skip
    np.testing.assert_allclose(emb, ref.numpy(), atol=1e-5)


def test_no_items_skips_the_item_table(tmp_path: Path) -> None:
    make_checkpoint(tmp_path / "ckpt")
    path = build_bundle(tmp_path / "ckpt", tmp_path / "art", ExportConfig(label="x"))
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["item_table"]["embeddings"] is None
    assert "no --items" in manifest["item_table"]["skipped"]
    assert not (path / "item_embeddings.npy").exists()
    bundle = load_bundle(path)
    assert bundle.item_embeddings is None and bundle.precisions == ("fp32",)


def test_version_is_a_content_hash(tmp_path: Path) -> None:
    make_checkpoint(tmp_path / "a", seed=0)
    make_checkpoint(tmp_path / "b", seed=1)
    ec = ExportConfig(label="v")
    first = build_bundle(tmp_path / "a", tmp_path / "art", ec)
    again = build_bundle(tmp_path / "a", tmp_path / "art", ec)  # a rebuild replaces it
    other = build_bundle(tmp_path / "b", tmp_path / "art", ec)
    assert first == again and first != other
    assert (tmp_path / "art" / LATEST).read_text().strip() == other.name
    digest = tensors_digest(tmp_path / "a" / "model.safetensors")
    assert first.name == f"v-{content_hash(digest, CFG, ec)}"
    # the same tensors in a file whose header lists its metadata in another order
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(tmp_path / "a" / "model.safetensors"))
    shutil.copytree(tmp_path / "a", tmp_path / "c")
    save_file(tensors, str(tmp_path / "c" / "model.safetensors"),
              metadata={"kind": "gen_reranker", "format": "pt", "note": "re-saved"})  # fmt: skip
    assert build_bundle(tmp_path / "c", tmp_path / "art", ec).name == first.name
    assert not list((tmp_path / "art").glob(".tmp-*"))


@pytest.mark.parametrize("fused_ops", [False, True])
def test_dynamic_axes_first_pass_and_later_passes(tmp_path: Path, fused_ops: bool) -> None:
    """decoder.onnx at shapes it was not traced with: P = 0, T = 1, B = 1, odd M."""
    torch.manual_seed(0)
    model = GenReranker(CFG).eval()
    path = tmp_path / "decoder.onnx"
    export_graph("decoder", model, "fp32", path, 20, {}, fused_ops=fused_ops)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    from tests.support.inputs import make_inputs

    for B, M in ((1, 7), (4, 13)):
        inp = make_inputs(B=B, M=M, seed=B)
        with torch.no_grad():
            enc = model.encode(model.embed_items(inp), inp)
        feeds = {"z": enc.z.numpy(), "bos": enc.bos.numpy(), "cand_mask": inp.cand_mask.numpy()}
        for i, (k, v) in enumerate(enc.cross_kv):
            feeds |= {f"cross.{i}.key": k.numpy(), f"cross.{i}.value": v.numpy()}
        past: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        onnx_past = [np.zeros((B, 2, 0, 8), np.float32)] * 4
        for tokens in (torch.full((B, 1), -1), torch.zeros(B, 3, dtype=torch.long),
                       torch.ones(B, 1, dtype=torch.long)):  # fmt: skip
            start = 0 if past is None else past[0][0].shape[2]
            with torch.no_grad():
                ref, past = model.decode(enc, tokens, past)
            names = [f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
            feeds |= dict(zip(names, onnx_past, strict=True))
            feeds |= {"tokens": tokens.numpy(), "start": np.array([start], np.int64)}
            head, *onnx_past = sess.run(None, feeds)
            np.testing.assert_allclose(head, ref[:, -1].numpy(), atol=1e-5)
            assert onnx_past[0].shape == (B, 2, start + tokens.shape[1], 8)


@pytest.mark.parametrize("graph", ["encoder", "decoder"])
def test_fused_graphs_compute_what_the_plain_ones_do(tmp_path: Path, graph: str) -> None:
    """export/fused.py: onnxruntime's fused attention and residual LayerNorm kernels give
    the plain graph's outputs (the encoder's folded BOS pass included) in fewer nodes."""
    torch.manual_seed(0)
    model = GenReranker(CFG).eval()
    plain = export_graph(graph, model, "fp32", tmp_path / "p.onnx", 20, {}, fused_ops=False)
    fused = export_graph(graph, model, "fp32", tmp_path / "f.onnx", 20, {}, fused_ops=True)
    ops = [n.op_type for n in fused.graph.node]
    assert {"MultiHeadAttention", "SkipLayerNormalization"} <= set(ops)
    assert len(ops) < 0.7 * len(plain.graph.node), (len(ops), len(plain.graph.node))
    assert [i.name for i in fused.graph.input] == [i.name for i in plain.graph.input]
    assert [o.name for o in fused.graph.output] == [o.name for o in plain.graph.output]
    args = example_inputs(model, "fp32")[graph]
    feeds = {i.name: a.numpy() for i, a in zip(plain.graph.input, args, strict=True)}
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    runs = [
        ort.InferenceSession(str(tmp_path / f), opts, providers=["CPUExecutionProvider"]).run(
            None, feeds
        )
        for f in ("p.onnx", "f.onnx")
    ]
    for name, a, b in zip([o.name for o in plain.graph.output], *runs, strict=True):
        np.testing.assert_allclose(b, a, atol=1e-5, err_msg=name)
    # the fp16 (GPU) graphs keep the plain ops
    half = graph_module(graph, model, "fp16", fused_ops=True)
    assert not getattr(half, "fused_ops", True)


def test_shape_folding_keeps_the_math(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = GenReranker(CFG).eval()
    for name in GRAPHS:
        plain = export_graph(name, model, "fp32", tmp_path / "a.onnx", 20, {}, False)
        folded = export_graph(name, model, "fp32", tmp_path / "b.onnx", 20, {}, True)
        # the item tower has no shape arithmetic to fold
        assert len(folded.graph.node) <= len(plain.graph.node) - (name != "item_tower")
        args = example_inputs(model, "fp32")[name]
        names = [i.name for i in plain.graph.input]
        feeds = {n: a.numpy() for n, a in zip(names, args, strict=True)}
        a = ort.InferenceSession(str(tmp_path / "a.onnx"), providers=["CPUExecutionProvider"])
        b = ort.InferenceSession(str(tmp_path / "b.onnx"), providers=["CPUExecutionProvider"])
        for x, y in zip(a.run(None, feeds), b.run(None, feeds), strict=True):
            np.testing.assert_array_equal(x, y)
        with torch.no_grad():
            ref = graph_module(name, model, "fp32")(*args)
        ref = ref if isinstance(ref, tuple) else (ref,)
        np.testing.assert_allclose(b.run(None, feeds)[0], ref[0].numpy(), atol=1e-5)


def test_verify_writes_parity_into_the_manifest(tmp_path: Path) -> None:
    make_checkpoint(tmp_path / "ckpt")
    path = build_bundle(tmp_path / "ckpt", tmp_path / "art", ExportConfig(label="p", fp16=True))
    reports = verify_bundle(path, overrides={"requests": 60, "max_m": 40, "max_k": 12})
    assert set(reports) == {"fp32", "fp16"} and all(r.passed for r in reports.values())
    parity = json.loads((path / "manifest.json").read_text())["parity"]
    assert parity["fp32"]["passed"] and parity["fp32"]["atol"] == 1e-4
    assert parity["fp16"]["atol"] == ParityConfig.for_precision("fp16").atol
    assert parity["fp32"]["requests"] == 60
    load_bundle(path)  # still loads: the manifest rewrite kept every sha256


def test_verify_refuses_other_weights(tmp_path: Path) -> None:
    make_checkpoint(tmp_path / "ckpt")
    make_checkpoint(tmp_path / "other", seed=5)
    path = build_bundle(tmp_path / "ckpt", tmp_path / "art", ExportConfig(label="p"))
    with pytest.raises(Exception, match="weights differ"):
        verify_bundle(path, checkpoint=tmp_path / "other", write=False)


def test_cli_build_and_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "artifacts"
    assert export_main(["build", str(tmp_path / "ckpt"), "--out", str(out), "--label", "cli"]) == 0
    version = (out / LATEST).read_text().strip()
    code = export_main(["verify", str(out / version), "--requests", "40"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "parity fp32: PASSED" in printed and "head scores" in printed


# The structure of the tiny bundle's graphs (nodes, their attributes, inputs and outputs;
# no weights) at the exporter's GRAPH_REVISION. When the exporter's graphs change, bump
# export.build.GRAPH_REVISION (bundles then get a new version) and record the new digest.
GRAPH_STRUCTURE = {2: "c7f6a00cc0377082"}


def graph_structure_digest(path: Path) -> str:
    """sha256 over every graph of a bundle: each node's op, domain, attributes (a tensor
    attribute by its type and shape), input and output names; the graphs' inputs and
    outputs. Initializer values are left out: weights change the version on their own."""
    import hashlib

    def attr(a: onnx.AttributeProto) -> str:
        if a.type == onnx.AttributeProto.GRAPH:
            return f"{a.name}={body(a.g)}"
        if a.type == onnx.AttributeProto.TENSOR:
            return f"{a.name}=tensor{a.t.data_type}{list(a.t.dims)}"
        return f"{a.name}={onnx.helper.get_attribute_value(a)!r}"

    def body(g: onnx.GraphProto) -> str:
        nodes = [f"{n.domain}:{n.op_type}({','.join(n.input)})->({','.join(n.output)})"
                 f"[{';'.join(attr(a) for a in n.attribute)}]" for n in g.node]  # fmt: skip
        io = [v.name for v in g.input] + ["->"] + [v.name for v in g.output]
        return "|".join(io + nodes)

    h = hashlib.sha256()
    for f in sorted(path.glob("*.onnx")):
        h.update(f.name.encode() + body(onnx.load(str(f)).graph).encode())
    return h.hexdigest()[:16]


def test_graph_changes_bump_the_graph_revision(tiny_bundle: tuple[Path, GenReranker]) -> None:
    from export.build import GRAPH_REVISION

    path, _ = tiny_bundle
    digest = graph_structure_digest(path)
    assert GRAPH_STRUCTURE.get(GRAPH_REVISION) == digest, (
        f"the exporter's graphs are {digest} at GRAPH_REVISION {GRAPH_REVISION}: a change "
        "to the graphs bumps export.build.GRAPH_REVISION and records the digest here"
    )
