"""What the page forms of every job kind share."""

from __future__ import annotations

from django import forms


def require_one_of(data: dict, first: str, second: str, *, both: str, neither: str) -> None:
    """Exactly one of two ways to give the same thing (a path, or an upload); the sentences say which."""
    if data.get(first) and data.get(second):
        raise forms.ValidationError(both)
    if not data.get(first) and not data.get(second):
        raise forms.ValidationError(neither)
