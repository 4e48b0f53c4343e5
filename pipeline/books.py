"""Turn an uploaded book (EPUB, Markdown or plain text) into chapters of plain text.

Chapter text comes out as paragraphs separated by "\\n\\n" with whitespace collapsed, the shape the
chunkers in ``model.chunking`` expect. ``Chapter.index`` is the 0-based position in ``Book.chapters``.
"""

from __future__ import annotations

import codecs
import io
import posixpath
import re
import zipfile
from dataclasses import dataclass
from urllib.parse import unquote

from bs4 import BeautifulSoup
from ebooklib import epub
from lxml import etree


class BookError(ValueError):
    """A book that cannot be turned into chapters, with the reason why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass
class Chapter:
    index: int
    title: str
    text: str


@dataclass
class Book:
    title: str | None
    author: str | None
    chapters: list[Chapter]
    cover: bytes | None = None
    cover_mime: str | None = None


PREFACE_MIN_WORDS = 30

_XHTML_TYPES = frozenset({"application/xhtml+xml", "text/html"})
# Encryption algorithms that only obfuscate embedded fonts (IDPF and Adobe): books carry them without DRM.
_FONT_OBFUSCATION = frozenset({"http://www.idpf.org/2008/embedding", "http://ns.adobe.com/pdf/enc#RC"})
_XMLENC = "http://www.w3.org/2001/04/xmlenc#"

_BLOCK_TAGS = (  # noqa: SIM905
    "p div h1 h2 h3 h4 h5 h6 li ul ol dl dt dd blockquote pre section article aside header footer "
    "figure figcaption table tr caption hr address"
).split()
_DROPPED_TAGS = ["script", "style", "head", "title", "noscript", "template"]
# Private-use characters mark structure while BeautifulSoup flattens the tree; they cannot occur in text
# that means anything.
_PARAGRAPH_MARK = "\ue000"
_LINE_MARK = "\ue001"

_TEXT_HEADING = re.compile(r"^(CHAPTER|Chapter|BOOK|Book|PART|Part)\s+([0-9IVXLCDM]+|[A-Za-z-]+)\b.*$")
_MD_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_MD_FENCE = re.compile(r"^\s*(```|~~~)")
_MD_IMAGE = re.compile(r"!\[([^\]]*)\]\([^)]*\)")
_MD_LINK = re.compile(r"\[([^\]]*)\]\([^)]*\)")
_MD_STAR = re.compile(r"\*{1,3}(?=\S)(.+?)(?<=\S)\*{1,3}")
_MD_UNDERSCORE = re.compile(r"(?<!\w)_{1,3}(?=\S)(.+?)(?<=\S)_{1,3}(?!\w)")
_MD_LINE_PREFIX = re.compile(r"^\s*(?:>\s*)*(?:[-*+]\s+)?")


def read_book(data: bytes, source_name: str) -> Book:
    """Read `data` as the kind of book `source_name`'s extension names: .epub, .md/.markdown or .txt."""
    extension = posixpath.splitext(source_name.lower())[1]
    if extension == ".epub":
        return read_epub(data)
    if extension in (".md", ".markdown"):
        return read_text_book(_decode(data), markdown=True)
    if extension == ".txt":
        return read_text_book(_decode(data), markdown=False)
    raise BookError(
        f"unsupported book type {extension or '(none)'!r} for {source_name!r}; expected .epub, .md, .markdown or .txt"
    )


def find_empty_chapters(book: Book) -> list[int]:
    """Indexes of chapters whose text has no words."""
    return [chapter.index for chapter in book.chapters if not _has_words(chapter.text)]


# --- EPUB -------------------------------------------------------------------------------------------


