"""Books (EPUB, Markdown, plain text) to chapters."""

from __future__ import annotations

import io
import zipfile

import pytest
from ebooklib import epub

from pipeline.books import Book, BookError, Chapter, find_empty_chapters, read_book, read_epub, read_text_book

COVER_PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 32  # only the bytes matter, nothing decodes them

# Public domain: Lewis Carroll, Alice's Adventures in Wonderland (1865), hard-wrapped as Project Gutenberg
# texts are.
ALICE = """\
ALICE'S ADVENTURES IN WONDERLAND

Lewis Carroll


CHAPTER I.
Down the Rabbit-Hole


Alice was beginning to get very tired of sitting by her sister on the
bank, and of having nothing to do: once or twice she had peeped into
the book her sister was reading, but it had no pictures or
conversations in it.

So she was considering in her own mind (as well as she could, for the
hot day made her feel very sleepy and stupid), whether the pleasure of
making a daisy-chain would be worth the trouble of getting up and
picking the daisies, when suddenly a White Rabbit with pink eyes ran
close by her.


CHAPTER II.
The Pool of Tears


"Curiouser and curiouser!" cried Alice (she was so much surprised, that
for the moment she quite forgot how to speak good English).
Part of her wanted to laugh.

Part of the trouble was that she had grown so large.


Chapter 3: A Caucus-Race and a Long Tale

They were indeed a queer-looking party that assembled on the bank.
"""


def _page(title: str, file_name: str, body: str) -> epub.EpubHtml:
    page = epub.EpubHtml(title=title, file_name=file_name, lang="en")
    page.content = f"<html><head><title>{title}</title></head><body>{body}</body></html>"
    return page


def _write(book: epub.EpubBook) -> bytes:
    buffer = io.BytesIO()
    epub.write_epub(buffer, book)
    return buffer.getvalue()


def _alice_epub() -> bytes:
    book = epub.EpubBook()
    book.set_identifier("alice-test")
    book.set_title("Alice's Adventures in Wonderland")
    book.set_language("en")
    book.add_author("Lewis Carroll")
    book.set_cover("images/cover.png", COVER_PNG)
    chapters = [
        _page(
            "One",
            "text/ch1.xhtml",
            "<h1>Chapter I. Down the Rabbit-Hole</h1>"
            "<p>Alice was beginning to get very\n   tired of sitting by her sister.</p>"
            "<p>So she was considering<br/>in her own mind.</p>"
            "<script>document.write('never read aloud');</script><style>p { color: red }</style>",
        ),
        _page(
            "Two",
            "text/ch2.xhtml",
            "<section><h2>Chapter II. The Pool of Tears</h2><div>Curiouser and curiouser!</div>"
            "<ul><li>First item</li><li>Second item</li></ul></section>",
        ),
        _page(
            "Three",
            "text/ch3.xhtml",
            "<h2>A Caucus-Race and a Long Tale</h2><p>They were indeed a queer-looking party.</p>",
        ),
    ]
    for chapter in chapters:
        book.add_item(chapter)
    # The third chapter is left out of the TOC, so its title must come from its heading.
    book.toc = [
        epub.Link("text/ch1.xhtml", "Down the Rabbit-Hole", "ch1"),
        (epub.Section("Part One"), [epub.Link("text/ch2.xhtml#start", "The Pool of Tears", "ch2")]),
    ]
    book.add_item(epub.EpubNcx())
    book.add_item(epub.EpubNav())
    book.spine = ["cover", "nav", *chapters]
    return _write(book)


def _with_files(data: bytes, files: dict[str, str]) -> bytes:
    buffer = io.BytesIO(data)
    with zipfile.ZipFile(buffer, "a") as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return buffer.getvalue()


def _encryption_xml(*entries: tuple[str, str]) -> str:
    data = "".join(
        f'<enc:EncryptedData><enc:EncryptionMethod Algorithm="{algorithm}"/>'
        f'<enc:CipherData><enc:CipherReference URI="{uri}"/></enc:CipherData></enc:EncryptedData>'
        for algorithm, uri in entries
    )
    return (
        '<?xml version="1.0"?><encryption xmlns="urn:oasis:names:tc:opendocument:xmlns:container" '
        f'xmlns:enc="http://www.w3.org/2001/04/xmlenc#">{data}</encryption>'
    )


