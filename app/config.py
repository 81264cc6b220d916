"""All settings in one place, read from the environment (prefix ``MODELPRESS_``) or a ``.env`` file.

The README's settings table shows this class row for row (``tests/test_readme.py`` renders
each row from the fields and looks for it): keep the descriptions user-facing.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MODELPRESS_", env_file=".env", extra="ignore")

    redis_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("MODELPRESS_REDIS_URL", "REDIS_URL"),
        description="Redis (6.2 or newer) for job records, events and the Celery queue. Unset: "
        "`modelpress serve` starts an embedded Redis server under the data folder.",
    )
    redis_retry_s: float = Field(
        default=30.0, ge=0,
        description="How long the API and the workers retry a Redis command that finds no "
        "connection (Redis restarting) before giving up: the API answers 503, a running job "
        "fails (`redis_unavailable`); a job that has finished waits for Redis to record its "
        "outcome.",
    )
    data_dir: Path = Field(
        default=Path(".modelpress"),
        description="Local working folder: embedded Redis data, the default artifact store, caches.",
    )
    store_url: str | None = Field(
        default=None,
        description="Object store: unset -> local folder `<data_dir>/store`; `file:///abs/path`; "
        "or `s3://bucket[/prefix]` with the S3 settings below.",
    )
    s3_endpoint: str | None = Field(
        default=None, description="S3 endpoint URL (MinIO, moto...); unset: AWS's.")
    s3_region: str = Field(default="us-east-1", description="S3 region.")
    s3_access_key_id: str | None = Field(
        default=None, description="S3 access key id (with the secret key; both unset: the "
        "`AWS_*` variables or the instance's role).")
    s3_secret_access_key: SecretStr | None = Field(default=None, description="S3 secret key.")
    s3_allow_http: bool = Field(default=False, description="Allow a plain-http S3 endpoint.")

    max_upload_bytes: int = Field(
        default=2 * 1024**3, gt=0, description="Largest accepted upload (bytes); larger -> 413."
    )
    max_unpacked_bytes: int = Field(
        default=8 * 1024**3, gt=0, description="Largest total size of an uploaded archive's members."
    )
    max_artifact_bytes: int = Field(
        default=16 * 1024**3, gt=0,
        description="Largest artifact a job may store (bytes); a larger one fails the job with "
        "`artifact_too_large`.",
    )
    store_retry_s: float = Field(
        default=180.0, ge=0,
        description="How long a worker retries an object-store call that gets no answer or a 5xx "
        "(with backoff) before failing the job with `store_unavailable`.",
    )
    task_time_limit_s: int = Field(
        default=6 * 3600, gt=0, description="Hard wall-clock limit of one job attempt (seconds)."
    )
    visibility_timeout_s: int = Field(
        default=7 * 3600,
        gt=0,
        description="Seconds before an unacknowledged job is handed to another worker. Must exceed "
        "the task time limit (checked at start-up), or a long job would run twice.",
    )
    job_retention_days: float = Field(
        default=0.0, ge=0,
        description="Finished jobs older than this many days are deleted with their artifacts "
        "and logs by the API (0: kept until deleted). Uploads are never deleted by it.",
    )
    worker_stop_grace_s: float = Field(
        default=10.0, ge=0, description="On SIGTERM a worker lets its running job go on this "
        "many seconds, then stops it and hands it back to the queue at once (another worker "
        "resumes it; it is not stranded until the visibility timeout). Keep it below the "
        "supervisor's grace period (Docker's stop_grace_period, Kubernetes' "
        "terminationGracePeriodSeconds).",
    )
    worker_heartbeat_s: float = Field(
        default=5.0, gt=0, description="Worker heartbeat and job-lease refresh period (seconds)."
    )
    stalled_job_s: float = Field(
        default=60.0, gt=0, description="A running job whose lease has not been renewed for "
        "this long (its worker died) is sent to the queue again by the API, once per attempt, "
        "instead of waiting for the visibility timeout. Checked every half of it.",
    )
    default_queue: str = Field(
        default="cpu", description="Queue for jobs with device `auto`/`cpu` (`gpu` for device "
        "`cuda` or backend `torch-cuda`)."
    )
    worker_queues: str = Field(
        default="", description="Queues a worker consumes; empty -> `cpu`, plus `gpu` with CUDA."
    )
    api_host: str = Field(default="127.0.0.1", description="Address the API binds to.")
    api_port: int = Field(
        default=8000, ge=0, le=65535,
        description="Port the API binds to (`serve` picks a free one if taken).",
    )
    public_url: str | None = Field(
        default=None, description="URL users reach the API at (printed by `serve`)."
    )
    event_stream_maxlen: int = Field(
        default=5000, gt=0, description="Progress/log events kept per job for replay over SSE."
    )
    log_lines_kept: int = Field(default=5000, gt=0, description="Log lines kept per job in Redis.")
    rate_limit_per_minute: int = Field(
        default=600, ge=0, description=(
            "Requests per minute per API key, API calls and dashboard pages and buttons "
            "together; the log and result fragments a job page fetches by itself are not "
            "counted (0 disables).")
    )

    @model_validator(mode="after")
    def _visibility_exceeds_time_limit(self) -> Settings:
        if self.visibility_timeout_s <= self.task_time_limit_s:
            raise ValueError(
                f"MODELPRESS_VISIBILITY_TIMEOUT_S ({self.visibility_timeout_s}) must be larger than "
                f"MODELPRESS_TASK_TIME_LIMIT_S ({self.task_time_limit_s}); otherwise Redis hands a "
                "running job to a second worker"
            )
        return self

    @property
    def soft_time_limit_s(self) -> int:
        """The engine gets a soft limit first so it can fail the job cleanly with a reason."""
        return max(1, int(self.task_time_limit_s * 0.95) - 1)

    def resolved_store_url(self) -> str:
        if self.store_url:
            return self.store_url
        return (self.data_dir / "store").resolve().as_uri()

    def queues_for_worker(self, has_cuda: bool) -> list[str]:
        if self.worker_queues.strip():
            return [q.strip() for q in self.worker_queues.split(",") if q.strip()]
        return ["cpu", "gpu"] if has_cuda else ["cpu"]


@lru_cache
def get_settings() -> Settings:
    return Settings()