def read_epub(data: bytes) -> Book:
    """Chapters in spine order, titled from the TOC, else the page's first heading, else "Chapter N"."""
    _check_drm(data)
    try:
        book = epub.read_epub(io.BytesIO(data), {"ignore_ncx": True})
    except Exception as exc:  # ebooklib raises KeyError, lxml and its own errors for broken books
        raise BookError(f"not a readable EPUB: {_describe(exc)}") from exc

    toc_titles = _toc_titles(book)
    chapters: list[Chapter] = []
    for idref, linear in book.spine:
        item = book.get_item_with_id(idref)
        # linear="no" marks pages outside the reading order (pop-up notes, cover pages).
        if item is None or linear == "no" or not _is_content_page(item):
            continue
        soup = BeautifulSoup(item.content, "html.parser")
        title = toc_titles.get(posixpath.normpath(item.get_name())) or _first_heading(soup)
        text = _html_text(soup)
        if not _has_words(text):
            continue
        index = len(chapters)
        chapters.append(Chapter(index=index, title=title or f"Chapter {index + 1}", text=text))

    cover, cover_mime = _cover(book)
    return Book(
        title=_dc_value(book, "title"),
        author=_dc_value(book, "creator"),
        chapters=chapters,
        cover=cover,
        cover_mime=cover_mime,
    )


def _check_drm(data: bytes) -> None:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            names = set(archive.namelist())
            encryption = (
                archive.read("META-INF/encryption.xml") if "META-INF/encryption.xml" in names else None
            )
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as exc:
        raise BookError(f"not a readable EPUB: {_describe(exc)}") from exc
    if "META-INF/rights.xml" in names:
        raise BookError("EPUB is DRM-protected (META-INF/rights.xml); remove DRM before rendering")
    if encryption is not None and not _only_font_obfuscation(encryption):
        raise BookError("EPUB is DRM-protected (META-INF/encryption.xml); remove DRM before rendering")


def _only_font_obfuscation(encryption_xml: bytes) -> bool:
    """True when encryption.xml only obfuscates fonts, which is not DRM and leaves the text readable."""
    parser = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
    try:
        root = etree.fromstring(encryption_xml, parser)
    except etree.XMLSyntaxError:
        return False  # unreadable: assume the worst rather than feed ciphertext to the model
    methods = root.iter(f"{{{_XMLENC}}}EncryptionMethod")
    return all(method.get("Algorithm") in _FONT_OBFUSCATION for method in methods)


def _is_content_page(item: epub.EpubItem) -> bool:
    if isinstance(item, (epub.EpubNav, epub.EpubNcx, epub.EpubCoverHtml)):
        return False
    if "nav" in getattr(item, "properties", ()):
        return False
    return item.media_type in _XHTML_TYPES


def _toc_titles(book: epub.EpubBook) -> dict[str, str]:
    """Page file name -> title of the first TOC entry pointing into that page."""
    titles: dict[str, str] = {}
    # ebooklib resolves nav hrefs against the nav's folder but leaves NCX hrefs relative to the NCX file,
    # which it reads only when the book has no nav.
    ncx = next((item for item in book.get_items() if isinstance(item, epub.EpubNcx)), None)
    has_nav = any(isinstance(item, epub.EpubNav) for item in book.get_items())
    base = "" if has_nav or ncx is None else posixpath.dirname(ncx.get_name())

    def visit(entries: object) -> None:
        for entry in entries if isinstance(entries, (list, tuple)) else ():
            if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[1], (list, tuple)):
                section, children = entry
                add(section)
                visit(children)
            elif isinstance(entry, (list, tuple)):
                visit(entry)
            else:
                add(entry)

    def add(entry: object) -> None:
        href = getattr(entry, "href", "") or ""
        title = _collapse(getattr(entry, "title", "") or "")
        if href and title:
            page = posixpath.normpath(posixpath.join(base, unquote(href.split("#", 1)[0])))
            titles.setdefault(page, title)

    visit(book.toc)
    return titles


def _first_heading(soup: BeautifulSoup) -> str:
    for heading in soup.find_all(["h1", "h2", "h3"]):
        text = _collapse(heading.get_text(" "))
        if text:
            return text
    return ""


