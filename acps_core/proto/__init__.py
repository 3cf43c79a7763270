"""Generated protobuf modules for acps's three file formats (do not edit the ``*_pb2`` files by hand).

* :mod:`acps_core.proto.basic_info_pb2`: ``AutoChannelPruneConfig``, the search config.
* :mod:`acps_core.proto.retrain_config_pb2`: ``AMCTRetrainConfig``, the channel-prune config.
* :mod:`acps_core.proto.scale_offset_record_pb2`: ``ScaleOffsetRecord``, the prune record file.

The sources are ``proto/*.proto`` at the repository root; ``python proto/generate.py`` regenerates these
modules with a pinned protoc whose output imports under protobuf 4.21 through 7.x, and
``tests/config/test_proto_schema.py`` fails when they drift from the sources.
"""

from __future__ import annotations

from acps_core.proto import basic_info_pb2, retrain_config_pb2, scale_offset_record_pb2

__all__ = ["basic_info_pb2", "retrain_config_pb2", "scale_offset_record_pb2"]
