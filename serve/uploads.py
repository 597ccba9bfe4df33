"""Uploaded photos: streamed straight into one request's temporary folder, each file size-limited, its type decided by
its content (never by its name), its name kept only for display.

A multipart body is parsed as it arrives (python-multipart's streaming parser), so a file over the limit is refused
when its limit is crossed, not after the whole body has been buffered; nothing is written anywhere but the request's
folder, which the caller removes when the request ends.
"""

from __future__ import annotations

import logging
import os
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from dermpipe.data.reading import ImageReadError, ImageTooLargeError, image_size
from dermpipe.errors import DermpipeError

# The formats batch prediction reads, by their first bytes: JPEG, PNG, BMP, TIFF (little- and big-endian).
SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", ".jpg"),
    (b"\x89PNG\r\n\x1a\n", ".png"),
    (b"BM", ".bmp"),
    (b"II*\x00", ".tif"),
    (b"MM\x00*", ".tif"),
)
FIELD = "files"  # the multipart field the photos come in (one part per photo); a part in any other field is refused

# the parser logs a warning before each error it raises; the server logs the refused request itself, once
logging.getLogger("python_multipart").setLevel(logging.ERROR)


class UploadError(DermpipeError):
    """A request or upload the server refuses: an HTTP status and one line saying what is wrong and what to do."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Upload:
    """One uploaded file: its name for display (never used as a path), where it lies and what its bytes are."""

    name: str
    path: Path
    size: int = 0
    head: bytes = b""  # the first bytes, for the type

    @property
    def suffix(self) -> str:
        """``.jpg``/``.png``/``.bmp``/``.tif`` from the content, or ``""`` when it is none of them."""
        return next((suffix for magic, suffix in SIGNATURES if self.head.startswith(magic)), "")

    @property
    def image_id(self) -> str:
        """The name without its extension, as a folder listing names the image."""
        stem, dot, _ = self.name.rpartition(".")
        return stem if dot and stem else self.name


def display_name(raw: str, index: int) -> str:
    """A client's file name made safe to show: its last path part only (``../../x.jpg`` -> ``x.jpg``), no control
    characters, at most 120 characters; ``upload-N`` when nothing is left."""
    name = raw.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C").strip()
    name = name.lstrip(".").strip()
    return name[-120:] or f"upload-{index + 1}"


class MultipartUploads:
    """Receive a ``multipart/form-data`` body chunk by chunk (``write``), each file part into ``folder/NNN.upload``.

    Refused with an ``UploadError``: a body that is not multipart (415), a malformed multipart body (400), a part in
    another field than ``files`` (422), more than ``max_files`` files or a file over ``max_file_bytes`` (413). Parts
    of ``files`` without a file name (form values) are read and dropped.
    """

    def __init__(self, content_type: str, folder: Path, max_file_bytes: int, max_files: int) -> None:
        kind, options = parse_options_header(content_type)
        boundary = options.get(b"boundary")
        if kind != b"multipart/form-data" or not boundary:
            raise UploadError(415, f"send the photos as multipart/form-data, one part per photo in the field "
                                   f"'{FIELD}' (got {content_type or 'no content type'})")  # fmt: skip
        self.folder, self.max_file_bytes, self.max_files = folder, max_file_bytes, max_files
        # the whole body: every file at its limit, plus room for the parts' headers and small form fields
        self.max_body_bytes = max_files * max_file_bytes + 2**20
        self.received = 0
        self.uploads: list[Upload] = []
        self._file: BinaryIO | None = None
        self._current: Upload | None = None
        self._header_field = b""
        self._header_value = b""
        self._disposition = b""
        callbacks = {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field_data,
            "on_header_value": self._header_value_data,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }
        self._parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]

    def write(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self.received > self.max_body_bytes:
            raise UploadError(413, f"the request is over {self.max_body_bytes / 2**20:g} MB ({self.max_files} files of "
                                   "at most --max-upload-mb each): send fewer or smaller files")  # fmt: skip
        try:
            self._parser.write(chunk)
        except MultipartParseError as error:
            raise malformed(error) from None

    def close(self) -> list[Upload]:
        """The files received, in order; an unfinished body (cut off mid-file) is refused."""
        try:
            self._parser.finalize()
        except MultipartParseError as error:
            raise malformed(error) from None
        if self._file is not None:
            self._close_file()
            raise UploadError(400, "the upload was cut off before its end: send it again")
        return self.uploads

    def abort(self) -> None:
        """Close the file being written (the caller removes the folder)."""
        self._close_file()

    def _part_begin(self) -> None:
        self._disposition = b""

    def _header_field_data(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        if self._header_field.strip().lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_field = self._header_value = b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name", b"").decode("utf-8", "replace")
        if name != FIELD:
            shown = "".join(ch for ch in name if unicodedata.category(ch)[0] != "C")[:80]
            raise UploadError(422, f"unexpected multipart field {shown!r}: send each photo as a part of the field "
                                   f"'{FIELD}' (curl -F {FIELD}=@photo.jpg)")  # fmt: skip
        filename = options.get(b"filename")
        if filename is None:
            return  # a form field: its data is dropped
        if len(self.uploads) >= self.max_files:
            raise UploadError(413, f"more than {self.max_files} files in one request: send them in several requests "
                                   "(the server's --max-files)")  # fmt: skip
        index = len(self.uploads)
        upload = Upload(display_name(filename.decode("utf-8", "replace"), index), self.folder / f"{index:04d}.upload")
        self.uploads.append(upload)
        self._current = upload
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        self._file = os.fdopen(os.open(upload.path, flags, 0o600), "wb")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._file is None or self._current is None:
            return
        upload = self._current
        if upload.size + (end - start) > self.max_file_bytes:
            limit = self.max_file_bytes / 2**20
            raise UploadError(413, f"{upload.name}: file is over the {limit:g} MB limit on one upload (downscale or "
                                   "re-export it; the server's --max-upload-mb)")  # fmt: skip
        if len(upload.head) < 16:
            upload.head += data[start : min(end, start + 16 - len(upload.head))]
        self._file.write(data[start:end])
        upload.size += end - start

    def _part_end(self) -> None:
        self._close_file()

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file, self._current = None, None


def malformed(error: Exception) -> UploadError:
    """The 400 for a body the multipart parser cannot read (a wrong boundary, broken part headers)."""
    return UploadError(400, f"the request body is not valid multipart/form-data ({error}): send the photos as "
                            f"multipart/form-data, one part per photo in the field '{FIELD}'")  # fmt: skip


def check_upload(upload: Upload) -> tuple[int, str] | None:
    """``(HTTP status, one-line reason)`` when the photo cannot be predicted, from its first bytes and its header, or
    ``None``. The reason is the one batch prediction gives for the same file, with the upload's name for the path."""
    try:
        image_size(upload.path)  # the reader's own header checks: format, corrupt header, decompression bomb
    except ImageTooLargeError as error:
        return 413, upload_reason(str(error), upload)
    except ImageReadError as error:
        return (422 if upload.suffix else 415), upload_reason(str(error), upload)
    return None  # the reader takes it: whatever batch prediction reads, the server reads


def upload_reason(message: str, upload: Upload) -> str:
    """A reader's message about the upload's stored file, naming the upload instead."""
    return message.replace(str(upload.path), upload.name)
