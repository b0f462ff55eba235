"""Versioned prompt templates.

A prompt is a text file in this package (``anchors_v1.txt``). Its version string is the file
stem plus a short hash of its contents (``anchors_v1-3f2a9c1b``), so editing a prompt changes
the version and invalidates cached anchors made with the old text.

Template format (see ``anchors_v1.txt``): comment lines starting with ``#`` before the first
section, then sections ``=== system ===`` / ``=== user ===`` / ``=== assistant ===``. Placeholders
``{k}`` and ``{history}`` (the last user section) are filled at render time; the final assistant
section, if present, is a prefill the model continues.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

PROMPT_DIR = Path(__file__).resolve().parent
DEFAULT_ANCHOR_PROMPT = "anchors_v3"
HISTORY_PLACEHOLDER = "{history}"

_SECTION = re.compile(r"^===\s*(system|user|assistant)\s*===\s*$", re.M)


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    version: str
    text: str
    messages: tuple[tuple[str, str], ...]  # (role, content) in order, last assistant = prefill

    @property
    def prefill(self) -> str:
        if self.messages and self.messages[-1][0] == "assistant":
            return self.messages[-1][1]
        return ""

    def chat_messages(self, k: int, history: str, cut_examples: bool = True) -> list[dict[str, str]]:
        """Messages for a chat template (without the final prefill)."""
        msgs = list(self.messages)
        if msgs and msgs[-1][0] == "assistant":
            msgs = msgs[:-1]
        out = []
        for i, (role, content) in enumerate(msgs):
            if role == "assistant" and cut_examples:
                lines = [line for line in content.splitlines() if line.strip()]
                content = "\n".join(lines[:k]) if len(lines) > k else content
            content = content.replace("{k}", str(k))
            if i == len(msgs) - 1:
                content = content.replace(HISTORY_PLACEHOLDER, history)
            out.append({"role": role, "content": content})
        return out

    def as_completion_text(self, k: int, history: str) -> str:
        """Plain-text rendering for servers without a chat template (/completions)."""
        parts = []
        for m in self.chat_messages(k, history):
            label = {"system": "", "user": "User: ", "assistant": "Assistant: "}[m["role"]]
            parts.append(f"{label}{m['content']}".strip())
        return "\n\n".join(parts) + "\n\nAssistant: " + self.prefill


def prompt_version(name: str, text: str) -> str:
    return f"{name}-{hashlib.sha256(text.encode('utf-8')).hexdigest()[:8]}"


def parse_template(name: str, text: str) -> PromptTemplate:
    matches = list(_SECTION.finditer(text))
    if not matches:
        raise ValueError(f"prompt {name!r} has no '=== role ===' sections")
    msgs: list[tuple[str, str]] = []
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        body = text[m.end() : end]
        body = body[1:] if body.startswith("\n") else body
        body = body.rstrip("\n")
        if m.group(1) != "assistant" or i + 1 < len(matches):
            body = body.strip()
        msgs.append((m.group(1), body))
    users = [i for i, (r, _) in enumerate(msgs) if r == "user"]
    if not users or HISTORY_PLACEHOLDER not in msgs[users[-1]][1]:
        raise ValueError(f"prompt {name!r}: the last user section must contain {HISTORY_PLACEHOLDER}")
    return PromptTemplate(name=name, version=prompt_version(name, text), text=text, messages=tuple(msgs))


def load_prompt(name_or_path: str | Path = DEFAULT_ANCHOR_PROMPT) -> PromptTemplate:
    """Load a template by name (file in this package, ``.txt`` optional) or by path."""
    p = Path(name_or_path)
    if not p.suffix:
        p = PROMPT_DIR / f"{p.name}.txt"
    elif not p.is_absolute() and not p.exists():
        p = PROMPT_DIR / p.name
    text = p.read_text(encoding="utf-8")
    return parse_template(p.stem, text)
