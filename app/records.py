"""Redis layout of job records, inputs, keys and workers, shared by the API and the workers.

A job is a Redis hash (scalar fields as strings, structured fields as JSON) plus side keys:
an event stream for SSE replay, a capped log list, an artifact hash and a run-attempt hash.
State changes go through Lua scripts so that a check and its write are one atomic step.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from app.schemas import ArtifactInfo, ErrorInfo, Job, JobEvent, Progress, RunAttempt

P = "mp"


def now() -> datetime:
    return datetime.now(UTC)


def iso(ts: datetime | None = None) -> str:
    return (ts or now()).isoformat()


# ---------------------------------------------------------------- keys


def job_key(job_id: str) -> str:
    return f"{P}:job:{job_id}"


def events_key(job_id: str) -> str:
    return f"{P}:job:{job_id}:events"


def log_key(job_id: str) -> str:
    return f"{P}:job:{job_id}:log"


def artifacts_key(job_id: str) -> str:
    return f"{P}:job:{job_id}:artifacts"


def runs_key(job_id: str) -> str:
    return f"{P}:job:{job_id}:runs"


def lease_key(job_id: str) -> str:
    return f"{P}:job:{job_id}:lease"


def lease_ttl_s(heartbeat_s: float) -> int:
    """A job lease lives three heartbeats: a worker that sent none for that long is gone."""
    return max(2, int(heartbeat_s * 3 + 0.999))


def memo_key(job_id: str) -> str:
    """Finished evaluations of a job, so a re-run after a crash resumes instead of redoing them."""
    return f"{P}:job:{job_id}:memo"


def job_keys(job_id: str) -> list[str]:
    """Every Redis key a job owns, but the memo's claims: each is released when its piece ends,
    and one whose worker died expires within seconds (a TTL), so none is scanned for."""
    return [job_key(job_id), events_key(job_id), log_key(job_id), artifacts_key(job_id),
            runs_key(job_id), lease_key(job_id), memo_key(job_id)]


FINISHED_KEY = f"{P}:finished"  # every finished job, scored by when it finished (for retention)
# every upload delete that has taken its record and not ended, scored by when it took it
PENDING_DELETES_KEY = f"{P}:pending-deletes"
# Jobs written but not yet handed to the queue, scored by when: a create removes its job once the
# queue has it; one the API died in between is sent by ``app.unsent``.
UNSENT_KEY = f"{P}:unsent"
# Jobs a worker started, scored by when: ``app.stalled`` sends one again whose lease has been
# gone a while (its worker died with the message acknowledged, or the whole worker died and the
# broker would hand the message on only after its visibility timeout, hours).
RUNNING_KEY = f"{P}:running"


def tenant_jobs_key(tenant: str) -> str:
    return f"{P}:tenant:{tenant}:jobs"


def tenant_seq_key(tenant: str) -> str:
    return f"{P}:tenant:{tenant}:seq"


def asset_key(collection: str, asset_id: str) -> str:
    return f"{P}:{collection}:{asset_id}"


def tenant_assets_key(tenant: str, collection: str) -> str:
    return f"{P}:tenant:{tenant}:{collection}"


def apikey_key(token_hash: str) -> str:
    return f"{P}:apikey:{token_hash}"


def worker_key(worker: str) -> str:
    return f"{P}:worker:{worker}"


WORKER_PATTERN = f"{P}:worker:*"
# The names of the workers that announced themselves: read instead of SCANning the keyspace for
# worker keys (0.65 s at 300k keys, on every submit). A name whose key has expired is dead.
WORKERS_KEY = f"{P}:workers"
# KEYS: the set, then n worker keys; ARGV: their n names. Drops a name only if its key is gone.
FORGET_DEAD_WORKERS = """
for i = 1, #ARGV do
  if redis.call('EXISTS', KEYS[i + 1]) == 0 then redis.call('SREM', KEYS[1], ARGV[i]) end
end
return 0
"""


IDEMPOTENCY_TTL_S = 24 * 3600  # how long an Idempotency-Key answers for a create, upload or delete


def idempotency_key(tenant: str, key: str) -> str:
    return f"{P}:tenant:{tenant}:idem:{key}"


def delete_replay_key(tenant: str, key: str) -> str:
    """What a DELETE sent with this Idempotency-Key (or, without one, a key of its own) did:
    JSON ``{"target", "answer"}``, or ``{"target", "pending", "score", "owner"}`` while an
    upload's delete has taken its record."""
    return f"{P}:tenant:{tenant}:del:{key}"


def upload_claim_key(tenant: str, collection: str, key: str) -> str:
    """The sha256 of the body first sent with an upload's Idempotency-Key: one key, one file."""
    return f"{P}:tenant:{tenant}:upl:{collection}:{key}"


