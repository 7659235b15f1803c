"""Tokenizer and chat template of a Hugging Face model directory or a GGUF file.

Wraps the `tokenizers` library (tokenizer.json) and renders the checkpoint's own Jinja chat template
from tokenizer_config.json, so prompts are exactly what the model was trained on.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import Tokenizer as HFTokenizer

Message = dict[str, Any]


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens either as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


class Tokenizer:
    """Encodes text, decodes ids and applies the chat template of one checkpoint."""

    def __init__(self, tokenizer: HFTokenizer, config: dict[str, Any]) -> None:
        self._tok = tokenizer
        self.config = config
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        self.pad_token = _token_text(config.get("pad_token"))
        self.add_bos_token = bool(config.get("add_bos_token", False))
        self.chat_template: str | None = config.get("chat_template")
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.special_token_ids = frozenset(
            tokenizer.token_to_id(t.content)
            for t in tokenizer.get_added_tokens_decoder().values()
            if t.special
        )
        self._template: jinja2.Template | None = None
        self._token_texts: dict[int, str] = {}

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """From a model directory (tokenizer.json, tokenizer_config.json), or a GGUF file (or a directory
        holding one), whose vocabulary is converted (models/gguf/tokenizer.py)."""
        path = Path(path)
        from chatscale.models.gguf.checkpoint import find_gguf, open_gguf

        gguf = find_gguf(path)
        if gguf is not None:
            from chatscale.models.gguf.tokenizer import build_tokenizer

            return cls(*build_tokenizer(open_gguf(gguf)))
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"{path}: no tokenizer.json (a fast tokenizer file is required)")
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        template_file = path / "chat_template.jinja"
        if "chat_template" not in config and template_file.is_file():
            config["chat_template"] = template_file.read_text()
        return cls(HFTokenizer.from_file(str(tok_file)), config)

    @property
    def hf(self) -> HFTokenizer:
        """The underlying `tokenizers` tokenizer (for its streaming decoder)."""
        return self._tok

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_id(self.eos_token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; a BOS is prepended when the checkpoint asks for one."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        bos = self.bos_token_id
        if add_special_tokens and self.add_bos_token and bos is not None:
            if not ids or ids[0] != bos:
                ids = [bos, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """One token's text, specials included (logprobs name every sampled and top token: thousands a
        step at n=128 with 20 alternatives, so each is decoded once)."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self._tok.decode([token_id], skip_special_tokens=False)
        return text

    def to_json(self) -> str:
        """The tokenizer.json text (what grammar libraries build their vocabulary from)."""
        return self._tok.to_str()

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def apply_chat_template(
        self, messages: list[Message], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render `messages` with the checkpoint's Jinja template (the same one HF uses)."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat_template; send a plain prompt instead")
        if self._template is None:
            env = jinja2.sandbox.ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
            )
            env.globals["raise_exception"] = _raise_exception
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            env.filters["tojson"] = lambda v, indent=None: json.dumps(v, ensure_ascii=False, indent=indent)
            self._template = env.from_string(self.chat_template)
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **kwargs,
        )

    def encode_chat(self, messages: list[Message], add_generation_prompt: bool = True, **kwargs: Any) -> list[int]:
        """Token ids of a chat; the template already writes any BOS, so none is added twice."""
        return self.encode_text(self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                         **kwargs))

    def encode_text(self, rendered: str) -> list[int]:
        """Token ids of text a chat template rendered (special tokens in it are parsed, no BOS added)."""
        return self._tok.encode(rendered, add_special_tokens=False).ids
