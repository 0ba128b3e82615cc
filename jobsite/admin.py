"""What the admins share: bulk actions that call a service per selected job, and a guard against
tampered changelist requests. Also the admin of personal API tokens (jobsite.tokens)."""

from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.contrib.admin.views.main import ERROR_FLAG
from django.core.exceptions import ValidationError
from django.http import HttpResponseRedirect
from django.template.response import TemplateResponse
from django.utils.html import format_html
from django.utils.translation import ngettext

from jobsite.errors import JobInputError
from jobsite.lifecycle import TransitionError
from jobsite.models import ApiToken
from jobsite.permissions import can
from jobsite.services import job_resume
from jobsite.tokens import HOW_TO_USE, api_token_create, api_token_revoke


class TamperProofMixin:
    """What Django's admin takes as it comes and the database then refuses with a 500: a selected
    id that is not a number, and a NUL in a filter value (PostgreSQL text cannot hold one)."""

    def changelist_view(self, request, extra_context=None):
        if any("\x00" in key or any("\x00" in value for value in values) for key, values in request.GET.lists()):
            return HttpResponseRedirect(f"{request.path}?{ERROR_FLAG}=1")  # Django's answer to a bad lookup
        return super().changelist_view(request, extra_context)

    def response_action(self, request, queryset):
        try:
            for value in request.POST.getlist(helpers.ACTION_CHECKBOX_NAME):
                self.model._meta.pk.to_python(value)
        except ValidationError:
            self.message_user(request, "The selection was not understood; no action was taken.", messages.WARNING)
            return None
        return super().response_action(request, queryset)


class ActionPermissions:
    """Who sees and who acts (jobsite.permissions): every staff member sees the changelists, and
    an action declared `permissions=["cancel"]` is offered, and taken, only by a user with the
    model's own "cancel_<model>" permission; Django leaves the others out of the menu and refuses
    one sent anyway. Deleting and adding stay with Django's own permissions."""

    def has_module_permission(self, request):
        return request.user.is_active and request.user.is_staff

    def has_view_permission(self, request, obj=None):
        return request.user.is_active and request.user.is_staff

    def _holds(self, request, action: str) -> bool:
        opts = self.model._meta
        return can(request.user, f"{opts.app_label}.{action}_{opts.model_name}")

    def has_cancel_permission(self, request):
        return self._holds(request, "cancel")

    def has_retry_permission(self, request):
        return self._holds(request, "retry")

    def has_resume_permission(self, request):
        return self._holds(request, "resume")

    def has_dismiss_permission(self, request):
        return self._holds(request, "dismiss")

    def has_delete_with_files_permission(self, request):
        # Not has_delete_permission: that would also offer Django's own delete, which skips the files.
        return self._holds(request, "delete")

    def has_train_permission(self, request):
        return self._holds(request, "train")

    def has_stop_permission(self, request):
        return self._holds(request, "stop")

    def has_proceed_permission(self, request):
        return self._holds(request, "proceed")

    def has_adopt_permission(self, request):
        return self._holds(request, "adopt")

    def has_remove_permission(self, request):
        return self._holds(request, "remove")

    def has_review_permission(self, request):
        return self._holds(request, "change")  # a pair's review is its one change


class RegisteredMixin(ActionPermissions, TamperProofMixin):
    """A model, dataset or corpus: viewed and deleted here, never edited. Its name and path were
    checked when it was registered (API, page, command), and jobs and files refer to them: an
    edit here would skip those checks (a path outside the data directory, a name a folder
    cannot hold) and change what finished jobs say they read."""

    def has_change_permission(self, request, obj=None):
        return False


