"""schemathesis against the OpenAPI schema, as a staff user: no input makes the API answer 5xx."""

import hypothesis
import pytest
import schemathesis
from django.core.wsgi import get_wsgi_application
from django.middleware.csrf import _get_new_csrf_string
from django.test import Client

EXAMPLES_PER_OPERATION = 12


@pytest.mark.django_db(transaction=True)
def test_no_generated_request_gets_a_server_error(staff_user, fake_model, fake_dataset, make_extraction):
    make_extraction("failed")
    browser = Client()
    browser.force_login(staff_user)
    token = _get_new_csrf_string()
    cookies = {"sessionid": browser.cookies["sessionid"].value, "csrftoken": token}
    schema = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", get_wsgi_application())
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20
    server_errors = []
    for operation in operations:

        @hypothesis.settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, derandomize=True,
                             suppress_health_check=list(hypothesis.HealthCheck), phases=[hypothesis.Phase.generate])
        @hypothesis.given(case=operation.as_strategy())
        def probe(case):
            response = case.call(cookies=cookies, headers={"X-CSRFToken": token})
            # /health answers 503 on purpose when a part is down (no worker runs in this test).
            if response.status_code >= 500 and case.formatted_path != "/api/v1/health":
                server_errors.append(f"{case.method} {case.formatted_path} {case.body!r}: {response.status_code}")

        probe()
    assert server_errors == []


@pytest.mark.django_db
def test_every_json_body_refuses_an_unknown_field_naming_it(staff_client):
    """A misspelled optional field must never fall back to its default (`pairs` for `pair_ids`
    meant every pending pair), so every JSON body refuses a field it does not have."""
    import json
    import re

    schema = staff_client.get("/api/v1/openapi.json").json()
    checked = []
    for path, methods in schema["paths"].items():
        for method, operation in methods.items():
            if "application/json" not in operation.get("requestBody", {}).get("content", {}):
                continue
            url = re.sub(r"\{[^}]+\}", "1", path)
            response = getattr(staff_client, method)(url, data=json.dumps({"no_such_field": 1}),
                                                     content_type="application/json")
            assert response.status_code == 422, (method, path, response.content)
            assert response.json()["field"] == "no_such_field", (method, path)
            message = response.json()["message"]
            assert message.startswith("Unknown field 'no_such_field'; the fields are "), (method, path)
            checked.append(f"{method} {path}")
    assert len(checked) >= 8, checked
