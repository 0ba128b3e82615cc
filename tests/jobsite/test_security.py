"""Every write, whatever URL it lives at, is refused to anonymous visitors and to viewers (staff
without the action's permission), and taken from the "job operators".

The endpoints are enumerated from the OpenAPI schema, the URL conf and the admin's registry, so
a new one is covered the day it is added.
"""

import html
import json
import re
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlencode

import pytest
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver

from jobsite.permissions import ACTIONS, OPERATORS_GROUP, refusal
from jobsite.urls import api  # with the apps' routers, which the URL conf mounts

REPO = Path(__file__).resolve().parents[2]
PUBLIC_READS = {"/api/v1/health", "/api/v1/openapi.json", "/api/v1/docs"}


def api_operations() -> list[tuple[str, str]]:
    schema = api.get_openapi_schema()
    return [
        (method.upper(), re.sub(r"\{[^}]+\}", "1", path))
        for path, operations in schema["paths"].items()
        for method in operations
    ]


WRITES = [op for op in api_operations() if op[0] != "GET"]
READS = [op for op in api_operations() if op[0] == "GET" and op[1] not in PUBLIC_READS]
REFUSALS = {refusal(perm) for perm in ACTIONS}


def test_the_api_has_write_operations_to_check():
    assert len(WRITES) >= 12 and len(READS) >= 8


@pytest.fixture
def world(make_extraction, fake_model, fake_dataset):
    """One of everything an action can act on: a failed extraction, a corpus, a run waiting for
    review with its pair. A refused request must leave all of it as it was."""
    from django.utils import timezone

    from training_runs.models import Chunk, Corpus, TrainingPair, TrainingRun

    extraction = make_extraction("failed", error_type="OOM", error_message="CUDA out of memory.",
                                 suggested_retry_params={"batch_size": 4})
    from extraction.models import ExtractionShard

    # A shard of it, stopped when another shard failed: its admin page and actions are checked too.
    ExtractionShard.objects.create(extraction=extraction, index=0, first_sample=0, end_sample=4,
                                   status="cancelled", finished_at=timezone.now())
    corpus = Corpus.objects.create(name="handbook", source="/data/handbook", num_documents=1)
    chunk = Chunk.objects.create(corpus=corpus, index=0, document="handbook.md", text="Bicycles need oil.")
    run = TrainingRun.objects.create(corpus=corpus, status="generated", total_chunks=1, processed_chunks=1,
                                     pair_count=1, generated_at=timezone.now())
    pair = TrainingPair.objects.create(run=run, chunk=chunk, query="how often do bicycles need oil")
    return SimpleNamespace(model=fake_model, dataset=fake_dataset, extraction=extraction, corpus=corpus, run=run,
                           pair=pair)


def snapshot() -> dict:
    """Every row of the apps' tables and of the users and groups: what a refused request must not change."""
    from django.apps import apps

    models = [m for m in apps.get_models() if m._meta.app_label in APPS or m._meta.label in ("auth.User", "auth.Group")]
    # last_login: a refused request still logs its user in.
    return {m._meta.label: [{k: v for k, v in row.items() if k != "last_login"}
                            for row in m.objects.order_by("pk").values()] for m in models}


def logged_in(user) -> Client:
    client = Client()
    if user is not None:
        client.force_login(user)
    return client


# -- the API -------------------------------------------------------------------------------------

def _example(schema: dict, components: dict):
    """The smallest value a JSON schema takes: a write's body that passes validation, so that
    what answers is the permission, not a 422 about the body."""
    if "$ref" in schema:
        return _example(components[schema["$ref"].rsplit("/", 1)[1]], components)
    if "anyOf" in schema:
        return _example(schema["anyOf"][0], components)
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type")
    if kind == "object":
        return {name: _example(schema["properties"][name], components) for name in schema.get("required", [])}
    if kind == "array":
        return [_example(schema["items"], components)] * max(1, schema.get("minItems", 1))
    if kind == "integer":
        return max(1, schema.get("minimum", 1))
    if kind == "boolean":
        return False
    if schema.get("format") == "binary":
        from django.core.files.uploadedfile import SimpleUploadedFile

        return SimpleUploadedFile("notes.txt", b"A sample.\nAnother sample.\n", content_type="text/plain")
    return "x"


def api_writes() -> list[tuple[str, str, dict]]:
    schema = api.get_openapi_schema()
    return [(method.upper(), path, operation.get("requestBody") or {})
            for path, operations in schema["paths"].items() for method, operation in operations.items()
            if method != "get"]


