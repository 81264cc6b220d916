from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response

from app import assets
from app.deps import IDEMPOTENCY_KEY_PATTERN, DeleteKeyHeader, PrincipalDep, ServicesDep
from app.schemas import (
    DatasetFormat,
    DatasetInfo,
    DatasetList,
    Deleted,
    ModelFormat,
    ModelInfo,
    ModelList,
)

router = APIRouter(prefix="/v1", tags=["models and datasets"])

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}
Sha256Header = Annotated[
    str | None,
    Header(alias="X-Content-SHA256", pattern=r"^[0-9a-fA-F]{64}$",
           description="Optional SHA-256 of the body; a mismatch is rejected."),
]
UploadKeyHeader = Annotated[
    str | None,
    Header(alias="Idempotency-Key", pattern=IDEMPOTENCY_KEY_PATTERN,
           description="Repeat an upload safely: every try with the same key and file makes one "
                       "upload, returned with 200 once it exists; another file with it is a 422."),
]
_REPLAYED: dict[int | str, dict[str, Any]] = {
    200: {"description": "Already uploaded with this Idempotency-Key"}}


@router.post("/models", status_code=201, response_model=ModelInfo, openapi_extra=_UPLOAD_BODY,
             responses=_REPLAYED)
async def upload_model(
    request: Request,
    response: Response,
    svc: ServicesDep,
    who: PrincipalDep,
    name: Annotated[str, Query(description="A name for the model.")],
    format: Annotated[ModelFormat | None, Query(description="pt2 or hf; default: detected")] = None,
    sha256: Sha256Header = None,
    idempotency_key: UploadKeyHeader = None,
) -> ModelInfo:
    """Upload a model as the raw request body: a `torch.export.save` archive (`.pt2`) or a zipped
    Hugging Face folder with safetensors weights. Pickles are never accepted."""
    info, created = await assets.create_model(svc, who.tenant, request, name, format, sha256,
                                              idempotency_key)
    if not created:
        response.status_code = 200
    return info


# The `next_cursor` of a page: the score (upload time) and id of its last entry.
AssetCursor = Annotated[str | None, Query(
    pattern=r"^\d{1,12}(\.\d{1,20})?(e[+-]?\d{1,3})?:[a-z]{3}_[0-9a-f]{32}$",
    description="The `next_cursor` of the previous page.")]


@router.get("/models", response_model=ModelList)
async def list_models(
    svc: ServicesDep, who: PrincipalDep, limit: Annotated[int, Query(ge=1, le=500)] = 100,
    cursor: AssetCursor = None,
) -> ModelList:
    """The tenant's uploaded models, newest first, a page at a time."""
    items, next_cursor = await assets.list_assets(svc, "models", who.tenant, ModelInfo, limit,
                                                  cursor)
    return ModelList(items=items, next_cursor=next_cursor)


@router.get("/models/{model_id}", response_model=ModelInfo)
async def get_model(model_id: str, svc: ServicesDep, who: PrincipalDep) -> ModelInfo:
    return await assets.get_asset(svc, "models", who.tenant, model_id, ModelInfo)


@router.delete("/models/{model_id}", response_model=Deleted)
async def delete_model(model_id: str, svc: ServicesDep, who: PrincipalDep,
                       idempotency_key: DeleteKeyHeader = None) -> Deleted:
    """Delete an uploaded model and its file; refused (409) while a queued or running job
    names it."""
    return await assets.delete_asset(svc, "models", who.tenant, model_id, idempotency_key)


@router.post("/datasets", status_code=201, response_model=DatasetInfo, openapi_extra=_UPLOAD_BODY,
             responses=_REPLAYED)
async def upload_dataset(
    request: Request,
    response: Response,
    svc: ServicesDep,
    who: PrincipalDep,
    name: Annotated[str, Query(description="A name for the dataset.")],
    format: Annotated[DatasetFormat | None,
                      Query(description="npz or safetensors; default: detected")] = None,
    sha256: Sha256Header = None,
    idempotency_key: UploadKeyHeader = None,
) -> DatasetInfo:
    """Upload a dataset as the raw request body: `.npz` (no object arrays) or `.safetensors`,
    with inputs under `x` (or the model's input names) and integer labels under `y`."""
    info, created = await assets.create_dataset(svc, who.tenant, request, name, format, sha256,
                                                idempotency_key)
    if not created:
        response.status_code = 200
    return info


@router.get("/datasets", response_model=DatasetList)
async def list_datasets(
    svc: ServicesDep, who: PrincipalDep, limit: Annotated[int, Query(ge=1, le=500)] = 100,
    cursor: AssetCursor = None,
) -> DatasetList:
    """The tenant's uploaded datasets, newest first, a page at a time."""
    items, next_cursor = await assets.list_assets(svc, "datasets", who.tenant, DatasetInfo,
                                                  limit, cursor)
    return DatasetList(items=items, next_cursor=next_cursor)


@router.get("/datasets/{dataset_id}", response_model=DatasetInfo)
async def get_dataset(dataset_id: str, svc: ServicesDep, who: PrincipalDep) -> DatasetInfo:
    return await assets.get_asset(svc, "datasets", who.tenant, dataset_id, DatasetInfo)


@router.delete("/datasets/{dataset_id}", response_model=Deleted)
async def delete_dataset(dataset_id: str, svc: ServicesDep, who: PrincipalDep,
                         idempotency_key: DeleteKeyHeader = None) -> Deleted:
    """Delete an uploaded dataset and its file; refused (409) while a queued or running job
    names it."""
    return await assets.delete_asset(svc, "datasets", who.tenant, dataset_id, idempotency_key)
