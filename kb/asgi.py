"""ASGI entry point: uvicorn serves this, so chat streams run as async generators."""

import os

from django.conf import settings
from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "kb.settings")
# uvicorn imported this module first, so this process exists to serve requests. (`serve`
# prepares its own process; tests that serve the app in their process keep theirs.)
serving = not settings.configured

application = get_asgi_application()

if serving:
    from kb.web_process import web_process_prepare

    web_process_prepare()

if os.environ.get("KB_SERVE_STATIC", "true").lower() in {"1", "true", "yes", "on"}:
    # One self-contained process serves its own CSS and JS; behind nginx, set
    # KB_SERVE_STATIC=false and let nginx serve collectstatic's output (docs/DEPLOY.md).
    from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler

    application = ASGIStaticFilesHandler(application)
