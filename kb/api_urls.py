"""Core API routes: collections, documents (list, upload, detail), chunks."""

from django.urls import path

from kb import api

urlpatterns = [
    path("collections/", api.CollectionList.as_view(), name="api-collection-list"),
    path("documents/", api.DocumentListCreate.as_view(), name="api-document-list"),
    path("documents/<int:pk>/", api.DocumentDetail.as_view(), name="api-document-detail"),
    path("chunks/", api.ChunkList.as_view(), name="api-chunk-list"),
    path("chunks/<int:pk>/", api.ChunkDetail.as_view(), name="api-chunk-detail"),
]