def _html_text(soup: BeautifulSoup) -> str:
    """Page text with block elements as paragraphs and <br> as line breaks. Mutates `soup`."""
    for tag in soup.find_all(_DROPPED_TAGS):
        tag.decompose()
    for br in soup.find_all("br"):
        br.replace_with(_LINE_MARK)
    for tag in soup.find_all(_BLOCK_TAGS):
        tag.insert_before(_PARAGRAPH_MARK)
        tag.append(_PARAGRAPH_MARK)
    root = soup.body or soup
    paragraphs = []
    for block in root.get_text().split(_PARAGRAPH_MARK):
        lines = [_collapse(line) for line in block.split(_LINE_MARK)]
        paragraph = "\n".join(line for line in lines if line)
        if paragraph:
            paragraphs.append(paragraph)
    return "\n\n".join(paragraphs)


def _dc_value(book: epub.EpubBook, name: str) -> str | None:
    values = [_collapse(value) for value, _ in book.get_metadata("DC", name) if value]
    values = list(dict.fromkeys(value for value in values if value))
    return ", ".join(values) if values else None


def _cover(book: epub.EpubBook) -> tuple[bytes | None, str | None]:
    # EPUB 3 marks the image with properties="cover-image"; ebooklib reads that item as an EpubCover.
    for item in book.get_items():
        if isinstance(item, epub.EpubCover) and item.content:
            return item.content, item.media_type
    # EPUB 2 names it with <meta name="cover" content="item id">; some books put the href there instead.
    # ebooklib files <meta> under "meta" (its check for the "name" form never matches namespaced tags);
    # "cover" is looked at too in case a later version fixes that.
    metas = [attrs for _, attrs in book.get_metadata("OPF", "meta") if (attrs or {}).get("name") == "cover"]
    metas += [attrs for _, attrs in book.get_metadata("OPF", "cover")]
    for attributes in metas:
        ref = (attributes or {}).get("content")
        if not ref:
            continue
        item = book.get_item_with_id(ref) or book.get_item_with_href(ref)
        if item is not None and (item.media_type or "").startswith("image/") and item.content:
            return item.content, item.media_type
    return None, None


# --- Markdown and plain text -------------------------------------------------------------------------


def read_text_book(text: str, markdown: bool) -> Book:
    """Chapters split at headings: Markdown "#"/"##" lines, or "CHAPTER I."-style lines in plain text.

    Heading lines become titles and are left out of the chapter text. Text before the first heading is
    kept as a "Preface" chapter only when it has at least PREFACE_MIN_WORDS words; shorter front matter
    is usually a title page or a table of contents. Without any heading the whole text is "Chapter 1".
    """
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    headings = _markdown_headings(lines) if markdown else _text_headings(lines)
    book_title = None
    if markdown:
        # A lone "#" above "##" chapters is the book's title, not a chapter of its own.
        top = [number for number, heading in headings.items() if heading.level == 1]
        if len(top) == 1 and top[0] == min(headings) and any(h.level == 2 for h in headings.values()):
            book_title = headings.pop(top[0]).title
            lines[top[0]] = ""

    front: list[str] = []
    sections: list[tuple[str, list[str]]] = []
    skip_until = 0
    for number, line in enumerate(lines):
        if number in headings:
            sections.append((headings[number].title, []))
            skip_until = number + headings[number].span
        elif number >= skip_until:
            (sections[-1][1] if sections else front).append(line)

    chapters: list[Chapter] = []
    front_text = _text_paragraphs(front, markdown)
    if not sections:
        return Book(title=book_title, author=None, chapters=[Chapter(0, "Chapter 1", front_text)])
    if len(front_text.split()) >= PREFACE_MIN_WORDS:
        chapters.append(Chapter(0, "Preface", front_text))
    for title, body in sections:
        index = len(chapters)
        chapters.append(Chapter(index, title or f"Chapter {index + 1}", _text_paragraphs(body, markdown)))
    return Book(title=book_title, author=None, chapters=chapters)


