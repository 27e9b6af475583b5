"""Parsing and formatting of byte sizes and durations given by users.

Sizes follow the convention users see in Dask and job systems: ``kB``/``MB``/``GB``
are decimal (powers of 1000) and ``KiB``/``MiB``/``GiB`` are binary (powers of 1024).
"""

from __future__ import annotations

import re

from runtime.errors import ConfigError

__all__ = ["format_bytes", "format_time", "parse_bytes", "parse_timedelta"]

_BYTE_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "p": 10**15,
    "pb": 10**15,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "pib": 2**50,
}

_TIME_UNITS = {
    "": 1.0,
    "us": 1e-6,
    "microsecond": 1e-6,
    "microseconds": 1e-6,
    "ms": 1e-3,
    "millisecond": 1e-3,
    "milliseconds": 1e-3,
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "seconds": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "minutes": 60.0,
    "h": 3600.0,
    "hr": 3600.0,
    "hour": 3600.0,
    "hours": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
    "days": 86400.0,
}

_NUMBER_UNIT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_bytes(value: int | float | str) -> int:
    """Return a number of bytes from an int or a string such as ``"10MB"``.

    Parameters
    ----------
    value
        An integer count of bytes, or a number followed by a unit
        (``B``, ``kB``, ``MB``, ``GB``, ``TB``, ``KiB``, ``MiB``, ``GiB``, ``TiB``).

    Examples
    --------
    >>> parse_bytes("10MB")
    10000000
    >>> parse_bytes("2 GiB")
    2147483648
    >>> parse_bytes(512)
    512
    """
    if isinstance(value, bool):
        raise ConfigError(f"{value!r} is not a byte size; write e.g. '10MB' or 1048576")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ConfigError(f"byte size {value!r} is negative")
        return int(value)
    match = _NUMBER_UNIT.match(str(value))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _BYTE_UNITS:
        raise ConfigError(
            f"{value!r} is not a byte size; write a number with one of the units "
            "B, kB, MB, GB, TB (decimal) or KiB, MiB, GiB, TiB (binary), e.g. '10MB'"
        )
    return int(float(match.group(1)) * _BYTE_UNITS[unit])


def format_bytes(n: int | float) -> str:
    """Format a byte count for people, in binary units.

    Examples
    --------
    >>> format_bytes(1536)
    '1.50 KiB'
    >>> format_bytes(12)
    '12 B'
    """
    for prefix, k in (("Pi", 2**50), ("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if n >= k * 0.9:
            return f"{n / k:.2f} {prefix}B"
    return f"{int(n)} B"


def parse_timedelta(value: int | float | str | None, default: str = "s") -> float | None:
    """Return seconds from a number or a string such as ``"500ms"`` or ``"2 min"``.

    Plain numbers are read in the ``default`` unit. ``None`` stays ``None``.

    Examples
    --------
    >>> parse_timedelta("500ms")
    0.5
    >>> parse_timedelta(3)
    3.0
    >>> parse_timedelta("2 min")
    120.0
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ConfigError(f"{value!r} is not a duration; write e.g. '30s' or '5 min'")
    if isinstance(value, (int, float)):
        return float(value) * _TIME_UNITS[default]
    match = _NUMBER_UNIT.match(str(value))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _TIME_UNITS:
        raise ConfigError(
            f"{value!r} is not a duration; write a number with a unit such as "
            "ms, s, min, h or d, e.g. '30s'"
        )
    return float(match.group(1)) * _TIME_UNITS[unit or default]


def format_time(seconds: float) -> str:
    """Format a duration for people.

    Examples
    --------
    >>> format_time(0.0123)
    '12.30 ms'
    >>> format_time(75)
    '1 min 15.0 s'
    """
    if seconds < 1e-3:
        return f"{seconds * 1e6:.2f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    if seconds < 60:
        return f"{seconds:.2f} s"
    minutes, rest = divmod(seconds, 60)
    if minutes < 60:
        return f"{int(minutes)} min {rest:.1f} s"
    hours, minutes = divmod(minutes, 60)
    return f"{int(hours)} h {int(minutes)} min"
