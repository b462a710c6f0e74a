from shared.rpc.pdserve.v1 import sampling_pb2 as _sampling_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KvLeaf(_message.Message):
    __slots__ = ("path", "dtype", "shape", "offset", "length")
    PATH_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    path: str
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    length: int
    def __init__(self, path: _Optional[str] = ..., dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class KvManifest(_message.Message):
    __slots__ = ("format_version", "model_fingerprint", "request_id", "lease_id", "true_length", "first_token", "sampling", "leaves", "total_bytes", "chunk_bytes", "chunk_count")
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    TRUE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    LEAVES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    format_version: int
    model_fingerprint: str
    request_id: str
    lease_id: str
    true_length: int
    first_token: int
    sampling: _sampling_pb2.SamplingParams
    leaves: _containers.RepeatedCompositeFieldContainer[KvLeaf]
    total_bytes: int
    chunk_bytes: int
    chunk_count: int
    def __init__(self, format_version: _Optional[int] = ..., model_fingerprint: _Optional[str] = ..., request_id: _Optional[str] = ..., lease_id: _Optional[str] = ..., true_length: _Optional[int] = ..., first_token: _Optional[int] = ..., sampling: _Optional[_Union[_sampling_pb2.SamplingParams, _Mapping]] = ..., leaves: _Optional[_Iterable[_Union[KvLeaf, _Mapping]]] = ..., total_bytes: _Optional[int] = ..., chunk_bytes: _Optional[int] = ..., chunk_count: _Optional[int] = ...) -> None: ...

class KvChunk(_message.Message):
    __slots__ = ("index", "offset", "data", "crc32c")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CRC32C_FIELD_NUMBER: _ClassVar[int]
    index: int
    offset: int
    data: bytes
    crc32c: int
    def __init__(self, index: _Optional[int] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., crc32c: _Optional[int] = ...) -> None: ...

class KvTrailer(_message.Message):
    __slots__ = ("chunk_count", "payload_digest")
    CHUNK_COUNT_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_DIGEST_FIELD_NUMBER: _ClassVar[int]
    chunk_count: int
    payload_digest: bytes
    def __init__(self, chunk_count: _Optional[int] = ..., payload_digest: _Optional[bytes] = ...) -> None: ...

class KvTransfer(_message.Message):
    __slots__ = ("manifest", "chunk", "trailer")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    manifest: KvManifest
    chunk: KvChunk
    trailer: KvTrailer
    def __init__(self, manifest: _Optional[_Union[KvManifest, _Mapping]] = ..., chunk: _Optional[_Union[KvChunk, _Mapping]] = ..., trailer: _Optional[_Union[KvTrailer, _Mapping]] = ...) -> None: ...

class KvReceipt(_message.Message):
    __slots__ = ("lease_id", "bytes_received", "chunks_received")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    bytes_received: int
    chunks_received: int
    def __init__(self, lease_id: _Optional[str] = ..., bytes_received: _Optional[int] = ..., chunks_received: _Optional[int] = ...) -> None: ...
