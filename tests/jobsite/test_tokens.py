"""Personal API tokens: a script sends `Authorization: Bearer <key>` and acts as the token's user.

Against the real API (Django test client, CSRF enforced as a browser would meet it), the admin
and the command.
"""

import hashlib
import io
import re
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.test import Client
from django.utils import timezone

from jobsite.models import ApiToken
from jobsite.tokens import api_token_authenticate, api_token_create, api_token_revoke

pytestmark = pytest.mark.django_db

CSRF_REFUSAL = "The CSRF token is missing or wrong: send the csrftoken cookie's value"


def script(key: str | None = None, **headers) -> Client:
    """A client as a script is one: no session, no CSRF cookie, CSRF checks enforced."""
    if key is not None:
        headers["HTTP_AUTHORIZATION"] = f"Bearer {key}"
    client = Client(enforce_csrf_checks=True)
    client.defaults.update(headers)
    return client


def cancel_url(job) -> str:
    return f"/api/v1/models/{job.model_id}/extractions/{job.pk}/cancel"


def test_an_operators_token_writes_without_a_csrf_token(staff_user, make_extraction):
    _token, key = api_token_create(user=staff_user, name="nightly script")
    job = make_extraction("queued")
    answer = script(key).post(cancel_url(job), content_type="application/json")
    assert answer.status_code == 200, answer.content
    assert answer.json()["status"] == "cancelled"
    job.refresh_from_db()
    assert job.status == "cancelled"


def test_a_token_reads_as_its_user(viewer_user, make_extraction):
    _token, key = api_token_create(user=viewer_user, name="dashboard")
    job = make_extraction("queued")
    answer = script(key).get(f"/api/v1/extractions/{job.pk}")
    assert answer.status_code == 200 and answer.json()["id"] == job.pk


def test_a_viewers_token_carries_only_the_viewers_permissions(viewer_user, make_extraction):
    _token, key = api_token_create(user=viewer_user, name="dashboard")
    job = make_extraction("queued")
    refused = script(key).post(cancel_url(job), content_type="application/json")
    assert refused.status_code == 403
    assert refused.json()["message"].startswith("You may view jobs but not cancel extractions")
    job.refresh_from_db()
    assert job.status == "queued" and not job.cancel_requested


