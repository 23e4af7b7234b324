from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RequestPhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REQUEST_PHASE_UNKNOWN: _ClassVar[RequestPhase]
    REQUEST_PHASE_WAITING: _ClassVar[RequestPhase]
    REQUEST_PHASE_PREFILL: _ClassVar[RequestPhase]
    REQUEST_PHASE_DECODING: _ClassVar[RequestPhase]
    REQUEST_PHASE_SUSPENDED: _ClassVar[RequestPhase]
    REQUEST_PHASE_PINNED: _ClassVar[RequestPhase]
    REQUEST_PHASE_FINISHED: _ClassVar[RequestPhase]

class StageStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STAGE_STATUS_UNSPECIFIED: _ClassVar[StageStatus]
    STAGE_STATUS_SENT: _ClassVar[StageStatus]
    STAGE_STATUS_NOT_MIGRATABLE: _ClassVar[StageStatus]
    STAGE_STATUS_REFUSED: _ClassVar[StageStatus]
    STAGE_STATUS_DESTINATION_FAILED: _ClassVar[StageStatus]

class HandoffStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HANDOFF_STATUS_UNSPECIFIED: _ClassVar[HandoffStatus]
    HANDOFF_STATUS_COMMITTED: _ClassVar[HandoffStatus]
    HANDOFF_STATUS_NOT_MIGRATABLE: _ClassVar[HandoffStatus]
    HANDOFF_STATUS_ABORTED: _ClassVar[HandoffStatus]
REQUEST_PHASE_UNKNOWN: RequestPhase
REQUEST_PHASE_WAITING: RequestPhase
REQUEST_PHASE_PREFILL: RequestPhase
REQUEST_PHASE_DECODING: RequestPhase
REQUEST_PHASE_SUSPENDED: RequestPhase
REQUEST_PHASE_PINNED: RequestPhase
REQUEST_PHASE_FINISHED: RequestPhase
STAGE_STATUS_UNSPECIFIED: StageStatus
STAGE_STATUS_SENT: StageStatus
STAGE_STATUS_NOT_MIGRATABLE: StageStatus
STAGE_STATUS_REFUSED: StageStatus
STAGE_STATUS_DESTINATION_FAILED: StageStatus
HANDOFF_STATUS_UNSPECIFIED: HandoffStatus
HANDOFF_STATUS_COMMITTED: HandoffStatus
HANDOFF_STATUS_NOT_MIGRATABLE: HandoffStatus
HANDOFF_STATUS_ABORTED: HandoffStatus

class BlockBatch(_message.Message):
    __slots__ = ("migration_id", "first_block", "block_hashes", "has_parent", "parent_hash", "token_ids", "payload", "payload_bytes_per_block")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    FIRST_BLOCK_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    HAS_PARENT_FIELD_NUMBER: _ClassVar[int]
    PARENT_HASH_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_PER_BLOCK_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    first_block: int
    block_hashes: _containers.RepeatedScalarFieldContainer[int]
    has_parent: bool
    parent_hash: int
    token_ids: bytes
    payload: bytes
    payload_bytes_per_block: int
    def __init__(self, migration_id: _Optional[str] = ..., first_block: _Optional[int] = ..., block_hashes: _Optional[_Iterable[int]] = ..., has_parent: _Optional[bool] = ..., parent_hash: _Optional[int] = ..., token_ids: _Optional[bytes] = ..., payload: _Optional[bytes] = ..., payload_bytes_per_block: _Optional[int] = ...) -> None: ...

class ReserveRequest(_message.Message):
    __slots__ = ("migration_id", "request_id", "num_blocks", "ttl_s", "source_instance_id")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    SOURCE_INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    request_id: str
    num_blocks: int
    ttl_s: float
    source_instance_id: str
    def __init__(self, migration_id: _Optional[str] = ..., request_id: _Optional[str] = ..., num_blocks: _Optional[int] = ..., ttl_s: _Optional[float] = ..., source_instance_id: _Optional[str] = ...) -> None: ...

class ReserveReply(_message.Message):
    __slots__ = ("accepted", "reason", "free_blocks", "reserved_blocks")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    FREE_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    RESERVED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    free_blocks: int
    reserved_blocks: int
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ..., free_blocks: _Optional[int] = ..., reserved_blocks: _Optional[int] = ...) -> None: ...

