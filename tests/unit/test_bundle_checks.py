"""What the bundle's producers and its loader refuse: `build --verify` moves `latest` only
after parity passed; load_bundle refuses a failed parity, a malformed manifest, an unknown
id hash and a bad item table, each with a BundleError naming the field or file; `publish`
refuses a table that overflows float16 and writes to a Redis Cluster with --cluster; a
checkpoint's loaders name the file they cannot read."""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from contract.bundle import LATEST, BundleError, load_bundle, read_manifest, sha256_file
from contract.config import ModelConfig
from contract.ids import ID_KEY_NAME
from export.__main__ import main as export_main
from export.publish import PublishError, publish_arrays, publish_bundle
from export.verify import ParityReport, verify_bundle
from model.checkpoint import load_checkpoint, load_train_state, read_config, save_train_state
from model.network import GenReranker
from service.settings import Settings
from tests.support.bundle import BUNDLE_CFG as CFG
from tests.support.bundle import make_checkpoint

Manifest = dict[str, Any]


@pytest.fixture
def bundle_copy(tiny_bundle: tuple[Path, GenReranker], tmp_path: Path) -> Path:
    dst = tmp_path / tiny_bundle[0].name
    shutil.copytree(tiny_bundle[0], dst)
    return dst


def edit_manifest(path: Path, fn: Callable[[Manifest], object]) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    fn(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def replace_file(path: Path, name: str, array: np.ndarray) -> None:
    """Write `name` and give the manifest its new sha256 and size (so only the content is
    wrong, not the checksum)."""
    np.save(path / name, array, allow_pickle=False)
    entry = {"sha256": sha256_file(path / name), "size": (path / name).stat().st_size}
    edit_manifest(path, lambda m: m["files"].update({name: entry}))


def fake_parity(passed: bool) -> Callable[..., ParityReport]:
    """run_parity's stand-in: a report that passed or failed, at once."""

    def run(model: Any, engine: Any, pc: Any) -> ParityReport:
        report = ParityReport(pc.precision, 1, 1, 2, 1, [1], min_agreement=pc.min_agreement)
        report.lists_equal, report.failures = (1, 0) if passed else (0, 1)
        return report

    return run


# ---- 1. an unverified or failed bundle never becomes `latest`, never loads ----------------


def test_build_verify_moves_latest_only_after_parity_passed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "artifacts"
    make_checkpoint(tmp_path / "old", seed=0)
    make_checkpoint(tmp_path / "new", seed=1)
    assert export_main(["build", str(tmp_path / "old"), "--out", str(out), "--label", "a"]) == 0
    old = (out / LATEST).read_text().strip()
    new_build = ["build", str(tmp_path / "new"), "--out", str(out), "--label", "a", "--verify"]

    monkeypatch.setattr("export.verify.run_parity", fake_parity(passed=False))
    assert export_main(new_build) == 1
    assert (out / LATEST).read_text().strip() == old
    err = capsys.readouterr().err
    assert "parity FAILED for fp32" in err and f"not moved (still names {old})" in err
    failed = [p for p in out.iterdir() if p.is_dir() and p.name != old]
    assert len(failed) == 1  # kept for inspection, with its parity recorded
    with pytest.raises(BundleError, match=r"manifest\.json: parity FAILED for fp32"):
        load_bundle(failed[0])

    monkeypatch.setattr("export.verify.run_parity", fake_parity(passed=True))
    assert export_main(new_build) == 0
    assert (out / LATEST).read_text().strip() == failed[0].name
    load_bundle(failed[0])


def test_a_failed_parity_is_refused_and_can_be_verified_again(bundle_copy: Path) -> None:
    edit_manifest(bundle_copy, lambda m: m.update(parity={"fp32": {"passed": True},
                                                          "fp16": {"passed": False}}))  # fmt: skip
    with pytest.raises(BundleError, match=r"parity FAILED for fp16 .*\(refused\)"):
        load_bundle(bundle_copy)
    with pytest.raises(BundleError, match="parity FAILED"):
        publish_bundle(bundle_copy, "redis://127.0.0.1:1")  # refused before any connection
    # `verify` measures it again (its own load does not refuse), and records the new result
    reports = verify_bundle(bundle_copy, precisions=["fp16"],
                            overrides={"requests": 20, "max_m": 20, "max_k": 8})  # fmt: skip
    assert reports["fp16"].passed
    load_bundle(bundle_copy)


def test_verify_names_a_manifest_without_its_source(bundle_copy: Path) -> None:
    edit_manifest(bundle_copy, lambda m: m.pop("source"))
    with pytest.raises(BundleError, match=r"manifest\.json: source\.weights_sha256 missing"):
        verify_bundle(bundle_copy, write=False)


def test_a_never_verified_bundle_loads_with_one_warning(
    bundle_copy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="contract.bundle"):
        load_bundle(bundle_copy)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "parity never verified for fp32, fp16" in warnings[0]
    caplog.clear()
    edit_manifest(bundle_copy, lambda m: m.update(parity={"fp32": {"passed": True},
                                                          "fp16": {"passed": True}}))  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="contract.bundle"):
        load_bundle(bundle_copy)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# ---- 2. a malformed manifest: BundleError naming the field -------------------------------


