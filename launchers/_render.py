"""Filling job-script templates: the only place values meet shell text.

Templates (``launchers/templates/*.sh.tmpl``) are plain shell with ``{{ slot }}``
placeholders. A slot is filled with a block that this module's callers build from
*quoted* values: :func:`quote` for one word, :func:`quote_command` for a command
line, :func:`directive` for a ``#SBATCH``/``#PBS`` line. Templates never quote and
callers never paste a raw value, so a path with spaces, quotes, ``$`` or a newline
reaches the job as the same string it was in Python.

Every slot a template names must be filled and every value given must have a slot,
so template and code cannot drift apart silently. This module keeps no state (the
templates are read from package data on each render; they are small).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping, Sequence
from importlib import resources

from launchers._errors import JobConfigError

__all__ = [
    "directive",
    "quote",
    "quote_command",
    "read_template",
    "render_template",
    "template_slots",
]

_SLOT = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_LINE_BREAKS = re.compile(r"[\n\r\x00\x0b\x0c\x85\u2028\u2029]")


def quote(value: str) -> str:
    """Quote one word for the shell (unchanged when it needs no quoting).

    Examples
    --------
    >>> quote("/scratch/run-1/sched.json")
    '/scratch/run-1/sched.json'
    >>> print(quote("it's $HOME"))
    'it'"'"'s $HOME'
    """
    return shlex.quote(value)


def quote_command(argv: Sequence[str]) -> str:
    """Quote a command line, one word per argument.

    Examples
    --------
    >>> print(quote_command(["echo", "a b", "$x"]))
    echo 'a b' '$x'
    """
    return " ".join(quote(arg) for arg in argv)


def directive(prefix: str, *words: str) -> str:
    """Return one directive line, e.g. ``#SBATCH --partition=debug``.

    Parameters
    ----------
    prefix
        ``"#SBATCH"`` or ``"#PBS"``.
    *words
        The option and its value(s), unquoted; each is quoted here. A word may be an
        option joined to its value (``"--output=/a b/x.out"``): the whole word is
        quoted, which both ``sbatch`` and ``qsub`` read back as one word.

    Raises
    ------
    JobConfigError
        A word contains a line break, which would end the directive and start a new
        line of the script.

    Examples
    --------
    >>> print(directive("#SBATCH", "--job-name=my job"))
    #SBATCH '--job-name=my job'
    """
    for word in words:
        if _LINE_BREAKS.search(word):
            raise JobConfigError(
                f"{word!r} contains a line break and cannot go into a {prefix} directive"
            )
    return " ".join([prefix, *(quote(w) for w in words)])


def read_template(name: str) -> str:
    """Return the text of ``launchers/templates/<name>`` from the installed package."""
    return (
        resources.files("launchers")
        .joinpath("templates")
        .joinpath(name)
        .read_text(encoding="utf-8")
    )


def template_slots(template: str) -> set[str]:
    """Return the names of the ``{{ slot }}`` placeholders in ``template``."""
    return set(_SLOT.findall(template))


def render_template(template: str, blocks: Mapping[str, str]) -> str:
    """Fill each ``{{ slot }}`` of ``template`` with ``blocks[slot]``.

    A slot alone on its line whose block is empty disappears with its line, so
    optional sections leave no blank lines behind.

    Raises
    ------
    KeyError
        The template names a slot that ``blocks`` does not fill.
    ValueError
        ``blocks`` fills a slot that the template does not have.

    Examples
    --------
    >>> render_template("a\\n{{ x }}\\nb {{ y }}\\n", {"x": "", "y": "'1 2'"})
    "a\\nb '1 2'\\n"
    """
    used: set[str] = set()

    def fill(match: re.Match[str]) -> str:
        slot = match.group(1)
        if slot not in blocks:
            raise KeyError(f"template slot {{{{ {slot} }}}} has no value")
        used.add(slot)
        return blocks[slot]

    lines = []
    for line in template.splitlines(keepends=True):
        only_slot = _SLOT.fullmatch(line.strip())
        if only_slot and only_slot.group(1) in blocks and not blocks[only_slot.group(1)]:
            used.add(only_slot.group(1))
            continue
        lines.append(_SLOT.sub(fill, line))
    unused = set(blocks) - used
    if unused:
        raise ValueError(f"values given for slots the template lacks: {sorted(unused)}")
    return "".join(lines)
