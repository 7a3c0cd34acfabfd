"""/metrics, the Prometheus scrape endpoint (kb.metrics)."""

from django.urls import path

from kb.metrics import metrics_view

urlpatterns = [
    path("", metrics_view, name="metrics"),
]
