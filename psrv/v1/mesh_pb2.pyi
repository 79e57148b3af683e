from psrv.v1 import psrv_pb2 as _psrv_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JoinRequest(_message.Message):
    __slots__ = ("worker_id", "address", "num_samples", "n_features", "n_classes")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    N_FEATURES_FIELD_NUMBER: _ClassVar[int]
    N_CLASSES_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    address: str
    num_samples: int
    n_features: int
    n_classes: int
    def __init__(self, worker_id: _Optional[str] = ..., address: _Optional[str] = ..., num_samples: _Optional[int] = ..., n_features: _Optional[int] = ..., n_classes: _Optional[int] = ...) -> None: ...

class MeshPeer(_message.Message):
    __slots__ = ("worker_id", "address", "weight", "index")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    address: str
    weight: float
    index: int
    def __init__(self, worker_id: _Optional[str] = ..., address: _Optional[str] = ..., weight: _Optional[float] = ..., index: _Optional[int] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("worker_index", "config", "neighbours", "self_weight", "total_samples", "rounds", "topology")
    WORKER_INDEX_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    SELF_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    TOPOLOGY_FIELD_NUMBER: _ClassVar[int]
    worker_index: int
    config: _psrv_pb2.RunConfig
    neighbours: _containers.RepeatedCompositeFieldContainer[MeshPeer]
    self_weight: float
    total_samples: int
    rounds: int
    topology: str
    def __init__(self, worker_index: _Optional[int] = ..., config: _Optional[_Union[_psrv_pb2.RunConfig, _Mapping]] = ..., neighbours: _Optional[_Iterable[_Union[MeshPeer, _Mapping]]] = ..., self_weight: _Optional[float] = ..., total_samples: _Optional[int] = ..., rounds: _Optional[int] = ..., topology: _Optional[str] = ...) -> None: ...

class LinkBytes(_message.Message):
    __slots__ = ("peer", "sent", "received")
    PEER_FIELD_NUMBER: _ClassVar[int]
    SENT_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    peer: str
    sent: int
    received: int
    def __init__(self, peer: _Optional[str] = ..., sent: _Optional[int] = ..., received: _Optional[int] = ...) -> None: ...

class BarrierRequest(_message.Message):
    __slots__ = ("worker_id", "round", "loss", "links", "disagreement")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    LINKS_FIELD_NUMBER: _ClassVar[int]
    DISAGREEMENT_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    round: int
    loss: float
    links: _containers.RepeatedCompositeFieldContainer[LinkBytes]
    disagreement: float
    def __init__(self, worker_id: _Optional[str] = ..., round: _Optional[int] = ..., loss: _Optional[float] = ..., links: _Optional[_Iterable[_Union[LinkBytes, _Mapping]]] = ..., disagreement: _Optional[float] = ...) -> None: ...

class BarrierResponse(_message.Message):
    __slots__ = ("round", "done")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    round: int
    done: bool
    def __init__(self, round: _Optional[int] = ..., done: _Optional[bool] = ...) -> None: ...

class FinishRequest(_message.Message):
    __slots__ = ("worker_id", "params")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    params: _psrv_pb2.DenseTensor
    def __init__(self, worker_id: _Optional[str] = ..., params: _Optional[_Union[_psrv_pb2.DenseTensor, _Mapping]] = ...) -> None: ...

class FinishResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExchangeRequest(_message.Message):
    __slots__ = ("sender", "round", "values")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    sender: str
    round: int
    values: _psrv_pb2.DenseTensor
    def __init__(self, sender: _Optional[str] = ..., round: _Optional[int] = ..., values: _Optional[_Union[_psrv_pb2.DenseTensor, _Mapping]] = ...) -> None: ...

class ExchangeResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
