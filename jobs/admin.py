from django.contrib import admin

from .models import Job, JobEvent


@admin.register(Job)
class JobAdmin(admin.ModelAdmin):
    list_display = ("id", "owner", "model_source", "recipe_name", "status", "created_at", "finished_at")
    list_filter = ("status", "recipe_name")
    search_fields = ("id", "model_source", "name")
    readonly_fields = ("created_at", "started_at", "finished_at", "heartbeat_at")


@admin.register(JobEvent)
class JobEventAdmin(admin.ModelAdmin):
    list_display = ("job", "created_at", "level", "stage", "message")
    list_filter = ("level", "stage")
