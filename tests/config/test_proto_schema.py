"""The committed protobuf modules match ``proto/*.proto``, the schema in SPEC.md, and SPEC's sample files.

When a ``.proto`` file changes, ``python proto/generate.py`` must be run and its output committed; the first
test fails until then.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf import descriptor_pb2, text_format

from acps_core.proto import basic_info_pb2, retrain_config_pb2, scale_offset_record_pb2
from tests.support.spec_samples import SPEC_PRUNE_CONFIG, SPEC_RECORD, SPEC_SEARCH_CONFIG

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = REPO_ROOT / "proto"
#: .proto file -> committed module generated from it.
GENERATED = {
    "basic_info.proto": "acps_core.proto.basic_info_pb2",
    "retrain_config.proto": "acps_core.proto.retrain_config_pb2",
    "scale_offset_record.proto": "acps_core.proto.scale_offset_record_pb2",
}
#: The folder the generator stages the sources in, which becomes each file's name in the descriptor pool.
STAGED_AS = Path("acps_core") / "proto"

FDP = descriptor_pb2.FieldDescriptorProto


def _compile_sources(tmp_path: Path) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    """Compile proto/*.proto, staged as proto/generate.py stages them, into FileDescriptorProtos."""
    try:
        importlib.import_module("grpc_tools.protoc")
    except ImportError:
        pytest.fail("grpc_tools is not importable, so the committed *_pb2.py files cannot be checked against "
                    "proto/*.proto; install the test extra: pip install -e '.[test]'")
    staged = tmp_path / "include" / STAGED_AS
    staged.mkdir(parents=True)
    for name in GENERATED:
        shutil.copyfile(PROTO_DIR / name, staged / name)
    descriptor_set = tmp_path / "schema.pb"
    result = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{tmp_path / 'include'}",
         f"--descriptor_set_out={descriptor_set}", *(str(STAGED_AS / name) for name in GENERATED)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, f"protoc rejected proto/*.proto:\n{result.stderr}"
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes()).file
    return {Path(file.name).name: file for file in files}


def _committed(module_name: str) -> descriptor_pb2.FileDescriptorProto:
    module: ModuleType = importlib.import_module(module_name)
    return descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)


def _schema(file: descriptor_pb2.FileDescriptorProto) -> dict[str, str]:
    """Everything about a file that changes its wire or text format, flattened to path -> description.

    Flat keys make a failing comparison name the exact message, field or enum value that drifted.
    """
    schema = {
        "<file name>": file.name,
        "<package>": file.package,
        # protoc releases differ in whether they write "proto2" or leave it unset (which means proto2).
        "<syntax>": file.syntax or "proto2",
        "<dependencies>": ",".join(file.dependency),
    }

    def add_enum(prefix: str, enum: descriptor_pb2.EnumDescriptorProto) -> None:
        for value in enum.value:
            schema[f"{prefix}.{enum.name}.{value.name}"] = f"enum value {value.number}"

    def add_message(prefix: str, message: descriptor_pb2.DescriptorProto) -> None:
        path = f"{prefix}.{message.name}"
        schema[path] = "message; reserved " + ",".join(
            f"{r.start}-{r.end - 1}" for r in message.reserved_range) + " " + ",".join(message.reserved_name)
        for field in message.field:
            oneof = message.oneof_decl[field.oneof_index].name if field.HasField("oneof_index") else None
            schema[f"{path}.{field.name}"] = (
                f"number={field.number} label={FDP.Label.Name(field.label)} type={FDP.Type.Name(field.type)} "
                f"type_name={field.type_name} default={field.default_value!r} "
                f"has_default={field.HasField('default_value')} oneof={oneof}"
            )
        for nested in message.nested_type:
            add_message(path, nested)
        for enum in message.enum_type:
            add_enum(path, enum)

    for message in file.message_type:
        add_message(file.package, message)
    for enum in file.enum_type:
        add_enum(file.package, enum)
    return schema


@pytest.mark.parametrize("proto_name", sorted(GENERATED))
def test_committed_module_matches_proto_source(tmp_path: Path, proto_name: str) -> None:
    compiled = _compile_sources(tmp_path)[proto_name]
    committed = _committed(GENERATED[proto_name])
    assert _schema(committed) == _schema(compiled), (
        f"acps_core/proto/{proto_name.replace('.proto', '_pb2.py')} is out of date with proto/{proto_name}; "
        "run: python proto/generate.py"
    )


@pytest.mark.parametrize("module_name", sorted(GENERATED.values()))
def test_committed_module_has_no_runtime_version_check(module_name: str) -> None:
    # Code from protoc >= 26 refuses protobuf runtimes older than itself, breaking protobuf>=4.21 support.
    source = Path(importlib.import_module(module_name).__file__ or "").read_text(encoding="utf-8")
    assert "ValidateProtobufRuntimeVersion" not in source, (
        f"{module_name} was generated by a protoc that pins the protobuf runtime; regenerate with "
        "python proto/generate.py (it uses grpcio-tools 1.62.x)"
    )


def test_generated_modules_import_each_other_not() -> None:
    # Independent files import cleanly whatever the package path; a cross-import would be a bare module name.
    for module_name in GENERATED.values():
        assert not _committed(module_name).dependency, f"{module_name} imports another .proto file"


def _field(message_type: type, name: str) -> descriptor_pb2.FieldDescriptorProto:
    descriptor = descriptor_pb2.DescriptorProto()
    message_type.DESCRIPTOR.CopyToProto(descriptor)  # type: ignore[attr-defined]
    return next(field for field in descriptor.field if field.name == name)


def _shape(message_type: type, name: str) -> tuple[int, str, str]:
    field = _field(message_type, name)
    return field.number, FDP.Label.Name(field.label), FDP.Type.Name(field.type)


def test_search_config_fields_match_spec_section_2() -> None:
    message = basic_info_pb2.AutoChannelPruneConfig
    assert _shape(message, "compress_ratio") == (1, "LABEL_REQUIRED", "TYPE_FLOAT")
    assert _shape(message, "ascend_optimized") == (2, "LABEL_OPTIONAL", "TYPE_BOOL")
    assert _shape(message, "max_prune_ratio") == (3, "LABEL_OPTIONAL", "TYPE_FLOAT")
    assert _shape(message, "test_iteration") == (4, "LABEL_OPTIONAL", "TYPE_INT64")
    assert _shape(message, "override_prune_cfg") == (10, "LABEL_OPTIONAL", "TYPE_STRING")
    defaults = message()
    assert (defaults.ascend_optimized, defaults.max_prune_ratio, defaults.test_iteration) == (True, 1.0, 1)


def test_prune_config_fields_match_spec_section_3() -> None:
    config = retrain_config_pb2.AMCTRetrainConfig
    assert _shape(config, "skip_layers") == (4, "LABEL_REPEATED", "TYPE_STRING")
    assert _shape(config, "override_layer_configs") == (5, "LABEL_REPEATED", "TYPE_MESSAGE")
    assert _shape(config, "skip_layer_types") == (6, "LABEL_REPEATED", "TYPE_STRING")
    assert _shape(config, "override_layer_types") == (7, "LABEL_REPEATED", "TYPE_MESSAGE")
    assert _shape(config, "prune_config") == (8, "LABEL_OPTIONAL", "TYPE_MESSAGE")
    assert _shape(config, "regular_prune_skip_layers") == (9, "LABEL_REPEATED", "TYPE_STRING")
    assert _shape(config, "regular_prune_skip_types") == (10, "LABEL_REPEATED", "TYPE_STRING")
    by_name, by_type = retrain_config_pb2.RetrainOverrideLayer, retrain_config_pb2.RetrainOverrideLayerType
    assert _shape(by_name, "layer_name") == (1, "LABEL_REQUIRED", "TYPE_STRING")
    assert _shape(by_name, "prune_config") == (4, "LABEL_OPTIONAL", "TYPE_MESSAGE")
    assert _shape(by_type, "layer_type") == (1, "LABEL_REQUIRED", "TYPE_STRING")
    assert _shape(by_type, "prune_config") == (4, "LABEL_OPTIONAL", "TYPE_MESSAGE")
    strategy = retrain_config_pb2.PruneConfig.DESCRIPTOR.oneofs_by_name["regular_prune_strategy"]
    assert {(f.name, f.number) for f in strategy.fields} == {("filter_pruner", 1), ("n_out_of_m_pruner", 2)}
    algo = retrain_config_pb2.FilterPruner.DESCRIPTOR.oneofs_by_name["filter_pruner_algo"]
    assert [(f.name, f.number) for f in algo.fields] == [("balanced_l2_norm_filter_prune", 1)]
    balanced = retrain_config_pb2.BalancedL2NormFilterPruner
    assert _shape(balanced, "prune_ratio") == (1, "LABEL_REQUIRED", "TYPE_FLOAT")
    assert _shape(balanced, "ascend_optimized") == (2, "LABEL_OPTIONAL", "TYPE_BOOL")
    assert balanced().ascend_optimized is True


def test_record_fields_match_spec_section_6() -> None:
    record = scale_offset_record_pb2
    assert _shape(record.ScaleOffsetRecord, "prune_record") == (2, "LABEL_REPEATED", "TYPE_MESSAGE")
    reserved = descriptor_pb2.DescriptorProto()
    record.ScaleOffsetRecord.DESCRIPTOR.CopyToProto(reserved)
    assert [(r.start, r.end) for r in reserved.reserved_range] == [(1, 2)]  # quantization records
    assert _shape(record.PruneRecord, "producer") == (1, "LABEL_REPEATED", "TYPE_MESSAGE")
    assert _shape(record.PruneRecord, "consumer") == (2, "LABEL_REPEATED", "TYPE_MESSAGE")
    assert _shape(record.PruneNode, "name") == (1, "LABEL_REQUIRED", "TYPE_STRING")
    assert _shape(record.PruneNode, "attr") == (2, "LABEL_REPEATED", "TYPE_MESSAGE")
    expected_attr = {
        "name": (1, "LABEL_OPTIONAL", "TYPE_STRING"), "type": (2, "LABEL_OPTIONAL", "TYPE_ENUM"),
        "f": (3, "LABEL_OPTIONAL", "TYPE_FLOAT"), "i": (4, "LABEL_OPTIONAL", "TYPE_INT64"),
        "s": (5, "LABEL_OPTIONAL", "TYPE_BYTES"), "floats": (6, "LABEL_REPEATED", "TYPE_FLOAT"),
        "ints": (7, "LABEL_REPEATED", "TYPE_INT64"), "strings": (8, "LABEL_REPEATED", "TYPE_BYTES"),
    }
    assert {name: _shape(record.AttrProto, name) for name in expected_attr} == expected_attr
    attr_type = record.AttrProto.DESCRIPTOR.enum_types_by_name["AttrType"]
    assert {v.name: v.number for v in attr_type.values} == {
        "UNDEFINED": 0, "FLOAT": 1, "INT": 2, "STRING": 3, "FLOATS": 4, "INTS": 5, "STRINGS": 6}




def test_spec_sample_search_config_parses() -> None:
    config = text_format.Parse(SPEC_SEARCH_CONFIG, basic_info_pb2.AutoChannelPruneConfig())
    assert config.compress_ratio == 1.5
    assert config.override_prune_cfg == "your/path/to/override_channel_prune.cfg"


def test_spec_sample_prune_config_parses() -> None:
    config = text_format.Parse(SPEC_PRUNE_CONFIG, retrain_config_pb2.AMCTRetrainConfig())
    override = config.override_layer_configs[0]
    assert override.layer_name == "layer2.0.conv1"
    assert override.prune_config.filter_pruner.balanced_l2_norm_filter_prune.prune_ratio == 0.5
    assert config.prune_config.WhichOneof("regular_prune_strategy") == "filter_pruner"
    assert list(config.regular_prune_skip_layers) == ["layer1.0.conv1"]


def test_spec_sample_record_parses() -> None:
    record = text_format.Parse(SPEC_RECORD, scale_offset_record_pb2.ScaleOffsetRecord())
    group = record.prune_record[0]
    assert [node.name for node in group.producer] == ["layer1.0"]
    assert [node.name for node in group.consumer] == ["layer1.1", "layer2.0"]
    first = group.producer[0].attr[0]
    assert (first.name, first.type, first.s) == ("type", scale_offset_record_pb2.AttrProto.STRING, b"Conv")


def test_reference_n_out_of_m_config_parses() -> None:
    # AMCT's 4:2 sparsity entry; acps never applies it, but a reference file holding one must still load.
    text = ("prune_config { n_out_of_m_pruner { "
            "l1_selective_prune { n_out_of_m_type: M4N2 update_freq: 2 } } }")
    config = text_format.Parse(text, retrain_config_pb2.AMCTRetrainConfig())
    assert config.prune_config.n_out_of_m_pruner.l1_selective_prune.update_freq == 2


def test_missing_grpc_tools_fails_with_install_hint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = importlib.import_module

    def no_grpc_tools(name: str, package: str | None = None) -> ModuleType:
        if name.startswith("grpc_tools"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, package)

    monkeypatch.setattr(importlib, "import_module", no_grpc_tools)
    with pytest.raises(pytest.fail.Exception, match=r"install the test extra"):
        _compile_sources(tmp_path)
