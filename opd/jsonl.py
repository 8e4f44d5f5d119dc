"""JSON Lines files as the format defines them: UTF-8 text whose lines end at "\\n" (or "\\r\\n").

`str.splitlines` also ends a line at U+2028, U+2029, U+0085 and a few control characters, which
JSON allows raw inside a string (`json.dumps(..., ensure_ascii=False)` writes them so): a valid
line would be cut in two.
"""

from pathlib import Path

from opd.errors import ConfigError


def lines(text: str) -> list[str]:
    """`text`'s lines, cut at "\\n" only, each without its "\\r\\n" or "\\n"."""
    cut = text.split("\n")
    if cut and cut[-1] == "":
        cut.pop()
    return [line.removesuffix("\r") for line in cut]


def read_text(path: str | Path) -> str:
    """The file as text: UTF-8, a leading byte-order mark dropped; other bytes are an error naming
    the file, the line and the byte."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                          "save the file as UTF-8") from None  # fmt: skip
