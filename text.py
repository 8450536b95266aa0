"""
Captions to tokens: CLIP's caption cleaning, then a byte-level BPE (Tokenizer). A run's tokenizer
is trained on its first step's captions, or it is CLIP's (python tools/prepare.py clip-tokenizer),
and it is fixed for the whole run as CLIP's vocabulary is.

The cleaning is open_clip's, as its tokenizer runs it on every caption before BPE (ftfy.fix_text,
HTML entities decoded twice, lower case), written out so that the trainer needs no ftfy.
Tokenizer calls clean_text; shards.caption mends surrogates with fix_surrogates.

ftfy repairs text that went wrong on its way to us: HTML entities (escaped several times),
mojibake (UTF-8 decoded with a one-byte codec: "cafÃ©" for "café", "â€™" for "’"),
C1 control characters (Windows-1252 bytes read as Latin-1), terminal colour codes, UTF-16
surrogates; and it straightens quotes, spells out ligatures and full-width forms, drops control
characters. Deterministic, whatever is installed. Where it differs from ftfy (whose mojibake
detector is a large heuristic; ours decodes what spells UTF-8 convincingly):
docs/data.md#captions-cleaned-as-clip-cleans-them.
"""
import html
import html.entities
import os
import re
import unicodedata
from typing import Iterable

import torch

import files

# tokenizers' thread pool warns at every DataLoader fork; one caption batch gains nothing from it
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
import tokenizers  # noqa: E402


def _windows_1252(byte: int) -> str:
    """The character a browser reads this byte as: Windows-1252, its 5 undefined bytes as is."""
    return bytes([byte]).decode("cp1252", errors="ignore") or chr(byte)


def _char_fixes() -> dict[int, str | None]:
    """The character fixes of ftfy.fix_text, as one str.translate table: C1 control characters
    read as Windows-1252 (as browsers do), Latin ligatures spelled out, full-width forms made
    normal width, curly quotes straightened, stray control characters dropped."""
    quotes = {**{c: "'" for c in "\u02bc\u2018\u2019\u201a\u201b"},
              **{c: '"' for c in "\u201c\u201d\u201e\u201f"}}
    uncurl = str.maketrans(quotes)
    ligatures = dict(zip("ĲĳŉǱǲǳǄǅǆǇǈǉǊǋǌﬀﬁﬂﬃﬄﬅﬆ",
                         ("IJ ij ʼn DZ Dz dz DŽ Dž dž LJ Lj lj NJ Nj nj "
                          "ff fi fl ffi ffl ſt st").split()))
    # "ŉ" -> "'n", "\x93" -> '"', as ftfy's repeated passes give
    fixes = {c: s.translate(uncurl) for c, s in ligatures.items()}
    fixes.update({chr(b): _windows_1252(b).translate(uncurl) for b in range(0x80, 0xA0)
                  if _windows_1252(b) != chr(b)})
    fixes.update(quotes)
    fixes["\u3000"] = " "  # the ideographic space
    fixes.update({chr(i): unicodedata.normalize("NFKC", chr(i)) for i in range(0xFF01, 0xFFF0)
                  if unicodedata.normalize("NFKC", chr(i)) != chr(i)})
    controls = [*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF,
                *range(0xFFF9, 0xFFFD)]
    fixes.update({chr(i): None for i in controls})
    return str.maketrans(fixes)


def _byte_table(codec: str) -> dict[int, str]:
    """A str.translate table that spells text of a one-byte codec as its bytes, each as the
    Latin-1 character of that value, so that .encode("latin-1") gives the bytes; a character the
    codec lacks becomes U+0100, which that refuses. Windows codecs read as browsers do: undefined
    bytes as is, and U+FFFD for a byte lost in decoding (byte 0x1A here)."""
    table = {i: "\u0100" for i in range(256)}
    windows = codec.startswith("cp125")
    for b in range(256):
        char = bytes([b]).decode(codec, errors="ignore") or (chr(b) if windows else "")
        if char:
            table[ord(char)] = chr(b)
    if windows:
        table.update({0x1A: "\u0100", 0xFFFD: "\x1a"})
    return table


CHAR_FIXES = _char_fixes()
# the one-byte codecs UTF-8 is misread as, in the order tried (ftfy's)
MISREAD_AS = {codec: _byte_table(codec) for codec in (
    "latin-1", "cp1252", "cp1251", "cp1250", "cp1253", "cp1254", "cp1257", "iso-8859-2",
    "mac_roman", "cp437")}
_UTF8_CHAR = re.compile(rb"[\xc2-\xdf][\x80-\xbf]|[\xe0-\xef][\x80-\xbf]{2}"
                        rb"|[\xf0-\xf4][\x80-\xbf]{3}")
