"""`/v1/files…` and `/v1/batches…` (OpenAI's paths, no trailing slash) and the REST API's batches."""

from django.urls import path

from . import api, v1

urlpatterns = [
    path("v1/files", v1.files_api, name="v1-files"),
    path("v1/files/<str:file_id>", v1.file_api, name="v1-file"),
    path("v1/files/<str:file_id>/content", v1.file_content_api, name="v1-file-content"),
    path("v1/batches", v1.batches_api, name="v1-batches"),
    path("v1/batches/<str:batch_id>", v1.batch_api, name="v1-batch"),
    path("v1/batches/<str:batch_id>/cancel", v1.batch_cancel_api, name="v1-batch-cancel"),
    path("api/v1/batches/", api.BatchListApi.as_view(), name="api-batches"),
    path("api/v1/batches/<str:batch_id>/", api.BatchDetailApi.as_view(), name="api-batch"),
]