def api_request(client: Client, method: str, path: str, body: dict, world):
    """The write sent with real ids in its path and a body that passes validation."""
    ids = {"model_id": world.model.pk, "extraction_id": world.extraction.pk, "run_id": world.run.pk,
           "pair_id": world.pair.pk}
    url = re.sub(r"\{([^}]+)\}", lambda m: str(ids[m.group(1)]), path)
    components = api.get_openapi_schema()["components"]["schemas"]
    content = body.get("content", {})
    if "multipart/form-data" in content:
        assert method == "POST", "an upload is a POST"
        return client.post(url, _example(content["multipart/form-data"]["schema"], components))
    data = _example(content["application/json"]["schema"], components) if "application/json" in content else {}
    return client.generic(method, url, data=json.dumps(data), content_type="application/json")


@pytest.mark.django_db
@pytest.mark.parametrize(("method", "path", "body"), api_writes(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_api_write_refuses_anonymous_and_viewers_and_lets_operators_act(world, viewer_user, staff_user, method,
                                                                              path, body):
    before = snapshot()
    anonymous = api_request(logged_in(None), method, path, body, world)
    assert anonymous.status_code == 401 and anonymous.json()["message"], (method, path, anonymous.content)
    viewer = api_request(logged_in(viewer_user), method, path, body, world)
    assert viewer.status_code == 403, (method, path, viewer.content)
    assert viewer.json()["message"] in REFUSALS
    assert snapshot() == before, (method, path)
    operator = api_request(logged_in(staff_user), method, path, body, world)
    assert operator.status_code not in (401, 403) and operator.status_code < 500, (method, path, operator.content)


@pytest.mark.django_db
def test_an_api_refusal_names_the_permission_and_who_holds_it(world, viewer_user):
    """The refusal names the permission and who has it: the same sentence on every entry point."""
    response = logged_in(viewer_user).post(
        f"/api/v1/models/{world.model.pk}/extractions/{world.extraction.pk}/cancel")
    assert (response.status_code, response.json()) == (403, {"message": (
        "You may view jobs but not cancel extractions: that needs the 'cancel_extraction' permission, which the "
        "'job operators' group has; ask an administrator.")})
    world.extraction.refresh_from_db()
    assert world.extraction.status == "failed" and not world.extraction.cancel_requested


@pytest.mark.django_db
@pytest.mark.parametrize(("method", "path"), READS)
def test_every_api_read_needs_a_login(client, method, path):
    assert client.get(path).status_code == 401


APPS = ("jobsite", "extraction", "training_runs")


# -- the pages -----------------------------------------------------------------------------------

# Addresses that answer a POST without being a write: the home page only redirects.
NOT_WRITES = {"home"}


def page_routes() -> dict[str, list[str]]:
    """Every named page address outside the admin, the API and logging in: its URL name, and
    the names of the arguments its path takes."""
    routes = {}

    def walk(patterns, namespace=""):
        for pattern in patterns:
            if isinstance(pattern, URLResolver):
                if pattern.namespace not in ("admin", "api"):
                    walk(pattern.url_patterns, f"{namespace}{pattern.namespace}:" if pattern.namespace else namespace)
            elif isinstance(pattern, URLPattern) and pattern.name:
                routes[namespace + pattern.name] = list(getattr(pattern.pattern, "converters", {}))

    walk(get_resolver().url_patterns)
    return {name: args for name, args in routes.items() if name not in ("login", "logout", "metrics")}


def page_url(name: str, world) -> str:
    from django.urls import reverse

    values = {"pk": world.extraction.pk if name.startswith("extraction:") else world.run.pk,
              "pair_id": world.pair.pk, "name": "metadata.json"}
    return reverse(name, kwargs={arg: values[arg] for arg in page_routes()[name]})


FORM = {"confirmed": "1", "layers": "0", "hooks": "residual", "kind": "dataset", "dataset-path": "nothing.txt",
        "generator": "local", "decision": "approved", "scope": "all", "query": "how often is oil needed?",
        "name": "other", "path": "corpora-src", "chunk_size": "500", "chunk_overlap": "50"}


def test_the_pages_have_write_addresses_to_check():
    assert {"extraction:cancel", "extraction:register", "training_runs:delete", "training_runs:review"} <= set(
        page_routes())


@pytest.mark.django_db
@pytest.mark.parametrize("name", sorted(page_routes()))
def test_every_page_write_refuses_anonymous_and_viewers_and_lets_operators_act(world, viewer_user, staff_user, name):
    """A write is any address that does not answer a viewer's POST with 405: it must answer
    403 with the sentence (and an anonymous visitor the login page), and change nothing."""
    url = page_url(name, world)
    form = {**FORM, "model": world.model.pk, "dataset": world.dataset.pk, "corpus": world.corpus.pk}
    before = snapshot()
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        anonymous = logged_in(None).generic(method, url, urlencode(form),
                                             content_type="application/x-www-form-urlencoded")
        assert anonymous.status_code in (302, 405), (method, url, anonymous.status_code)
        if anonymous.status_code == 302:
            assert anonymous["Location"].startswith("/accounts/login/"), (method, url)
        viewer = logged_in(viewer_user).generic(method, url, urlencode(form),
                                                content_type="application/x-www-form-urlencoded")
        if name in NOT_WRITES:
            continue
        assert viewer.status_code in (403, 405), (method, url, viewer.status_code)
        if viewer.status_code == 403:
            assert "You may view jobs but not" in viewer.content.decode(), (method, url)
    assert snapshot() == before, url
    operator = logged_in(staff_user).post(url, form)
    assert operator.status_code not in (401, 403) and operator.status_code < 500, (url, operator.status_code)


def posted_forms(page: str) -> set[str]:
    """Where the page's forms post to (htmx or not)."""
    forms = re.findall(r"<form\b[^>]*>", page)
    return {re.search(r'(?:hx-post|action)="([^"]*)"', form).group(1) for form in forms
            if re.search(r'method="post"|hx-post=', form)}


@pytest.mark.django_db
def test_a_viewer_sees_the_extractions_page_without_actions_and_an_operator_with_them(world, viewer_user, staff_user,
                                                                                    make_extraction):
    from django.utils import timezone

    running = make_extraction("extracting", started_at=timezone.now(), heartbeat_at=timezone.now(),
                              total_samples=100, samples_processed=10, attempt=1)
    cancelled = make_extraction("cancelled")
    page = f"/extractions/?job={cancelled.pk}"
    seen = logged_in(viewer_user).get(page).content.decode()
    assert posted_forms(seen) == {"/accounts/logout/"}
    for job in (world.extraction, running, cancelled):
        assert f"/extractions/{job.pk}/cancel/" not in seen and f"/extractions/{job.pk}/retry" not in seen
    assert "group (and superusers) can start, cancel or retry jobs" in html.unescape(seen)
    assert "(read only)" in seen
    acted = logged_in(staff_user).get(page).content.decode()
    assert {f"/extractions/{running.pk}/cancel/", f"/extractions/{world.extraction.pk}/retry-suggested/",
            f"/extractions/{world.extraction.pk}/retry/", f"/extractions/{cancelled.pk}/retry/",
            "/extractions/register/", "/extractions/"} <= posted_forms(acted)
    assert "(read only)" not in acted and "data-staff-note" not in acted


@pytest.mark.django_db
def test_a_viewer_sees_the_training_page_without_actions_and_an_operator_with_them(world, viewer_user, staff_user,
                                                                                encoder):
    run = world.run
    seen = logged_in(viewer_user).get("/training/").content.decode()
    assert posted_forms(seen) == {"/accounts/logout/"}
    assert world.pair.query in seen, "the pairs are there to read"
    for action in ("review", "train", "delete", "proceed", "stop", "adopt", f"pairs/{world.pair.pk}/edit"):
        assert f"/training/runs/{run.pk}/{action}/" not in seen, action
    acted = logged_in(staff_user).get("/training/").content.decode()
    assert {f"/training/runs/{run.pk}/review/", f"/training/runs/{run.pk}/train/", f"/training/runs/{run.pk}/delete/",
            "/training/corpora/", "/training/generate/"} <= posted_forms(acted)
    assert f"/training/runs/{run.pk}/pairs/{world.pair.pk}/edit/" in acted


# -- the admin -----------------------------------------------------------------------------------

# A staff member revokes their own API tokens: a token grants nothing its user does not hold.
OWN_THINGS = {"jobsite.ApiToken"}


def admin_actions() -> list[tuple[str, str]]:
    from django.contrib import admin

    found = []
    for model, model_admin in admin.site._registry.items():
        if model._meta.label in OWN_THINGS:
            continue
        names = [name for name, _ in admin.site.actions]
        names += [a if isinstance(a, str) else a.__name__ for a in model_admin.actions or ()]
        found += [(model._meta.label, name) for name in names]
    return found


def _changelist(label: str) -> str:
    app_label, model_name = label.lower().split(".")
    return f"/admin/{app_label}/{model_name}/"


def test_the_admin_has_job_actions_to_check():
    assert {("extraction.Extraction", "cancel"), ("training_runs.TrainingRun", "remove"),
            ("training_runs.TrainingPair", "approve")} <= set(admin_actions())


@pytest.mark.django_db
@pytest.mark.parametrize(("label", "action"), admin_actions())
def test_every_admin_action_is_refused_to_viewers_and_offered_to_operators(world, viewer_user, staff_user, label,
                                                                         action):
    from django.apps import apps
    from django.contrib import admin

    model = apps.get_model(label)
    model_admin = admin.site._registry[model]
    # A function listed in `actions` (not a method) is found by itself, not by its name.
    listed_function = [a for a in model_admin.actions or () if getattr(a, "__name__", None) == action]
    func = model_admin.get_action(listed_function[0] if listed_function else action)[0]
    ids = list(model.objects.values_list("pk", flat=True)) or [1]
    before = snapshot()
    viewer = logged_in(viewer_user)
    listed = viewer.get(_changelist(label))
    if listed.status_code == 200:
        offered = listed.context["action_form"]
        assert offered is None or action not in dict(offered.fields["action"].choices), (label, action)
    else:
        assert listed.status_code == 403, (label, listed.status_code)
    sent = viewer.post(_changelist(label), {"action": action, "_selected_action": ids, "post": "yes",
                                            "confirmed": "yes", "index": "0"})
    assert sent.status_code in (200, 302, 403), (label, action, sent.status_code)
    assert snapshot() == before, (label, action)
    builtin = set(getattr(func, "allowed_permissions", ())) & {"add", "change", "delete", "view"}
    if model._meta.app_label in APPS and not builtin:  # a job action: the operators may take it
        operator = logged_in(staff_user)
        offered = operator.get(_changelist(label)).context["action_form"]
        assert action in dict(offered.fields["action"].choices), (label, action)
        done = operator.post(_changelist(label), {"action": action, "_selected_action": ids[:1]})
        assert done.status_code in (200, 302), (label, action, done.status_code)


@pytest.mark.django_db
@pytest.mark.parametrize("label", sorted({label for label, _ in admin_actions() if label.split(".")[0] in APPS}))
def test_a_viewer_sees_every_job_changelist_and_object_read_only(world, viewer_user, label):
    from django.apps import apps

    obj = apps.get_model(label).objects.first()
    viewer = logged_in(viewer_user)
    assert viewer.get(_changelist(label)).status_code == 200
    page = viewer.get(f"{_changelist(label)}{obj.pk}/change/")
    assert page.status_code == 200, label
    assert 'name="_save"' not in page.content.decode() and "deletelink" not in page.content.decode(), label
    before = snapshot()
    assert viewer.post(f"{_changelist(label)}{obj.pk}/change/", {}).status_code == 403, label
    assert viewer.post(f"{_changelist(label)}{obj.pk}/delete/", {"post": "yes"}).status_code == 403, label
    assert snapshot() == before, label


@pytest.mark.django_db
def test_the_job_operators_group_holds_every_action_permission():
    from django.contrib.auth.models import Group

    group = Group.objects.get(name=OPERATORS_GROUP)
    held = {f"{p.content_type.app_label}.{p.codename}" for p in group.permissions.select_related("content_type")}
    assert held == set(ACTIONS)


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
        401, "Log in first (session cookie), or send a personal API token as 'Authorization: Bearer <key>'."
    ), "not a CSRF refusal to someone not logged in"
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


# -- the services ------------------------------------------------------------------------------

def _service_calls(world):
    from extraction import services as extraction_services
    from training_runs import services as training_services

    return {
        "extraction.add_extraction": lambda user: extraction_services.extraction_start(
            model=world.model, dataset=world.dataset, layers=[1], hooks=["residual"], user=user),
        "extraction.retry_extraction": lambda user: extraction_services.extraction_retry(
            extraction=world.extraction, user=user),
        "extraction.delete_extraction": lambda user: extraction_services.extraction_delete(
            extraction=world.extraction, user=user),
        "training_runs.remove_trainingrun": lambda user: training_services.training_run_remove(
            run=world.run, user=user),
    }


@pytest.mark.django_db
@pytest.mark.parametrize("perm", ["extraction.add_extraction", "extraction.retry_extraction",
                                  "extraction.delete_extraction", "training_runs.remove_trainingrun"])
def test_a_service_refuses_a_named_person_without_the_permission_and_not_the_host(world, viewer_user, perm):
    """Whatever calls it (page, API, admin, command), a service that names who acts refuses the
    same way; a command on the host names nobody and acts as the host's operator."""
    from django.core.exceptions import PermissionDenied

    call = _service_calls(world)[perm]
    before = snapshot()
    with pytest.raises(PermissionDenied) as refused:
        call(viewer_user)
    assert str(refused.value) == refusal(perm)
    assert snapshot() == before
    call(None)
    assert snapshot() != before, "the host's operator acts"
