"""The words of a magic's line: split like a shell, `{expr}` evaluated, options parsed.

    >>> split_args('"The sky is" -k {k}', {"k": 5})
    ['The sky is', '-k', 5]
    >>> parse_options(["a", "--scale", "4", "--clear"], {"--scale": float, "--clear": bool}, "%steer")
    (['a'], {'scale': 4.0, 'clear': True})

A word that is exactly `{expr}` becomes the Python object (`%%trace {prompts}` passes a
list); `{expr}` inside a longer word is formatted into it; `{{` and `}}` are literal
braces, and so are a site's template positions (`"resid_post.4@'{name}'"`, a field of a
causal model's template); a `#` that starts a word outside quotes begins a comment, as in a
shell. Options
given are returned; options not given are absent, so the API's own defaults apply.
"""

from __future__ import annotations

import re
import shlex

from ..core.errors import MagicError


def split_args(line: str, namespace: dict) -> list:
    """Split a magic's argument line like a shell; `{expr}` is evaluated in `namespace`.

    A word that is exactly `{expr}` becomes the object itself; `{expr}` inside a
    longer word is formatted into it; `{{` and `}}` are literal braces, as is a site's
    template position `@'{field}'`; a `#` that starts a word outside quotes begins a comment.
    """
    found = []

    def stash(match: re.Match) -> str:
        found.append(match.group(1))
        return f"\x00{len(found) - 1}\x00"

    line = line.replace("{{", "\x01").replace("}}", "\x02")
    # A template field in a site's positions (`resid_post.4@'{name}'`) is the site's, not Python's.
    line = re.sub(r"""@(['"])\{(\w+)\}\1""", lambda m: f"@{m[1]}\x01{m[2]}\x02{m[1]}", line)
    stashed = re.sub(r"\{([^{}]+)\}", stash, line)
    try:
        words = shlex.split(_without_comment(stashed))
    except ValueError as error:
        raise MagicError(f"cannot split the arguments {line!r}: {error}") from None

    def value(index: str):
        expr = found[int(index)]
        try:
            return eval(expr, namespace)
        except Exception as error:
            raise MagicError(f"cannot evaluate {{{expr}}}: {type(error).__name__}: {error}") from None

    result = []
    for word in words:
        whole = re.fullmatch(r"\x00(\d+)\x00", word)
        if whole:
            result.append(value(whole.group(1)))
            continue
        word = re.sub(r"\x00(\d+)\x00", lambda m: str(value(m.group(1))), word)
        result.append(word.replace("\x01", "{").replace("\x02", "}"))
    return result


def _without_comment(line: str) -> str:
    """The line up to a `#` that starts a word outside quotes, as a shell reads a comment."""
    quote = None
    for index, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index]
    return line


def percentage(text: str):
    """A `--top` value: `"2%"` as it is (the API reads percentages), else an int or a float."""
    if isinstance(text, str) and text.endswith("%"):
        return text
    try:
        return float(text) if any(c in str(text) for c in ".eE") else int(text)
    except ValueError:
        raise MagicError(f"--top takes a number or a percentage such as 2%, got {text!r}") from None


def _is_option(word) -> bool:
    return isinstance(word, str) and word.startswith("-") and not re.fullmatch(r"-\d+", word)


def parse_options(words: list, options: dict[str, type], command: str) -> tuple[list, dict]:
    """Positional words and `--option value` pairs; `bool` options are flags, `list`
    options take every word up to the next option. Keys drop the dashes, `-` -> `_`."""
    positional, values = [], {}
    words = list(words)
    while words:
        word = words.pop(0)
        if _is_option(word):
            if word not in options:
                valid = ", ".join(options) or "none"
                raise MagicError(f"unknown option {word} for {command}: valid options are {valid}")
            kind = options[word]
            key = word.lstrip("-").replace("-", "_")
            if kind is bool:
                values[key] = True
                continue
            if kind is list:
                taken = []
                while words and not _is_option(words[0]):
                    item = words.pop(0)
                    taken += item if isinstance(item, (list, tuple)) else [item]
                if not taken:
                    raise MagicError(f"option {word} of {command} needs at least one value")
                values[key] = taken
                continue
            if not words:
                raise MagicError(f"option {word} of {command} needs a value")
            raw = words.pop(0)
            try:
                values[key] = raw if kind is object else kind(raw)
            except MagicError:
                raise
            except (TypeError, ValueError):
                raise MagicError(f"option {word} of {command} takes a {kind.__name__}, got {raw!r}") from None
        else:
            positional.append(word)
    return positional, values