def _drop(d: dict[str, Any], key: str) -> None:
    del d[key]


MALFORMED: list[tuple[str, Callable[[Manifest], object], str]] = [
    ("version", lambda m: m.update(version=3), r"version: 3, want a non-empty string"),
    ("graph", lambda m: m["graphs"]["fp32"].update(decoder="x"), r"graphs\.fp32\.decoder: 'x'"),
    ("graph file", lambda m: _drop(m["graphs"]["fp32"]["encoder"], "file"),
     r"graphs\.fp32\.encoder\.file: None"),
    ("io name", lambda m: m["graphs"]["fp16"]["decoder"].update(inputs=[{"nom": "z"}]),
     r"graphs\.fp16\.decoder\.inputs\[0\]\.name: None"),
    ("io list", lambda m: m["graphs"]["fp32"]["item_tower"].update(outputs="static"),
     r"graphs\.fp32\.item_tower\.outputs: 'static'"),
    ("files entry", lambda m: m["files"].update({"encoder.onnx": "abc"}),
     r"files\.encoder\.onnx: 'abc', want a JSON object"),
    ("sha256", lambda m: m["files"]["encoder.onnx"].update(sha256=None),
     r"files\.encoder\.onnx\.sha256: None"),
    ("item_table", lambda m: m.update(item_table="x"), r"item_table: 'x', want a JSON object"),
    ("item dtype", lambda m: m["item_table"].update(dtype="int8"), r"item_table\.dtype: 'int8'"),
    ("item dim", lambda m: m["item_table"].update(dim=8), r"item_table\.dim 8 != .*d_model 16"),
    ("model_config", lambda m: m.update(model_config=[]), r"model_config: \[\], want a JSON"),
    ("heads divide d", lambda m: m["model_config"].update(d_model=15),
     r"model_config: d_model=15 is not a multiple of n_attn_heads=2"),
    ("heads", lambda m: m["model_config"].update(omtp_heads=0),
     r"model_config: omtp_heads=0: want an integer >= 1"),
    ("max_candidates", lambda m: m["model_config"].update(max_candidates=-3),
     r"model_config: max_candidates=-3: want an integer >= 1"),
    ("missing size", lambda m: _drop(m["model_config"], "max_steps"),
     r"model_config: max_steps: missing"),
    ("unknown field", lambda m: m["model_config"].update(d_modle=16),
     r"model_config: d_modle: unknown field"),
    ("buckets", lambda m: m["model_config"]["schema"].update(item_categorical=[["category", 1]]),
     r"model_config: schema\.item_categorical\[0\] \('category'\) buckets=1"),
    ("names", lambda m: m["model_config"]["schema"].update(user_dense="pref_0"),
     r"model_config: schema\.user_dense: 'pref_0', want a list of names"),
    ("parity", lambda m: m.update(parity={"fp32": "yes"}), r"parity\.fp32: 'yes'"),
    ("passed", lambda m: m.update(parity={"fp32": {"passed": "yes"}}),
     r"parity\.fp32\.passed: 'yes', want true or false"),
]  # fmt: skip


@pytest.mark.parametrize(("edit", "message"), [(e, msg) for _, e, msg in MALFORMED],
                         ids=[name for name, _, _ in MALFORMED])  # fmt: skip
def test_a_malformed_manifest_is_a_bundle_error_naming_the_field(
    bundle_copy: Path, edit: Callable[[Manifest], object], message: str
) -> None:
    edit_manifest(bundle_copy, edit)
    with pytest.raises(BundleError, match=r"manifest\.json: " + message):
        load_bundle(bundle_copy)