# --- EPUB --------------------------------------------------------------------------------------------


def test_epub_chapters_in_spine_order_with_titles_and_text() -> None:
    book = read_epub(_alice_epub())

    assert book.title == "Alice's Adventures in Wonderland"
    assert book.author == "Lewis Carroll"
    # Cover page and nav page are in the spine but are not chapters.
    assert [chapter.index for chapter in book.chapters] == [0, 1, 2]
    assert [chapter.title for chapter in book.chapters] == [
        "Down the Rabbit-Hole",
        "The Pool of Tears",
        "A Caucus-Race and a Long Tale",
    ]
    assert book.chapters[0].text == (
        "Chapter I. Down the Rabbit-Hole\n\n"
        "Alice was beginning to get very tired of sitting by her sister.\n\n"
        "So she was considering\nin her own mind."
    )
    assert book.chapters[1].text == (
        "Chapter II. The Pool of Tears\n\nCuriouser and curiouser!\n\nFirst item\n\nSecond item"
    )
    assert book.chapters[2].text == "A Caucus-Race and a Long Tale\n\nThey were indeed a queer-looking party."
    assert all("never read aloud" not in c.text and "color" not in c.text for c in book.chapters)
    assert find_empty_chapters(book) == []


def test_epub_cover_image() -> None:
    book = read_epub(_alice_epub())
    assert book.cover == COVER_PNG
    assert book.cover_mime == "image/png"


def test_epub2_meta_cover_and_fallback_titles() -> None:
    book = epub.EpubBook()
    book.set_identifier("meta-cover")
    book.set_title("Untitled Pages")
    image = epub.EpubImage(uid="front", file_name="front.jpg", media_type="image/jpeg", content=b"JPEGDATA")
    book.add_item(image)
    book.add_metadata(None, "meta", "", {"name": "cover", "content": "front"})
    pages = [
        _page("", "a.xhtml", "<p>Untitled first page of prose.</p>"),
        _page("", "b.xhtml", '<p><img src="front.jpg" alt=""/></p>'),  # no words: dropped
        _page("", "c.xhtml", "<p>Untitled third page.</p>"),
    ]
    for page in pages:
        book.add_item(page)
    book.add_item(epub.EpubNav())
    book.spine = pages
    result = read_epub(_write(book))

    assert (result.cover, result.cover_mime) == (b"JPEGDATA", "image/jpeg")
    assert result.author is None
    assert [(c.index, c.title, c.text) for c in result.chapters] == [
        (0, "Chapter 1", "Untitled first page of prose."),
        (1, "Chapter 2", "Untitled third page."),
    ]


def test_epub2_ncx_titles_and_non_linear_pages() -> None:
    book = epub.EpubBook()
    book.set_identifier("ncx-only")
    first = _page("", "text/first.xhtml", "<h1>Heading One</h1><p>First.</p>")
    notes = _page("", "text/notes.xhtml", "<p>Footnotes, outside the reading order.</p>")
    second = _page("", "text/second part.xhtml", "<p>Second.</p>")
    for page in (first, notes, second):
        book.add_item(page)
    # No nav document: the TOC comes from the NCX alone, as in EPUB 2 books.
    book.toc = [
        epub.Link("text/first.xhtml", "From the NCX", "a"),
        epub.Link("text/second%20part.xhtml", "Two", "b"),  # hrefs are URL-encoded
    ]
    book.add_item(epub.EpubNcx())
    book.spine = [first, (notes, "no"), second]
    result = read_epub(_write(book))
    assert [(c.title, c.text) for c in result.chapters] == [
        ("From the NCX", "Heading One\n\nFirst."),
        ("Two", "Second."),
    ]


def test_epub_without_cover() -> None:
    book = epub.EpubBook()
    book.set_identifier("plain")
    page = _page("Only", "only.xhtml", "<p>Just text.</p>")
    book.add_item(page)
    book.add_item(epub.EpubNav())
    book.spine = [page]
    result = read_epub(_write(book))
    assert (result.cover, result.cover_mime) == (None, None)
    assert [c.text for c in result.chapters] == ["Just text."]


