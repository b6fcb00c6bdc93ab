"""OpenAI-style chat messages: validation, images, the CoCA safety principle. Shared by the
runtimes; no model code here.

A message is ``{"role": "system"|"user"|"assistant", "content": str | [part, ...]}`` with parts
``{"type": "text", "text": ...}`` and ``{"type": "image_url", "image_url": {"url": ...}}``
(or ``"image_url": "..."``), and ``{"type": "graft", "text": ...}``: content for a grafted modality
(``pyguard.graft``), which the model reads through a projector, never as text. Image URLs are local
file paths, ``file://`` URLs or ``data:`` URIs; nothing is fetched from the network.
"""
from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

ROLES = ("system", "user", "assistant")


@dataclass
class Prompt:
    """Messages flattened for a text chat template: image (or grafted content) parts replaced by
    ``marker``.

    messages: [{"role", "content": str}]; images: the image bytes, in order of their markers;
    grafts: the grafted contents, in order of their markers (a prompt has images or grafts, not both).
    """

    messages: list[dict]
    images: list[bytes]
    grafts: list[str] = field(default_factory=list)

    @property
    def media(self) -> bool:
        """Whether the prompt holds images or grafted content (what CMRM shifts)."""
        return bool(self.images or self.grafts)


def image_bytes(url: str) -> bytes:
    """The bytes of an image given as a local path, a file:// URL or a data: URI."""
    if url.startswith("data:"):
        head, _, data = url.partition(",")
        if not head.endswith(";base64"):
            raise ValueError("data: image URIs must be base64-encoded (data:image/png;base64,...)")
        try:
            return base64.b64decode(data, validate=True)
        except binascii.Error as e:
            raise ValueError(f"data: image URI is not valid base64: {e}") from None
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https", "ftp"):
        raise ValueError(f"image {url!r}: remote URLs are not fetched; pass a local path or a data: URI")
    path = Path(unquote(parsed.path) if parsed.scheme == "file" else url)
    if not path.is_file():
        raise ValueError(f"image file not found: {path}")
    return path.read_bytes()


def _parts(content, i: int) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise ValueError(f"messages[{i}].content must be a string or a list of parts, got {type(content).__name__}")
    for j, p in enumerate(content):
        if not isinstance(p, dict) or p.get("type") not in ("text", "image_url", "graft"):
            raise ValueError(f"messages[{i}].content[{j}] must be a text, image_url or graft part, got {p!r:.80}")
        if p["type"] == "graft" and not (isinstance(p.get("text"), str) and p["text"].strip()):
            raise ValueError(f"messages[{i}].content[{j}]: a graft part needs a non-empty 'text'")
        if p["type"] == "text" and not isinstance(p.get("text"), str):
            raise ValueError(f"messages[{i}].content[{j}]: a text part needs a string 'text', got {p.get('text')!r:.60}")
        if p["type"] == "image_url":
            url = p.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str) or not url:
                raise ValueError(f"messages[{i}].content[{j}]: an image_url part needs 'image_url': {{'url': ...}} "
                                 f"(a path, file:// URL or data: URI)")
    return content


def _utf8(text: str, i: int) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"messages[{i}] holds a character that is not valid Unicode text ({e.reason}, "
                         f"position {e.start})") from None
    return text


def flatten(messages, marker: str) -> Prompt:
    """Validate ``messages`` and flatten image parts to ``marker`` in the text."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    out, images, grafts = [], [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ValueError(f"messages[{i}] has unknown role {m['role']!r} (known: {', '.join(ROLES)})")
        text = []
        for p in _parts(m["content"], i):
            if p["type"] == "text":
                text.append(_utf8(p["text"], i))
            elif p["type"] == "graft":
                if m["role"] != "user":
                    raise ValueError(f"messages[{i}]: grafted content is only accepted in user messages")
                grafts.append(_utf8(p["text"], i))
                text.append(marker)
            else:
                if m["role"] != "user":
                    raise ValueError(f"messages[{i}]: images are only accepted in user messages")
                url = p["image_url"]["url"] if isinstance(p["image_url"], dict) else p["image_url"]
                images.append(image_bytes(url))
                text.append(marker)
        out.append({"role": m["role"], "content": "".join(text)})
    if images and grafts:
        raise ValueError("a request holds images and grafted content: give one kind of media per request")
    return Prompt(out, images, grafts)


def with_principle(prompt: Prompt, principle: str, position: str, marker: str) -> Prompt:
    """The prompt with the safety principle in the last user message: after its images, and
    before (``position="before"``) or after (``"after"``) its text."""
    last = max((i for i, m in enumerate(prompt.messages) if m["role"] == "user"), default=None)
    if last is None:
        raise ValueError("CoCA needs a user message to attach the safety principle to")
    content = prompt.messages[last]["content"]
    head, sep, text = content.rpartition(marker)  # head + sep: everything up to the last image
    body = f"{principle}\n\n{text.lstrip()}" if position == "before" else f"{text.rstrip()}\n\n{principle}"
    messages = [dict(m) for m in prompt.messages]
    messages[last]["content"] = head + sep + body
    return Prompt(messages, prompt.images, prompt.grafts)


def last_turn_head(render, messages: list[dict]) -> str | None:
    """The text ``render(messages)`` holds before the last message's content, for flattened
    messages whose last one is the user's; None otherwise. Found template-agnostically: the last
    content is replaced by two different stand-ins and the renders' common prefix taken."""
    if not messages or messages[-1]["role"] != "user":
        return None
    a, b = (render([*messages[:-1], {"role": "user", "content": s}]) for s in ("\ue000", "\ue001"))
    return a[:next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)]


def last_turn_row(render, tokenize, messages: list[dict], marker: str) -> int:
    """The prompt position where the last user message's content starts (``render``: flattened
    messages -> prompt text; ``tokenize``: a text prefix -> its token ids, as the prompt's
    start is tokenized); 0, every row, when the last message is not the user's or an earlier
    turn holds media (``marker``)."""
    head = last_turn_head(render, messages)
    return 0 if head is None or marker in head else len(tokenize(head))
