"""The playground page (``GET /playground``): plain HTML, JavaScript and CSS shipped in the package, no build
step and nothing fetched from elsewhere. See ``playground.js``."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

PATH = "/playground"
FILES = Path(__file__).parent

router = APIRouter(include_in_schema=False)


@router.get(PATH)
async def page() -> FileResponse:
    return FileResponse(FILES / "index.html", headers={"cache-control": "no-cache"})


def serve_playground(app: FastAPI) -> None:
    """Adds the page and its assets (``/playground/playground.js``, ...)."""
    app.include_router(router)
    app.mount(PATH, StaticFiles(directory=FILES), name="playground")


def is_playground_path(path: str) -> bool:
    return path == PATH or path.startswith(PATH + "/")
