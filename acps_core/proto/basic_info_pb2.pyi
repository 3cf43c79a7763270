from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class AutoChannelPruneConfig(_message.Message):
    __slots__ = ("compress_ratio", "ascend_optimized", "max_prune_ratio", "test_iteration", "override_prune_cfg")
    COMPRESS_RATIO_FIELD_NUMBER: _ClassVar[int]
    ASCEND_OPTIMIZED_FIELD_NUMBER: _ClassVar[int]
    MAX_PRUNE_RATIO_FIELD_NUMBER: _ClassVar[int]
    TEST_ITERATION_FIELD_NUMBER: _ClassVar[int]
    OVERRIDE_PRUNE_CFG_FIELD_NUMBER: _ClassVar[int]
    compress_ratio: float
    ascend_optimized: bool
    max_prune_ratio: float
    test_iteration: int
    override_prune_cfg: str
    def __init__(self, compress_ratio: _Optional[float] = ..., ascend_optimized: bool = ..., max_prune_ratio: _Optional[float] = ..., test_iteration: _Optional[int] = ..., override_prune_cfg: _Optional[str] = ...) -> None: ...
