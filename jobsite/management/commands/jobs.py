from django.core.management.base import BaseCommand, CommandError

from jobsite import watchdog
from jobsite.cleanup import REUSABLE, Item, cleanup_find, cleanup_remove


def _human(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} B"


def _line(item: Item) -> str:
    """A listed item: its size, path and why; an output a Retry can reuse says how much."""
    reason = f"{item.reason}, {_human(item.size)}" if item.use == REUSABLE else item.reason
    return f"{_human(item.size):>10}  {item.path}  ({reason})"


class Command(BaseCommand):
    help = ("Operations on every kind of job: recover (run the watchdog now), cleanup (output of dead jobs); "
            "and token (personal API tokens).")

    def add_arguments(self, parser):
        sub = parser.add_subparsers(dest="action", required=True)
        sub.add_parser("recover", help="fail stalled or timed-out jobs now and resend lost enqueues")
        cleanup = sub.add_parser("cleanup", help="list (or --delete) outputs nobody needs; dry run by default")
        cleanup.add_argument("--delete", action="store_true", help="remove what is listed")
        cleanup.add_argument("--include-reusable", action="store_true",
                             help="also list (with --delete: remove) outputs of failed or cancelled jobs that a Retry "
                                  "would start from; a later Retry then starts from the first sample")
        cleanup.add_argument("--show-kept", action="store_true",
                             help="also list the job folders left alone, with why (active, a result, awaiting review "
                                  "or Proceed)")
        token = sub.add_parser("token", help="personal API tokens: create (the key is printed once), list, revoke")
        token_sub = token.add_subparsers(dest="token_action", required=True)
        create = token_sub.add_parser("create", help="make a token for USER and print its key once")
        create.add_argument("user", metavar="USER", help="the username the token acts as")
        create.add_argument("--name", default="made with manage.py jobs token create",
                            help="what the token is for, e.g. 'nightly export script'")
        listing = token_sub.add_parser("list", help="every token (or USER's), newest first; never a key")
        listing.add_argument("user", metavar="USER", nargs="?", help="only this user's tokens")
        revoke = token_sub.add_parser("revoke", help="revoke a token from now on")
        revoke.add_argument("token", metavar="PREFIX_OR_ID", help="the token's id, or its key's first characters")

    def handle(self, *args, **options):
        getattr(self, f"do_{options['action']}")(options)

    def do_token(self, options):
        from django.contrib.auth import get_user_model
        from django.utils import timezone

        from jobsite.errors import JobInputError
        from jobsite.models import ApiToken
        from jobsite.tokens import HOW_TO_USE, api_token_create, api_token_find, api_token_revoke

        def user_named(username: str):
            user = get_user_model().objects.filter(username=username).first()
            if user is None:
                raise CommandError(f"No user is named '{username}'; manage.py createsuperuser or the admin makes one.")
            return user

        action = options["token_action"]
        if action == "create":
            try:
                token, key = api_token_create(user=user_named(options["user"]), name=options["name"])
            except JobInputError as exc:
                raise CommandError(str(exc)) from None
            self.stdout.write(key)
            # The key alone on stdout (KEY=$(manage.py jobs token create ...)); what it is, on stderr.
            self.stderr.write(f"That is the key of API token {token.pk} ('{token.name}') for {token.user.username}, "
                              f"shown only this once. {HOW_TO_USE}", style_func=lambda line: line)
        elif action == "list":
            tokens = ApiToken.objects.select_related("user")
            if options["user"]:
                tokens = tokens.filter(user=user_named(options["user"]))
            if not tokens:
                self.stdout.write("No API tokens. Make one with: manage.py jobs token create USER.")
                return
            self.stdout.write(f"{'id':>5}  {'key starts with':<16} {'user':<16} {'created':<17} {'last used':<17} "
                              f"{'revoked':<17} name")

            def when(moment) -> str:
                return f"{timezone.localtime(moment):%Y-%m-%d %H:%M}" if moment else "—"

            for t in tokens:
                self.stdout.write(f"{t.pk:>5}  {t.prefix + '…':<16} {t.user.username[:16]:<16} "
                                  f"{when(t.created_at):<17} {when(t.last_used_at):<17} {when(t.revoked_at):<17} "
                                  f"{t.name}")
        else:
            try:
                token = api_token_find(prefix_or_id=options["token"])
            except JobInputError as exc:
                raise CommandError(str(exc)) from None
            if api_token_revoke(token=token):
                self.stdout.write(f"Revoked API token {token.pk} ({token.prefix}…, '{token.name}', "
                                  f"{token.user.username}): a request that sends it now gets 401.")
            else:
                self.stdout.write(f"API token {token.pk} ({token.prefix}…) was revoked already, at "
                                  f"{token.revoked_at:%Y-%m-%d %H:%M:%S}.")

    def do_recover(self, options):
        changed = watchdog.run()
        for line in changed:
            self.stdout.write(line)
        if not changed:
            running = sum(m.objects.filter(status__in=m.RUNNING).exclude(worker="").count() for m in watchdog.job_models())
            self.stdout.write(f"Nothing to recover: {running} running job(s), all with a live heartbeat.")

    def do_cleanup(self, options):
        found = cleanup_find()
        include = options["include_reusable"]
        listed = found.removable(include_reusable=include)
        kept_reusable = [] if include else found.reusable
        for item in listed:
            self.stdout.write(_line(item))
        if kept_reusable:
            self.stdout.write("Kept for Retry (--include-reusable removes them too):")
            for item in kept_reusable:
                self.stdout.write(_line(item))
        if options["delete"]:
            done = cleanup_remove(items=listed)
            for item, why in done.skipped:
                self.stdout.write(f"Left {item.path}: {why}.")
            for item, error in done.failed:
                self.stdout.write(f"Could not remove {item.path}: {error}.")
            summary = f"Removed {len(done.removed)} item(s), {_human(sum(i.size for i in done.removed))}."
        else:
            summary = f"Would remove {len(listed)} item(s), {_human(sum(i.size for i in listed))}."
            if listed:
                summary += " Run again with --delete to remove them."
        if kept_reusable:
            summary += (f" Kept {len(kept_reusable)} output(s) a Retry can reuse, "
                        f"{_human(sum(i.size for i in kept_reusable))}.")
        summary += f" Left alone {len(found.kept)} folder(s) of jobs that are active or still need them."
        if options["show_kept"]:
            for item in found.kept:
                self.stdout.write(f"{'left':>10}  {item.path}  ({item.reason})")
        self.stdout.write(summary)
        if options["delete"] and done.failed:
            raise CommandError(f"{len(done.failed)} item(s) could not be removed; see above.")
