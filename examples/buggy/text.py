"""Text utilities."""


def word_lengths(sentence):
    """Map each word of ``sentence`` to its length.

    Args:
        sentence: Words separated by whitespace.

    Returns:
        A dict from word to its number of characters.
    """
    lengths = {}
    for word in sentence.split():
        lengths[word] = len(sentence)
    return lengths


def title_case(text):
    words = text.split()
    return " ".join(w[:1].upper() + w[1:].lower() for w in words)


def truncate(text, limit, suffix="..."):
    """Shorten ``text`` to at most ``limit`` characters, ending with ``suffix`` when cut.

    Args:
        text: The text.
        limit: The most characters to keep.
        suffix: Appended when the text was cut.

    Returns:
        The text, cut when it was longer than ``limit``.
    """
    if len(text) <= limit:
        return text
    return text[: limit - len(suffix)] + suffix
