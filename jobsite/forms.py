"""What the page forms of every job kind share."""

from __future__ import annotations

from django import forms

from jobsite.errors import JobInputError


def require_one_of(data: dict, first: str, second: str, *, both: str, neither: str) -> None:
    """Exactly one of two ways to give the same thing (a path, or an upload); the sentences say which."""
    if data.get(first) and data.get(second):
        raise forms.ValidationError(both)
    if not data.get(first) and not data.get(second):
        raise forms.ValidationError(neither)


def add_refusal(form, exc: JobInputError, *, default: str | None = None, renamed: dict | None = None) -> None:
    """A service's refusal under the field it is about (`renamed` maps the API's name for an
    input to the form's), else under `default`, else at the top of the form."""
    field = (renamed or {}).get(exc.field, exc.field)
    form.add_error(field if field in form.fields else default if default in form.fields else None, str(exc))