def test_settings_refuse_a_malformed_manifest_as_a_validation_error(bundle_copy: Path) -> None:
    """service/settings.py reads model_config["max_candidates"] from read_manifest: checked
    there, the problem is a pydantic ValidationError naming the field, not a KeyError."""
    edit_manifest(bundle_copy, lambda m: _drop(m["model_config"], "max_candidates"))
    with pytest.raises(ValueError, match=r"model_config: max_candidates: missing"):
        Settings(bundle=bundle_copy)
    with pytest.raises(BundleError, match=r"max_candidates: missing"):
        read_manifest(bundle_copy)


def test_model_config_refuses_what_no_model_can_be_built_from() -> None:
    with pytest.raises(ValueError, match="d_model=30 is not a multiple of n_attn_heads=4"):
        ModelConfig(d_model=30, n_attn_heads=4)
    with pytest.raises(ValueError, match=r"schema\.item_id_buckets=1: want an integer >= 2"):
        ModelConfig.from_dict({**CFG.to_dict(), "schema": {**CFG.schema.to_dict(),
                                                           "item_id_buckets": 1}})  # fmt: skip
    with pytest.raises(ValueError, match=r"schema\.item_categorical: missing"):
        ModelConfig.from_dict({**CFG.to_dict(), "schema": {"item_id_buckets": 4}})
    with pytest.raises(ValueError, match=r"dropout=1.5: want a number in \[0, 1\)"):
        ModelConfig.from_dict({**CFG.to_dict(), "dropout": 1.5})
    assert ModelConfig.from_dict(CFG.to_dict(), complete=True) == CFG


# ---- 3. the item table: dtype, shape, finite, unique ---------------------------------------


def test_an_item_table_with_a_nan_row_is_refused(bundle_copy: Path) -> None:
    emb = np.load(bundle_copy / "item_embeddings.npy")
    ids = np.load(bundle_copy / "item_ids.npy")
    emb[7, 3] = np.nan
    emb[9, 0] = np.inf
    replace_file(bundle_copy, "item_embeddings.npy", emb)
    want = rf"item_embeddings\.npy: 2 of 300 rows not finite .* item ids \[{ids[7]}, {ids[9]}\]"
    with pytest.raises(BundleError, match=want):
        load_bundle(bundle_copy)
    load_bundle(bundle_copy, item_table=False)  # a server that never reads the table


def test_repeated_item_ids_are_refused(bundle_copy: Path) -> None:
    ids = np.load(bundle_copy / "item_ids.npy")
    ids[5] = ids[4]
    replace_file(bundle_copy, "item_ids.npy", ids)
    with pytest.raises(BundleError, match=rf"item_ids\.npy: 1 item ids more than once.*{ids[4]}"):
        load_bundle(bundle_copy)


def test_the_item_table_dtype_and_count_are_the_manifests(bundle_copy: Path) -> None:
    emb = np.load(bundle_copy / "item_embeddings.npy")
    replace_file(bundle_copy, "item_embeddings.npy", emb.astype(np.float64))
    with pytest.raises(
        BundleError, match=r"dtype float64, manifest item_table\.dtype says float32"
    ):
        load_bundle(bundle_copy)
    replace_file(bundle_copy, "item_embeddings.npy", emb.astype(np.float16))
    with pytest.raises(BundleError, match=r"dtype float16, manifest .* says float32"):
        load_bundle(bundle_copy)
    edit_manifest(bundle_copy, lambda m: m["item_table"].update(dtype="float16"))
    bundle = load_bundle(bundle_copy)  # a float16 table, said so: fine
    assert bundle.item_embeddings is not None and bundle.item_embeddings.dtype == np.float16
    edit_manifest(bundle_copy, lambda m: m["item_table"].update(count=299))
    with pytest.raises(BundleError, match=r"300 rows, manifest item_table\.count says 299"):
        load_bundle(bundle_copy)


# ---- 4. the id hash ---------------------------------------------------------------------


def test_an_unknown_id_hash_is_refused(bundle_copy: Path) -> None:
    def other_hash(m: Manifest) -> None:
        m["model_config"]["schema"]["hash_name"] = "murmur3-v1"
        m["hashing"]["name"] = "murmur3-v1"

    edit_manifest(bundle_copy, other_hash)
    with pytest.raises(BundleError, match=r"hash_name 'murmur3-v1': unknown id hash"):
        load_bundle(bundle_copy)


def test_a_hashing_block_that_disagrees_with_the_schema_is_refused(bundle_copy: Path) -> None:
    edit_manifest(bundle_copy, lambda m: m["hashing"].update(salt=1))
    with pytest.raises(BundleError, match=r"hashing .* disagrees with model_config\.schema"):
        load_bundle(bundle_copy)