def test_epub_with_encrypted_content_is_drm() -> None:
    data = _with_files(
        _alice_epub(),
        {
            "META-INF/encryption.xml": _encryption_xml(
                ("http://www.w3.org/2001/04/xmlenc#aes128-cbc", "EPUB/text/ch1.xhtml")
            )
        },
    )
    with pytest.raises(BookError, match=r"DRM-protected \(META-INF/encryption\.xml\); remove DRM"):
        read_epub(data)


def test_epub_with_rights_file_is_drm() -> None:
    data = _with_files(_alice_epub(), {"META-INF/rights.xml": "<rights/>"})
    with pytest.raises(BookError, match=r"DRM-protected \(META-INF/rights\.xml\)"):
        read_epub(data)


def test_unparseable_encryption_file_is_treated_as_drm() -> None:
    data = _with_files(_alice_epub(), {"META-INF/encryption.xml": "not xml at all <"})
    with pytest.raises(BookError, match="DRM-protected"):
        read_epub(data)


def test_font_obfuscation_alone_is_not_drm() -> None:
    data = _with_files(
        _alice_epub(),
        {"META-INF/encryption.xml": _encryption_xml(("http://www.idpf.org/2008/embedding", "EPUB/font.otf"))},
    )
    assert len(read_epub(data).chapters) == 3


@pytest.mark.parametrize("data", [b"", b"definitely not a zip file", b"PK\x03\x04garbage"])
def test_garbage_is_not_an_epub(data: bytes) -> None:
    with pytest.raises(BookError, match="not a readable EPUB"):
        read_epub(data)


def test_zip_that_is_not_an_epub() -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("hello.txt", "hi")
    with pytest.raises(BookError, match="not a readable EPUB"):
        read_epub(buffer.getvalue())


def test_book_error_is_a_value_error() -> None:
    assert issubclass(BookError, ValueError)
    assert BookError("why").reason == "why"


# --- plain text --------------------------------------------------------------------------------------


def test_plain_text_chapters() -> None:
    book = read_text_book(ALICE, markdown=False)

    # The title page before CHAPTER I. is under 30 words, so it is dropped.
    assert [(c.index, c.title) for c in book.chapters] == [
        (0, "CHAPTER I. Down the Rabbit-Hole"),
        (1, "CHAPTER II. The Pool of Tears"),
        (2, "Chapter 3: A Caucus-Race and a Long Tale"),
    ]
    first = book.chapters[0].text
    assert first.startswith("Alice was beginning to get very tired of sitting by her sister on the bank,")
    assert "\n\nSo she was considering in her own mind" in first
    assert first.count("\n\n") == 1  # hard wraps are undone; paragraphs stay apart
    # Lines starting "Part of ..." are prose, not "PART" headings.
    assert book.chapters[1].text.endswith(
        "Part of her wanted to laugh.\n\nPart of the trouble was that she had grown so large."
    )
    assert book.chapters[2].text == "They were indeed a queer-looking party that assembled on the bank."
    assert book.title is None and book.author is None


def test_preface_kept_only_when_long_enough() -> None:
    preface = " ".join(["word"] * 30) + "."
    book = read_text_book(f"{preface}\n\nCHAPTER I.\n\nBody text.", markdown=False)
    assert [(c.title, c.text) for c in book.chapters] == [("Preface", preface), ("CHAPTER I.", "Body text.")]

    short = " ".join(["word"] * 29) + "."
    book = read_text_book(f"{short}\n\nCHAPTER I.\n\nBody text.", markdown=False)
    assert [(c.index, c.title) for c in book.chapters] == [(0, "CHAPTER I.")]


def test_text_without_headings_is_one_chapter() -> None:
    book = read_text_book("Just a short\nstory.\n\nThe end.", markdown=False)
    assert [(c.index, c.title, c.text) for c in book.chapters] == [
        (0, "Chapter 1", "Just a short story.\n\nThe end.")
    ]


def test_named_heading_keeps_a_short_first_line() -> None:
    book = read_text_book("Chapter 2: The Road\nIt was dark.\n\nThe end.", markdown=False)
    assert [(c.title, c.text) for c in book.chapters] == [("Chapter 2: The Road", "It was dark.\n\nThe end.")]


