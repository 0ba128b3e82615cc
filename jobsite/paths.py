"""Every path that comes from a request, a command or a row is resolved here first."""

from pathlib import Path

from jobsite.errors import JobInputError

# A file in a model directory whose weights are random (the demo's tiny models): such a model
# runs, so extraction may use it, but what it writes is noise, not text.
RANDOM_WEIGHTS_MARKER = "RANDOM_WEIGHTS"


def resolve_under(path: str | Path, roots: list[Path], what: str, *, field: str = "path") -> Path:
    """Resolve symlinks and `..` first, then require the result to lie under a root; a refusal
    is about the request's `field`."""
    if not str(path).strip() or "\x00" in str(path):
        raise JobInputError(f"The {what} path must be a non-empty path without NUL characters.", field=field)
    try:
        candidate = Path(path).expanduser()
        if not candidate.is_absolute():
            candidate = roots[0] / candidate
        resolved = candidate.resolve()
        if not any(resolved == root or resolved.is_relative_to(root) for root in roots):
            allowed = ", ".join(str(r) for r in roots)
            raise JobInputError(f"The {what} path {path} is outside the allowed directories ({allowed}); move it there.", field=field)
        if not resolved.exists():
            raise JobInputError(f"The {what} path {path} does not exist.", field=field)
    except JobInputError:
        raise  # already a sentence (it is a ValueError too)
    except (OSError, RuntimeError, ValueError) as exc:  # too long, a symlink loop, unreadable
        raise JobInputError(f"The {what} path {str(path)[:200]} cannot be used: {exc}.", field=field) from None
    return resolved
