"""The baseline of ``bench/ingest.py``: a bare FastAPI endpoint that parses the same body with
the service's own pydantic models (``metrics_service.models.MetricsPayload``) and stores nothing.

    uvicorn bench.baseline_app:app --port 8001
"""

from __future__ import annotations

from fastapi import FastAPI

from metrics_service.models import MetricsPayload

app = FastAPI()


@app.post("/metrics")
async def ingest(payload: MetricsPayload) -> dict[str, int]:
    return {"accepted": len(payload.metrics), "rejected": 0}
