"""Avatar files: streamed to disk in chunks, typed by their content, never held whole.

An upload is written to a temporary file in the avatars directory while its size is
counted; its first bytes decide the type (JPEG, PNG or WebP magic numbers, whatever
the client claimed). Only a complete, accepted upload is renamed into place, under a
random name, so a half-written or refused file is never served.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from .errors import BadRequest, InvalidInput, PayloadTooLarge, UnsupportedMediaType

AVATAR_TYPES = {"image/jpeg": "jpg", "image/png": "png", "image/webp": "webp"}
SNIFF_BYTES = 12
FILE_NAME_RE = re.compile(r"^[0-9a-f]{32}\.(jpg|png|webp)$")
MAX_FORM_OVERHEAD = 64 * 1024  # other multipart fields and headers around the file


def sniff_image(head: bytes) -> str | None:
    """The media type of an image from its magic bytes, if it is JPEG, PNG or WebP."""
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return None


@dataclass(frozen=True, slots=True)
class StoredAvatar:
    file_name: str
    content_type: str
    size: int


class AvatarStorage:
    """Avatar files under ``root`` (``<data_dir>/avatars``)."""

    def __init__(self, root: Path, *, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes

    def path_of(self, file_name: str) -> Path:
        """The path of a stored avatar; refuses anything but names this class made."""
        if not FILE_NAME_RE.match(file_name):
            raise ValueError(f"not an avatar file name: {file_name!r}")
        return self.root / file_name

    async def save(self, chunks: AsyncIterable[bytes]) -> StoredAvatar:
        """Stream ``chunks`` to disk. Raises :class:`PayloadTooLarge` past ``max_bytes``
        and :class:`UnsupportedMediaType` unless the content is JPEG, PNG or WebP."""
        await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)
        temp = self.root / f".upload-{secrets.token_hex(8)}"
        handle: BinaryIO = await asyncio.to_thread(temp.open, "xb")
        try:
            content_type, size = await self._copy(chunks, handle)
            await asyncio.to_thread(_flush_and_close, handle)
            file_name = f"{secrets.token_hex(16)}.{AVATAR_TYPES[content_type]}"
            await asyncio.to_thread(os.replace, temp, self.root / file_name)
        except BaseException:
            await asyncio.to_thread(_discard, handle, temp)
            raise
        return StoredAvatar(file_name, content_type, size)

    async def _copy(self, chunks: AsyncIterable[bytes], handle: BinaryIO) -> tuple[str, int]:
        size = 0
        head = b""
        content_type: str | None = None
        async for chunk in chunks:
            if not chunk:
                continue
            size += len(chunk)
            if size > self.max_bytes:
                raise PayloadTooLarge(f"avatar is larger than {self.max_bytes} bytes")
            if content_type is None:
                head += chunk
                if len(head) < SNIFF_BYTES:
                    continue
                content_type = _require_image(head)
                chunk, head = head, b""
            await asyncio.to_thread(handle.write, chunk)
        if content_type is None:
            if not head:
                raise InvalidInput(["body", "file"], "the file is empty")
            content_type = _require_image(head)
            await asyncio.to_thread(handle.write, head)
        return content_type, size

    async def delete(self, file_name: str | None) -> None:
        if not file_name:
            return
        try:
            path = self.path_of(file_name)
        except ValueError:
            return
        await asyncio.to_thread(path.unlink, missing_ok=True)


def _require_image(head: bytes) -> str:
    content_type = sniff_image(head)
    if content_type is None:
        raise UnsupportedMediaType("avatar must be a JPEG, PNG or WebP image")
    return content_type


def _flush_and_close(handle: BinaryIO) -> None:
    handle.flush()
    os.fsync(handle.fileno())
    handle.close()


def _discard(handle: BinaryIO, path: Path) -> None:
    handle.close()
    path.unlink(missing_ok=True)


class _FilePart:
    """Callbacks of :class:`MultipartParser` that keep the data of one named part."""

    def __init__(self, field: str) -> None:
        self.field = field.encode()
        self.pending: list[bytes] = []
        self.found = False
        self.done = False
        self.other_bytes = 0
        self._header_name = b""
        self._header_value = b""
        self._part_name: bytes | None = None
        self._in_target = False

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value_cb,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self._part_name = None
        self._header_name = b""
        self._header_value = b""

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_cb(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            _, params = parse_options_header(self._header_value)
            self._part_name = params.get(b"name")
        self._header_name = b""
        self._header_value = b""

    def _headers_finished(self) -> None:
        self._in_target = not self.found and self._part_name == self.field

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._in_target:
            self.pending.append(bytes(data[start:end]))
        else:
            self.other_bytes += end - start

    def _part_end(self) -> None:
        if self._in_target:
            self.found = True
            self.done = True
            self._in_target = False


async def multipart_file(
    body: AsyncIterable[bytes], content_type: str, field: str = "file"
) -> AsyncIterator[bytes]:
    """The bytes of the ``field`` part of a ``multipart/form-data`` body, as they arrive.

    Other parts are skipped (at most 64 KiB of them); reading stops at the end of the
    file part, so the body is never buffered whole.
    """
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadRequest("multipart body without a boundary")
    part = _FilePart(field)
    try:
        parser = MultipartParser(boundary, part.callbacks())  # type: ignore[arg-type]
    except (MultipartParseError, ValueError):
        raise BadRequest("malformed multipart boundary") from None
    async for chunk in body:
        try:
            parser.write(chunk)
        except MultipartParseError:
            raise BadRequest("malformed multipart body") from None
        if part.other_bytes > MAX_FORM_OVERHEAD:
            raise PayloadTooLarge("too much form data besides the file")
        pending, part.pending = part.pending, []
        for piece in pending:
            yield piece
        if part.done:
            return
    if not part.found:
        raise InvalidInput(["body", field], f"a '{field}' file part is required")
