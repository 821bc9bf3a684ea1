"""Errors for bad user input (malformed conversations, oversized prompts, unreadable images).

Everything that is the caller's fault raises an ``InputError`` (a ``ValueError``) carrying an
OpenAI-style ``code``, the offending ``param`` and an HTTP ``status``, so serving can turn it into an
error body without string matching and the data pipeline can count drops by ``code``.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input. ``status`` is the HTTP status serving should answer with."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_request_error",
                 status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.status = status

    def as_openai(self) -> dict:
        """OpenAI-compatible error body."""
        return {"error": {"message": self.message, "type": "invalid_request_error",
                          "param": self.param, "code": self.code}}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.message!r}, param={self.param!r}, code={self.code!r}, "
                f"status={self.status})")


class SampleTooLong(InputError):
    """Prompt + answer (after ``<image>`` expansion) does not fit in ``max_length``."""

    def __init__(self, length: int, max_length: int, param: str | None = "messages") -> None:
        super().__init__(f"sequence is {length} tokens (including visual tokens) but max_length is {max_length}",
                         param=param, code="context_length_exceeded", status=400)
        self.length = length
        self.max_length = max_length


class ImageError(InputError):
    """Undecodable image (``invalid_image``, 400) or over the pixel limit (``image_too_large``, 413)."""

    def __init__(self, message: str, param: str | None = "image", code: str = "invalid_image",
                 status: int = 400) -> None:
        super().__init__(message, param=param, code=code, status=status)
