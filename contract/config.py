"""Frozen configs of the offline stages. Every artifact carries the config that made it."""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from contract.features import FeatureSchema

# the sizes every model is built from: each a whole number >= 1
SIZES = (
    "d_model", "n_attn_heads", "enc_layers", "dec_layers", "ffn_mult", "omtp_heads",
    "max_candidates", "max_steps",
)  # fmt: skip


@dataclass(frozen=True)
class ModelConfig:
    """Gen-Reranker (and the baselines' shared sizes)."""

    schema: FeatureSchema = field(default_factory=FeatureSchema)
    d_model: int = 32  # small: the default preset targets sub-millisecond CPU decode at m = 30
    n_attn_heads: int = 2
    enc_layers: int = 1
    dec_layers: int = 1
    ffn_mult: int = 2
    omtp_heads: int = 4  # n: items proposed per decoder pass (paper: 4)
    max_candidates: int = 256  # size of the upstream-position embedding
    max_steps: int = 64  # longest generated list (decoder position embedding)
    dropout: float = 0.0

    def __post_init__(self) -> None:
        # a config no model can be built from (a hand-edited manifest or checkpoint, a bad
        # override) is refused here, naming the field, not deep inside a layer
        problems = config_problems(self)
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        if name == "fast":
            base = cls()
        elif name == "paper":  # paper defaults: 4 encoder + 4 decoder layers, n = 4
            base = cls(d_model=64, n_attn_heads=4, enc_layers=4, dec_layers=4, omtp_heads=4)
        else:
            raise ValueError(f"unknown preset {name!r} (fast | paper)")
        return replace(base, **overrides)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["schema"] = self.schema.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], complete: bool = False) -> ModelConfig:
        """The inverse of to_dict. ValueError naming the field for anything else: not an
        object, an unknown field, a schema of the wrong shape, a size no model can have.
        complete=True: every field must be given (an artifact rebuilt from itself, never
        from today's defaults)."""
        names = {f.name for f in fields(cls)}
        d = _object("config", d, names, names if complete else {"schema"})
        names = {f.name for f in fields(FeatureSchema)}
        lists = {"item_categorical", "item_dense", "user_dense"}  # FeatureSchema.from_dict's
        schema = _object("schema", d["schema"], names, names if complete else lists)
        _check_schema_shape(schema)
        return cls(**{**d, "schema": FeatureSchema.from_dict(dict(schema))})


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _object(where: str, d: Any, known: set[str], required: set[str]) -> Mapping[str, Any]:
    """d, if it is a mapping with only `known` keys and every `required` one."""
    if not isinstance(d, Mapping):
        raise ValueError(f"{where}: {type(d).__name__}, want an object")
    prefix = "" if where == "config" else f"{where}."
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{prefix}{unknown[0]}: unknown field")
    missing = sorted(required - set(d))
    if missing:
        raise ValueError(f"{prefix}{missing[0]}: missing")
    return d


def _check_schema_shape(schema: Mapping[str, Any]) -> None:
    """The JSON shapes FeatureSchema.from_dict converts (a name list given as one string
    would become a tuple of its letters)."""
    for name in ("item_dense", "user_dense"):
        names = schema.get(name, [])
        if not isinstance(names, list | tuple) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"schema.{name}: {names!r:.60}, want a list of names")
    pairs = schema.get("item_categorical", [])
    if not isinstance(pairs, list | tuple) or not all(
        isinstance(p, list | tuple) and len(p) == 2 and isinstance(p[0], str) and _is_int(p[1])
        for p in pairs
    ):
        raise ValueError(f"schema.item_categorical: {pairs!r:.60}, want [[name, buckets], ...]")


def _names_problem(where: str, names: tuple[str, ...]) -> str | None:
    if not all(isinstance(n, str) and n for n in names):
        return f"{where}: {names!r:.60}: names must be non-empty strings"
    if len(set(names)) != len(names):
        return f"{where}: {names!r:.60}: a name twice"
    return None


def schema_problems(s: FeatureSchema) -> list[str]:
    """What makes the schema unusable, one line each, naming the field ([] = none)."""
    problems = []
    # bucket 0 is padding (contract.features.hash_ids): a real id needs at least one more
    for name in ("item_id_buckets", "user_id_buckets"):
        value = getattr(s, name)
        if not _is_int(value) or value < 2:
            problems.append(f"schema.{name}={value!r}: want an integer >= 2 (0 is padding)")
    for f, (name, buckets) in enumerate(s.item_categorical):
        if not _is_int(buckets) or buckets < 2:
            problems.append(f"schema.item_categorical[{f}] ({name!r}) buckets={buckets!r}: "
                            "want an integer >= 2 (0 is padding)")  # fmt: skip
    for where, names in (
        ("schema.item_categorical", s.categorical_names),
        ("schema.item_dense", s.item_dense),
        ("schema.user_dense", s.user_dense),
    ):
        problem = _names_problem(where, names)
        if problem:
            problems.append(problem)
    if not isinstance(s.hash_name, str) or not s.hash_name:
        problems.append(f"schema.hash_name={s.hash_name!r}: want a name")
    if not _is_int(s.hash_salt) or not 0 <= s.hash_salt < 1 << 64:
        problems.append(f"schema.hash_salt={s.hash_salt!r}: want an integer in [0, 2**64)")
    return problems


def config_problems(cfg: ModelConfig) -> list[str]:
    """What makes the config unusable, one line each, naming the field ([] = none)."""
    if not isinstance(cfg.schema, FeatureSchema):
        return [f"schema: {type(cfg.schema).__name__}, want a FeatureSchema"]
    problems = schema_problems(cfg.schema)
    bad = [name for name in SIZES if not _is_int(getattr(cfg, name)) or getattr(cfg, name) < 1]
    problems += [f"{name}={getattr(cfg, name)!r}: want an integer >= 1" for name in bad]
    if not {"d_model", "n_attn_heads"} & set(bad) and cfg.d_model % cfg.n_attn_heads:
        problems.append(f"d_model={cfg.d_model} is not a multiple of "
                        f"n_attn_heads={cfg.n_attn_heads}")  # fmt: skip
    dropout = cfg.dropout
    if not isinstance(dropout, numbers.Real) or isinstance(dropout, bool) or not 0 <= dropout < 1:
        problems.append(f"dropout={dropout!r}: want a number in [0, 1)")
    return problems