def test_book_and_part_headings() -> None:
    text = "BOOK ONE\n\nPART I\n\nOpening.\n\nChapter 1\n\nMiddle.\n\nPart Two: Later\n\nEnd."
    book = read_text_book(text, markdown=False)
    assert [(c.title, c.text) for c in book.chapters] == [
        ("BOOK ONE", ""),
        ("PART I", "Opening."),
        ("Chapter 1", "Middle."),
        ("Part Two: Later", "End."),
    ]
    assert find_empty_chapters(book) == [0]


# --- Markdown ----------------------------------------------------------------------------------------


def test_markdown_chapters() -> None:
    text = (
        "# Through the Looking-Glass\n\n"
        "## Looking-Glass House\n\n"
        "One thing was *certain*, that the **white** kitten had had\nnothing to do with it.\n\n"
        "- the [black kitten](https://example.org/kitten) was _entirely_ to blame\n"
        "- snake_case stays\n\n"
        "```\n# not a heading\n```\n\n"
        "## The Garden of Live Flowers\n\n"
        "![a picture](garden.png)\n"
        "> I should see the garden far better.\n"
    )
    book = read_text_book(text, markdown=True)

    assert book.title == "Through the Looking-Glass"
    assert [(c.index, c.title) for c in book.chapters] == [
        (0, "Looking-Glass House"),
        (1, "The Garden of Live Flowers"),
    ]
    assert book.chapters[0].text == (
        "One thing was certain, that the white kitten had had nothing to do with it.\n\n"
        "the black kitten was entirely to blame snake_case stays\n\n"
        "# not a heading"
    )
    assert book.chapters[1].text == "I should see the garden far better."


def test_markdown_level_one_chapters() -> None:
    preface = "A preface of some length. " * 10
    book = read_text_book(f"{preface}\n\n# One\n\nFirst.\n\n# Two\n\nSecond.", markdown=True)
    assert book.title is None
    assert [(c.title, c.text) for c in book.chapters] == [
        ("Preface", preface.strip()),
        ("One", "First."),
        ("Two", "Second."),
    ]


# --- read_book dispatch ------------------------------------------------------------------------------


def test_read_book_dispatches_on_extension() -> None:
    assert len(read_book(_alice_epub(), "books/Alice.EPUB").chapters) == 3
    assert read_book(b"## A\n\ntext", "a.md").chapters[0].title == "A"
    assert read_book(b"## A\n\ntext", "a.markdown").chapters[0].title == "A"
    assert read_book(b"## A\n\ntext", "a.txt").chapters[0].title == "Chapter 1"
    with pytest.raises(BookError, match="unsupported book type '.pdf'"):
        read_book(b"%PDF", "book.pdf")
    with pytest.raises(BookError, match="unsupported book type"):
        read_book(b"text", "README")


def test_read_book_decodes_bom_and_latin1() -> None:
    bom = read_book("\ufeffCHAPTER I.\n\nCaf\u00e9 au lait.".encode(), "a.txt")
    assert [(c.title, c.text) for c in bom.chapters] == [("CHAPTER I.", "Caf\u00e9 au lait.")]
    latin = read_book("CHAPTER I.\n\nCaf\u00e9 au lait.".encode("latin-1"), "a.txt")
    assert latin.chapters[0].text == "Caf\u00e9 au lait."
    utf16 = read_book("CHAPTER I.\r\n\r\nCaf\u00e9.".encode("utf-16"), "a.txt")
    assert utf16.chapters[0].text == "Caf\u00e9."


@pytest.mark.parametrize(
    "data",
    [b"%PDF-1.7\n\x00\x01binary", "CHAPTER I.\n\nText.".encode("utf-16-le")],
    ids=["pdf-renamed", "utf-16-without-bom"],
)
def test_a_text_book_holding_nul_bytes_is_refused_rather_than_read_as_latin1(data: bytes) -> None:
    with pytest.raises(BookError, match="holds NUL bytes, so it is not UTF-8 or 8-bit text"):
        read_book(data, "book.txt")


def test_find_empty_chapters() -> None:
    book = Book(
        title=None,
        author=None,
        chapters=[Chapter(0, "a", "words"), Chapter(1, "b", " \n\n - "), Chapter(2, "c", "")],
        cover=None,
        cover_mime=None,
    )
    assert find_empty_chapters(book) == [1, 2]
