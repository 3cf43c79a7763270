from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NOutOfMType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    M4N2: _ClassVar[NOutOfMType]
M4N2: NOutOfMType

class AMCTRetrainConfig(_message.Message):
    __slots__ = ("skip_layers", "override_layer_configs", "skip_layer_types", "override_layer_types", "prune_config", "regular_prune_skip_layers", "regular_prune_skip_types")
    SKIP_LAYERS_FIELD_NUMBER: _ClassVar[int]
    OVERRIDE_LAYER_CONFIGS_FIELD_NUMBER: _ClassVar[int]
    SKIP_LAYER_TYPES_FIELD_NUMBER: _ClassVar[int]
    OVERRIDE_LAYER_TYPES_FIELD_NUMBER: _ClassVar[int]
    PRUNE_CONFIG_FIELD_NUMBER: _ClassVar[int]
    REGULAR_PRUNE_SKIP_LAYERS_FIELD_NUMBER: _ClassVar[int]
    REGULAR_PRUNE_SKIP_TYPES_FIELD_NUMBER: _ClassVar[int]
    skip_layers: _containers.RepeatedScalarFieldContainer[str]
    override_layer_configs: _containers.RepeatedCompositeFieldContainer[RetrainOverrideLayer]
    skip_layer_types: _containers.RepeatedScalarFieldContainer[str]
    override_layer_types: _containers.RepeatedCompositeFieldContainer[RetrainOverrideLayerType]
    prune_config: PruneConfig
    regular_prune_skip_layers: _containers.RepeatedScalarFieldContainer[str]
    regular_prune_skip_types: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, skip_layers: _Optional[_Iterable[str]] = ..., override_layer_configs: _Optional[_Iterable[_Union[RetrainOverrideLayer, _Mapping]]] = ..., skip_layer_types: _Optional[_Iterable[str]] = ..., override_layer_types: _Optional[_Iterable[_Union[RetrainOverrideLayerType, _Mapping]]] = ..., prune_config: _Optional[_Union[PruneConfig, _Mapping]] = ..., regular_prune_skip_layers: _Optional[_Iterable[str]] = ..., regular_prune_skip_types: _Optional[_Iterable[str]] = ...) -> None: ...

class RetrainOverrideLayer(_message.Message):
    __slots__ = ("layer_name", "prune_config")
    LAYER_NAME_FIELD_NUMBER: _ClassVar[int]
    PRUNE_CONFIG_FIELD_NUMBER: _ClassVar[int]
    layer_name: str
    prune_config: PruneConfig
    def __init__(self, layer_name: _Optional[str] = ..., prune_config: _Optional[_Union[PruneConfig, _Mapping]] = ...) -> None: ...

class RetrainOverrideLayerType(_message.Message):
    __slots__ = ("layer_type", "prune_config")
    LAYER_TYPE_FIELD_NUMBER: _ClassVar[int]
    PRUNE_CONFIG_FIELD_NUMBER: _ClassVar[int]
    layer_type: str
    prune_config: PruneConfig
    def __init__(self, layer_type: _Optional[str] = ..., prune_config: _Optional[_Union[PruneConfig, _Mapping]] = ...) -> None: ...

class PruneConfig(_message.Message):
    __slots__ = ("filter_pruner", "n_out_of_m_pruner")
    FILTER_PRUNER_FIELD_NUMBER: _ClassVar[int]
    N_OUT_OF_M_PRUNER_FIELD_NUMBER: _ClassVar[int]
    filter_pruner: FilterPruner
    n_out_of_m_pruner: NOutOfMPruner
    def __init__(self, filter_pruner: _Optional[_Union[FilterPruner, _Mapping]] = ..., n_out_of_m_pruner: _Optional[_Union[NOutOfMPruner, _Mapping]] = ...) -> None: ...

class FilterPruner(_message.Message):
    __slots__ = ("balanced_l2_norm_filter_prune",)
    BALANCED_L2_NORM_FILTER_PRUNE_FIELD_NUMBER: _ClassVar[int]
    balanced_l2_norm_filter_prune: BalancedL2NormFilterPruner
    def __init__(self, balanced_l2_norm_filter_prune: _Optional[_Union[BalancedL2NormFilterPruner, _Mapping]] = ...) -> None: ...

class BalancedL2NormFilterPruner(_message.Message):
    __slots__ = ("prune_ratio", "ascend_optimized")
    PRUNE_RATIO_FIELD_NUMBER: _ClassVar[int]
    ASCEND_OPTIMIZED_FIELD_NUMBER: _ClassVar[int]
    prune_ratio: float
    ascend_optimized: bool
    def __init__(self, prune_ratio: _Optional[float] = ..., ascend_optimized: bool = ...) -> None: ...

class NOutOfMPruner(_message.Message):
    __slots__ = ("l1_selective_prune",)
    L1_SELECTIVE_PRUNE_FIELD_NUMBER: _ClassVar[int]
    l1_selective_prune: L1SelectivePruner
    def __init__(self, l1_selective_prune: _Optional[_Union[L1SelectivePruner, _Mapping]] = ...) -> None: ...

class L1SelectivePruner(_message.Message):
    __slots__ = ("n_out_of_m_type", "update_freq")
    N_OUT_OF_M_TYPE_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FREQ_FIELD_NUMBER: _ClassVar[int]
    n_out_of_m_type: NOutOfMType
    update_freq: int
    def __init__(self, n_out_of_m_type: _Optional[_Union[NOutOfMType, str]] = ..., update_freq: _Optional[int] = ...) -> None: ...
