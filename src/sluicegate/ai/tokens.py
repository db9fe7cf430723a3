"""Token counts the gateway makes itself, for a provider that reports no usage (a stream
from a server that cannot be asked for it); such figures are marked estimated.

With `tiktoken` installed *and* its `o200k_base` or `cl100k_base` file already in
tiktoken's cache (`TIKTOKEN_CACHE_DIR`), counts use that encoding. tiktoken downloads its
files on first use, and the gateway must not reach out to the internet on the request path,
so without the file the count is the heuristic OpenAI documents for English: one token per
four characters; every non-ASCII character (CJK, mostly) counts as one token.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Any

# OpenAI's chat format costs about 3 tokens per message and 3 to prime the answer
# (OpenAI cookbook, "How to count tokens with tiktoken").
TOKENS_PER_MESSAGE = 3
TOKENS_PER_REPLY = 3
# OpenAI: "one token generally corresponds to ~4 characters of text for common English".
CHARS_PER_TOKEN = 4

_ENCODING_URLS = {
    "o200k_base": "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
    "cl100k_base": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
}
_encoding: Any = None
_looked = False


def local_encoding() -> Any:
    """A tiktoken encoding whose file is cached locally, or None (never downloads)."""
    global _encoding, _looked
    if _looked:
        return _encoding
    _looked = True
    try:
        import tiktoken
    except ImportError:
        return None
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or \
        os.path.join(tempfile.gettempdir(), "data-gym-cache")
    for name, url in _ENCODING_URLS.items():
        # tiktoken names cached files by the SHA-1 of their URL.
        if os.path.exists(os.path.join(cache, hashlib.sha1(url.encode()).hexdigest())):
            try:
                _encoding = tiktoken.get_encoding(name)
            except Exception:  # a corrupt cache file: fall back to the heuristic
                continue
            return _encoding
    return None


def estimate_tokens(text: str) -> int:
    if not text:
        return 0
    encoding = local_encoding()
    if encoding is not None:
        return len(encoding.encode(text, disallowed_special=()))
    ascii_chars = len(text.encode("ascii", "ignore"))
    return -(-ascii_chars // CHARS_PER_TOKEN) + (len(text) - ascii_chars)


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(part.get("text", "") for part in content
                        if isinstance(part, dict) and isinstance(part.get("text"), str))
    return ""


def estimate_prompt_tokens(body: dict[str, Any]) -> int:
    """Tokens of an OpenAI chat request's messages (and tool definitions)."""
    total = TOKENS_PER_REPLY
    for message in body.get("messages") or ():
        if isinstance(message, dict):
            total += TOKENS_PER_MESSAGE + estimate_tokens(_content_text(message.get("content")))
    if body.get("tools"):
        import json

        total += estimate_tokens(json.dumps(body["tools"]))
    return total
