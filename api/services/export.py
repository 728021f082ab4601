"""CSV export of the user directory, produced row by row as the database yields them."""

from __future__ import annotations

import csv
import io
from collections.abc import AsyncIterator

from sqlalchemy.ext.asyncio import AsyncScalarResult, AsyncSession

from ..db import Database
from ..models import User
from ..schemas import UserFilters
from .users import stream_users

COLUMNS = (
    "id",
    "email",
    "username",
    "full_name",
    "phone",
    "role",
    "status",
    "is_verified",
    "created_at",
    "updated_at",
    "last_login_at",
)
FLUSH_EVERY = 200
# A cell starting with one of these is a formula to spreadsheet software (CSV injection).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if hasattr(value, "isoformat"):
        return str(value.isoformat())
    text = str(value)
    if text.startswith(_FORMULA_START):
        return "'" + text
    return text


def _row(user: User) -> list[str]:
    row = [_cell(getattr(user, column)) for column in COLUMNS]
    row[COLUMNS.index("phone")] = user.phone or ""  # E.164, validated: never a formula
    row[COLUMNS.index("role")] = user.role.value
    row[COLUMNS.index("status")] = user.status.value
    return row


async def users_csv(db: Database, filters: UserFilters) -> AsyncIterator[str]:
    """Run the export query, then return the CSV text as an iterator of pieces.

    The query runs before the response starts, so a database error is an ordinary
    error response rather than a truncated file. The iterator owns its session (the
    response outlives the request's dependencies) and closes it when done.
    """
    session = db.session()
    try:
        result = await stream_users(session=session, filters=filters)
    except BaseException:
        await session.close()
        raise
    return _pieces(session, result)


async def _pieces(session: AsyncSession, result: AsyncScalarResult[User]) -> AsyncIterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(COLUMNS)
    try:
        count = 0
        async for user in result:
            writer.writerow(_row(user))
            count += 1
            if count == 1 or count % FLUSH_EVERY == 0:
                yield buffer.getvalue()
                buffer.seek(0)
                buffer.truncate()
        yield buffer.getvalue()
    finally:
        await result.close()
        await session.close()
