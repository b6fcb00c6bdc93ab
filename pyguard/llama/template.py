"""The chat template of a GGUF model, chosen and rendered as llama-cpp-python's ``Llama`` does
(a recognised template -> its built-in format; otherwise the Jinja template from the metadata;
no template -> llama-2), so a prompt renders to the same text in both."""
from __future__ import annotations

from llama_cpp import llama_chat_format as F

_BUILTIN = {"chatml": F.format_chatml, "mistral-instruct": F.format_mistral_instruct,
            "llama-3": F.format_llama3, "llama-2": F.format_llama2}


class ChatTemplate:
    """Renders flattened messages ([{"role", "content": str}]) to (prompt text, add_bos)."""

    def __init__(self, metadata: dict, eos_text: str, bos_text: str, eos_id: int):
        name = F.guess_chat_format_from_gguf_metadata(metadata)
        if name is None and "tokenizer.chat_template" in metadata:
            self.name = "chat_template.default"
            self._format = F.Jinja2ChatFormatter(template=metadata["tokenizer.chat_template"],
                                                 eos_token=eos_text, bos_token=bos_text,
                                                 stop_token_ids=[eos_id])
        else:
            self.name = name or "llama-2"
            self._format = _BUILTIN[self.name]

    def render(self, messages: list[dict]) -> tuple[str, bool]:
        r = self._format(messages=messages)
        return r.prompt, not r.added_special
