"""Core API routes: collections, documents (list, upload, detail), chunks."""

from django.urls import path

from kb.api import views

urlpatterns = [
    path("collections/", views.CollectionList.as_view(), name="api-collection-list"),
    path("documents/", views.DocumentListCreate.as_view(), name="api-document-list"),
    path("documents/<int:pk>/", views.DocumentDetail.as_view(), name="api-document-detail"),
    path("chunks/", views.ChunkList.as_view(), name="api-chunk-list"),
    path("chunks/<int:pk>/", views.ChunkDetail.as_view(), name="api-chunk-detail"),
]
