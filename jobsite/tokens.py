"""Personal API tokens: made for one user, shown once, stored as a hash, revoked by a person.

A script sends `Authorization: Bearer <key>` and acts as the token's user, with that user's
permissions (jobsite.permissions) and nothing more. The key itself is never stored: a stolen
database copy holds only SHA-256 hashes, and a lost key is replaced, not recovered.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import timedelta

from django.db.models import Q
from django.utils import timezone

from jobsite.errors import JobInputError, check_text
from jobsite.models import ApiToken

KEY_PREFIX = "jst_"
# How many characters of the key a list shows (the "jst_" and a few random ones): enough to tell
# one's tokens apart, far too few to guess the rest.
SHOWN_CHARS = 12
# last_used_at is written at most this often per token: a script polling every second must not
# turn every read into a write.
LAST_USED_EVERY = timedelta(seconds=60)

HOW_TO_USE = "Send it with every API request as the header 'Authorization: Bearer <key>'."
REVOKED = ("This API token is revoked; create a new one with manage.py jobs token create USER or in the admin "
           "(API tokens).")
UNKNOWN = "Unknown API token: it is mistyped, or it was deleted; the admin lists your tokens by their first characters."
INACTIVE = "The account of this API token is deactivated; ask an administrator."


class TokenRefused(Exception):
    """A key that authenticates nobody; the message is the sentence the client gets."""


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def api_token_create(*, user, name: str) -> tuple[ApiToken, str]:
    """A new token for `user`; returns it with its key, which exists nowhere else after this call."""
    name = check_text(" ".join(name.split()), "The token's name", ApiToken._meta.get_field("name").max_length,
                      field="name")
    if not name:
        raise JobInputError("Name the token after what will use it, e.g. 'nightly export script'.", field="name")
    if not user.is_active:
        raise JobInputError(f"User {user.username} is deactivated; a token of theirs would be refused.", field="user")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken.objects.create(user=user, name=name, prefix=key[:SHOWN_CHARS], key_hash=key_hash(key))
    return token, key


def api_token_user(*, key: str):
    """The active user a key belongs to; TokenRefused with the sentence otherwise. Records the use."""
    token = ApiToken.objects.select_related("user").filter(key_hash=key_hash(key)).first() if key else None
    if token is None:
        raise TokenRefused(UNKNOWN)
    if token.revoked_at is not None:
        raise TokenRefused(REVOKED)
    if not token.user.is_active:
        raise TokenRefused(INACTIVE)
    now = timezone.now()
    if token.last_used_at is None or now - token.last_used_at >= LAST_USED_EVERY:
        ApiToken.objects.filter(Q(last_used_at__isnull=True) | Q(last_used_at__lt=now - LAST_USED_EVERY),
                                pk=token.pk).update(last_used_at=now)
    return token.user


def api_token_authenticate(*, key: str):
    """The token's user, or None for a key that is unknown, revoked or of a deactivated account."""
    try:
        return api_token_user(key=key)
    except TokenRefused:
        return None


def api_token_find(*, prefix_or_id: str) -> ApiToken:
    """The one token a person means by its id, its key's first characters (as lists show them,
    "…" and all) or its whole key; JobInputError with a sentence when none or several match."""
    given = prefix_or_id.strip().rstrip("…")
    if given.isdigit():
        found = list(ApiToken.objects.filter(pk=int(given)))
    elif len(given) > SHOWN_CHARS:
        found = list(ApiToken.objects.filter(key_hash=key_hash(given)))
    else:
        found = list(ApiToken.objects.filter(prefix__startswith=given)[:10]) if len(given) > len(KEY_PREFIX) else []
    if not found:
        raise JobInputError(f"No API token has the id or key prefix '{given}'; manage.py jobs token list shows them "
                            f"(a prefix is at least {len(KEY_PREFIX) + 1} characters, e.g. '{KEY_PREFIX}Ab').")
    if len(found) > 1:
        raise JobInputError(f"Several API tokens start with '{given}' (ids {', '.join(str(t.pk) for t in found)}); "
                            "give more characters, or the id.")
    return found[0]


def api_token_revoke(*, token: ApiToken) -> bool:
    """Revoke a token from now on; False when it was revoked already (its first revocation time stays)."""
    revoked = ApiToken.objects.filter(pk=token.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
    token.refresh_from_db(fields=["revoked_at"])
    return bool(revoked)
