"""Reading, checking and writing the search config and the channel-prune config (acps_core.config.prune_config).

Each error test asserts the error type, the ``file:line`` it points at and the words that tell the user what
to do, because those words are the behaviour.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pydantic
import pytest
from google.protobuf import text_format

from acps_core.config import (
    AMCTRetrainConfig,
    LayerDecision,
    SearchSettings,
    format_prune_config,
    load_override_config,
    load_search_config,
    parse_prune_config,
    resolve_layer,
    validate_override_targets,
    write_prune_config,
)
from acps_core.errors import ConfigError, OutputPathError
from tests.support.spec_samples import SPEC_PRUNE_CONFIG


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def filter_prune(ratio: float, ascend: bool | None = None) -> str:
    """Text of a prune_config body that removes ``ratio`` of the channels."""
    ascend_text = "" if ascend is None else f" ascend_optimized: {str(ascend).lower()}"
    algo = f"balanced_l2_norm_filter_prune {{ prune_ratio: {ratio}{ascend_text} }}"
    return f"prune_config {{ filter_pruner {{ {algo} }} }}"


def location(error: pytest.ExceptionInfo[ConfigError]) -> tuple[str | None, int | None]:
    return error.value.path, error.value.line


# ------------------------------------------------------------------------------------------------------------
# Search config: what loads
# ------------------------------------------------------------------------------------------------------------


def test_spec_sample_loads_into_settings(tmp_path: Path) -> None:
    write(tmp_path, "your/path/to/override_channel_prune.cfg", 'skip_layers: "fc"\n')
    path = write(tmp_path, "search.cfg", (
        "compress_ratio: 1.5\nascend_optimized: true\nmax_prune_ratio: 0.8\ntest_iteration: 1\n"
        "override_prune_cfg: 'your/path/to/override_channel_prune.cfg'\n"))

    settings = load_search_config(path)

    assert settings == SearchSettings(
        compress_ratio=1.5, ascend_optimized=True, max_prune_ratio=0.8, test_iteration=1,
        override_prune_cfg=(tmp_path / "your/path/to/override_channel_prune.cfg").resolve(),
        source=path.resolve())


def test_optional_fields_take_the_reference_defaults(tmp_path: Path) -> None:
    settings = load_search_config(write(tmp_path, "search.cfg", "compress_ratio: 2\n"))
    assert (settings.ascend_optimized, settings.max_prune_ratio, settings.test_iteration) == (True, 1.0, 1)
    assert settings.override_prune_cfg is None


def test_float_fields_read_back_without_32_bit_noise(tmp_path: Path) -> None:
    path = write(tmp_path, "search.cfg", "compress_ratio: 1.3\nmax_prune_ratio: 0.7\n")
    settings = load_search_config(path)
    assert (settings.compress_ratio, settings.max_prune_ratio) == (1.3, 0.7)


def test_override_path_is_resolved_against_the_config_folder_not_the_cwd(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    override = write(tmp_path, "cfg/override.cfg", 'skip_layers: "fc"\n')
    path = write(tmp_path, "cfg/search.cfg", "compress_ratio: 2\noverride_prune_cfg: 'override.cfg'\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load_search_config(path).override_prune_cfg == override.resolve()


def test_a_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "search.cfg"
    path.write_bytes("\ufeffcompress_ratio: 2\n".encode())
    assert load_search_config(path).compress_ratio == 2


# ------------------------------------------------------------------------------------------------------------
# Search config: file-level errors
# ------------------------------------------------------------------------------------------------------------


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"search config does not exist; check the path") as error:
        load_search_config(tmp_path / "nope.cfg")
    assert error.value.path == os.fspath(tmp_path / "nope.cfg")


def test_missing_relative_file_mentions_the_current_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=re.escape(f"relative to the current directory {os.getcwd()}")):
        load_search_config("nope.cfg")


def test_directory_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"is a directory, not a file") as error:
        load_search_config(tmp_path)
    assert error.value.path == os.fspath(tmp_path)


def test_non_utf8_file_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "search.cfg"
    path.write_bytes(b"compress_ratio: 1.5\n# caf\xe9\n")
    with pytest.raises(ConfigError, match=r"not UTF-8 text: byte 0xe9 .* save the file as UTF-8") as error:
        load_search_config(path)
    assert (error.value.line, error.value.column) == (2, 6)
    assert str(error.value).startswith(f"{path}:2:6: ")


def test_binary_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "search.cfg"
    path.write_bytes(b"\x0d\x00\x00\xc0\x3f")  # a serialized AutoChannelPruneConfig
    with pytest.raises(ConfigError, match=r"holds binary data .* not protobuf text format"):
        load_search_config(path)


@pytest.mark.parametrize("text", ["", "   \n\t\n", "# compress_ratio: 1.5\n\n# nothing else\n"])
def test_empty_file_is_rejected(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, "search.cfg", text)
    with pytest.raises(ConfigError, match=r"is empty .* must set at least compress_ratio") as error:
        load_search_config(path)
    assert error.value.path == os.fspath(path)


def test_oversized_file_is_rejected_before_parsing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACPS_MAX_CONFIG_BYTES", "64")
    path = write(tmp_path, "search.cfg", "compress_ratio: 2\n" + "# padding\n" * 10)
    with pytest.raises(ConfigError, match=r"search config is over the 64 byte limit for config files, so it is "
                                          r"probably not the file meant; .* ACPS_MAX_CONFIG_BYTES"):
        load_search_config(path)
    monkeypatch.setenv("ACPS_MAX_CONFIG_BYTES", "128")
    assert load_search_config(path).compress_ratio == 2


def test_syntax_error_gives_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "search.cfg", "compress_ratio: 1.5\nmax_prune_ratio 0.8\n")
    expected = r"syntax error, not valid protobuf text format.*Expected \":\""
    with pytest.raises(ConfigError, match=expected) as err:
        load_search_config(path)
    assert (err.value.line, err.value.column) == (2, 17)
    assert str(err.value).startswith(f"{path}:2:17: ")


def test_value_of_wrong_type_is_a_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path, "search.cfg", "compress_ratio: 1.5\ntest_iteration: 1.5\n")
    with pytest.raises(ConfigError, match=r"Couldn't parse integer: 1\.5") as error:
        load_search_config(path)
    assert error.value.line == 2


def test_unknown_field_is_named_with_the_valid_ones(tmp_path: Path) -> None:
    path = write(tmp_path, "search.cfg", "compress_ratio: 1.5\ncompres_ratio: 2\n")
    with pytest.raises(ConfigError) as error:
        load_search_config(path)
    message = str(error.value)
    assert 'unknown field "compres_ratio" in AutoChannelPruneConfig' in message
    assert "did you mean 'compress_ratio'" in message
    assert ("valid fields: compress_ratio, ascend_optimized, max_prune_ratio, test_iteration, "
            "override_prune_cfg") in message
    assert location(error) == (os.fspath(path), 2)


def test_prune_config_passed_as_search_config_gets_a_hint(tmp_path: Path) -> None:
    path = write(tmp_path, "search.cfg", 'skip_layers: "fc"\n')
    expected = r"skip_layers belongs in a channel-prune config.*override_prune_cfg"
    with pytest.raises(ConfigError, match=expected):
        load_search_config(path)


def test_field_given_twice_names_both_lines(tmp_path: Path) -> None:
    path = write(tmp_path, "search.cfg", "compress_ratio: 1.5\nmax_prune_ratio: 0.5\n\ncompress_ratio: 2\n")
    expected = r'"compress_ratio" is given twice \(lines 1 and 4\).*keep one'
    with pytest.raises(ConfigError, match=expected) as err:
        load_search_config(path)
    assert location(err) == (os.fspath(path), 4)


# ------------------------------------------------------------------------------------------------------------
# Search config: value errors point at the field's line
# ------------------------------------------------------------------------------------------------------------


def test_compress_ratio_missing(tmp_path: Path) -> None:
    path = write(tmp_path, "search.cfg", "max_prune_ratio: 0.5\n")
    expected = r"compress_ratio is missing.*e\.g\. `compress_ratio: 1\.5`"
    with pytest.raises(ConfigError, match=expected) as error:
        load_search_config(path)
    assert error.value.path == os.fspath(path)


@pytest.mark.parametrize("value", ["1", "1.0", "0.5", "-2", "0"])
def test_compress_ratio_not_above_one(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, "search.cfg", f"# target\nascend_optimized: false\ncompress_ratio: {value}\n")
    with pytest.raises(ConfigError, match=rf"compress_ratio: {re.escape(value)} is not valid; it must be a "
                                          r"finite number greater than 1") as error:
        load_search_config(path)
    assert location(error) == (os.fspath(path), 3)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "infinity", "1e40"])
def test_compress_ratio_not_finite(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, "search.cfg", f"compress_ratio: {value}\n")
    expected = rf"compress_ratio: {value} is not valid.*finite number greater than 1"
    with pytest.raises(ConfigError, match=expected):
        load_search_config(path)


@pytest.mark.parametrize("value", ["0", "-0.1", "1.5", "nan"])
def test_max_prune_ratio_outside_zero_one(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, "search.cfg", f"compress_ratio: 2\nmax_prune_ratio: {value}\n")
    with pytest.raises(ConfigError, match=rf"max_prune_ratio: {value} is out of range; it must be in \(0, 1\]"
                       ) as error:
        load_search_config(path)
    assert error.value.line == 2


@pytest.mark.parametrize("value", ["0", "-3"])
def test_test_iteration_below_one(tmp_path: Path, value: str) -> None:
    path = write(tmp_path, "search.cfg", f"compress_ratio: 2\n\ntest_iteration: {value}\n")
    expected = rf"test_iteration: {value} is out of range; it must be an integer >= 1"
    with pytest.raises(ConfigError, match=expected) as error:
        load_search_config(path)
    assert error.value.line == 3


def test_override_file_that_does_not_exist_names_the_resolved_path(tmp_path: Path) -> None:
    path = write(tmp_path, "cfg/search.cfg", "compress_ratio: 2\noverride_prune_cfg: 'sub/override.cfg'\n")
    resolved = (tmp_path / "cfg" / "sub" / "override.cfg").resolve()
    with pytest.raises(ConfigError, match=re.escape(
            f"override_prune_cfg: 'sub/override.cfg' does not exist (resolved against the search config's "
            f"folder to {resolved})")) as error:
        load_search_config(path)
    assert location(error) == (os.fspath(path), 2)


def test_override_file_that_is_the_config_itself(tmp_path: Path) -> None:
    path = write(tmp_path, "search.cfg", "compress_ratio: 2\noverride_prune_cfg: './search.cfg'\n")
    with pytest.raises(ConfigError, match=r"is this search config itself; it must name a separate") as error:
        load_search_config(path)
    assert error.value.line == 2


def test_override_path_that_is_a_directory(tmp_path: Path) -> None:
    path = write(tmp_path, "search.cfg", "compress_ratio: 2\noverride_prune_cfg: '.'\n")
    with pytest.raises(ConfigError, match=r"override_prune_cfg: '\.' is a directory"):
        load_search_config(path)


def test_empty_override_path(tmp_path: Path) -> None:
    path = write(tmp_path, "search.cfg", "compress_ratio: 2\noverride_prune_cfg: ''\n")
    with pytest.raises(ConfigError, match=r"override_prune_cfg is empty.*or delete the line"):
        load_search_config(path)


def test_settings_built_in_code_are_validated_too() -> None:
    with pytest.raises(pydantic.ValidationError):
        SearchSettings(compress_ratio=1.0)
    with pytest.raises(pydantic.ValidationError):
        SearchSettings(compress_ratio=math.inf)
    with pytest.raises(pydantic.ValidationError):
        SearchSettings(compress_ratio=2, max_prune_ratio=0)
    with pytest.raises(pydantic.ValidationError):
        SearchSettings(compress_ratio=2, test_iteration=0)
    with pytest.raises(pydantic.ValidationError, match="absolute"):
        SearchSettings(compress_ratio=2, override_prune_cfg=Path("relative.cfg"))
    with pytest.raises(pydantic.ValidationError, match="Extra inputs"):
        SearchSettings(compress_ratio=2, compress=3)  # type: ignore[call-arg]


def test_settings_are_frozen() -> None:
    settings = SearchSettings(compress_ratio=2)
    with pytest.raises(pydantic.ValidationError):
        settings.compress_ratio = 3  # type: ignore[misc]


# ------------------------------------------------------------------------------------------------------------
# Channel-prune config
# ------------------------------------------------------------------------------------------------------------



def test_spec_prune_config_parses(tmp_path: Path) -> None:
    config = parse_prune_config(write(tmp_path, "prune.cfg", SPEC_PRUNE_CONFIG))
    assert [entry.layer_name for entry in config.override_layer_configs] == ["layer2.0.conv1"]
    assert list(config.regular_prune_skip_layers) == ["layer1.0.conv1"]


def test_prune_config_file_errors_match_the_search_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"channel-prune config does not exist"):
        parse_prune_config(tmp_path / "missing.cfg")
    with pytest.raises(ConfigError, match=r"channel-prune config is empty"):
        parse_prune_config(write(tmp_path, "empty.cfg", "# nothing\n"))


def test_search_field_in_prune_config_gets_a_hint(tmp_path: Path) -> None:
    path = write(tmp_path, "prune.cfg", "compress_ratio: 2\n")
    expected = r'unknown field "compress_ratio" in AMCTRetrainConfig.*belongs in the search config'
    with pytest.raises(ConfigError, match=expected) as error:
        parse_prune_config(path)
    assert error.value.line == 1


def test_unknown_nested_field_suggests_the_right_name(tmp_path: Path) -> None:
    path = write(tmp_path, "prune.cfg",
                 "prune_config { filter_pruner { balanced_l2_norm_filter_prune {\n  prune_rate: 0.3 } } }\n")
    expected = (r'unknown field "prune_rate" in BalancedL2NormFilterPruner; '
                r"did you mean 'prune_ratio'\? valid fields: prune_ratio, ascend_optimized")
    with pytest.raises(ConfigError, match=expected) as error:
        parse_prune_config(path)
    assert error.value.line == 2


def test_missing_prune_ratio_points_at_the_entry(tmp_path: Path) -> None:
    path = write(tmp_path, "prune.cfg", (
        'skip_layers: "fc"\noverride_layer_configs {\n  layer_name: "conv1"\n'
        "  prune_config { filter_pruner { balanced_l2_norm_filter_prune { } } }\n}\n"))
    expected = (r"override_layer_configs\[0\]\.prune_config\.filter_pruner\."
                r"balanced_l2_norm_filter_prune\.prune_ratio is missing; it is required")
    with pytest.raises(ConfigError, match=expected) as error:
        parse_prune_config(path)
    assert error.value.line == 4


def test_missing_layer_name(tmp_path: Path) -> None:
    text = f'skip_layers: "fc"\noverride_layer_configs {{\n  {filter_prune(0.2)}\n}}\n'
    path = write(tmp_path, "prune.cfg", text)
    expected = r'override_layer_configs\[0\]\.layer_name is missing.*layer_name: "'
    with pytest.raises(ConfigError, match=expected) as error:
        parse_prune_config(path)
    assert error.value.line == 2


@pytest.mark.parametrize("ratio", ["1.0", "1.5", "-0.1", "nan"])
def test_prune_ratio_outside_zero_one(tmp_path: Path, ratio: str) -> None:
    path = write(tmp_path, "prune.cfg", (
        f"{filter_prune(0.3)}\noverride_layer_configs {{\n  layer_name: \"conv1\"\n"
        "  prune_config { filter_pruner { balanced_l2_norm_filter_prune {\n"
        f"    prune_ratio: {ratio} }} }} }}\n}}\n"))
    with pytest.raises(ConfigError, match=rf"prune_ratio: {re.escape(ratio)} in override_layer_configs\[0\]"
                                          r"\.prune_config is out of range; it must be in \[0, 1\)") as error:
        parse_prune_config(path)
    assert location(error) == (os.fspath(path), 5)


def test_global_prune_ratio_out_of_range(tmp_path: Path) -> None:
    path = write(tmp_path, "prune.cfg", f'skip_layers: "fc"\n{filter_prune(1.0)}\n')
    with pytest.raises(ConfigError, match=r"prune_ratio: 1\.0 in prune_config is out of range") as error:
        parse_prune_config(path)
    assert error.value.line == 2


def test_layer_with_two_override_entries(tmp_path: Path) -> None:
    path = write(tmp_path, "prune.cfg", (
        f'override_layer_configs {{ layer_name: "a" {filter_prune(0.1)} }}\n'
        f'override_layer_configs {{ layer_name: "b" {filter_prune(0.1)} }}\n'
        f'override_layer_configs {{ layer_name: "a" {filter_prune(0.2)} }}\n'))
    expected = r'layer_name "a" has two override_layer_configs entries \(also at line 1\); keep one'
    with pytest.raises(ConfigError, match=expected) as error:
        parse_prune_config(path)
    assert error.value.line == 3


def test_type_with_two_override_entries(tmp_path: Path) -> None:
    path = write(tmp_path, "prune.cfg", (
        f'override_layer_types {{ layer_type: "Conv2d" {filter_prune(0.1)} }}\n'
        f'override_layer_types {{ layer_type: "Conv2d" {filter_prune(0.2)} }}\n'))
    expected = r'layer_type "Conv2d" has two override_layer_types entries'
    with pytest.raises(ConfigError, match=expected) as error:
        parse_prune_config(path)
    assert error.value.line == 2


def test_nested_field_given_twice_names_both_lines(tmp_path: Path) -> None:
    path = write(tmp_path, "prune.cfg", (
        'override_layer_configs {\n  layer_name: "a"\n  prune_config { filter_pruner { '
        "balanced_l2_norm_filter_prune {\n    prune_ratio: 0.1\n    prune_ratio: 0.2 } } }\n}\n"))
    with pytest.raises(ConfigError, match=r'"prune_ratio" is given twice \(lines 4 and 5\)') as error:
        parse_prune_config(path)
    assert error.value.line == 5


def test_both_strategies_of_a_oneof(tmp_path: Path) -> None:
    path = write(tmp_path, "prune.cfg", "prune_config {\n  filter_pruner { }\n  n_out_of_m_pruner { }\n}\n")
    expected = r'"n_out_of_m_pruner" and "filter_pruner" cannot both be set.*keep one'
    with pytest.raises(ConfigError, match=expected) as error:
        parse_prune_config(path)
    assert error.value.line == 3


def test_filter_pruner_without_algorithm(tmp_path: Path) -> None:
    path = write(tmp_path, "prune.cfg", "prune_config {\n  filter_pruner { }\n}\n")
    with pytest.raises(ConfigError, match=r"prune_config\.filter_pruner names no algorithm; give "
                                          r"balanced_l2_norm_filter_prune") as error:
        parse_prune_config(path)
    assert error.value.line == 2


def test_empty_layer_name_in_a_skip_list(tmp_path: Path) -> None:
    path = write(tmp_path, "prune.cfg", 'skip_layers: ["conv1",\n  ""]\n')
    with pytest.raises(ConfigError, match=r"skip_layers holds an empty name") as error:
        parse_prune_config(path)
    assert error.value.line == 2


# ------------------------------------------------------------------------------------------------------------
# Override file
# ------------------------------------------------------------------------------------------------------------


def test_override_file_with_skip_and_override_entries_loads(tmp_path: Path) -> None:
    path = write(tmp_path, "override.cfg", (
        'skip_layers: "fc"\nregular_prune_skip_types: "Linear"\n'
        f'override_layer_configs {{ layer_name: "conv1" {filter_prune(0.25, False)} }}\n'
        f'override_layer_types {{ layer_type: "Conv2d" {filter_prune(0.5)} }}\n'))
    config = load_override_config(path)
    assert resolve_layer(config, "fc", "Linear").source == "skip"
    assert resolve_layer(config, "conv1", "Conv2d") == LayerDecision("override_layer", 0.25, False)
    assert resolve_layer(config, "conv2", "Conv2d") == LayerDecision("override_type", 0.5, True)


def test_global_prune_config_in_override_file(tmp_path: Path) -> None:
    path = write(tmp_path, "override.cfg", f'skip_layers: "fc"\n\n{filter_prune(0.3)}\n')
    with pytest.raises(ConfigError) as error:
        load_override_config(path)
    message = str(error.value)
    assert "prune_config is not allowed in an override file" in message
    assert ("it may hold only skip_layers / skip_layer_types / regular_prune_skip_layers / "
            "regular_prune_skip_types / override_layer_configs / override_layer_types") in message
    assert location(error) == (os.fspath(path), 3)


def test_unknown_field_in_override_file_lists_the_allowed_entries(tmp_path: Path) -> None:
    path = write(tmp_path, "override.cfg", 'skip_layers: "fc"\nbatch_num: 2\n')
    with pytest.raises(ConfigError, match=r'unknown field "batch_num".*an override file may hold only '
                                          r"skip_layers /") as error:
        load_override_config(path)
    assert error.value.line == 2


def test_n_out_of_m_override_is_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, "override.cfg", (
        'override_layer_types {\n  layer_type: "Conv2d"\n'
        "  prune_config { n_out_of_m_pruner { l1_selective_prune { } } }\n}\n"))
    with pytest.raises(ConfigError, match=r'override_layer_types entry for "Conv2d" uses n_out_of_m_pruner, '
                                          r"which is 4:2 weight sparsity, not channel pruning") as error:
        load_override_config(path)
    assert error.value.line == 3


def test_override_entry_without_prune_config(tmp_path: Path) -> None:
    path = write(tmp_path, "override.cfg", 'skip_layers: "fc"\noverride_layer_configs { layer_name: "c1" }\n')
    expected = (r'override_layer_configs entry for "c1" has no prune_config; give '
                r"prune_config \{ filter_pruner.*or list the layer in skip_layers")
    with pytest.raises(ConfigError, match=expected) as error:
        load_override_config(path)
    assert error.value.line == 2


def test_override_entry_with_empty_prune_config(tmp_path: Path) -> None:
    text = 'override_layer_configs {\n  layer_name: "conv1"\n  prune_config { }\n}\n'
    path = write(tmp_path, "override.cfg", text)
    with pytest.raises(ConfigError, match=r"has an empty prune_config") as error:
        load_override_config(path)
    assert error.value.line == 3


def test_empty_override_file(tmp_path: Path) -> None:
    path = write(tmp_path, "override.cfg", "# to be filled in\n")
    with pytest.raises(ConfigError, match=r"override file is empty.*or drop override_prune_cfg"):
        load_override_config(path)


# ------------------------------------------------------------------------------------------------------------
# Override targets against the model
# ------------------------------------------------------------------------------------------------------------

MODEL_LAYERS = {
    "features.0": ("Conv2d", None),
    "features.3": ("Conv2d", None),
    "classifier": ("Linear", "its outputs are the model's outputs"),
}


def test_targets_that_exist_pass(tmp_path: Path) -> None:
    path = write(tmp_path, "override.cfg", (
        'skip_layers: "classifier"\nskip_layer_types: "Linear"\n'
        f'override_layer_configs {{ layer_name: "features.0" {filter_prune(0.5)} }}\n'
        f'override_layer_types {{ layer_type: "Conv2d" {filter_prune(0.25)} }}\n'))
    validate_override_targets(load_override_config(path), path, MODEL_LAYERS)


def test_unknown_layer_suggests_close_names(tmp_path: Path) -> None:
    path = write(tmp_path, "override.cfg", f'# tuned\noverride_layer_configs {{ layer_name: "features.1" '
                                           f"{filter_prune(0.5)} }}\n")
    with pytest.raises(ConfigError, match=r'override_layer_configs names layer "features\.1", which is not a '
                                          r"Conv/Linear layer of the model \(did you mean ") as error:
        validate_override_targets(load_override_config(path), path, MODEL_LAYERS)
    assert "'features.0'" in str(error.value) and "'features.3'" in str(error.value)
    assert location(error) == (os.fspath(path), 2)


def test_unknown_layer_in_a_skip_list(tmp_path: Path) -> None:
    path = write(tmp_path, "override.cfg", 'regular_prune_skip_layers: ["features.0",\n  "head"]\n')
    with pytest.raises(ConfigError, match=r'regular_prune_skip_layers names layer "head"') as error:
        validate_override_targets(load_override_config(path), path, MODEL_LAYERS)
    assert error.value.line == 2


def test_override_of_a_layer_that_cannot_be_pruned_gives_the_reason(tmp_path: Path) -> None:
    path = write(tmp_path, "override.cfg", f'override_layer_configs {{ layer_name: "classifier" '
                                           f"{filter_prune(0.5)} }}\n")
    expected = (r'"classifier": this layer cannot be pruned \(its outputs are the model\'s outputs\); '
                r"delete the entry or move the layer to skip_layers")
    with pytest.raises(ConfigError, match=expected) as error:
        validate_override_targets(load_override_config(path), path, MODEL_LAYERS)
    assert error.value.line == 1


def test_type_missing_from_the_model_lists_the_types_present(tmp_path: Path) -> None:
    path = write(tmp_path, "override.cfg", 'skip_layers: "classifier"\nskip_layer_types: "conv2d"\n')
    expected = (r'skip_layer_types names layer type "conv2d", but no Conv/Linear layer of the model has it; '
                r"did you mean 'Conv2d'\? types present: Conv2d, Linear")
    with pytest.raises(ConfigError, match=expected) as error:
        validate_override_targets(load_override_config(path), path, MODEL_LAYERS)
    assert error.value.line == 2


def test_override_type_missing_from_the_model(tmp_path: Path) -> None:
    text = f'override_layer_types {{ layer_type: "Conv1d" {filter_prune(0.5)} }}\n'
    path = write(tmp_path, "override.cfg", text)
    with pytest.raises(ConfigError, match=r'override_layer_types names layer type "Conv1d".*types present'):
        validate_override_targets(load_override_config(path), path, MODEL_LAYERS)


def test_every_bad_target_is_listed_in_one_error(tmp_path: Path) -> None:
    path = write(tmp_path, "override.cfg", 'skip_layers: "head"\nskip_layer_types: "Conv3d"\n')
    with pytest.raises(ConfigError, match=r'layer "head".*; also: line 2: skip_layer_types names layer type '
                                          r'"Conv3d"') as error:
        validate_override_targets(load_override_config(path), path, MODEL_LAYERS)
    assert error.value.line == 1


def test_targets_of_a_config_built_in_code_have_no_line() -> None:
    config = AMCTRetrainConfig(skip_layers=["head"])
    with pytest.raises(ConfigError, match=r'skip_layers names layer "head"') as error:
        validate_override_targets(config, None, MODEL_LAYERS)
    assert location(error) == (None, None)


# ------------------------------------------------------------------------------------------------------------
# Precedence: resolve_layer
# ------------------------------------------------------------------------------------------------------------

PRECEDENCE_CONFIG = f"""\
{filter_prune(0.3)}
override_layer_types {{ layer_type: "Conv2d" {filter_prune(0.5, False)} }}
override_layer_types {{ layer_type: "ConvTranspose2d" }}
override_layer_configs {{ layer_name: "named" {filter_prune(0.25)} }}
override_layer_configs {{ layer_name: "named_and_skipped" {filter_prune(0.25)} }}
override_layer_configs {{ layer_name: "named_and_type_skipped" {filter_prune(0.25)} }}
override_layer_configs {{ layer_name: "quant_only" }}
override_layer_configs {{
  layer_name: "sparse" prune_config {{ n_out_of_m_pruner {{ l1_selective_prune {{ }} }} }}
}}
skip_layers: "named_and_skipped"
regular_prune_skip_layers: "prune_skipped"
skip_layer_types: "BatchNorm2d"
regular_prune_skip_types: "Conv1d"
"""


@pytest.mark.parametrize(("layer_name", "layer_type", "expected"), [
    ("named_and_skipped", "Linear", LayerDecision("skip", None, None)),  # skip_layers beats its override
    ("prune_skipped", "Linear", LayerDecision("skip", None, None)),  # regular_prune_skip_layers
    ("anything", "BatchNorm2d", LayerDecision("skip", None, None)),  # skip_layer_types
    ("named_and_type_skipped", "Conv1d", LayerDecision("skip", None, None)),  # regular_prune_skip_types wins
    ("named", "Conv2d", LayerDecision("override_layer", 0.25, True)),  # name beats type
    ("named", "Linear", LayerDecision("override_layer", 0.25, True)),
    ("other", "Conv2d", LayerDecision("override_type", 0.5, False)),  # type beats global
    ("other", "Linear", LayerDecision("global", 0.3, True)),
    ("quant_only", "Linear", LayerDecision("global", 0.3, True)),  # no prune_config: passed over
    ("deconv", "ConvTranspose2d", LayerDecision("global", 0.3, True)),  # type entry without prune_config
    ("sparse", "Conv2d", LayerDecision("override_layer", None, None)),  # 4:2 sparsity, no channels removed
])
def test_precedence(layer_name: str, layer_type: str, expected: LayerDecision) -> None:
    config = text_format.Parse(PRECEDENCE_CONFIG, AMCTRetrainConfig())
    assert resolve_layer(config, layer_name, layer_type) == expected


def test_no_rule_applies_without_a_global_prune_config() -> None:
    assert resolve_layer(AMCTRetrainConfig(), "conv", "Conv2d") == LayerDecision("none", None, None)


# ------------------------------------------------------------------------------------------------------------
# Writing
# ------------------------------------------------------------------------------------------------------------


def searched_config() -> AMCTRetrainConfig:
    config = AMCTRetrainConfig()
    config.regular_prune_skip_layers.append("layer1.0.conv1")
    entry = config.override_layer_configs.add(layer_name="layer2.0.conv1")
    entry.prune_config.filter_pruner.balanced_l2_norm_filter_prune.prune_ratio = 0.5
    entry.prune_config.filter_pruner.balanced_l2_norm_filter_prune.ascend_optimized = True
    config.prune_config.filter_pruner.balanced_l2_norm_filter_prune.prune_ratio = 0.3
    config.prune_config.filter_pruner.balanced_l2_norm_filter_prune.ascend_optimized = True
    return config


def test_write_then_parse_round_trips(tmp_path: Path) -> None:
    config = searched_config()
    path = tmp_path / "prune.cfg"
    write_prune_config(path, config)
    assert parse_prune_config(path) == config


def test_format_is_stable_and_in_field_number_order() -> None:
    text = format_prune_config(searched_config())
    assert text == format_prune_config(text_format.Parse(text, AMCTRetrainConfig()))
    order = [text.index(name) for name in ("override_layer_configs", "\nprune_config", "regular_prune_skip")]
    assert order == sorted(order)
    assert "prune_ratio: 0.3\n" in text  # shortest float, no 32-bit noise


def test_spec_example_round_trips_through_the_writer(tmp_path: Path) -> None:
    config = text_format.Parse(SPEC_PRUNE_CONFIG, AMCTRetrainConfig())
    write_prune_config(tmp_path / "prune.cfg", config)
    assert parse_prune_config(tmp_path / "prune.cfg") == config


@pytest.mark.parametrize("header", ["# written by acps\n", "# written by acps\n# compress_ratio 1.5"])
def test_header_comment_is_kept_apart_from_the_config(tmp_path: Path, header: str) -> None:
    write_prune_config(tmp_path / "prune.cfg", searched_config(), header=header)
    text = (tmp_path / "prune.cfg").read_text(encoding="utf-8")
    assert text.startswith(header.rstrip("\n") + "\n")
    assert parse_prune_config(tmp_path / "prune.cfg") == searched_config()


def test_header_must_be_comments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="comments starting with '#'"):
        write_prune_config(tmp_path / "prune.cfg", searched_config(), header="written by acps\n")


def test_write_includes_sidecar_files(tmp_path: Path) -> None:
    write_prune_config(tmp_path / "prune.cfg", searched_config(), extra={tmp_path / "prune.cfg.json": "{}\n"})
    assert (tmp_path / "prune.cfg.json").read_text(encoding="utf-8") == "{}\n"
    assert (tmp_path / "prune.cfg").is_file()


def test_write_refuses_a_config_that_could_not_be_read_back(tmp_path: Path) -> None:
    config = searched_config()
    config.prune_config.filter_pruner.balanced_l2_norm_filter_prune.prune_ratio = 1.0
    expected = r"refusing to write .*prune_ratio: 1\.0 in prune_config is out of range"
    with pytest.raises(ConfigError, match=expected):
        write_prune_config(tmp_path / "prune.cfg", config)
    assert not (tmp_path / "prune.cfg").exists()


def test_write_into_a_missing_folder_names_the_folder(tmp_path: Path) -> None:
    with pytest.raises(OutputPathError, match=r"does not exist: .*missing.*create it first"):
        write_prune_config(tmp_path / "missing" / "prune.cfg", searched_config())


def test_failed_write_leaves_the_old_file_and_no_temporary_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "prune.cfg"
    path.write_bytes(b"# the previous search's result\n")
    before = sorted(tmp_path.iterdir())

    def fail_replace(source: object, target: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail_replace)
    with pytest.raises(OutputPathError, match=r"No space left on device"):
        write_prune_config(path, searched_config(), extra={tmp_path / "report.txt": "report\n"})
    assert path.read_bytes() == b"# the previous search's result\n"
    assert sorted(tmp_path.iterdir()) == before
