from django.contrib import admin
from django.utils import timezone
from django.utils.html import format_html, format_html_join

from extraction import selectors, services
from extraction.constants import BLOCK_ORDER
from extraction.models import Dataset, Extraction, ExtractionShard, ModelRecord
from jobsite.admin import JobActionsMixin, RegisteredMixin
from jobsite.permissions import can

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


class ShardFields:
    """How a shard reads in the admin, as a row of its extraction's page and as its own."""

    @admin.display(description="samples")
    def progress(self, obj):
        return f"{obj.samples_processed:,}/{obj.total_samples:,} ({obj.percent:.0f} %)"

    @admin.display(description="error")
    def error(self, obj):
        return f"{obj.error_type}: {obj.error_message}" if obj.error_type else "—"


class ShardInline(ShardFields, admin.TabularInline):
    model = ExtractionShard
    fields = ["index", "status", "progress", "worker", "heartbeat_at", "attempt", "current_batch_size", "error"]
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True

    def has_view_permission(self, request, obj=None):
        return request.user.is_active and request.user.is_staff  # whoever sees the extraction sees its shards

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(ExtractionShard)
class ExtractionShardAdmin(ShardFields, JobActionsMixin, admin.ModelAdmin):
    """Read only: a shard is made by its extraction's planning, and stopped or retried with it.
    Resume takes back a shard whose worker went silent, as Resume on the extraction does for all of them."""

    list_display = ["__str__", "status", "progress", "worker", "attempt", "heartbeat"]
    list_filter = ["status"]
    search_fields = ["extraction__id", "worker"]
    actions = ["resume"]
    readonly_fields = [f.name for f in ExtractionShard._meta.get_fields() if getattr(f, "concrete", False)]

    def _holds(self, request, action: str) -> bool:
        # A shard's actions are its extraction's: the permissions are the extraction's.
        return can(request.user, f"extraction.{action}_extraction")

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(Extraction)
class ExtractionAdmin(JobActionsMixin, admin.ModelAdmin):
    # Short columns and labels, so that the list fits beside the filters at 1,280 px.
    list_display = ["number", "badge", "model", "dataset", "progress", "shard_column", "heartbeat"]
    inlines = [ShardInline]
    list_filter = ["status", "error_type", "model", "dataset", "auto_retried",
                   ("dismissed_at", admin.EmptyFieldListFilter)]
    search_fields = ["id", "error_message", "model__name", "dataset__name"]
    actions = ["cancel", "resume", "retry", "retry_with_suggested", "dismiss", "delete"]
    # The original by its number (retry_of): the row may be deleted, and the number stays.
    readonly_fields = [("retry_of" if f.name == "original_extraction" else f.name)
                       for f in Extraction._meta.get_fields() if getattr(f, "concrete", False)]
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
        """The status, with its error type and attempt under it (one column, not three)."""
        label = "cancelling" if obj.cancel_requested and obj.status in obj.RUNNING else obj.status
        under = " · ".join(part for part in (obj.error_type, f"try {obj.attempt}" if obj.attempt > 1 else "",
                                             "dismissed" if obj.dismissed_at else "") if part)
        return format_html(
            '<span style="background:{};color:#fff;padding:2px 8px;border-radius:8px;white-space:nowrap">{}</span>'
            '{}', BADGE_COLOURS.get(obj.status, "#6c757d"), label,
            format_html('<br><small style="word-break:break-all">{}</small>', under) if under else "",
        )

    @admin.display(description="ID", ordering="id")
    def number(self, obj):
        """Its number, with when it was created and the one it retries under it."""
        retry = format_html('<br><small style="white-space:nowrap">retry of {}</small>', self.retry_of(obj)) \
            if obj.original_extraction_id else ""
        return format_html('{}<br><small class="quiet">{}</small>{}', obj.pk, self.created(obj), retry)

    @admin.display(description="samples")
    def progress(self, obj):
        return f"{obj.samples_processed:,}/{obj.total_samples:,} ({obj.percent:.0f} %)"

    @admin.display(description="Shards", ordering="shards")
    def shard_column(self, obj):
        if obj.shards <= 1:
            return "—"
        done = sum(1 for shard in obj.shard_set.all() if shard.status == ExtractionShard.Status.COMPLETED)
        return f"{done}/{obj.shards} done"

    @admin.display(description="retry of", ordering="original_extraction_id")
    def retry_of(self, obj):
        if not obj.original_extraction_id:
            return "—"
        return f"#{obj.original_extraction_id} (deleted)" if obj.original_deleted else f"#{obj.original_extraction_id}"

    @admin.display(description="created", ordering="created_at")
    def created(self, obj):
        return timezone.localtime(obj.created_at).strftime("%m-%d %H:%M")

    def get_queryset(self, request):
        # original_deleted: a retry keeps its original's number after that one is deleted.
        return selectors.extraction_list()

    def has_dismiss_permission(self, request):
        return can(request.user, "extraction.dismiss_extraction")

    @admin.action(description="Dismiss selected failed or cancelled extractions (into the history)",
                  permissions=["dismiss"])
    def dismiss(self, request, queryset):
        self._each(request, queryset, lambda e: services.extraction_dismiss(extraction=e, user=request.user),
                   "%(count)d extraction dismissed: it is in the history, no longer among the jobs needing attention.",
                   "%(count)d extractions dismissed: they are in the history, no longer among the jobs needing "
                   "attention.")

    @admin.action(description="Cancel selected extractions", permissions=["cancel"])
    def cancel(self, request, queryset):
        """After a confirmation page, as delete_selected: a cancel cannot be taken back."""
        return self._each_once_confirmed(
            request, queryset, check=lambda e: services.extraction_check_cancellable(extraction=e),
            act=lambda e: services.extraction_cancel(extraction=e),
            template="admin/extraction/confirm_cancel.html", title="Cancel extractions?", listed="extractions",
            done_singular="%(count)d extraction cancelled (a running one stops after its batch).",
            done_plural="%(count)d extractions cancelled (running ones stop after their batch).")

    @admin.action(description="Retry selected extractions", permissions=["retry"])
    def retry(self, request, queryset):
        self._each(request, queryset,
                   lambda e: services.extraction_retry(extraction=e, user=request.user, reason="retried from the admin"),
                   "%(count)d retry started.", "%(count)d retries started.")

    @admin.action(description="Retry selected extractions with the suggested parameters", permissions=["retry"])
    def retry_with_suggested(self, request, queryset):
        def act(extraction):
            services.extraction_retry_suggested(extraction=extraction, user=request.user, via="from the admin")

        self._each(request, queryset, act, "%(count)d retry started with suggested parameters.",
                   "%(count)d retries started with suggested parameters.")

    @admin.action(description="Delete selected finished extractions (with their files)",
                  permissions=["delete_with_files"])
    def delete(self, request, queryset):
        return self._each_once_confirmed(
            request, queryset, check=lambda e: services.extraction_check_deletable(extraction=e),
            act=lambda e: services.extraction_delete(extraction=e, user=request.user),
            template="admin/extraction/confirm_delete.html", title="Delete extractions?", listed="extractions",
            done_singular="%(count)d extraction deleted with its files.",
            done_plural="%(count)d extractions deleted with their files.")
