"""``/v1/models``: configured generation models and the job methods this server runs."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from ..deps import MethodsDep, SettingsDep, current_key
from ..schemas import ModelsPublic

router = APIRouter(prefix="/v1", tags=["models"], dependencies=[Depends(current_key)])


@router.get("/models", response_model=ModelsPublic, summary="Configured models, job methods and index names")
def list_models(settings: SettingsDep, methods: MethodsDep) -> ModelsPublic:
    return ModelsPublic(models=dict(settings.models), methods={n: methods.get(n).kind for n in methods.names()},
                        indexes=list(settings.indexes))