def split_delete_replay_key(replay: str) -> tuple[str, str]:
    """The tenant and key of a :func:`delete_replay_key` (tenants hold no ':')."""
    tenant, _, key = replay.removeprefix(f"{P}:tenant:").partition(":del:")
    return tenant, key


def ratelimit_key(token_hash: str, minute: int) -> str:
    return f"{P}:rl:{token_hash}:{minute}"


# ---------------------------------------------------------------- object-store keys


def model_object(tenant: str, model_id: str, fmt: str) -> str:
    return f"tenants/{tenant}/models/{model_id}/model.{'pt2' if fmt == 'pt2' else 'zip'}"


def dataset_object(tenant: str, dataset_id: str, fmt: str) -> str:
    return f"tenants/{tenant}/datasets/{dataset_id}/data.{fmt}"


def artifact_object(tenant: str, job_id: str, name: str) -> str:
    return f"tenants/{tenant}/jobs/{job_id}/artifacts/{name}"


# ---------------------------------------------------------------- codecs

_JSON_FIELDS = ("spec", "progress", "result", "error")


# kept in the hash, not part of the Job (the last two: app.stalled's)
_INTERNAL_FIELDS = ("tenant", "seq", "idem", "lease_missing_since", "resent_attempt")


def job_to_hash(job: Job, tenant: str, seq: int, idem: str | None = None) -> dict[str, str]:
    """``idem``: the Idempotency-Key's Redis key, so deleting the job also frees the key."""
    data = job.model_dump(mode="json", exclude={"artifacts", "runs"})
    out: dict[str, str] = {"tenant": tenant, "seq": str(seq)}
    if idem:
        out["idem"] = idem
    for k, v in data.items():
        if v is None:
            continue
        if k in _JSON_FIELDS:
            out[k] = json.dumps(v)
        elif isinstance(v, bool):
            out[k] = "1" if v else "0"
        else:
            out[k] = str(v)
    return out


def job_from_hash(
    h: dict[str, str], artifacts: dict[str, str] | None = None, runs: dict[str, str] | None = None
) -> Job:
    data: dict[str, Any] = {}
    for k, v in h.items():
        if k in _INTERNAL_FIELDS:
            continue
        if k in _JSON_FIELDS:
            data[k] = json.loads(v)
        elif k == "cancel_requested":
            data[k] = v == "1"
        else:
            data[k] = v
    data["artifacts"] = sorted(
        (ArtifactInfo.model_validate_json(a) for a in (artifacts or {}).values()),
        key=lambda a: a.name,
    )
    data["runs"] = sorted(
        (RunAttempt.model_validate_json(r) for r in (runs or {}).values()), key=lambda r: r.attempt
    )
    return Job.model_validate(data)


def event_json(job_id: str, type_: str, **fields: Any) -> str:
    """An event body without its id (the stream assigns the id)."""
    body: dict[str, Any] = {"type": type_, "job_id": job_id, "at": iso()}
    for k, v in fields.items():
        if isinstance(v, Progress | ErrorInfo):
            body[k] = v.model_dump(mode="json")
        elif v is not None:
            body[k] = v
    return json.dumps(body)


def event_from_stream(entry_id: str, fields: dict[str, str]) -> JobEvent:
    return JobEvent.model_validate({"id": entry_id, **json.loads(fields["data"])})


# ---------------------------------------------------------------- atomic transitions (Lua)

# KEYS: job, events, finished
# ARGV: now, event_json, maxlen, job_id, now (epoch seconds), progress_json (if queued)
# queued -> cancelled at once (its "waiting for a worker" progress replaced); running -> flag for
# the worker; final -> unchanged.
CANCEL = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return 'missing' end
if state == 'queued' then
  redis.call('HSET', KEYS[1], 'state', 'cancelled', 'finished_at', ARGV[1], 'cancel_requested', '1',
             'progress', ARGV[6])
  redis.call('ZADD', KEYS[3], ARGV[5], ARGV[4])
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'data', ARGV[2])
  return 'cancelled'
end
if state == 'running' then
  redis.call('HSET', KEYS[1], 'cancel_requested', '1')
  return 'requested'
end
return state
"""

# KEYS: job, events[, running]   ARGV: now, event_json, maxlen[, now (epoch s), job_id]
# Claims the job for a new attempt: queued|running -> running, attempts += 1; lists it as
# running (for ``app.stalled``) where the running key is passed.
START = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state then return {'missing', 0} end
if state ~= 'queued' and state ~= 'running' then return {state, 0} end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'state', 'running')
if not redis.call('HGET', KEYS[1], 'started_at') then
  redis.call('HSET', KEYS[1], 'started_at', ARGV[1])
end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'data', ARGV[2])
if KEYS[3] then redis.call('ZADD', KEYS[3], ARGV[4], ARGV[5]) end
return {'running', attempt}
"""