def test_an_unknown_id_key_rule_is_refused(bundle_copy: Path) -> None:
    assert load_bundle(bundle_copy).manifest["hashing"]["id_keys"] == ID_KEY_NAME
    edit_manifest(bundle_copy, lambda m: m["hashing"].pop("id_keys"))
    load_bundle(bundle_copy)  # a bundle from before string ids: integer ids, their own keys
    edit_manifest(bundle_copy, lambda m: m["hashing"].update(id_keys="crc32-v0"))
    with pytest.raises(BundleError, match=r"hashing\.id_keys 'crc32-v0': unknown id key rule"):
        load_bundle(bundle_copy)


# ---- 5, 6. publish: float16 overflow, Redis Cluster --------------------------------------


class NoRedis:
    """A client that must not be used: publish refuses before it writes anything."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"Redis used ({name}) for a table that must be refused")


def test_publish_refuses_rows_that_overflow_float16() -> None:
    ids = np.array([10, 11, 12, 13], np.int64)
    emb = np.ones((4, 8), np.float32)
    emb[1, 2] = 70_000.0  # float16's largest is 65504
    emb[3, 0] = -1e6
    with pytest.raises(PublishError, match=r"2 of 4 rows .* overflows float16.*float32 keeps "
                                           r"them\), e.g. item ids \[11, 13\]"):  # fmt: skip
        publish_arrays(NoRedis(), "v1", ids, emb, dtype="float16")  # type: ignore[arg-type]
    emb[1, 2] = np.nan
    with pytest.raises(
        PublishError,
        match=r"1 of 4 rows .* as float32 \(NaN or inf in the table\), e.g. item ids \[11\]",
    ):
        publish_arrays(NoRedis(), "v1", ids, emb, dtype="float32")  # type: ignore[arg-type]


def test_publish_cli_passes_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake(bundle: str, url: str, **kwargs: Any) -> Any:
        seen.update(kwargs, bundle=bundle, url=url)
        raise SystemExit(0)

    monkeypatch.setattr("export.publish.publish_bundle", fake)
    for argv, cluster in ((["--cluster"], True), ([], False)):
        with pytest.raises(SystemExit):
            export_main(["publish", "b", "--redis-url", "redis://h:1", *argv])
        assert seen["cluster"] is cluster and seen["url"] == "redis://h:1"


# ---- 7. checkpoints: the file that cannot be read is named -------------------------------


def at(path: Path, problem: str) -> str:
    """A match pattern: the message starts with the path (escaped), then the problem."""
    return re.escape(str(path)) + problem


def test_checkpoint_loaders_name_the_file(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    make_checkpoint(ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    config_json, weights = ckpt / "config.json", ckpt / "model.safetensors"

    config_json.write_text("{not json")
    with pytest.raises(ValueError, match=at(config_json, ": not valid JSON")):
        read_config(ckpt)
    config_json.write_text(json.dumps({k: v for k, v in config.items() if k != "kind"}))
    with pytest.raises(ValueError, match=at(config_json, ": no 'kind'")):
        load_checkpoint(ckpt)
    bad = {**config, "model_config": {**config["model_config"], "d_model": 15}}
    config_json.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=at(config_json, ": d_model=15 is not a multiple")):
        load_checkpoint(ckpt)
    other = {**config, "model_config": {**config["model_config"], "d_model": 8}}
    config_json.write_text(json.dumps(other))
    with pytest.raises(ValueError, match=at(weights, ": does not fit its config.json")):
        load_checkpoint(ckpt)
    config_json.write_text(json.dumps(config))
    weights.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=at(weights, ": not a readable safetensors file")):
        load_checkpoint(ckpt)


def test_train_state_loader_names_the_file(tmp_path: Path) -> None:
    model = GenReranker(CFG)
    opt = torch.optim.AdamW(model.parameters())
    save_train_state(tmp_path, opt, {"step": 3})
    assert load_train_state(tmp_path, opt) == {"step": 3}
    state_json = tmp_path / "train_state.json"
    state_json.write_text('{"state": ')
    with pytest.raises(ValueError, match=at(state_json, ": not valid JSON")):
        load_train_state(tmp_path, opt)
    state_json.write_text('{"state": {}}')
    with pytest.raises(ValueError, match=at(state_json, ": want an object")):
        load_train_state(tmp_path, opt)
