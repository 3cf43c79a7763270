from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ScaleOffsetRecord(_message.Message):
    __slots__ = ("prune_record",)
    PRUNE_RECORD_FIELD_NUMBER: _ClassVar[int]
    prune_record: _containers.RepeatedCompositeFieldContainer[PruneRecord]
    def __init__(self, prune_record: _Optional[_Iterable[_Union[PruneRecord, _Mapping]]] = ...) -> None: ...

class PruneRecord(_message.Message):
    __slots__ = ("producer", "consumer")
    PRODUCER_FIELD_NUMBER: _ClassVar[int]
    CONSUMER_FIELD_NUMBER: _ClassVar[int]
    producer: _containers.RepeatedCompositeFieldContainer[PruneNode]
    consumer: _containers.RepeatedCompositeFieldContainer[PruneNode]
    def __init__(self, producer: _Optional[_Iterable[_Union[PruneNode, _Mapping]]] = ..., consumer: _Optional[_Iterable[_Union[PruneNode, _Mapping]]] = ...) -> None: ...

class PruneNode(_message.Message):
    __slots__ = ("name", "attr")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ATTR_FIELD_NUMBER: _ClassVar[int]
    name: str
    attr: _containers.RepeatedCompositeFieldContainer[AttrProto]
    def __init__(self, name: _Optional[str] = ..., attr: _Optional[_Iterable[_Union[AttrProto, _Mapping]]] = ...) -> None: ...

class AttrProto(_message.Message):
    __slots__ = ("name", "type", "f", "i", "s", "floats", "ints", "strings")
    class AttrType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        UNDEFINED: _ClassVar[AttrProto.AttrType]
        FLOAT: _ClassVar[AttrProto.AttrType]
        INT: _ClassVar[AttrProto.AttrType]
        STRING: _ClassVar[AttrProto.AttrType]
        FLOATS: _ClassVar[AttrProto.AttrType]
        INTS: _ClassVar[AttrProto.AttrType]
        STRINGS: _ClassVar[AttrProto.AttrType]
    UNDEFINED: AttrProto.AttrType
    FLOAT: AttrProto.AttrType
    INT: AttrProto.AttrType
    STRING: AttrProto.AttrType
    FLOATS: AttrProto.AttrType
    INTS: AttrProto.AttrType
    STRINGS: AttrProto.AttrType
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    F_FIELD_NUMBER: _ClassVar[int]
    I_FIELD_NUMBER: _ClassVar[int]
    S_FIELD_NUMBER: _ClassVar[int]
    FLOATS_FIELD_NUMBER: _ClassVar[int]
    INTS_FIELD_NUMBER: _ClassVar[int]
    STRINGS_FIELD_NUMBER: _ClassVar[int]
    name: str
    type: AttrProto.AttrType
    f: float
    i: int
    s: bytes
    floats: _containers.RepeatedScalarFieldContainer[float]
    ints: _containers.RepeatedScalarFieldContainer[int]
    strings: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, name: _Optional[str] = ..., type: _Optional[_Union[AttrProto.AttrType, str]] = ..., f: _Optional[float] = ..., i: _Optional[int] = ..., s: _Optional[bytes] = ..., floats: _Optional[_Iterable[float]] = ..., ints: _Optional[_Iterable[int]] = ..., strings: _Optional[_Iterable[bytes]] = ...) -> None: ...
