"""One APIRouter per resource; joined by the app factory."""
