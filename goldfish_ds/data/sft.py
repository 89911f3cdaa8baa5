"""SFT examples as token ids plus which of them are supervised targets: chat conversations and prompt/response pairs.

chat: a record {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]} with at least one
assistant turn. With a tokenizer that has a chat template (an HF tokenizer directory whose tokenizer_config.json
holds `chat_template`) the conversation is rendered by it; the supervised text of assistant turn i is what
render(messages[:i + 1]) adds to render(messages[:i], add_generation_prompt=True), so the template's end-of-turn
marker is supervised and the header is not. Every such render must be a prefix of the whole conversation's render
(else ValueError: the template rewrites earlier turns). A tokenizer without a chat template (a sentencepiece
model) gets the plain template: BOS, then per message "System: {content}\n" or "User: {content}\n" (not
supervised), and for an assistant turn "Assistant: " (not supervised) then "{content}" and EOS (supervised).

prompt_response: a record {"prompt": str, "response": str}: BOS + prompt + response + EOS, the response and EOS
supervised. Nothing is inserted between them: end the prompt with its separator ("...\\nAnswer:").

Each rendered piece (the text between two boundaries of supervision) is tokenized on its own, so a token never
straddles prompt and response and the prompt's ids equal those a generation prompt has at inference time.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from goldfish_ds.data.sources import read_jsonl_records
from goldfish_ds.data.tokenizer import Tokenizer

SFT_FORMATS = ("chat", "prompt_response")
ROLES = ("system", "user", "assistant")
_PLAIN_ROLE = {"system": "System: ", "user": "User: "}


@dataclass
class SupervisedExample:
    """One example: ids and, per id, whether it is a supervised target (predicting it counts in the loss)."""

    ids: list[int]
    supervised: list[bool]

    @classmethod
    def from_pieces(cls, pieces: Iterable[tuple[list[int], bool]]) -> "SupervisedExample":
        ids, supervised = [], []
        for piece, counts in pieces:
            ids += piece
            supervised += [counts] * len(piece)
        return cls(ids, supervised)


def _checked_messages(record: dict, where: str) -> list[dict]:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: a chat record needs a non-empty list field 'messages', got {messages!r:.80}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) or "role" not in message:
            raise ValueError(f"{where}: messages[{i}] must be an object with a string 'role' and a string 'content', "
                             f"got {message!r:.80}")
        if message["role"] not in ROLES:
            raise ValueError(f"{where}: messages[{i}] has role {message['role']!r}; roles are {list(ROLES)}")
        if message["role"] == "assistant" and not message["content"].strip():
            raise ValueError(f"{where}: messages[{i}] is an assistant turn with an empty 'content' "
                             "(nothing to train on)")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError(f"{where}: the conversation has no assistant turn (nothing to train on)")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _plain_pieces(tok: Tokenizer, messages: list[dict], generation_prompt: bool) -> list[tuple[list[int], bool]]:
    pieces = [([tok.bos_id], False)] if tok.bos_id is not None else []
    for message in messages:
        if message["role"] == "assistant":
            pieces += [(tok.encode("Assistant: "), False), (tok.encode(message["content"]) + [tok.eos_id], True)]
        else:
            pieces.append((tok.encode(_PLAIN_ROLE[message["role"]] + message["content"] + "\n"), False))
    if generation_prompt:
        pieces.append((tok.encode("Assistant: "), False))
    return pieces


def _template_pieces(tok: Tokenizer, messages: list[dict], where: str) -> list[tuple[str, bool]]:
    """The rendered conversation cut at the start and end of every assistant turn's supervised text."""
    full = tok.render_chat(messages, add_generation_prompt=False)
    cuts = [0]
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        for prefix in (tok.render_chat(messages[:i], add_generation_prompt=True),
                       tok.render_chat(messages[:i + 1], add_generation_prompt=False)):
            if not full.startswith(prefix) or len(prefix) < cuts[-1]:
                raise ValueError(f"{where}: the chat template of {tok.path} renders the conversation up to messages"
                                 f"[{i}] as text that is not a prefix of the whole conversation's rendering, so its "
                                 "supervised tokens cannot be located; use a template that only appends turns")
            cuts.append(len(prefix))
    cuts.append(len(full))
    return [(full[a:b], n % 2 == 1) for n, (a, b) in enumerate(zip(cuts, cuts[1:]))]


def encode_chat(tok: Tokenizer, record: dict, where: str = "record") -> SupervisedExample:
    """A chat record as ids with its assistant turns (and their end-of-turn markers) supervised."""
    messages = _checked_messages(record, where)
    if tok.chat_template is None:
        if tok.eos_id is None:
            raise ValueError(f"{where}: tokenizer {tok.path} has neither a chat template nor an EOS id to end "
                             "assistant turns with")
        return SupervisedExample.from_pieces(_plain_pieces(tok, messages, generation_prompt=False))
    example = SupervisedExample.from_pieces((tok.encode(text), counts)
                                            for text, counts in _template_pieces(tok, messages, where))
    if not any(example.supervised):
        raise ValueError(f"{where}: the assistant turns tokenize to no supervised token")
    return example


def chat_generation_prompt(tok: Tokenizer, messages: list[dict]) -> list[int]:
    """The ids of `messages` rendered as encode_chat renders them, followed by the assistant's header: the prompt
    to generate the next assistant turn from."""
    if tok.chat_template is None:
        return [i for piece, _ in _plain_pieces(tok, messages, generation_prompt=True) for i in piece]
    return tok.encode(tok.render_chat(messages, add_generation_prompt=True))


def encode_prompt_response(tok: Tokenizer, record: dict, where: str = "record") -> SupervisedExample:
    """A prompt/response record as BOS + prompt + response + EOS, the response and EOS supervised."""
    for field in ("prompt", "response"):
        if not isinstance(record.get(field), str):
            raise ValueError(f"{where}: a prompt_response record needs a string field {field!r}, got "
                             f"{record.get(field)!r:.80}")
    if not record["response"].strip():
        raise ValueError(f"{where}: field 'response' is empty (nothing to train on)")
    if tok.eos_id is None:
        raise ValueError(f"{where}: tokenizer {tok.path} has no EOS id to end responses with")
    bos = [tok.bos_id] if tok.bos_id is not None else []
    return SupervisedExample.from_pieces([(bos + tok.encode(record["prompt"]), False),
                                          (tok.encode(record["response"]) + [tok.eos_id], True)])


def read_sft_examples(paths: Iterable[str], sft_format: str, tok: Tokenizer) -> Iterator[SupervisedExample]:
    """The examples of JSONL inputs in format `sft_format` (one of SFT_FORMATS), in order."""
    if sft_format not in SFT_FORMATS:
        raise ValueError(f"read_sft_examples: sft_format must be one of {list(SFT_FORMATS)}, got {sft_format!r}")
    encode = encode_chat if sft_format == "chat" else encode_prompt_response
    for where, record in read_jsonl_records(paths):
        yield encode(tok, record, where)
