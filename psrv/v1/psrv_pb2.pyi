from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RoundTransport(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROUND_TRANSPORT_UNSPECIFIED: _ClassVar[RoundTransport]
    ROUND_TRANSPORT_UNARY: _ClassVar[RoundTransport]
    ROUND_TRANSPORT_STREAM: _ClassVar[RoundTransport]

class Dtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[Dtype]
    DTYPE_FLOAT32: _ClassVar[Dtype]
    DTYPE_FLOAT64: _ClassVar[Dtype]
    DTYPE_FLOAT16: _ClassVar[Dtype]
    DTYPE_BFLOAT16: _ClassVar[Dtype]

class IndexEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INDEX_ENCODING_UNSPECIFIED: _ClassVar[IndexEncoding]
    INDEX_ENCODING_BITPACKED: _ClassVar[IndexEncoding]
    INDEX_ENCODING_DELTA_VARINT: _ClassVar[IndexEncoding]

class PayloadKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PAYLOAD_KIND_UNSPECIFIED: _ClassVar[PayloadKind]
    PAYLOAD_KIND_DENSE: _ClassVar[PayloadKind]
    PAYLOAD_KIND_SPARSE: _ClassVar[PayloadKind]
    PAYLOAD_KIND_LAQ: _ClassVar[PayloadKind]
    PAYLOAD_KIND_QSGD: _ClassVar[PayloadKind]
    PAYLOAD_KIND_SIGN_SPARSE: _ClassVar[PayloadKind]

class SkipReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SKIP_REASON_UNSPECIFIED: _ClassVar[SkipReason]
    SKIP_REASON_LAZY_RULE: _ClassVar[SkipReason]
    SKIP_REASON_NOT_SELECTED: _ClassVar[SkipReason]
ROUND_TRANSPORT_UNSPECIFIED: RoundTransport
ROUND_TRANSPORT_UNARY: RoundTransport
ROUND_TRANSPORT_STREAM: RoundTransport
DTYPE_UNSPECIFIED: Dtype
DTYPE_FLOAT32: Dtype
DTYPE_FLOAT64: Dtype
DTYPE_FLOAT16: Dtype
DTYPE_BFLOAT16: Dtype
INDEX_ENCODING_UNSPECIFIED: IndexEncoding
INDEX_ENCODING_BITPACKED: IndexEncoding
INDEX_ENCODING_DELTA_VARINT: IndexEncoding
PAYLOAD_KIND_UNSPECIFIED: PayloadKind
PAYLOAD_KIND_DENSE: PayloadKind
PAYLOAD_KIND_SPARSE: PayloadKind
PAYLOAD_KIND_LAQ: PayloadKind
PAYLOAD_KIND_QSGD: PayloadKind
PAYLOAD_KIND_SIGN_SPARSE: PayloadKind
SKIP_REASON_UNSPECIFIED: SkipReason
SKIP_REASON_LAZY_RULE: SkipReason
SKIP_REASON_NOT_SELECTED: SkipReason

class DenseTensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: Dtype
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[Dtype, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class SparseTensor(_message.Message):
    __slots__ = ("dim", "nnz", "index_encoding", "indices", "value_dtype", "values")
    DIM_FIELD_NUMBER: _ClassVar[int]
    NNZ_FIELD_NUMBER: _ClassVar[int]
    INDEX_ENCODING_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    VALUE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    dim: int
    nnz: int
    index_encoding: IndexEncoding
    indices: bytes
    value_dtype: Dtype
    values: bytes
    def __init__(self, dim: _Optional[int] = ..., nnz: _Optional[int] = ..., index_encoding: _Optional[_Union[IndexEncoding, str]] = ..., indices: _Optional[bytes] = ..., value_dtype: _Optional[_Union[Dtype, str]] = ..., values: _Optional[bytes] = ...) -> None: ...

class LaqPayload(_message.Message):
    __slots__ = ("dim", "radius", "bits", "codes")
    DIM_FIELD_NUMBER: _ClassVar[int]
    RADIUS_FIELD_NUMBER: _ClassVar[int]
    BITS_FIELD_NUMBER: _ClassVar[int]
    CODES_FIELD_NUMBER: _ClassVar[int]
    dim: int
    radius: float
    bits: int
    codes: bytes
    def __init__(self, dim: _Optional[int] = ..., radius: _Optional[float] = ..., bits: _Optional[int] = ..., codes: _Optional[bytes] = ...) -> None: ...

class QsgdPayload(_message.Message):
    __slots__ = ("dim", "norm", "levels", "signs", "codes")
    DIM_FIELD_NUMBER: _ClassVar[int]
    NORM_FIELD_NUMBER: _ClassVar[int]
    LEVELS_FIELD_NUMBER: _ClassVar[int]
    SIGNS_FIELD_NUMBER: _ClassVar[int]
    CODES_FIELD_NUMBER: _ClassVar[int]
    dim: int
    norm: float
    levels: int
    signs: bytes
    codes: bytes
    def __init__(self, dim: _Optional[int] = ..., norm: _Optional[float] = ..., levels: _Optional[int] = ..., signs: _Optional[bytes] = ..., codes: _Optional[bytes] = ...) -> None: ...

class SignSparsePayload(_message.Message):
    __slots__ = ("dim", "nnz", "scale", "index_encoding", "indices", "signs")
    DIM_FIELD_NUMBER: _ClassVar[int]
    NNZ_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    INDEX_ENCODING_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    SIGNS_FIELD_NUMBER: _ClassVar[int]
    dim: int
    nnz: int
    scale: float
    index_encoding: IndexEncoding
    indices: bytes
    signs: bytes
    def __init__(self, dim: _Optional[int] = ..., nnz: _Optional[int] = ..., scale: _Optional[float] = ..., index_encoding: _Optional[_Union[IndexEncoding, str]] = ..., indices: _Optional[bytes] = ..., signs: _Optional[bytes] = ...) -> None: ...

class ZstdPayload(_message.Message):
    __slots__ = ("kind", "data")
    KIND_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    kind: PayloadKind
    data: bytes
    def __init__(self, kind: _Optional[_Union[PayloadKind, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("worker_id", "num_samples", "n_features", "n_classes")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    N_FEATURES_FIELD_NUMBER: _ClassVar[int]
    N_CLASSES_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    num_samples: int
    n_features: int
    n_classes: int
    def __init__(self, worker_id: _Optional[str] = ..., num_samples: _Optional[int] = ..., n_features: _Optional[int] = ..., n_classes: _Optional[int] = ...) -> None: ...

class RunConfig(_message.Message):
    __slots__ = ("algorithm", "compressor", "options", "task", "task_options", "dim", "num_workers", "seed", "zstd", "model_dtype", "down_compressor", "round_transport", "server_opt")
    class OptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class TaskOptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    COMPRESSOR_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    TASK_OPTIONS_FIELD_NUMBER: _ClassVar[int]
    DIM_FIELD_NUMBER: _ClassVar[int]
    NUM_WORKERS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    ZSTD_FIELD_NUMBER: _ClassVar[int]
    MODEL_DTYPE_FIELD_NUMBER: _ClassVar[int]
    DOWN_COMPRESSOR_FIELD_NUMBER: _ClassVar[int]
    ROUND_TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    SERVER_OPT_FIELD_NUMBER: _ClassVar[int]
    algorithm: str
    compressor: str
    options: _containers.ScalarMap[str, float]
    task: str
    task_options: _containers.ScalarMap[str, float]
    dim: int
    num_workers: int
    seed: int
    zstd: bool
    model_dtype: Dtype
    down_compressor: str
    round_transport: RoundTransport
    server_opt: str
    def __init__(self, algorithm: _Optional[str] = ..., compressor: _Optional[str] = ..., options: _Optional[_Mapping[str, float]] = ..., task: _Optional[str] = ..., task_options: _Optional[_Mapping[str, float]] = ..., dim: _Optional[int] = ..., num_workers: _Optional[int] = ..., seed: _Optional[int] = ..., zstd: _Optional[bool] = ..., model_dtype: _Optional[_Union[Dtype, str]] = ..., down_compressor: _Optional[str] = ..., round_transport: _Optional[_Union[RoundTransport, str]] = ..., server_opt: _Optional[str] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("worker_index", "config", "rejoin")
    WORKER_INDEX_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    REJOIN_FIELD_NUMBER: _ClassVar[int]
    worker_index: int
    config: RunConfig
    rejoin: Rejoin
    def __init__(self, worker_index: _Optional[int] = ..., config: _Optional[_Union[RunConfig, _Mapping]] = ..., rejoin: _Optional[_Union[Rejoin, _Mapping]] = ...) -> None: ...

class Rejoin(_message.Message):
    __slots__ = ("round", "contribution")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    round: int
    contribution: DenseTensor
    def __init__(self, round: _Optional[int] = ..., contribution: _Optional[_Union[DenseTensor, _Mapping]] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("worker_id", "round", "replica_round")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ROUND_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    round: int
    replica_round: int
    def __init__(self, worker_id: _Optional[str] = ..., round: _Optional[int] = ..., replica_round: _Optional[int] = ...) -> None: ...

class Payload(_message.Message):
    __slots__ = ("dense", "sparse", "laq", "qsgd", "sign_sparse", "zstd")
    DENSE_FIELD_NUMBER: _ClassVar[int]
    SPARSE_FIELD_NUMBER: _ClassVar[int]
    LAQ_FIELD_NUMBER: _ClassVar[int]
    QSGD_FIELD_NUMBER: _ClassVar[int]
    SIGN_SPARSE_FIELD_NUMBER: _ClassVar[int]
    ZSTD_FIELD_NUMBER: _ClassVar[int]
    dense: DenseTensor
    sparse: SparseTensor
    laq: LaqPayload
    qsgd: QsgdPayload
    sign_sparse: SignSparsePayload
    zstd: ZstdPayload
    def __init__(self, dense: _Optional[_Union[DenseTensor, _Mapping]] = ..., sparse: _Optional[_Union[SparseTensor, _Mapping]] = ..., laq: _Optional[_Union[LaqPayload, _Mapping]] = ..., qsgd: _Optional[_Union[QsgdPayload, _Mapping]] = ..., sign_sparse: _Optional[_Union[SignSparsePayload, _Mapping]] = ..., zstd: _Optional[_Union[ZstdPayload, _Mapping]] = ...) -> None: ...

class Contribution(_message.Message):
    __slots__ = ("worker", "payload")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    worker: int
    payload: Payload
    def __init__(self, worker: _Optional[int] = ..., payload: _Optional[_Union[Payload, _Mapping]] = ...) -> None: ...

class Contributions(_message.Message):
    __slots__ = ("contributions",)
    CONTRIBUTIONS_FIELD_NUMBER: _ClassVar[int]
    contributions: _containers.RepeatedCompositeFieldContainer[Contribution]
    def __init__(self, contributions: _Optional[_Iterable[_Union[Contribution, _Mapping]]] = ...) -> None: ...

class StateUpdate(_message.Message):
    __slots__ = ("relay", "values", "aggregate")
    RELAY_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    AGGREGATE_FIELD_NUMBER: _ClassVar[int]
    relay: Contributions
    values: SparseTensor
    aggregate: DenseTensor
    def __init__(self, relay: _Optional[_Union[Contributions, _Mapping]] = ..., values: _Optional[_Union[SparseTensor, _Mapping]] = ..., aggregate: _Optional[_Union[DenseTensor, _Mapping]] = ...) -> None: ...

class Snapshot(_message.Message):
    __slots__ = ("theta", "theta_sparse", "aggregate", "aggregate_sparse", "recent_step_sq", "server_opt")
    THETA_FIELD_NUMBER: _ClassVar[int]
    THETA_SPARSE_FIELD_NUMBER: _ClassVar[int]
    AGGREGATE_FIELD_NUMBER: _ClassVar[int]
    AGGREGATE_SPARSE_FIELD_NUMBER: _ClassVar[int]
    RECENT_STEP_SQ_FIELD_NUMBER: _ClassVar[int]
    SERVER_OPT_FIELD_NUMBER: _ClassVar[int]
    theta: DenseTensor
    theta_sparse: SparseTensor
    aggregate: DenseTensor
    aggregate_sparse: SparseTensor
    recent_step_sq: _containers.RepeatedScalarFieldContainer[float]
    server_opt: ServerOptState
    def __init__(self, theta: _Optional[_Union[DenseTensor, _Mapping]] = ..., theta_sparse: _Optional[_Union[SparseTensor, _Mapping]] = ..., aggregate: _Optional[_Union[DenseTensor, _Mapping]] = ..., aggregate_sparse: _Optional[_Union[SparseTensor, _Mapping]] = ..., recent_step_sq: _Optional[_Iterable[float]] = ..., server_opt: _Optional[_Union[ServerOptState, _Mapping]] = ...) -> None: ...

class ServerOptState(_message.Message):
    __slots__ = ("count", "beta1_power", "beta2_power", "first_moment", "first_moment_sparse", "second_moment", "second_moment_sparse")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    BETA1_POWER_FIELD_NUMBER: _ClassVar[int]
    BETA2_POWER_FIELD_NUMBER: _ClassVar[int]
    FIRST_MOMENT_FIELD_NUMBER: _ClassVar[int]
    FIRST_MOMENT_SPARSE_FIELD_NUMBER: _ClassVar[int]
    SECOND_MOMENT_FIELD_NUMBER: _ClassVar[int]
    SECOND_MOMENT_SPARSE_FIELD_NUMBER: _ClassVar[int]
    count: int
    beta1_power: float
    beta2_power: float
    first_moment: DenseTensor
    first_moment_sparse: SparseTensor
    second_moment: DenseTensor
    second_moment_sparse: SparseTensor
    def __init__(self, count: _Optional[int] = ..., beta1_power: _Optional[float] = ..., beta2_power: _Optional[float] = ..., first_moment: _Optional[_Union[DenseTensor, _Mapping]] = ..., first_moment_sparse: _Optional[_Union[SparseTensor, _Mapping]] = ..., second_moment: _Optional[_Union[DenseTensor, _Mapping]] = ..., second_moment_sparse: _Optional[_Union[SparseTensor, _Mapping]] = ...) -> None: ...

class Selection(_message.Message):
    __slots__ = ("workers",)
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, workers: _Optional[_Iterable[int]] = ...) -> None: ...

class GetModelResponse(_message.Message):
    __slots__ = ("round", "params", "recent_step_sq", "total_samples", "num_workers", "done", "selection", "update", "snapshot", "digest", "compressed")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    RECENT_STEP_SQ_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    NUM_WORKERS_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    SELECTION_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    COMPRESSED_FIELD_NUMBER: _ClassVar[int]
    round: int
    params: DenseTensor
    recent_step_sq: _containers.RepeatedScalarFieldContainer[float]
    total_samples: int
    num_workers: int
    done: bool
    selection: Selection
    update: StateUpdate
    snapshot: Snapshot
    digest: int
    compressed: Payload
    def __init__(self, round: _Optional[int] = ..., params: _Optional[_Union[DenseTensor, _Mapping]] = ..., recent_step_sq: _Optional[_Iterable[float]] = ..., total_samples: _Optional[int] = ..., num_workers: _Optional[int] = ..., done: _Optional[bool] = ..., selection: _Optional[_Union[Selection, _Mapping]] = ..., update: _Optional[_Union[StateUpdate, _Mapping]] = ..., snapshot: _Optional[_Union[Snapshot, _Mapping]] = ..., digest: _Optional[int] = ..., compressed: _Optional[_Union[Payload, _Mapping]] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("worker_id", "round", "local_loss", "smoothness", "dense", "sparse", "laq", "qsgd", "sign_sparse", "zstd")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    LOCAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    SMOOTHNESS_FIELD_NUMBER: _ClassVar[int]
    DENSE_FIELD_NUMBER: _ClassVar[int]
    SPARSE_FIELD_NUMBER: _ClassVar[int]
    LAQ_FIELD_NUMBER: _ClassVar[int]
    QSGD_FIELD_NUMBER: _ClassVar[int]
    SIGN_SPARSE_FIELD_NUMBER: _ClassVar[int]
    ZSTD_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    round: int
    local_loss: float
    smoothness: float
    dense: DenseTensor
    sparse: SparseTensor
    laq: LaqPayload
    qsgd: QsgdPayload
    sign_sparse: SignSparsePayload
    zstd: ZstdPayload
    def __init__(self, worker_id: _Optional[str] = ..., round: _Optional[int] = ..., local_loss: _Optional[float] = ..., smoothness: _Optional[float] = ..., dense: _Optional[_Union[DenseTensor, _Mapping]] = ..., sparse: _Optional[_Union[SparseTensor, _Mapping]] = ..., laq: _Optional[_Union[LaqPayload, _Mapping]] = ..., qsgd: _Optional[_Union[QsgdPayload, _Mapping]] = ..., sign_sparse: _Optional[_Union[SignSparsePayload, _Mapping]] = ..., zstd: _Optional[_Union[ZstdPayload, _Mapping]] = ...) -> None: ...

class PushResponse(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    def __init__(self, round: _Optional[int] = ...) -> None: ...

class SkipRequest(_message.Message):
    __slots__ = ("worker_id", "round", "reason", "local_loss")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    LOCAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    round: int
    reason: SkipReason
    local_loss: float
    def __init__(self, worker_id: _Optional[str] = ..., round: _Optional[int] = ..., reason: _Optional[_Union[SkipReason, str]] = ..., local_loss: _Optional[float] = ...) -> None: ...

class SkipResponse(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    def __init__(self, round: _Optional[int] = ...) -> None: ...

class GetModelStreamRequest(_message.Message):
    __slots__ = ("worker_id", "round", "replica_round")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ROUND_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    round: int
    replica_round: int
    def __init__(self, worker_id: _Optional[str] = ..., round: _Optional[int] = ..., replica_round: _Optional[int] = ...) -> None: ...

class GetModelStreamResponse(_message.Message):
    __slots__ = ("offset", "total_size", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    total_size: int
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., total_size: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class PushStreamRequest(_message.Message):
    __slots__ = ("offset", "total_size", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    total_size: int
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., total_size: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class PushStreamResponse(_message.Message):
    __slots__ = ("round",)
    ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    def __init__(self, round: _Optional[int] = ...) -> None: ...

class RoundsOpen(_message.Message):
    __slots__ = ("worker_id", "round", "replica_round")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ROUND_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    round: int
    replica_round: int
    def __init__(self, worker_id: _Optional[str] = ..., round: _Optional[int] = ..., replica_round: _Optional[int] = ...) -> None: ...

class RoundsSkip(_message.Message):
    __slots__ = ("reason", "local_loss")
    REASON_FIELD_NUMBER: _ClassVar[int]
    LOCAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    reason: SkipReason
    local_loss: float
    def __init__(self, reason: _Optional[_Union[SkipReason, str]] = ..., local_loss: _Optional[float] = ...) -> None: ...

class RoundsResync(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RoundsRequest(_message.Message):
    __slots__ = ("open", "skip", "push", "push_piece", "resync")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    SKIP_FIELD_NUMBER: _ClassVar[int]
    PUSH_FIELD_NUMBER: _ClassVar[int]
    PUSH_PIECE_FIELD_NUMBER: _ClassVar[int]
    RESYNC_FIELD_NUMBER: _ClassVar[int]
    open: RoundsOpen
    skip: RoundsSkip
    push: PushRequest
    push_piece: PushStreamRequest
    resync: RoundsResync
    def __init__(self, open: _Optional[_Union[RoundsOpen, _Mapping]] = ..., skip: _Optional[_Union[RoundsSkip, _Mapping]] = ..., push: _Optional[_Union[PushRequest, _Mapping]] = ..., push_piece: _Optional[_Union[PushStreamRequest, _Mapping]] = ..., resync: _Optional[_Union[RoundsResync, _Mapping]] = ...) -> None: ...

class RoundsRejected(_message.Message):
    __slots__ = ("round", "reason")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    round: int
    reason: str
    def __init__(self, round: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class RoundsResponse(_message.Message):
    __slots__ = ("model", "model_piece", "rejected")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MODEL_PIECE_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    model: GetModelResponse
    model_piece: GetModelStreamResponse
    rejected: RoundsRejected
    def __init__(self, model: _Optional[_Union[GetModelResponse, _Mapping]] = ..., model_piece: _Optional[_Union[GetModelStreamResponse, _Mapping]] = ..., rejected: _Optional[_Union[RoundsRejected, _Mapping]] = ...) -> None: ...

class HostRoundsOpen(_message.Message):
    __slots__ = ("workers",)
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[RoundsOpen]
    def __init__(self, workers: _Optional[_Iterable[_Union[RoundsOpen, _Mapping]]] = ...) -> None: ...

class HostRoundsReport(_message.Message):
    __slots__ = ("worker_id", "report")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    report: RoundsRequest
    def __init__(self, worker_id: _Optional[str] = ..., report: _Optional[_Union[RoundsRequest, _Mapping]] = ...) -> None: ...

class HostRoundsRequest(_message.Message):
    __slots__ = ("open", "report", "reports", "leave")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    LEAVE_FIELD_NUMBER: _ClassVar[int]
    open: HostRoundsOpen
    report: HostRoundsReport
    reports: HostRoundsReports
    leave: HostRoundsLeave
    def __init__(self, open: _Optional[_Union[HostRoundsOpen, _Mapping]] = ..., report: _Optional[_Union[HostRoundsReport, _Mapping]] = ..., reports: _Optional[_Union[HostRoundsReports, _Mapping]] = ..., leave: _Optional[_Union[HostRoundsLeave, _Mapping]] = ...) -> None: ...

class HostRoundsLeave(_message.Message):
    __slots__ = ("worker_id",)
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    def __init__(self, worker_id: _Optional[str] = ...) -> None: ...

class HostRoundsReports(_message.Message):
    __slots__ = ("reports",)
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    reports: _containers.RepeatedCompositeFieldContainer[HostRoundsReport]
    def __init__(self, reports: _Optional[_Iterable[_Union[HostRoundsReport, _Mapping]]] = ...) -> None: ...

class HostRoundsResponse(_message.Message):
    __slots__ = ("worker_ids", "response")
    WORKER_IDS_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    worker_ids: _containers.RepeatedScalarFieldContainer[str]
    response: RoundsResponse
    def __init__(self, worker_ids: _Optional[_Iterable[str]] = ..., response: _Optional[_Union[RoundsResponse, _Mapping]] = ...) -> None: ...

class ProbeRequest(_message.Message):
    __slots__ = ("worker_id", "payload")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    payload: bytes
    def __init__(self, worker_id: _Optional[str] = ..., payload: _Optional[bytes] = ...) -> None: ...

class ProbeResponse(_message.Message):
    __slots__ = ("received_bytes", "max_message_bytes")
    RECEIVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    received_bytes: int
    max_message_bytes: int
    def __init__(self, received_bytes: _Optional[int] = ..., max_message_bytes: _Optional[int] = ...) -> None: ...
