"""What every job kind's admin shares: bulk actions that call a service per selected job."""

from django.contrib import messages
from django.utils.translation import ngettext

from jobsite.errors import JobInputError
from jobsite.lifecycle import TransitionError


class JobActionsMixin:
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
        return f"{job._meta.verbose_name.capitalize()} {job.pk}: {exc}"