class JobActionsMixin(ActionPermissions, TamperProofMixin):
    """The actions and columns every job kind's changelist has: whether its worker lives, and
    Resume for one that went silent."""

    @admin.display(description="heartbeat")
    def heartbeat(self, obj):
        age = obj.heartbeat_age_s
        if age is None:
            return "—"
        if obj.is_stalled:
            return format_html('<strong style="color:#dc3545">stalled: silent {} s</strong>', f"{age:,.0f}")
        return f"{age:,.0f} s ago"

    @admin.action(description="Resume selected stalled jobs (from their checkpoint)", permissions=["resume"])
    def resume(self, request, queryset):
        self._each(request, queryset, job_resume, "%(count)d stalled job queued again; it continues from its checkpoint.",
                   "%(count)d stalled jobs queued again; they continue from their checkpoints.")

    def _each(self, request, jobs, act, done_singular: str, done_plural: str) -> None:
        """act(job) for each job: a message for every refusal, one for what was done
        ("%(count)d" in the sentences)."""
        done = 0
        for job in jobs:
            try:
                act(job)
                done += 1
            except (TransitionError, JobInputError) as exc:
                self.message_user(request, self.refusal(job, exc), messages.ERROR)
        if done:
            self.message_user(request, ngettext(done_singular, done_plural, done) % {"count": done}, messages.SUCCESS)

    def refusal(self, job, exc: Exception) -> str:
        name, message = f"{job._meta.verbose_name.capitalize()} {job.pk}", str(exc)
        this = f"This {job._meta.verbose_name} "  # "This extraction is ..." said of one of several rows
        if message.startswith(this):
            return f"{name} {message.removeprefix(this)}"
        return message if message.startswith(name) else f"{name}: {message}"  # a sentence that names it already

    def _each_once_confirmed(self, request, jobs, *, check, act, template: str, title: str, listed: str,
                             done_singular: str, done_plural: str):
        """A destructive action: the jobs check() refuses get a message each; the rest are listed
        on `template` (as `listed`) and acted on only when that page's form comes back confirmed."""
        accepted = []
        for job in jobs:
            try:
                check(job)
            except TransitionError as exc:
                self.message_user(request, self.refusal(job, exc), messages.ERROR)
            else:
                accepted.append(job)
        if not accepted:
            return None
        if request.POST.get("confirmed") != "yes":
            return TemplateResponse(request, template, {
                **self.admin_site.each_context(request), "title": title, listed: accepted,
                "opts": self.model._meta, "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
            })
        self._each(request, accepted, act, done_singular, done_plural)
        return None


@admin.register(ApiToken)
class ApiTokenAdmin(TamperProofMixin, admin.ModelAdmin):
    """Personal API tokens: made here (the key is shown once, in a message), listed, revoked.

    Every active staff member manages their own tokens: a token acts with no more than its
    user's own permissions, so making one grants nothing. Superusers see and make everyone's.
    A token is never edited (its key cannot change; revoke it and make another), and key_hash
    is never shown.
    """

    list_display = ("shown_prefix", "name", "user", "created_at", "last_used_at", "revoked_at")
    list_filter = (("revoked_at", admin.EmptyFieldListFilter),)
    search_fields = ("name", "prefix", "user__username")
    actions = ["revoke"]

    def get_queryset(self, request):
        tokens = super().get_queryset(request).select_related("user")
        return tokens if request.user.is_superuser else tokens.filter(user=request.user)

    def get_fields(self, request, obj=None):
        if obj is None:
            return ("user", "name")
        return ("user", "name", "prefix", "created_at", "last_used_at", "revoked_at")

    def get_readonly_fields(self, request, obj=None):
        return () if obj is None else self.get_fields(request, obj)

    def formfield_for_foreignkey(self, db_field, request, **kwargs):
        if db_field.name == "user":
            from django.contrib.auth import get_user_model

            users = get_user_model().objects.filter(is_active=True)
            kwargs["queryset"] = users if request.user.is_superuser else users.filter(pk=request.user.pk)
            kwargs["initial"] = request.user.pk
        return super().formfield_for_foreignkey(db_field, request, **kwargs)

    def _staff(self, request) -> bool:
        return request.user.is_active and request.user.is_staff

    def has_module_permission(self, request):
        return self._staff(request)

    def has_view_permission(self, request, obj=None):
        return self._staff(request) and (obj is None or request.user.is_superuser or obj.user_id == request.user.pk)

    def has_add_permission(self, request):
        return self._staff(request)

    def has_change_permission(self, request, obj=None):
        return False

    def has_revoke_permission(self, request):
        return self._staff(request)

    @admin.display(description="key starts with", ordering="prefix")
    def shown_prefix(self, obj):
        return f"{obj.prefix}…"

    def save_model(self, request, obj, form, change):
        token, key = api_token_create(user=obj.user, name=obj.name)
        for field in ApiToken._meta.concrete_fields:  # the admin goes on with the row the service made
            setattr(obj, field.attname, getattr(token, field.attname))
        obj._state.adding, obj._state.db = False, token._state.db
        self.message_user(request, format_html(
            "The key of API token “{}” for {} is <code>{}</code>. Copy it now: it is shown only this once, and "
            "only its hash is kept. {}", token.name, token.user.username, key, HOW_TO_USE), messages.WARNING)

    @admin.action(description="Revoke selected tokens", permissions=["revoke"])
    def revoke(self, request, queryset):
        revoked = sum(api_token_revoke(token=token) for token in queryset)
        already = queryset.count() - revoked
        if revoked:
            self.message_user(request, ngettext(
                "%(count)d token revoked: a request that sends it now gets 401.",
                "%(count)d tokens revoked: a request that sends one of them now gets 401.", revoked,
            ) % {"count": revoked}, messages.SUCCESS)
        if already:
            self.message_user(request, ngettext("%(count)d token was revoked already.",
                                                "%(count)d tokens were revoked already.", already)
                              % {"count": already}, messages.INFO)
