"""What the admins share: bulk actions that call a service per selected job, and a guard against
tampered changelist requests."""

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
from jobsite.services import job_resume


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


class RegisteredMixin(TamperProofMixin):
    """A model, dataset or corpus: viewed and deleted here, never edited. Its name and path were
    checked when it was registered (API, page, command), and jobs and files refer to them: an
    edit here would skip those checks (a path outside the data directory, a name a folder
    cannot hold) and change what finished jobs say they read."""

    def has_change_permission(self, request, obj=None):
        return False


class JobActionsMixin(TamperProofMixin):
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

    @admin.action(description="Resume selected stalled jobs (from their checkpoint)", permissions=["view"])
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