# KEYS: job, lease   ARGV: now (epoch s), stale_s
# Whether a running job's worker is gone: -1 the job is no longer running (or is gone): drop it
# from the running list; 1 its lease has been missing for stale_s (seen twice, that far apart)
# and the job was not sent again for this attempt yet: the caller sends it (marked sent here,
# so one API process of several does); 0 otherwise. Returns {verdict, queue, attempt}: what
# the caller needs to send the job, read in the same step.
STALLED = """
local h = redis.call('HMGET', KEYS[1], 'state', 'attempts', 'resent_attempt', 'lease_missing_since')
if h[1] ~= 'running' then return {-1} end
if redis.call('EXISTS', KEYS[2]) == 1 then
  if h[4] then redis.call('HDEL', KEYS[1], 'lease_missing_since') end
  return {0}
end
if h[3] == h[2] then return {0} end
if not h[4] then
  redis.call('HSET', KEYS[1], 'lease_missing_since', ARGV[1])
  return {0}
end
if tonumber(ARGV[1]) - tonumber(h[4]) < tonumber(ARGV[2]) then return {0} end
redis.call('HSET', KEYS[1], 'resent_attempt', h[2])
redis.call('HDEL', KEYS[1], 'lease_missing_since')
return {1, redis.call('HGET', KEYS[1], 'queue') or '', h[2]}
"""

# KEYS: job, events   ARGV: attempt, progress_json, event_json, maxlen
# Returns {written, cancel_requested}; a stale attempt writes nothing.
PROGRESS = """
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then return {0, 1} end
if redis.call('HGET', KEYS[1], 'attempts') ~= ARGV[1] then return {0, 1} end
redis.call('HSET', KEYS[1], 'progress', ARGV[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'data', ARGV[3])
local c = redis.call('HGET', KEYS[1], 'cancel_requested')
if c == '1' then return {1, 1} end
return {1, 0}
"""

# KEYS: job, events, finished
# ARGV: attempt, state, now, event_json, maxlen, result_json, error_json, job_id, now (epoch s)
# Only the attempt that holds the job may finish it, and only once.
FINISH = """
if redis.call('HGET', KEYS[1], 'state') ~= 'running' then return 0 end
if redis.call('HGET', KEYS[1], 'attempts') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'finished_at', ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[9], ARGV[8])
if ARGV[6] ~= '' then redis.call('HSET', KEYS[1], 'result', ARGV[6]) end
if ARGV[7] ~= '' then redis.call('HSET', KEYS[1], 'error', ARGV[7]) end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'data', ARGV[4])
return 1
"""

# KEYS: job, events, finished, unsent
# ARGV: now, error_json, progress_json, event_json, maxlen, job_id, now (epoch seconds)
# A job the queue never got: queued -> failed with the reason and its final event (a cancel that
# came first stands); off the unsent list either way.
FAIL_UNSENT = """
redis.call('ZREM', KEYS[4], ARGV[6])
if redis.call('HGET', KEYS[1], 'state') ~= 'queued' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'failed', 'finished_at', ARGV[1], 'error', ARGV[2],
           'progress', ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[7], ARGV[6])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'data', ARGV[4])
return 1
"""

# KEYS: tenant_jobs, idempotency key (or any unused key), finished, delete replay (or any unused
#       key), job, its other keys...
# ARGV: tenant, job_id, the replay's JSON ('' for none), its TTL
# Deletes a finished job of the tenant with every key it owns, and its Idempotency-Key if that
# still names it; writes the DELETE's own replay in the same step, so a reply lost after it still
# has an answer; returns 'deleted', 'missing', 'replayed' (the key has a replay: read it) or the
# state that kept it (queued or running).
DELETE_JOB = """
if ARGV[3] ~= '' and redis.call('EXISTS', KEYS[4]) == 1 then return 'replayed' end
local h = redis.call('HMGET', KEYS[5], 'tenant', 'state')
if not h[1] or h[1] ~= ARGV[1] then return 'missing' end
if h[2] == 'queued' or h[2] == 'running' then return h[2] end
redis.call('DEL', unpack(KEYS, 5))
redis.call('ZREM', KEYS[1], ARGV[2])
redis.call('ZREM', KEYS[3], ARGV[2])
if redis.call('GET', KEYS[2]) == ARGV[2] then redis.call('DEL', KEYS[2]) end
if ARGV[3] ~= '' then redis.call('SET', KEYS[4], ARGV[3], 'EX', ARGV[4]) end
return 'deleted'
"""

