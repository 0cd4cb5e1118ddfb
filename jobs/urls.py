from django.urls import path

from . import views

urlpatterns = [
    path("", views.job_list, name="job-list"),
    path("jobs/new/", views.job_new, name="job-new"),
    path("jobs/<uuid:job_id>/", views.job_detail, name="job-detail"),
    path("jobs/<uuid:job_id>/status.json", views.job_status, name="job-status"),
    path("jobs/<uuid:job_id>/cancel/", views.job_cancel, name="job-cancel"),
    path("jobs/<uuid:job_id>/artifact.tar", views.job_artifact, name="job-artifact"),
    path("jobs/<uuid:job_id>/README.md", views.job_card, name="job-card"),
    path("jobs/<uuid:job_id>/push/", views.job_push, name="job-push"),
    path("compare/", views.compare, name="compare"),
    path("calibration/", views.calibration_files, name="calibration-files"),
    path("calibration/<uuid:upload_id>/delete/", views.calibration_delete, name="calibration-delete"),
]
