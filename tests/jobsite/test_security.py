"""Anonymous and non-staff users are refused every write, whatever URL it lives at.

The endpoints are enumerated from the OpenAPI schema and the URL conf, so a new one is
covered the day it is added.
"""

import re
from pathlib import Path

import pytest
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver

from jobsite.api import api

REPO = Path(__file__).resolve().parents[2]
PUBLIC_READS = {"/api/v1/health", "/api/v1/openapi.json", "/api/v1/docs"}


def api_operations() -> list[tuple[str, str]]:
    schema = api.get_openapi_schema()
    return [
        (method.upper(), re.sub(r"\{[^}]+\}", "1", path))
        for path, operations in schema["paths"].items()
        for method in operations
    ]


def page_routes() -> list[str]:
    routes = []

    def walk(patterns, prefix=""):
        for pattern in patterns:
            route = prefix + str(pattern.pattern).lstrip("^").rstrip("$")
            if isinstance(pattern, URLResolver):
                walk(pattern.url_patterns, route)
            elif isinstance(pattern, URLPattern):
                routes.append("/" + re.sub(r"<[^>]+>", "1", route))

    walk(get_resolver().url_patterns)
    skip = ("/admin/", "/api/", "/static/", "/accounts/login", "/accounts/logout", "/metrics")
    return sorted({r for r in routes if not r.startswith(skip)})


WRITES = [op for op in api_operations() if op[0] != "GET"]
READS = [op for op in api_operations() if op[0] == "GET" and op[1] not in PUBLIC_READS]


def test_the_api_has_write_operations_to_check():
    assert len(WRITES) >= 12 and len(READS) >= 8


@pytest.mark.django_db
@pytest.mark.parametrize(("method", "path"), WRITES)
def test_every_api_write_refuses_anonymous_and_non_staff(client, plain_user, method, path):
    anonymous = client.generic(method, path, data="{}", content_type="application/json")
    assert anonymous.status_code == 401, (method, path, anonymous.content)
    client.force_login(plain_user)
    reader = client.generic(method, path, data="{}", content_type="application/json")
    assert reader.status_code == 403, (method, path, reader.content)
    assert "staff" in reader.json()["message"]


@pytest.mark.django_db
@pytest.mark.parametrize(("method", "path"), READS)
def test_every_api_read_needs_a_login(client, method, path):
    assert client.get(path).status_code == 401


def row_counts() -> dict:
    from django.apps import apps

    return {m._meta.label: m.objects.count() for m in apps.get_models() if m._meta.app_label in APPS}


APPS = ("jobsite", "extraction", "training_runs")


@pytest.mark.django_db
@pytest.mark.parametrize("path", page_routes())
def test_every_page_refuses_anonymous_and_non_staff_posts(client, plain_user, make_extraction, path):
    make_extraction("failed")  # something a page action could cancel, retry or remove
    before = row_counts()
    anonymous = client.post(path, {"model": "1", "dataset": "1", "layers": "0"})
    assert anonymous.status_code in (302, 401, 403, 405), (path, anonymous.status_code)
    if anonymous.status_code == 302:
        assert "/login" in anonymous["Location"]
    client.force_login(plain_user)
    reader = client.post(path, {"model": "1", "dataset": "1", "layers": "0"})
    assert not 200 <= reader.status_code < 300, (path, reader.status_code)
    assert row_counts() == before, path


@pytest.mark.django_db
def test_api_writes_from_a_browser_session_need_the_csrf_token(staff_user, fake_model, fake_dataset):
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(staff_user)
    body = '{"dataset_id": %d, "layers": [0], "hooks": ["residual"]}' % fake_dataset.pk
    refused = browser.post(f"/api/v1/models/{fake_model.pk}/extractions", data=body, content_type="application/json")
    assert refused.status_code == 403
    assert refused.json()["message"].startswith("The CSRF token is missing or wrong: send the csrftoken cookie's value")
    anonymous = Client(enforce_csrf_checks=True).post(f"/api/v1/models/{fake_model.pk}/extractions", data=body,
                                                      content_type="application/json")
    assert (anonymous.status_code, anonymous.json()["message"]) == (
        401, "Log in first (session cookie); writes also need staff."), "not a CSRF refusal to someone not logged in"
    from django.middleware.csrf import _get_new_csrf_string

    token = _get_new_csrf_string()  # what the csrftoken cookie of a page holds
    browser.cookies["csrftoken"] = token
    accepted = browser.post(f"/api/v1/models/{fake_model.pk}/extractions", data=body,
                            content_type="application/json", HTTP_X_CSRFTOKEN=token)
    assert accepted.status_code == 201


def test_a_page_form_without_its_csrf_token_gets_a_page_that_says_so(staff_user, make_extraction):
    """Not Django's debugging page: a sentence, a link back to the page the form was on, nothing done."""
    job = make_extraction("extracting")
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(staff_user)
    refused = browser.post(f"/extractions/{job.pk}/cancel/", HTTP_REFERER="http://testserver/extractions/?job=1")
    assert refused.status_code == 403
    html = refused.content.decode()
    assert "This form was not sent: its security token is missing or out of date" in html
    assert '<a href="http://testserver/extractions/?job=1">Back to the page</a>' in html
    assert "CSRF verification failed" not in html
    job.refresh_from_db()
    assert not job.cancel_requested
    elsewhere = browser.post(f"/extractions/{job.pk}/cancel/", HTTP_REFERER="https://evil.example/")
    assert '<a href="/">Back to the pages</a>' in elsewhere.content.decode()


@pytest.mark.django_db
def test_admin_is_refused_to_non_staff(client, plain_user):
    client.force_login(plain_user)
    response = client.post("/admin/extraction/extraction/", {"action": "cancel", "_selected_action": ["1"]})
    assert response.status_code == 302 and "/admin/login/" in response["Location"]


def test_no_pickle_in_our_code():
    """Weights are safetensors, arrays .npy without allow_pickle, checkpoints safetensors + JSON."""
    offenders = []
    for path in REPO.rglob("*.py"):
        if any(part in (".venv", "tests", "migrations") for part in path.relative_to(REPO).parts):
            continue
        text = path.read_text()
        for pattern in (r"\bimport pickle\b", r"\btorch\.load\(", r"\btorch\.save\(", r"allow_pickle\s*=\s*True",
                        r"\.bin\b.*from_pretrained"):
            if re.search(pattern, text):
                offenders.append(f"{path.relative_to(REPO)}: {pattern}")
    assert offenders == []


@pytest.mark.django_db
def test_an_address_that_does_not_exist_says_so_in_words(staff_user):
    browser = Client()
    browser.force_login(staff_user)
    for path in ("/foo/", "/training/6/delete/"):
        response = browser.get(path)
        html = response.content.decode()
        assert response.status_code == 404 and "There is nothing at this address." in html, path
        assert "Resolver404" not in html


@pytest.mark.django_db
def test_admin_pages_name_the_sites_icon(admin_client):
    html = admin_client.get("/admin/").content.decode()
    assert '<link rel="icon" href="/static/jobsite/favicon.svg" type="image/svg+xml">' in html
