from django.contrib import admin, messages
from django.utils.translation import ngettext

from jobsite.admin import ActionPermissions, JobActionsMixin, RegisteredMixin, TamperProofMixin
from jobsite.errors import JobInputError
from jobsite.lifecycle import TransitionError
from training_runs import services
from training_runs.models import Chunk, Corpus, TrainingPair, TrainingRun


@admin.register(Corpus)
class CorpusAdmin(RegisteredMixin, admin.ModelAdmin):
    list_display = ["name", "num_documents", "chunk_size", "chunk_overlap", "source", "created_at"]
    readonly_fields = ["source", "num_documents", "chunk_size", "chunk_overlap"]

    def has_add_permission(self, request):
        # Chunking lives in the service (API upload, command); the add form would skip it.
        return False


@admin.register(Chunk)
class ChunkAdmin(ActionPermissions, TamperProofMixin, admin.ModelAdmin):
    list_display = ["index", "corpus", "document"]
    list_filter = ["corpus"]
    search_fields = ["text", "document"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(TrainingRun)
class TrainingRunAdmin(JobActionsMixin, admin.ModelAdmin):
    list_display = ["id", "status_text", "progress", "heartbeat", "corpus", "pair_count", "error_text", "short_error",
                    "removed", "created_at"]
    list_filter = ["status", "error_type", "corpus"]
    actions = ["stop", "resume", "proceed", "adopt", "remove"]
    readonly_fields = ["verdict", *(f.name for f in TrainingRun._meta.get_fields() if getattr(f, "concrete", False))]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        # Deleting goes through the "remove" action: it refuses runs that are not failed
        # and takes the files with the rows.
        return False

    @admin.display(description="status", ordering="status")
    def status_text(self, obj):
        return obj.status_label  # the words the page, `training status` and the API use

    @admin.display(description="error type", ordering="error_type")
    def error_text(self, obj):
        return obj.error_label

    @admin.display(description="removed")
    def removed(self, obj):
        if not obj.is_removed:
            return "—"
        return f"{obj.removed_label.removeprefix('removed ')}; {obj.pair_count:,} pairs; {obj.verdict_label}"

    @admin.display(description="progress")
    def progress(self, obj):
        return obj.progress_label

    @admin.display(description="result")
    def verdict(self, obj):
        return obj.verdict

    @admin.display(description="error")
    def short_error(self, obj):
        return obj.error_message[:100]

    def refusal(self, job, exc):
        return str(exc)  # the services' sentences name the run already

    @admin.action(description="Stop selected generating or training runs", permissions=["stop"])
    def stop(self, request, queryset):
        self._each(request, queryset, lambda run: services.training_run_stop(run=run),
                   "Stop asked of %(count)d run: a working run stops after its current chunk or batch, one "
                   "without a live worker at once.",
                   "Stop asked of %(count)d runs: a working run stops after its current chunk or batch, one "
                   "without a live worker at once.")

    @admin.action(description="Proceed with selected failed runs", permissions=["proceed"])
    def proceed(self, request, queryset):
        self._each(request, queryset, lambda run: services.training_run_proceed(run=run),
                   "%(count)d run proceeds.", "%(count)d runs proceed.")

    @admin.action(description="Adopt the adapter of selected runs that did not adopt it", permissions=["adopt"])
    def adopt(self, request, queryset):
        return self._each_once_confirmed(
            request, queryset, check=lambda run: services.training_run_check_adoptable(run=run), act=lambda run: services.training_run_adopt(run=run, user=request.user),
            template="admin/training_runs/confirm_adopt.html", title="Adopt adapters?", listed="runs",
            done_singular="%(count)d adapter adopted: search goes through it.",
            done_plural="%(count)d adapters adopted: search goes through them.")

    @admin.action(description="Remove selected failed, stopped, unreviewed or completed runs (their pairs and files; "
                              "the rows stay)", permissions=["remove"])
    def remove(self, request, queryset):
        return self._each_once_confirmed(
            request, queryset, check=lambda run: services.training_run_check_removable(run=run),
            act=lambda run: services.training_run_remove(run=run, user=request.user),
            template="admin/training_runs/confirm_remove.html", title="Remove training runs?", listed="runs",
            done_singular="%(count)d run removed.", done_plural="%(count)d runs removed.")


@admin.register(TrainingPair)
class TrainingPairAdmin(ActionPermissions, TamperProofMixin, admin.ModelAdmin):
    list_display = ["id", "run", "query", "chunk", "review"]
    list_filter = ["review", "run"]
    search_fields = ["query", "chunk__text"]
    actions = ["approve", "reject"]
    list_select_related = ["chunk", "run"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        # A pair is approved or rejected, never deleted: its run counts its pairs, and a
        # trained run's pairs are what its adapter was trained on. Removing the run removes them.
        return False

    def _review(self, request, queryset, decision):
        updated = 0
        # order_by(): the default ordering's columns would otherwise make each pair's run distinct.
        for run_id in queryset.order_by("run_id").values_list("run_id", flat=True).distinct():
            run = TrainingRun.objects.get(pk=run_id)
            ids = list(queryset.filter(run=run).values_list("pk", flat=True))
            try:
                updated += services.training_run_review(run=run, decision=decision, pair_ids=ids)
            except (TransitionError, JobInputError) as exc:
                self.message_user(request, str(exc), messages.ERROR)
        if updated:
            self.message_user(request, ngettext("%d pair %s.", "%d pairs %s.", updated) % (updated, decision),
                              messages.SUCCESS)

    @admin.action(description="Approve selected pairs", permissions=["review"])
    def approve(self, request, queryset):
        self._review(request, queryset, TrainingPair.Review.APPROVED)

    @admin.action(description="Reject selected pairs", permissions=["review"])
    def reject(self, request, queryset):
        self._review(request, queryset, TrainingPair.Review.REJECTED)
