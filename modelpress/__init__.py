"""The modelpress Python SDK.

    from modelpress import Client, BenchmarkSpec, ModelRef

    with Client() as client:            # MODELPRESS_BASE_URL / MODELPRESS_API_KEY
        job = client.jobs.create(BenchmarkSpec(model=ModelRef(zoo="digits-cnn")))
        job = client.jobs.wait(job.id, progress=True)
        print(job.result)
"""

from app.schemas import (
    ArtifactInfo,
    BenchmarkResult,
    BenchmarkSpec,
    Budget,
    ConfigPoint,
    DatasetInfo,
    DatasetRef,
    IntrinsicDimensionResult,
    IntrinsicDimensionSpec,
    Job,
    JobEvent,
    JobPage,
    JobState,
    LossBenchmarkResult,
    LossBenchmarkSpec,
    MixedPrecisionResult,
    MixedPrecisionSpec,
    ModelInfo,
    ModelRef,
    SensitivityResult,
    SensitivitySpec,
    SpikingResult,
    SpikingSpec,
)
from modelpress._async_client import AsyncClient
from modelpress._client import Client
from modelpress._errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ConflictError,
    InternalServerError,
    JobFailedError,
    ModelpressError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    RateLimitError,
    UnprocessableEntityError,
    UnsupportedMediaTypeError,
)

__all__ = [
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "ArtifactInfo",
    "AsyncClient",
    "AuthenticationError",
    "BadRequestError",
    "BenchmarkResult",
    "BenchmarkSpec",
    "Budget",
    "Client",
    "ConfigPoint",
    "ConflictError",
    "DatasetInfo",
    "DatasetRef",
    "InternalServerError",
    "IntrinsicDimensionResult",
    "IntrinsicDimensionSpec",
    "Job",
    "JobEvent",
    "JobFailedError",
    "JobPage",
    "JobState",
    "LossBenchmarkResult",
    "LossBenchmarkSpec",
    "MixedPrecisionResult",
    "MixedPrecisionSpec",
    "ModelInfo",
    "ModelRef",
    "ModelpressError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RateLimitError",
    "SensitivityResult",
    "SensitivitySpec",
    "SpikingResult",
    "SpikingSpec",
    "UnprocessableEntityError",
    "UnsupportedMediaTypeError",
]