# KEYS: upload record, tenant's upload index, delete replay, pending deletes
# ARGV: upload id, target, owner, now
# Takes an upload's record out (so no new job can name it) and keeps it in the DELETE's replay,
# indexed as pending, in the same step: a retry after a lost reply or a crash finishes the delete
# instead of finding nothing, and so does the API's resolver for a delete nobody retries. Returns
# {record, score}, or nil when the record is gone or the key already has a replay (read that).
TAKE_UPLOAD = """
if redis.call('EXISTS', KEYS[3]) == 1 then return nil end
local raw = redis.call('GET', KEYS[1])
if not raw then return nil end
local score = redis.call('ZSCORE', KEYS[2], ARGV[1]) or ''
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('SET', KEYS[3], cjson.encode({target = ARGV[2], pending = raw, score = score,
                                         owner = ARGV[3]}))
redis.call('ZADD', KEYS[4], ARGV[4], KEYS[3])
return {raw, score}
"""

# KEYS: delete replay   ARGV: target, owner
# The replay of a DELETE's Idempotency-Key; a pending upload delete of the same target becomes
# the caller's to finish (the try that took it may still run: whichever fails later does not put
# the record back over the other's work).
CLAIM_REPLAY = """
local v = redis.call('GET', KEYS[1])
if not v then return nil end
local d = cjson.decode(v)
if d.target == ARGV[1] and d.pending then
  d.owner = ARGV[2]
  v = cjson.encode(d)
  redis.call('SET', KEYS[1], v, 'KEEPTTL')
end
return v
"""

# KEYS: upload record, tenant's upload index, delete replay, pending deletes
# ARGV: upload id, record, score, owner
# Puts a taken record back after a refused or failed delete, unless another try with the same key
# has since claimed the delete or finished it. Returns 1 if put back.
RESTORE_UPLOAD = """
local v = redis.call('GET', KEYS[3])
if not v or cjson.decode(v).owner ~= ARGV[4] then return 0 end
redis.call('DEL', KEYS[3])
redis.call('ZREM', KEYS[4], KEYS[3])
redis.call('SET', KEYS[1], ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[3], ARGV[1])
return 1
"""

# KEYS: upload record, tenant's upload index, delete replay, pending deletes
# ARGV: upload id, the answer's replay JSON, its TTL
# Ends an upload delete whose files are gone: the record goes (even if a try that failed put it
# back meanwhile: it would name no file) and the first answer is kept (returned either way).
FINISH_UPLOAD = """
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[4], KEYS[3])
local v = redis.call('GET', KEYS[3])
if v and cjson.decode(v).answer then return v end
redis.call('SET', KEYS[3], ARGV[2], 'EX', ARGV[3])
return ARGV[2]
"""

# KEYS: idempotency key, the job it names   ARGV: that job's id, the new job's id, TTL
# Hands a create's Idempotency-Key to a new try while the job it names is still unwritten (the
# try that set it died, or failed and could not free it): the job is written only while the key
# names it, so one of the two writes and the other sees the key taken. Returns 1 if taken.
TAKE_OVER_IDEM = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] or redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
return 1
"""

# KEYS: key   ARGV: value
DEL_IF_EQUALS = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: job, a hash of the job   ARGV: field, value, attempt ('' or left out: any)
# A worker's write into one of the job's hashes (memo, artifacts, runs), made only while the job
# exists: a piece or an attempt that finishes after the job was deleted does not bring its keys
# back (they would have no owner and no TTL); with an attempt, only while it is the job's latest
# (a replaced attempt must not rewrite a run or an artifact of the one that replaced it).
# Returns 1 if written.
HSET_IF_JOB = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[3] and ARGV[3] ~= '' and redis.call('HGET', KEYS[1], 'attempts') ~= ARGV[3] then
  return 0
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
"""

# KEYS: job, log, events   ARGV: line, lines kept, event_json, maxlen, attempt ('' or left
#       out: any)
# An attempt that a later one replaced (its worker stalled past its lease) writes no more lines.
LOG_IF_JOB = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[5] and ARGV[5] ~= '' and redis.call('HGET', KEYS[1], 'attempts') ~= ARGV[5] then
  return 0
end
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[2]), -1)
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'data', ARGV[3])
return 1
"""


def hset_if_job(r: Any, job_id: str, hash_key: str, field: str, value: str,
                attempt: int | None = None) -> bool:
    """HSET_IF_JOB with a synchronous client (the workers'); with ``attempt``, only while that
    attempt is the job's latest."""
    return bool(r.eval(HSET_IF_JOB, 2, job_key(job_id), hash_key, field, value,
                       "" if attempt is None else str(attempt)))