# a lead byte that alone says mojibake: Latin-1's and Latin Extended-A's letters and signs, Greek,
# Cyrillic, Hebrew, Arabic; not É, Ü, ... that end capitals before ™ or ® (NESCAFÉ®)
_TELLING_LEADS = b"\xc2\xc3\xc4\xc5\xce\xcf\xd0\xd1\xd7\xd8\xd9"
# a no-break space (byte A0) made a space: "Ã\xa0 la" -> "Ã  la", "Â\xa0" -> "Â ", "â‰\xa0"
_LOST_A0 = re.compile(rb"(?:^|(?<=[a-z])|(?<=[a-z] ))\xc3 |[\xc2\xc5\xce\xd0\xd9] "
                      rb"|[\xe0-\xe3](?: (?=[\x80-\xbf])|[\x80-\xbf] )")
# a UTF-8 character of which a byte was lost as U+FFFD (0x1A here): U+FFFD
_LOST_BYTE = re.compile(rb"[\xc2-\xdf]\x1a|[\xe0-\xef](?=[\x80-\xbf]?\x1a)[\x80-\xbf\x1a]{2}"
                        rb"|[\xf0-\xf4](?=[\x80-\xbf]{0,2}\x1a)[\x80-\xbf\x1a]{3}|\x1a")
_CONTINUATION = "".join(sorted({*map(_windows_1252, range(0x80, 0xC0)),
                                *map(chr, range(0x80, 0xC0))}))
# a UTF-8 character spelled in Windows-1252 or Latin-1
_SPELLED_UTF8 = re.compile(f"[\xc2-\xdf][{_CONTINUATION}]|[\xe0-\xef][{_CONTINUATION}]{{2}}"
                           f"|[\xf0-\xf4][{_CONTINUATION}]{{3}}")
_SPELLED_TABLE = {**MISREAD_AS["cp1252"], **{i: chr(i) for i in range(0x80, 0xA0)}}
_ANSI_ESCAPE = re.compile("\x1b\\[[0-9;]*[A-Za-z]")  # a terminal's colour or cursor code
_ENTITY = re.compile("&#?[0-9A-Za-z]{1,24};")
_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_PAIR = re.compile("[\ud800-\udbff][\udc00-\udfff]")


def clean_text(text: str) -> str:
    """A caption as open_clip's tokenizer sees it after its cleaning (basic_clean, lower case),
    but for the runs of whitespace that the tokenizer collapses. Line by line, as ftfy.fix_text:
    HTML entities (not once a line holds "<": HTML is left alone from there on), mojibake,
    terminal escape codes, surrogates and CHAR_FIXES until nothing changes; then HTML entities
    decoded twice more as CLIP does, lower case. Any str comes out encodable."""
    lines, unescape = [], True
    for line in text.split("\n"):
        unescape = unescape and "<" not in line
        lines.append(_fix_line(line, unescape))
    text = html.unescape(html.unescape("\n".join(lines)))
    return text.lower()  # only Python's lower() spells a final 'ς' as CLIP


def _fix_line(line: str, unescape: bool) -> str:
    """ftfy.fix_text on one line: every fix again until none changes the line."""
    while True:
        before = line
        line = _ENTITY.sub(_entity, line) if unescape else line
        mended = None
        while mended != line:  # mojibake of mojibake, before anything else changes it
            mended, line = line, _fix_mojibake(line)
        line = _ANSI_ESCAPE.sub("", fix_surrogates(line))
        line = unicodedata.normalize("NFC", line.translate(CHAR_FIXES))
        if line == before:
            return line


def _entity(match: re.Match) -> str:
    """An HTML entity ended by ";" as ftfy decodes it; the upper-cased name of a lower-case one
    (&EACUTE;) decodes to the upper case."""
    entity = match.group(0)
    name = entity[1:]
    if name in html.entities.html5:
        return html.entities.html5[name]
    if name.startswith("#"):
        char = html.unescape(entity)
        return entity if char.endswith(";") else char  # a number past U+10FFFF stays
    lower = html.entities.html5.get(name.lower()) if name.isupper() else None
    return lower.upper() if lower and html.unescape(entity) == entity else entity


def fix_surrogates(text: str) -> str:
    """A pair of UTF-16 surrogates joined into the character it encodes, a lone one made U+FFFD
    (as ftfy does): no text codec takes a surrogate, and any str comes out encodable."""
    if not _SURROGATE.search(text):
        return text
    text = _SURROGATE_PAIR.sub(
        lambda m: m.group(0).encode("utf-16", "surrogatepass").decode("utf-16"), text)
    return _SURROGATE.sub("\ufffd", text)


