"""/api/...: the REST API (jobs/api.py), its OpenAPI schema and the docs page."""
from django.urls import path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerSplitView

from . import api, hub_push_api

urlpatterns = [
    path("schema", SpectacularAPIView.as_view(), name="api-schema"),
    # the split view serves its start-up script as a file (?script), so the page needs no inline script
    path("docs", SpectacularSwaggerSplitView.as_view(url_name="api-schema", template_name="api/swagger_ui.html"),
         name="api-docs"),
    path("jobs", api.jobs, name="api-jobs"),
    path("jobs/<uuid:job_id>", api.job_detail, name="api-job-detail"),
    path("jobs/<uuid:job_id>/events", api.job_events, name="api-job-events"),
    path("jobs/<uuid:job_id>/cancel", api.job_cancel, name="api-job-cancel"),
    path("jobs/<uuid:job_id>/card", api.job_card, name="api-job-card"),
    path("jobs/<uuid:job_id>/artifact", api.job_artifact, name="api-job-artifact"),
    path("jobs/<uuid:job_id>/push", hub_push_api.job_push, name="api-job-push"),
    path("calibration-files", api.calibration_files, name="api-calibration-files"),
    path("calibration-files/<uuid:upload_id>", api.calibration_file, name="api-calibration-file"),
    path("presets", api.presets, name="api-presets"),
    path("compare", api.compare, name="api-compare"),
    path("recommend", api.recommend, name="api-recommend"),
    # (?s): a path with a newline in it is an unknown endpoint too, answered in JSON
    re_path(r"^(?P<unmatched>(?s:.*))\Z", api.not_found, name="api-not-found"),
]
