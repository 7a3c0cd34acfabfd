"""ASGI entry point: uvicorn serves this, so chat streams run as async generators."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kb.settings")

application = get_asgi_application()

if os.environ.get("KB_SERVE_STATIC", "true").lower() in {"1", "true", "yes", "on"}:
    # One self-contained process serves its own CSS and JS; behind nginx, set
    # KB_SERVE_STATIC=false and let nginx serve collectstatic's output (docs/DEPLOY.md).
    from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler

    application = ASGIStaticFilesHandler(application)