class PushReply(_message.Message):
    __slots__ = ("blocks_received", "blocks_copied", "bytes_received", "error")
    BLOCKS_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_COPIED_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    blocks_received: int
    blocks_copied: int
    bytes_received: int
    error: str
    def __init__(self, blocks_received: _Optional[int] = ..., blocks_copied: _Optional[int] = ..., bytes_received: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class RequestState(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "output_token_ids", "max_tokens", "temperature", "seed", "stop_token_ids", "num_cached_tokens", "client_state", "num_full_blocks", "partial_block_token_ids", "partial_block_payload", "partial_block_has_parent", "partial_block_parent_hash")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CLIENT_STATE_FIELD_NUMBER: _ClassVar[int]
    NUM_FULL_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_BLOCK_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_BLOCK_PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_BLOCK_HAS_PARENT_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_BLOCK_PARENT_HASH_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: bytes
    output_token_ids: bytes
    max_tokens: int
    temperature: float
    seed: int
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    num_cached_tokens: int
    client_state: bytes
    num_full_blocks: int
    partial_block_token_ids: bytes
    partial_block_payload: bytes
    partial_block_has_parent: bool
    partial_block_parent_hash: int
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[bytes] = ..., output_token_ids: _Optional[bytes] = ..., max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., seed: _Optional[int] = ..., stop_token_ids: _Optional[_Iterable[int]] = ..., num_cached_tokens: _Optional[int] = ..., client_state: _Optional[bytes] = ..., num_full_blocks: _Optional[int] = ..., partial_block_token_ids: _Optional[bytes] = ..., partial_block_payload: _Optional[bytes] = ..., partial_block_has_parent: _Optional[bool] = ..., partial_block_parent_hash: _Optional[int] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("migration_id", "state")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    state: RequestState
    def __init__(self, migration_id: _Optional[str] = ..., state: _Optional[_Union[RequestState, _Mapping]] = ...) -> None: ...

class CommitReply(_message.Message):
    __slots__ = ("committed", "reason", "instance_id", "url")
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    committed: bool
    reason: str
    instance_id: str
    url: str
    def __init__(self, committed: _Optional[bool] = ..., reason: _Optional[str] = ..., instance_id: _Optional[str] = ..., url: _Optional[str] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("migration_id", "reason")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    reason: str
    def __init__(self, migration_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class AbortReply(_message.Message):
    __slots__ = ("known", "committed", "instance_id", "url")
    KNOWN_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    known: bool
    committed: bool
    instance_id: str
    url: str
    def __init__(self, known: _Optional[bool] = ..., committed: _Optional[bool] = ..., instance_id: _Optional[str] = ..., url: _Optional[str] = ...) -> None: ...

class RequestStateQuery(_message.Message):
    __slots__ = ("request_id",)
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    def __init__(self, request_id: _Optional[str] = ...) -> None: ...

class RequestStateReply(_message.Message):
    __slots__ = ("phase", "num_tokens", "num_output_tokens", "num_full_blocks", "instance_id", "url")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_FULL_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    phase: RequestPhase
    num_tokens: int
    num_output_tokens: int
    num_full_blocks: int
    instance_id: str
    url: str
    def __init__(self, phase: _Optional[_Union[RequestPhase, str]] = ..., num_tokens: _Optional[int] = ..., num_output_tokens: _Optional[int] = ..., num_full_blocks: _Optional[int] = ..., instance_id: _Optional[str] = ..., url: _Optional[str] = ...) -> None: ...

class LinkModel(_message.Message):
    __slots__ = ("gbytes_per_s", "modelled_bytes_per_block")
    GBYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    MODELLED_BYTES_PER_BLOCK_FIELD_NUMBER: _ClassVar[int]
    gbytes_per_s: float
    modelled_bytes_per_block: int
    def __init__(self, gbytes_per_s: _Optional[float] = ..., modelled_bytes_per_block: _Optional[int] = ...) -> None: ...

class SendBlocksRequest(_message.Message):
    __slots__ = ("migration_id", "request_id", "destination", "start_block", "ttl_s", "link", "max_batch_bytes")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    START_BLOCK_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    LINK_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_BYTES_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    request_id: str
    destination: str
    start_block: int
    ttl_s: float
    link: LinkModel
    max_batch_bytes: int
    def __init__(self, migration_id: _Optional[str] = ..., request_id: _Optional[str] = ..., destination: _Optional[str] = ..., start_block: _Optional[int] = ..., ttl_s: _Optional[float] = ..., link: _Optional[_Union[LinkModel, _Mapping]] = ..., max_batch_bytes: _Optional[int] = ...) -> None: ...

class StageReply(_message.Message):
    __slots__ = ("status", "reason", "blocks_sent", "bytes_sent", "num_full_blocks", "num_output_tokens")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    NUM_FULL_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    NUM_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    status: StageStatus
    reason: str
    blocks_sent: int
    bytes_sent: int
    num_full_blocks: int
    num_output_tokens: int
    def __init__(self, status: _Optional[_Union[StageStatus, str]] = ..., reason: _Optional[str] = ..., blocks_sent: _Optional[int] = ..., bytes_sent: _Optional[int] = ..., num_full_blocks: _Optional[int] = ..., num_output_tokens: _Optional[int] = ...) -> None: ...

class HandoffRequest(_message.Message):
    __slots__ = ("migration_id", "request_id", "destination", "start_block", "ttl_s", "link", "rpc_timeout_s", "max_batch_bytes")
    MIGRATION_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    START_BLOCK_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    LINK_FIELD_NUMBER: _ClassVar[int]
    RPC_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_BYTES_FIELD_NUMBER: _ClassVar[int]
    migration_id: str
    request_id: str
    destination: str
    start_block: int
    ttl_s: float
    link: LinkModel
    rpc_timeout_s: float
    max_batch_bytes: int
    def __init__(self, migration_id: _Optional[str] = ..., request_id: _Optional[str] = ..., destination: _Optional[str] = ..., start_block: _Optional[int] = ..., ttl_s: _Optional[float] = ..., link: _Optional[_Union[LinkModel, _Mapping]] = ..., rpc_timeout_s: _Optional[float] = ..., max_batch_bytes: _Optional[int] = ...) -> None: ...

class HandoffReply(_message.Message):
    __slots__ = ("status", "reason", "blocks_sent", "bytes_sent", "instance_id", "url", "num_output_tokens", "stopped_s")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    NUM_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOPPED_S_FIELD_NUMBER: _ClassVar[int]
    status: HandoffStatus
    reason: str
    blocks_sent: int
    bytes_sent: int
    instance_id: str
    url: str
    num_output_tokens: int
    stopped_s: float
    def __init__(self, status: _Optional[_Union[HandoffStatus, str]] = ..., reason: _Optional[str] = ..., blocks_sent: _Optional[int] = ..., bytes_sent: _Optional[int] = ..., instance_id: _Optional[str] = ..., url: _Optional[str] = ..., num_output_tokens: _Optional[int] = ..., stopped_s: _Optional[float] = ...) -> None: ...