@dataclass
class _Heading:
    title: str
    level: int
    span: int = 1  # lines the heading occupies, its own included


def _text_headings(lines: list[str]) -> dict[int, _Heading]:
    headings: dict[int, _Heading] = {}
    for number, line in enumerate(lines):
        stripped = line.strip()
        match = _TEXT_HEADING.match(stripped)
        # Guard against prose that merely starts with "Part of" or "Book the": the label must be a number
        # or capitalised ("Chapter One"), and a heading stands after a blank line (or opens the text).
        if not match or not (match.group(2)[0].isdigit() or match.group(2)[0].isupper()):
            continue
        if number > 0 and lines[number - 1].strip():
            continue
        heading = _Heading(stripped, 1)
        # Gutenberg style puts the chapter's name alone on the next line: "CHAPTER I.\nDown the Rabbit-Hole".
        # Only a bare label takes one, so a heading with its own name never swallows a short first line.
        following = lines[number + 1].strip() if number + 1 < len(lines) else ""
        after = lines[number + 2].strip() if number + 2 < len(lines) else ""
        bare = len(stripped.split()) == 2
        if (
            bare
            and following
            and not after
            and len(following.split()) <= 12
            and not _TEXT_HEADING.match(following)
        ):
            heading = _Heading(f"{stripped} {following}", 1, span=2)
        headings[number] = heading
    return headings


def _markdown_headings(lines: list[str]) -> dict[int, _Heading]:
    headings: dict[int, _Heading] = {}
    in_fence = False
    for number, line in enumerate(lines):
        if _MD_FENCE.match(line):
            in_fence = not in_fence
            continue
        match = None if in_fence else _MD_HEADING.match(line)
        if match and len(match.group(1)) <= 2:
            title = _strip_markdown(match.group(2)).strip()
            headings[number] = _Heading(title, len(match.group(1)))
    return headings


def _text_paragraphs(lines: list[str], markdown: bool) -> str:
    """Blank-line separated paragraphs, each unwrapped onto one line: hard wraps mean nothing to speech."""
    paragraphs: list[list[str]] = [[]]
    in_fence = False
    for line in lines:
        if markdown:
            if _MD_FENCE.match(line):
                in_fence = not in_fence
                continue
            if not in_fence:
                heading = _MD_HEADING.match(line)
                line = heading.group(2) if heading else _MD_LINE_PREFIX.sub("", line)
                line = _strip_markdown(line)
        if line.strip():
            paragraphs[-1].append(_collapse(line))
        elif paragraphs[-1]:
            paragraphs.append([])
    return "\n\n".join(" ".join(paragraph) for paragraph in paragraphs if paragraph)


def _strip_markdown(text: str) -> str:
    text = _MD_IMAGE.sub("", text)
    text = _MD_LINK.sub(r"\1", text)
    text = _MD_STAR.sub(r"\1", text)
    return _MD_UNDERSCORE.sub(r"\1", text)


# --- helpers -----------------------------------------------------------------------------------------


def _decode(data: bytes) -> str:
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return data.decode("utf-16")
    # Text never holds NUL, and latin-1 below would read any binary file as (garbage) text and render it.
    if b"\x00" in data:
        raise BookError(
            "holds NUL bytes, so it is not UTF-8 or 8-bit text (a binary file such as a PDF renamed, or "
            "UTF-16 without a byte-order mark); save it as UTF-8 text"
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        # latin-1 maps every byte, so a legacy 8-bit text file still reads, if not always perfectly.
        return data.decode("latin-1")


def _collapse(text: str) -> str:
    return " ".join(text.split())


def _has_words(text: str) -> bool:
    return any(ch.isalnum() for ch in text)


def _describe(exc: BaseException) -> str:
    detail = str(exc).strip() or type(exc).__name__
    return detail if len(detail) <= 200 else detail[:197] + "..."
