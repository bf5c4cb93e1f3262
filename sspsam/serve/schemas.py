"""The JSON the service sends and the JSON body it takes, as Pydantic models.

Responses go through them (``response_model``): FastAPI validates each answer and writes only the
keys the endpoint set (``response_model_exclude_unset``), so an optional key that was not asked
for (``overlay_png``) stays absent rather than ``null``. ``extra="allow"`` on the result models
keeps a key a newer result type adds instead of silently dropping it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class Rle(BaseModel):
    """COCO RLE: ``counts`` is pycocotools' compressed string (column-major)."""

    size: list[int]  # [height, width]
    counts: str


class SegmentInstance(_Open):
    bbox: list[float]  # COCO [x, y, width, height], original pixels
    bbox_xyxy: list[float]  # x0, y0, x1, y1; x1/y1 one past the last pixel
    score: float
    area: int
    rle: Rle


class SegmentResult(_Open):
    phrase: str
    score: float
    no_target: bool
    no_target_prob: float | None = None  # models with a calibrated no-target head
    area: int
    rle: Rle
    bbox: list[float] | None = None  # COCO [x, y, width, height] of the whole mask; null when empty
    instances: list[SegmentInstance] = []
    warnings: list[str] = []  # about this phrase (e.g. words the model never saw)


class SegmentResponse(_Open):
    image_size: list[int]  # [height, width]
    results: list[SegmentResult]
    warnings: list[str] = []  # about the image (e.g. far from what the model was trained on)
    overlay_png: str | None = None  # base64 PNG, when asked for
    model: str
    dtype: str = "float32"  # what the model ran in: float32, bfloat16 or float16
    request_id: str


class OvssMask(_Open):
    index: int  # into ``classes``
    class_: str = Field(alias="class")
    share: float
    area: int
    rle: Rle


class OvssResponse(_Open):
    image_size: list[int]
    classes: list[str]
    shares: dict[str, float]
    warnings: list[str] = []
    label_png: str  # base64 palette PNG, pixel = index into classes (255 / 65535 = unlabelled)
    colours: list[list[int]] | None = None  # RGB per class, as in the overlay and the label PNG
    masks: list[OvssMask]
    overlay_png: str | None = None
    model: str
    dtype: str = "float32"
    request_id: str


class Health(BaseModel):
    status: str  # "ok" or "down"
    queued: int
    queue_size: int
    batches: int
    jobs: int
    model_calls: int


class ModelInfo(BaseModel):
    name: str
    device: str
    dtype: str
    examples: list[str]  # phrases / classes the web page suggests


class Models(BaseModel):
    segment: ModelInfo
    ovss: ModelInfo | None
    limits: dict[str, int | float]


class ErrorBody(BaseModel):
    code: str
    message: str
    request_id: str | None


class ErrorResponse(BaseModel):
    error: ErrorBody


class _JsonBody(BaseModel):
    image: str = Field(description="base64 of the image file (a data: URL works)")
    overlay: bool = Field(False, description="Also return a base64 PNG of the masks drawn on the image.")


class SegmentJson(_JsonBody):
    """The JSON form of a /v1/segment request (the multipart form has the same fields)."""

    phrases: list[str] | str | None = Field(None, description="One or more phrases ('phrase' also works).")
    phrase: str | None = None
    allow_unknown: bool = Field(False, description="Ask the model even phrases with no word it knows.")


class OvssJson(_JsonBody):
    """The JSON form of a /v1/ovss request."""

    classes: list[str] | str | None = Field(None, description="Class names: a list, or one comma-separated string.")


ERRORS = {code: {"model": ErrorResponse} for code in (400, 403, 408, 413, 415, 422, 500, 503, 504)}


def json_body_doc(model: type[BaseModel]) -> dict:
    """``openapi_extra`` adding the JSON form of a request beside FastAPI's multipart one."""
    return {"requestBody": {"content": {"application/json": {"schema": model.model_json_schema()}}}}
