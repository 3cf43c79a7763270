"""Fuzzing the config parsers with hypothesis: anything a user can write either loads or is a ConfigError (never
another exception), and valid configs round-trip exactly. Derandomized: CI sees the same examples every run."""

from __future__ import annotations

import math
import struct
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from acps_core.config import (
    SearchSettings,
    format_prune_config,
    load_override_config,
    load_search_config,
    parse_prune_config,
    proto_float,
    write_prune_config,
)
from acps_core.errors import ConfigError
from acps_core.proto.retrain_config_pb2 import AMCTRetrainConfig

FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None)

FIELDS = ["compress_ratio", "ascend_optimized", "max_prune_ratio", "test_iteration", "override_prune_cfg",
          "skip_layers", "override_layer_configs", "prune_config", "layer_name", "prune_ratio", "filter_pruner",
          "balanced_l2_norm_filter_prune", "regular_prune_skip_layers", "unknown_field"]
VALUES = st.one_of(st.integers(-10, 10**6).map(str), st.floats(allow_nan=True, allow_infinity=True).map(repr),
                   st.sampled_from(["true", "false", "True", "1e999", "-0", "0x10", "nan", "inf", "M4N2", "", "{",
                                    "}"]),
                   st.text(max_size=8).map(lambda s: '"' + s.replace("\\", "") + '"'))


def line() -> st.SearchStrategy[str]:
    """A field line, a nested message start or end, a comment, or noise."""
    return st.one_of(
        st.builds(lambda f, v: f"{f}: {v}", st.sampled_from(FIELDS), VALUES),
        st.builds(lambda f: f"{f} {{", st.sampled_from(FIELDS)),
        st.just("}"), st.builds(lambda t: "# " + t.replace("\n", " "), st.text(max_size=10)),
        st.text(max_size=12))


def as_float32(value: float) -> float:
    return float(struct.unpack("<f", struct.pack("<f", value))[0])


@contextmanager
def in_a_file(content: str | bytes, name: str = "search.cfg") -> Iterator[Path]:
    """A file holding ``content`` in a folder of its own, removed when the block ends."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogatepass"))
        yield path


def loads_or_config_error(load, path: Path) -> None:
    try:
        load(path)
    except ConfigError as exc:
        assert str(exc), "an error must say what is wrong"


@FUZZ
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300)))
def test_any_text_or_bytes_loads_or_is_a_config_error(content) -> None:
    if isinstance(content, str):
        content = content.encode("utf-8", "surrogatepass")
    with in_a_file(content) as path:
        for load in (load_search_config, parse_prune_config, load_override_config):
            loads_or_config_error(load, path)


@FUZZ
@given(st.lists(line(), max_size=12))
def test_config_shaped_text_loads_or_is_a_config_error(lines) -> None:
    text = "\n".join(lines) + "\n"
    with in_a_file(text) as path:
        for load in (load_search_config, parse_prune_config, load_override_config):
            loads_or_config_error(load, path)


FINITE_RATIO = st.floats(min_value=1.0001, max_value=1e6, allow_nan=False)
SHARE = st.floats(min_value=1e-6, max_value=1.0, allow_nan=False)


@FUZZ
@given(compress=FINITE_RATIO, aligned=st.booleans(), limit=SHARE, passes=st.integers(1, 10**6),
       order=st.permutations(range(4)), spacing=st.sampled_from([": ", ":", " :  ", ":\t"]),
       comment=st.booleans())
def test_valid_search_configs_load_exactly_what_they_say(compress, aligned, limit, passes, order, spacing,
                                                         comment) -> None:
    fields = [("compress_ratio", repr(compress)), ("ascend_optimized", str(aligned).lower()),
              ("max_prune_ratio", repr(limit)), ("test_iteration", str(passes))]
    lines = [f"{fields[i][0]}{spacing}{fields[i][1]}" + ("  # note" if comment else "") for i in order]
    with in_a_file("\n".join(lines) + "\n") as path:
        loaded = load_search_config(path)
    # the fields are 32-bit floats: what loads is the shortest decimal of the 32-bit value
    expected = SearchSettings(compress_ratio=proto_float(as_float32(compress)), ascend_optimized=aligned,
                              max_prune_ratio=proto_float(as_float32(limit)), test_iteration=passes)
    assert (loaded.compress_ratio, loaded.ascend_optimized, loaded.max_prune_ratio, loaded.test_iteration) == (
        expected.compress_ratio, expected.ascend_optimized, expected.max_prune_ratio, expected.test_iteration)


NAMES = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._", min_size=1, max_size=12)
RATIO = st.floats(min_value=0.0, max_value=0.999, allow_nan=False)


@st.composite
def prune_configs(draw) -> AMCTRetrainConfig:
    cfg = AMCTRetrainConfig()
    if draw(st.booleans()):
        algo = cfg.prune_config.filter_pruner.balanced_l2_norm_filter_prune
        algo.prune_ratio = draw(RATIO)
        algo.ascend_optimized = draw(st.booleans())
    for name in draw(st.lists(NAMES, max_size=4, unique=True)):
        entry = cfg.override_layer_configs.add(layer_name=name)
        algo = entry.prune_config.filter_pruner.balanced_l2_norm_filter_prune
        algo.prune_ratio = draw(RATIO)
        if draw(st.booleans()):
            algo.ascend_optimized = draw(st.booleans())
    for kind in draw(st.lists(st.sampled_from(["Conv2d", "Linear", "Conv1d", "ConvTranspose2d"]), max_size=2,
                              unique=True)):
        entry = cfg.override_layer_types.add(layer_type=kind)
        entry.prune_config.filter_pruner.balanced_l2_norm_filter_prune.prune_ratio = draw(RATIO)
    cfg.regular_prune_skip_layers.extend(draw(st.lists(NAMES, max_size=4, unique=True)))
    cfg.regular_prune_skip_types.extend(draw(st.lists(st.sampled_from(["Conv2d", "Linear"]), max_size=2,
                                                      unique=True)))
    return cfg


@FUZZ
@given(prune_configs())
def test_valid_prune_configs_round_trip_through_the_writer_exactly(cfg) -> None:
    with in_a_file("", "prune.cfg") as path:
        try:
            write_prune_config(path, cfg)
        except ConfigError:
            assert not path.read_text(), "a refused config must leave the file as it was"
            return
        loaded = parse_prune_config(path)
        assert format_prune_config(loaded) == format_prune_config(cfg) == path.read_text(encoding="utf-8")
    for entry, original in zip(loaded.override_layer_configs, cfg.override_layer_configs):
        ratio = entry.prune_config.filter_pruner.balanced_l2_norm_filter_prune.prune_ratio
        assert math.isclose(ratio, original.prune_config.filter_pruner.balanced_l2_norm_filter_prune.prune_ratio)