def test_a_revoked_token_gets_401_with_a_sentence_and_never_the_session(staff_user, make_extraction):
    token, key = api_token_create(user=staff_user, name="old laptop")
    assert api_token_revoke(token=token) is True
    job = make_extraction("queued")
    client = script(key)
    client.force_login(staff_user)  # a session that could write, in the same client: not used
    refused = client.post(cancel_url(job), content_type="application/json")
    assert refused.status_code == 401
    assert refused.json() == {"message": "This API token is revoked; create a new one with manage.py jobs token "
                                         "create USER or in the admin (API tokens)."}
    assert refused["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    assert client.get(f"/api/v1/extractions/{job.pk}").status_code == 401
    job.refresh_from_db()
    assert job.status == "queued"
    assert api_token_revoke(token=token) is False, "revoking again changes nothing"


def test_an_unknown_token_gets_401_with_a_sentence(staff_user, make_extraction):
    api_token_create(user=staff_user, name="real one")
    job = make_extraction("queued")
    refused = script("jst_" + "x" * 43).post(cancel_url(job), content_type="application/json")
    assert refused.status_code == 401
    assert refused.json()["message"].startswith("Unknown API token")


@pytest.mark.parametrize("header", ["Token abc", "Bearer", "Bearer ", "Basic c3RhZmY6cHc=", "Bearer a b", ""])
def test_a_malformed_authorization_header_gets_401_with_a_sentence(staff_user, make_extraction, header):
    job = make_extraction("queued")
    client = script(HTTP_AUTHORIZATION=header)
    client.force_login(staff_user)
    refused = client.post(cancel_url(job), content_type="application/json")
    assert refused.status_code == 401
    assert refused.json()["message"].startswith("The Authorization header is not understood: send 'Authorization: "
                                                "Bearer <key>'")


def test_a_deactivated_users_token_is_refused(staff_user, make_extraction):
    _token, key = api_token_create(user=staff_user, name="script")
    staff_user.is_active = False
    staff_user.save()
    refused = script(key).get(f"/api/v1/extractions/{make_extraction('queued').pk}")
    assert refused.status_code == 401
    assert refused.json()["message"] == "The account of this API token is deactivated; ask an administrator."
    assert api_token_authenticate(key=key) is None


def test_a_session_write_still_needs_the_csrf_token(staff_user, make_extraction):
    job = make_extraction("queued")
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(staff_user)
    refused = browser.post(cancel_url(job), content_type="application/json")
    assert refused.status_code == 403
    assert refused.json()["message"].startswith(CSRF_REFUSAL)
    job.refresh_from_db()
    assert job.status == "queued"


def test_no_credentials_at_all_is_asked_to_log_in(make_extraction):
    refused = script().get(f"/api/v1/extractions/{make_extraction('queued').pk}")
    assert refused.status_code == 401 and refused.json()["message"].startswith("Log in first")


def test_the_key_is_stored_only_as_its_hash_and_use_is_recorded(staff_user, make_extraction):
    token, key = api_token_create(user=staff_user, name="exporter")
    assert re.fullmatch(r"jst_[A-Za-z0-9_-]{43}", key)
    row = ApiToken.objects.filter(pk=token.pk).values().get()
    assert row["key_hash"] == hashlib.sha256(key.encode()).hexdigest()
    assert row["prefix"] == key[:12]
    assert not any(isinstance(value, str) and key[12:20] in value for value in row.values()), "no part past the prefix"
    assert row["last_used_at"] is None
    assert script(key).get(f"/api/v1/extractions/{make_extraction('queued').pk}").status_code == 200
    token.refresh_from_db()
    first_use = token.last_used_at
    assert first_use is not None and timezone.now() - first_use < timedelta(seconds=10)
    script(key).get("/api/v1/models")
    token.refresh_from_db()
    assert token.last_used_at == first_use, "written at most once a minute"
    ApiToken.objects.filter(pk=token.pk).update(last_used_at=first_use - timedelta(minutes=5))
    script(key).get("/api/v1/models")
    token.refresh_from_db()
    assert token.last_used_at > first_use


def test_two_tokens_have_different_keys(staff_user):
    keys = {api_token_create(user=staff_user, name=f"t{i}")[1] for i in range(5)}
    assert len(keys) == 5


def test_the_openapi_schema_declares_both_schemes(staff_client):
    schema = staff_client.get("/api/v1/openapi.json").json()
    schemes = schema["components"]["securitySchemes"]
    assert schemes["BearerToken"]["type"] == "http" and schemes["BearerToken"]["scheme"] == "bearer"
    assert (schemes["LoginRequired"]["type"], schemes["LoginRequired"]["in"]) == ("apiKey", "cookie")
    cancel = schema["paths"]["/api/v1/models/{model_id}/extractions/{extraction_id}/cancel"]["post"]
    assert {"BearerToken": []} in cancel["security"] and {"LoginRequired": []} in cancel["security"]
    assert "security" not in schema["paths"]["/api/v1/health"]["get"]


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
def test_a_token_works_against_the_real_server(start_daphne, staff_user, make_extraction):
    """Over daphne, as a script sends it: no cookie, no CSRF token, the key in the header."""
    import json
    import urllib.error
    import urllib.request

    _token, key = api_token_create(user=staff_user, name="deploy script")
    job = make_extraction("queued")
    _, port = start_daphne()

    def post(token: str) -> tuple[int, dict]:
        request = urllib.request.Request(f"http://127.0.0.1:{port}{cancel_url(job)}", data=b"", method="POST",
                                         headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    assert post("jst_unknown")[0] == 401
    status, body = post(key)
    assert (status, body["status"]) == (200, "cancelled")
    job.refresh_from_db()
    assert job.status == "cancelled"


# -- the command -------------------------------------------------------------------------------------

def run(*args) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command("jobs", "token", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_token_create_prints_the_key_once_and_how_to_use_it(staff_user, make_extraction):
    out, err = run("create", "staff", "--name", "nightly export")
    key = out.strip()
    assert re.fullmatch(r"jst_[A-Za-z0-9_-]{43}", key)
    assert "shown only this once" in err and "'Authorization: Bearer <key>'" in err
    token = ApiToken.objects.get()
    assert (token.user, token.name) == (staff_user, "nightly export")
    job = make_extraction("queued")
    assert script(key).post(cancel_url(job), content_type="application/json").json()["status"] == "cancelled"
    listed, _ = run("list")
    assert token.prefix in listed and "nightly export" in listed and key not in listed


def test_token_list_of_one_user_and_revoke_by_prefix_and_by_id(staff_user, viewer_user):
    mine, _ = api_token_create(user=staff_user, name="mine")
    theirs, their_key = api_token_create(user=viewer_user, name="theirs")
    out, _ = run("list", "viewer")
    assert theirs.prefix in out and mine.prefix not in out
    out, _ = run("revoke", f"{theirs.prefix}…")
    assert out.startswith(f"Revoked API token {theirs.pk}")
    assert api_token_authenticate(key=their_key) is None
    out, _ = run("revoke", str(theirs.pk))
    assert "was revoked already" in out
    out, _ = run("revoke", str(mine.pk))
    mine.refresh_from_db()
    assert mine.revoked_at is not None


@pytest.mark.parametrize(("args", "sentence"), [
    (("create", "nobody"), "No user is named 'nobody'"),
    (("list", "nobody"), "No user is named 'nobody'"),
    (("revoke", "jst_nothere"), "No API token has the id or key prefix 'jst_nothere'"),
    (("revoke", "999"), "No API token has the id or key prefix '999'"),
    (("revoke", "jst_"), "No API token has the id or key prefix 'jst_'"),
    (("create", "staff", "--name", "   "), "Name the token after what will use it"),
])
def test_token_command_refusals_are_sentences(staff_user, args, sentence):
    api_token_create(user=staff_user, name="one")
    with pytest.raises(CommandError, match=re.escape(sentence)):
        run(*args)


# -- the admin ---------------------------------------------------------------------------------------

def messages_on(response) -> list[str]:
    return [str(message) for message in response.context["messages"]]


def test_the_admin_makes_a_token_and_shows_its_key_once(client, viewer_user, make_extraction):
    client.force_login(viewer_user)  # any staff member manages their own tokens
    made = client.post("/admin/jobsite/apitoken/add/", {"user": viewer_user.pk, "name": "grafana"}, follow=True)
    assert made.status_code == 200
    shown = [m for m in messages_on(made) if "shown only this once" in m]
    assert len(shown) == 1
    key = re.search(r"<code>(jst_[A-Za-z0-9_-]{43})</code>", shown[0]).group(1)
    token = ApiToken.objects.get()
    assert (token.user, token.name) == (viewer_user, "grafana")
    assert token.key_hash == hashlib.sha256(key.encode()).hexdigest()
    assert script(key).get(f"/api/v1/extractions/{make_extraction('queued').pk}").status_code == 200
    again = client.get("/admin/jobsite/apitoken/")
    page = again.content.decode()
    assert key not in page and token.key_hash not in page and f"{token.prefix}…" in page
    detail = client.get(f"/admin/jobsite/apitoken/{token.pk}/change/").content.decode()
    assert token.key_hash not in detail and key not in detail


def test_the_admin_shows_staff_only_their_own_tokens_and_refuses_others(client, staff_user, viewer_user):
    theirs, _ = api_token_create(user=staff_user, name="operator's")
    client.force_login(viewer_user)
    page = client.get("/admin/jobsite/apitoken/").content.decode()
    assert theirs.prefix not in page
    assert client.get(f"/admin/jobsite/apitoken/{theirs.pk}/change/").status_code in (302, 403, 404)
    refused = client.post("/admin/jobsite/apitoken/add/", {"user": staff_user.pk, "name": "sneaky"})
    assert refused.status_code == 200 and "Select a valid choice" in refused.content.decode()
    assert ApiToken.objects.count() == 1
    client.post("/admin/jobsite/apitoken/", {"action": "revoke", "_selected_action": [theirs.pk]})
    theirs.refresh_from_db()
    assert theirs.revoked_at is None, "another user's token is out of reach"


def test_a_superuser_sees_every_token(client, django_user_model, staff_user):
    theirs, _ = api_token_create(user=staff_user, name="operator's")
    client.force_login(django_user_model.objects.create_superuser("root", password="pw"))
    assert theirs.prefix in client.get("/admin/jobsite/apitoken/").content.decode()


def test_the_admin_revokes_selected_tokens(client, viewer_user):
    token, key = api_token_create(user=viewer_user, name="old")
    client.force_login(viewer_user)
    done = client.post("/admin/jobsite/apitoken/", {"action": "revoke", "_selected_action": [token.pk]}, follow=True)
    assert any("1 token revoked" in m for m in messages_on(done))
    token.refresh_from_db()
    assert token.revoked_at is not None and api_token_authenticate(key=key) is None
