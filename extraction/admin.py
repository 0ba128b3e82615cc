from django.contrib import admin
from django.utils.html import format_html, format_html_join

from extraction import services
from extraction.constants import BLOCK_ORDER
from extraction.models import Dataset, Extraction, ModelRecord
from jobsite.admin import JobActionsMixin, RegisteredMixin

BADGE_COLOURS = {
    "queued": "#6c757d", "loading": "#0d6efd", "extracting": "#0d6efd", "saving": "#0d6efd",
    "completed": "#198754", "failed": "#dc3545", "cancelled": "#6c757d",
}


@admin.register(ModelRecord)
class ModelRecordAdmin(RegisteredMixin, admin.ModelAdmin):
    list_display = ["name", "architecture", "family", "num_layers", "hidden_size", "vocab_size", "path"]
    search_fields = ["name", "path"]
    readonly_fields = ["architecture", "model_type", "family", "num_layers", "hidden_size", "vocab_size",
                       "supported_hooks", "hook_point_table", "hook_refusals"]
    exclude = ["hook_points"]

    @admin.display(description="hook points")
    def hook_point_table(self, model):
        """Each hook point as the model's page lists it: name, TransformerLens name, width, definition."""
        rows = [(hook, f"blocks.L.{point['transformerlens']}", point["width"], point["definition"])
                for hook in BLOCK_ORDER if (point := model.hook_points.get(hook))]
        return format_html_join("\n", "<div><code>{}</code> · <code>{}</code> · width {} · {}</div>", rows) or "-"

    def has_add_permission(self, request):
        # Registering validates the directory; that lives in the service (API, command).
        return False


@admin.register(Dataset)
class DatasetAdmin(RegisteredMixin, admin.ModelAdmin):
    list_display = ["name", "format", "num_samples", "size_bytes", "path"]
    search_fields = ["name", "path"]
    readonly_fields = ["format", "num_samples", "size_bytes"]

    def has_add_permission(self, request):
        return False


@admin.register(Extraction)
class ExtractionAdmin(JobActionsMixin, admin.ModelAdmin):
    list_display = ["id", "badge", "model", "dataset", "progress", "heartbeat", "error_type", "attempt", "retry_of",
                    "created_at"]
    list_filter = ["status", "error_type", "model", "dataset", "auto_retried"]
    search_fields = ["id", "error_message", "model__name", "dataset__name"]
    actions = ["cancel", "resume", "retry", "retry_with_suggested", "delete"]
    readonly_fields = [f.name for f in Extraction._meta.get_fields() if getattr(f, "concrete", False)]
    list_select_related = ["model", "dataset"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        # Deleting goes through the "delete" action: it refuses active jobs and takes the files with the rows.
        return False

    @admin.display(description="status", ordering="status")
    def badge(self, obj):
        label = "cancelling" if obj.cancel_requested and obj.status in obj.RUNNING else obj.status
        return format_html(
            '<span style="background:{};color:#fff;padding:2px 8px;border-radius:8px">{}</span>',
            BADGE_COLOURS.get(obj.status, "#6c757d"), label,
        )

    @admin.display(description="progress")
    def progress(self, obj):
        return f"{obj.samples_processed:,}/{obj.total_samples:,} ({obj.percent:.0f} %)"

    @admin.display(description="retry of")
    def retry_of(self, obj):
        return obj.original_extraction_id or "—"

    @admin.action(description="Cancel selected extractions", permissions=["view"])
    def cancel(self, request, queryset):
        self._each(request, queryset, lambda e: services.extraction_cancel(extraction=e),
                   "%(count)d extraction cancelled (a running one stops after its batch).",
                   "%(count)d extractions cancelled (running ones stop after their batch).")

    @admin.action(description="Retry selected extractions", permissions=["view"])
    def retry(self, request, queryset):
        self._each(request, queryset,
                   lambda e: services.extraction_retry(extraction=e, user=request.user, reason="retried from the admin"),
                   "%(count)d retry started.", "%(count)d retries started.")

    @admin.action(description="Retry selected extractions with the suggested parameters", permissions=["view"])
    def retry_with_suggested(self, request, queryset):
        def act(extraction):
            services.extraction_retry_suggested(extraction=extraction, user=request.user, via="from the admin")

        self._each(request, queryset, act, "%(count)d retry started with suggested parameters.",
                   "%(count)d retries started with suggested parameters.")

    @admin.action(description="Delete selected finished extractions (with their files)", permissions=["view"])
    def delete(self, request, queryset):
        return self._each_once_confirmed(
            request, queryset, check=lambda e: services.extraction_check_deletable(extraction=e),
            act=lambda e: services.extraction_delete(extraction=e, user=request.user),
            template="admin/extraction/confirm_delete.html", title="Delete extractions?", listed="extractions",
            done_singular="%(count)d extraction deleted with its files.",
            done_plural="%(count)d extractions deleted with their files.")

    def has_view_permission(self, request, obj=None):
        return request.user.is_active and request.user.is_staff
