"""RFC 5260 4: date parts of a date-time, and the RFC 5322 date parsing the date test
needs.  Twisted-free."""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta, timezone, tzinfo
from email.utils import parsedate_tz

_ZONE = re.compile(r"([+-])([0-9]{2})([0-9]{2})\Z")
_MJD_EPOCH = date(1858, 11, 17)     # RFC 5260 4.2: julian is the Modified Julian Day
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def parse_zone(text: str) -> timezone | None:
    """"+hhmm" / "-hhmm" (RFC 5260 4.1), None when malformed."""
    m = _ZONE.match(text)
    if m is None:
        return None
    hours, minutes = int(m.group(2)), int(m.group(3))
    if minutes > 59 or hours > 23:   # no such offset ("+2500"): as a malformed zone
        return None
    offset = timedelta(hours=hours, minutes=minutes)
    return timezone(-offset if m.group(1) == "-" else offset)


def parse_date(value: str) -> datetime | None:
    """An RFC 5322 date-time (lenient as email.utils), aware; None when unusable.  For a
    Received field the date after its last ";" (RFC 5260 4.1)."""
    parts = parsedate_tz(value)
    if parts is None:
        return None
    year, month, day, hour, minute, second = parts[:6]
    offset = parts[9] if parts[9] is not None else 0
    try:
        if second == 60:
            second = 59
        return datetime(year, month, day, hour, minute, second,
                        tzinfo=timezone(timedelta(seconds=offset)))
    except (ValueError, OverflowError):
        return None


def zone_text(dt: datetime) -> str:
    off = dt.utcoffset() or timedelta(0)
    total = int(off.total_seconds()) // 60
    sign = "-" if total < 0 else "+"
    total = abs(total)
    return f"{sign}{total // 60:02d}{total % 60:02d}"


def date_part(dt: datetime, part: str) -> str | None:
    """RFC 5260 4.2; None for an unknown part (the test is then false)."""
    if part == "year":
        return f"{dt.year:04d}"
    if part == "month":
        return f"{dt.month:02d}"
    if part == "day":
        return f"{dt.day:02d}"
    if part == "date":
        return f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}"
    if part == "julian":
        return str((dt.date() - _MJD_EPOCH).days)
    if part == "hour":
        return f"{dt.hour:02d}"
    if part == "minute":
        return f"{dt.minute:02d}"
    if part == "second":
        return f"{dt.second:02d}"
    if part == "time":
        return f"{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d}"
    if part == "iso8601":
        z = zone_text(dt)
        z = "Z" if z in ("+0000", "-0000") else f"{z[:3]}:{z[3:]}"    # RFC 3339 5.6
        return (f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T{dt.hour:02d}:{dt.minute:02d}:"
                f"{dt.second:02d}{z}")
    if part == "std11":
        return (f"{_DAYS[dt.weekday()]}, {dt.day:02d} {_MONTHS[dt.month - 1]} {dt.year:04d} "
                f"{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d} {zone_text(dt)}")
    if part == "zone":
        return zone_text(dt)
    if part == "weekday":
        return str((dt.weekday() + 1) % 7)        # 0 = Sunday
    return None


def in_zone(dt: datetime, zone: tzinfo | None) -> datetime:
    """`dt` shown in `zone`; None: the local zone."""
    return dt.astimezone(zone) if zone is not None else dt.astimezone()