def _fix_mojibake(text: str) -> str:
    """One layer of mojibake (UTF-8 decoded with a codec of MISREAD_AS) decoded right: the whole
    line if it spells UTF-8 in one of them (allowing for a no-break space made a space and a byte
    lost as U+FFFD), else each UTF-8 character spelled in Windows-1252 or Latin-1. Only where the
    bytes say mojibake (_is_mojibake): "NESCAFÉ®" stays."""
    if text.isascii():
        return text
    for codec, table in MISREAD_AS.items():
        try:
            raw = text.translate(table).encode("latin-1")
        except UnicodeEncodeError:
            continue
        if codec != "mac_roman":
            raw = _LOST_A0.sub(_restore_a0, raw)
        raw = _LOST_BYTE.sub("\ufffd".encode(), raw)
        try:
            fixed = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue
        return fixed if _is_mojibake(raw) else text

    def decoded(match: re.Match) -> str:
        raw = match.group(0).translate(_SPELLED_TABLE).encode("latin-1")
        try:
            return raw.decode("utf-8") if _is_mojibake(raw) else match.group(0)
        except UnicodeDecodeError:
            return match.group(0)
    return _SPELLED_UTF8.sub(decoded, text)


def _is_mojibake(raw: bytes) -> bool:
    """Do these bytes (text misread) hold UTF-8 that says so: a 3- or 4-byte character, a telling
    lead byte, or two characters?"""
    chars = _UTF8_CHAR.findall(raw)
    return len(chars) > 1 or any(len(c) > 2 or c[0] in _TELLING_LEADS for c in chars)


def _restore_a0(match: re.Match) -> bytes:
    spelled = match.group(0)
    return spelled.replace(b" ", b"\xa0") + b" " * (spelled == b"\xc3 ")  # "Ã la": "à la"


class Tokenizer:
    """Byte-level BPE from the `tokenizers` package, trained on the captions, or a loaded
    tokenizer.json (such as CLIP's, made by `python tools/prepare.py clip-tokenizer`). Captions are
    cleaned first, as CLIP does (clean_text). Rows are [sot] + tokens + [eot] + padding,
    so a text model can pool at the eot position."""

    def __init__(self, tok: tokenizers.Tokenizer):
        self.tok = tok
        vocab = tok.get_vocab()
        self.sot_id = vocab.get("<start_of_text>", vocab.get("<|startoftext|>"))
        self.eot_id = vocab.get("<end_of_text>", vocab.get("<|endoftext|>"))
        if self.sot_id is None or self.eot_id is None:
            raise SystemExit("tokenizer has no <start_of_text>/<end_of_text> (or CLIP's "
                             "<|startoftext|>/<|endoftext|>) tokens; train one with "
                             "Tokenizer.train")
        self.pad_id = 0
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    @classmethod
    def train(cls, captions: Iterable[str], vocab_size: int = 1024) -> "Tokenizer":
        tok = tokenizers.Tokenizer(tokenizers.models.BPE())
        tok.normalizer = tokenizers.normalizers.Lowercase()
        tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tokenizers.decoders.ByteLevel()
        trainer = tokenizers.trainers.BpeTrainer(
            vocab_size=vocab_size, show_progress=False,
            special_tokens=["<pad>", "<start_of_text>", "<end_of_text>"],  # ids 0, 1, 2
            # all 256 bytes, so any text encodes
            initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(captions, trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str) -> "Tokenizer":
        try:
            return cls(tokenizers.Tokenizer.from_file(path))
        except Exception as e:  # tokenizers raises a bare Exception, missing file or malformed
            raise SystemExit(f"{path}: not a readable tokenizer.json ({e}); "
                             f"point at the run's tokenizer.json")

    def save(self, path: str) -> None:
        files.write_atomic(path, lambda f: f.write(self.tok.to_str(pretty=True).encode()))

    def __getstate__(self):  # pickle as JSON text, so DataLoader workers get a copy
        return self.tok.to_str()

    def __setstate__(self, state):
        self.__init__(tokenizers.Tokenizer.from_str(state))

    def __call__(self, texts: list[str], context_tokens: int) -> torch.Tensor:
        """LongTensor [len(texts), context_tokens]; over-long text is cut so the row still ends
        with eot. Any str encodes with a byte-level BPE (clean_text mends surrogates); a
        tokenizer.json that refuses a text (a word-level one without an unknown token) raises
        ValueError naming it."""
        rows = torch.full((len(texts), context_tokens), self.pad_id, dtype=torch.long)
        texts = [clean_text(t) for t in texts]
        try:
            encoded = self.tok.encode_batch(texts, add_special_tokens=False)
        except Exception:  # tokenizers raises a bare Exception: find the text it refuses
            for text in texts:
                try:
                    self.tok.encode(text, add_special_tokens=False)
                except Exception as e:
                    raise ValueError(f"the tokenizer cannot encode {text[:80]!r} ({e})") from None
            raise
        for row, enc in zip(rows, encoded):
            ids = [self.sot_id] + enc.ids[:context_tokens - 2] + [self.eot_id]
            row[:len(ids)] = torch.tensor(ids)
        return rows
