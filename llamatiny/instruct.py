"""
Instruction data: the formats `tinystories.py prepare` reads, the prompt template, and the loss mask.

A record is a conversation, a list of {"role": "system" | "user" | "assistant", "content": text} that
ends with the assistant's turn. A template turns it into text, in one of two plain layouts:

    story (TinyStoriesInstruct style)           chat (role-marked turns)
    <s>Words: dog, ball, happy                   <s>User: Tell me about a dog.
    Features: Dialogue                           Assistant: A dog is a friendly animal.</s>User: And a cat?
    Random sentence: The ball rolled away.       Assistant: A cat likes to sleep.</s>
    Summary: A dog finds a ball.
    Story: Once upon a time, ...</s>

The user's turn of a story record is its instruction fields, one a line, always in the order above
(whatever order the source had; missing fields are left out). <s> is BOS, </s> is EOS. Tokens:
BOS, then each prompt piece (the text up to and including "Story:" / "Assistant:") and each response
encoded on its own (sentencepiece's leading space makes "Story: Once"), each response followed by EOS.
The loss mask is 1 on the response tokens and their EOS (the model learns to end), 0 elsewhere; the
loader turns the 0 positions into ignored targets. Both layouts are plain text, so any sentencepiece
vocabulary encodes them; `train_vocab --special_tokens` can make the markers single tokens.

Inputs (`prepare --format=auto` tells them apart by content):
    tinystories_instruct  .txt, records between <|endoftext|> lines with Words:, Features:, Random sentence:,
                          Summary: lines and a Story: section, in any order, any of them missing
    tinystories_json      TinyStories' JSON shards: {"story", "instruction": {"words", "features"}, "summary"}
    prompt_response       JSONL {"prompt", "response"}, {"prompt", "completion"} (OpenAI's fine-tuning format:
                          the loss on the completion), or Alpaca's {"instruction", "input", "output"}
    chat                  JSONL {"conversations" or "messages": [{"role", "content"} or {"from", "value"}]}
                          (MiniMind, ShareGPT, OpenAI): the loss covers every assistant turn
    text                  plain stories (a "text", "story" or "completion" field of JSON); with
                          --words_from_story=N each becomes a Words: record (below)
"""
import itertools
import random
import re
from collections import Counter

import numpy as np

FIELDS = ("Words", "Features", "Random sentence", "Summary")  # a story record's instruction, in this order
# role -> the text of its turn in the prompt; "assistant" is the marker the response follows
TEMPLATES = {
    "story": {"user": "{}\n", "assistant": "Story:"},
    "chat": {"system": "System: {}\n", "user": "User: {}\n", "assistant": "Assistant:"},
}
LAYOUTS = {
    "story": "<s>Words: ...\\nFeatures: ...\\nRandom sentence: ...\\nSummary: ...\\nStory: STORY</s> "
             "(fields in this order, missing ones left out)",
    "chat": "<s>[System: ...\\n]User: ...\\nAssistant: REPLY</s>User: ...\\nAssistant: REPLY</s>",
}
FORMATS = ("text", "tinystories_instruct", "tinystories_json", "prompt_response", "chat")
TEMPLATE_OF = {"tinystories_instruct": "story", "tinystories_json": "story", "prompt_response": "chat",
               "chat": "chat"}
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user",
                  "assistant": "assistant"}
_FIELD_LINE = re.compile(r"^(Words|Features|Random sentence|Summary|Story):[ \t]*", re.MULTILINE)


class InstructError(ValueError):
    """An instruction that cannot be used; the message is one line."""


class Skip(Exception):
    """A record that cannot be trained on; its message is the reason, counted by Skips."""


class Skips:
    """Records skipped, by reason, and where the first of them was."""

    def __init__(self):
        self.reasons, self.first, self.kept = Counter(), None, 0

    def add(self, reason: str, where: str) -> None:
        self.reasons[reason] += 1
        self.first = self.first or f"{where}: {reason}"

    def merge(self, other: "Skips") -> None:
        self.reasons.update(other.reasons)
        self.first, self.kept = self.first or other.first, self.kept + other.kept

    def summary(self) -> str:
        total = sum(self.reasons.values())
        parts = ", ".join(f"{n} {reason}" for reason, n in self.reasons.most_common())
        return f"skipped {total:,} of {total + self.kept:,} records ({parts}); the first: {self.first}"


# -----------------------------------------------------------------------------
# the template

def check_template(name: str) -> dict:
    if name not in TEMPLATES:
        raise InstructError(f"unknown template {name!r}: this version knows {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def template_info(name: str) -> dict:
    # what meta.json and the checkpoint record
    return {"name": name, "layout": LAYOUTS[name]}


def segments(template: str, messages: list[dict]) -> list[tuple[str, bool]]:
    """(text, is_response) pieces in order, each encoded on its own. Messages that end with a user's turn
    end with the prompt for the reply: the generation prompt."""
    roles, out, prompt = check_template(template), [], ""
    for m in messages:
        if m["role"] == "assistant":
            out += [(prompt + roles["assistant"], False), (m["content"], True)]
            prompt = ""
        else:
            prompt += roles[m["role"]].format(m["content"])
    if prompt:
        out.append((prompt + roles["assistant"], False))
    return out


def encode_records(tok, template: str, records: list[list[dict]], num_threads: int | None = None):
    """Records -> (uint16 tokens, uint8 loss mask), back to back, BOS before each: the shard format."""
    pieces = [segments(template, messages) for messages in records]
    ids = tok.encode_batch([text for record in pieces for text, _ in record], bos=False,
                           num_threads=num_threads) if pieces else []
    parts, flags, k = [], [], 0
    for record in pieces:
        parts.append([tok.bos_id])
        flags.append(0)
        for _, response in record:
            parts.append(ids[k] + [tok.eos_id] if response else ids[k])
            flags.append(int(response))
            k += 1
    lengths = np.fromiter(map(len, parts), np.int64, len(parts))
    tokens = np.fromiter(itertools.chain.from_iterable(parts), np.uint16, int(lengths.sum()))
    return tokens, np.repeat(np.array(flags, np.uint8), lengths)


def record_text(template: str, messages: list[dict]) -> str:
    # a record as plain text, for fitting a vocabulary
    return "\n".join(text for text, _ in segments(template, messages))


def prompt_ids(tok, template: str, messages: list[dict]) -> list[int]:
    """The tokens a model continues with its reply: the record up to its last user turn, then the marker."""
    if not messages or messages[-1]["role"] == "assistant":
        raise InstructError("a prompt ends with the user's turn")
    tokens, _ = encode_records(tok, template, [messages])
    return tokens.tolist()


def hf_chat_template(template: str) -> str:
    """The template as a Hugging Face chat template (Jinja): apply_chat_template renders the same text."""
    roles, branches = check_template(template), []
    for role, text in roles.items():
        if role == "assistant":  # the reply, after the marker and a space (sentencepiece's, in our tokens)
            body = f"{text + ' '!r} + message['content'] + eos_token"
        else:
            before, after = text.split("{}")
            body = f"{before!r} + message['content'] + {after!r}"
        branches.append(f"{{% {'elif' if branches else 'if'} message['role'] == {role!r} %}}{{{{ {body} }}}}")
    return ("{{ bos_token }}{% for message in messages %}" + "".join(branches) + "{% endif %}{% endfor %}"
            + f"{{% if add_generation_prompt %}}{{{{ {roles['assistant']!r} }}}}{{% endif %}}")


def template_of_chat_template(jinja: str | None) -> str | None:
    # an exported Hugging Face directory back to the template it was made from
    return next((name for name in TEMPLATES if hf_chat_template(name) == jinja), None)


# -----------------------------------------------------------------------------
# story instructions: fields

def parse_fields(text: str) -> dict:
    """'Words: dog, ball\\nSummary: ...' -> {"Words": "dog, ball", "Summary": "..."}: fields start a line.
    Text before the first field, or a field given twice, is an InstructError."""
    marks = list(_FIELD_LINE.finditer(text))
    if not marks or text[:marks[0].start()].strip():
        raise InstructError("no field line (Words:, Features:, Random sentence:, Summary:, Story:) "
                            "at the start")
    fields = {}
    for m, end in zip(marks, [m.start() for m in marks[1:]] + [len(text)]):
        if m[1] in fields:
            raise InstructError(f"{m[1]}: given twice")
        fields[m[1]] = text[m.end():end].strip()
    return fields


def render_fields(fields: dict) -> str:
    # one line per field, in FIELDS' order; a value's own line breaks become spaces
    return "\n".join(f"{name}: {' '.join(fields[name].split())}" for name in FIELDS if fields.get(name))


def story_record(fields: dict, story: str) -> list[dict]:
    return [{"role": "user", "content": render_fields(fields)}, {"role": "assistant", "content": story}]


def instruction_messages(template: str, text: str) -> list[dict]:
    """An instruction typed by a user (sample.py --instruction) -> the messages to prompt with."""
    if template == "chat":
        return [{"role": "user", "content": text.strip()}]
    check_template(template)
    try:
        fields = parse_fields(text.strip())
    except InstructError as e:
        raise InstructError(f"{e} in {text.strip()[:60]!r}: this model follows TinyStories-style "
                            "instructions such as \"Words: dog, ball, happy\"") from None
    content = render_fields({k: v for k, v in fields.items() if k != "Story"})
    if not content:
        raise InstructError(f"no instruction in {text.strip()[:60]!r}: "
                            "give a field such as \"Words: dog, ball\"")
    return [{"role": "user", "content": content}]


# -----------------------------------------------------------------------------
# the input formats: item (a .txt record, a JSON object) -> messages, or Skip

def detect_format(items: list) -> str:
    """The format of a file from its first items (str records of a .txt, or parsed JSON values)."""
    for item in items:
        if isinstance(item, str) and re.search(r"^Story:", item, re.MULTILINE):
            return "tinystories_instruct"
        if isinstance(item, dict):
            if "conversations" in item or "messages" in item:
                return "chat"
            if {"prompt", "response"} <= item.keys() or {"prompt", "completion"} <= item.keys() \
                    or {"instruction", "output"} <= item.keys():
                return "prompt_response"
            if "story" in item and (isinstance(item.get("instruction"), dict) or "summary" in item):
                return "tinystories_json"
    return "text"


def to_messages(fmt: str, item) -> list[dict]:
    """One record of format fmt -> checked messages; raises Skip with the reason."""
    if fmt == "tinystories_instruct":
        if not isinstance(item, str):
            raise Skip("malformed record")
        try:
            fields = parse_fields(item.strip())
        except InstructError:
            raise Skip("malformed record") from None
        messages = story_record(fields, fields.pop("Story", ""))
    elif not isinstance(item, dict):
        raise Skip("malformed record")
    elif fmt == "tinystories_json":
        extra = item.get("instruction") if isinstance(item.get("instruction"), dict) else {}
        fields = {"Words": _listed(extra.get("words")), "Features": _listed(extra.get("features")),
                  "Summary": _text(item.get("summary"))}
        messages = story_record(fields, _text(item.get("story")))
    elif fmt == "prompt_response":
        prompt = _text(item.get("prompt", item.get("instruction")))
        if item.get("input"):  # Alpaca: the input below the instruction
            prompt = f"{prompt}\n\n{_text(item['input'])}"
        messages = [{"role": "user", "content": prompt},
                    {"role": "assistant",
                     "content": _text(item.get("response", item.get("completion", item.get("output"))))}]
    elif fmt == "chat":
        messages = [_turn(m) for m in _text_list(item.get("conversations", item.get("messages")))]
    else:
        raise ValueError(f"not an instruction format: {fmt!r}")
    return check_messages(messages)


def check_messages(messages: list[dict]) -> list[dict]:
    messages = [{"role": m["role"], "content": m["content"].strip()} for m in messages]
    if not messages or messages[-1]["role"] != "assistant":
        raise Skip("last turn not the assistant's")
    prompt = ""
    for m in messages:
        if m["role"] != "assistant":
            prompt += m["content"]
        elif not m["content"]:
            raise Skip("no response")
        elif not prompt:
            raise Skip("empty prompt")  # every reply answers something
        else:
            prompt = ""
    return messages


def _text(value) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise Skip("malformed record")
    return value


def _listed(value) -> str:
    # TinyStories' words and features are lists; some copies hold them as one string
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ", ".join(value)
    return _text(value)


def _text_list(value) -> list:
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise Skip("malformed record")
    return value


def _turn(m: dict) -> dict:
    role = SHAREGPT_ROLES.get(m.get("role", m.get("from")))
    if role is None:
        raise Skip("malformed record")
    return {"role": role, "content": _text(m.get("content", m.get("value")))}


# -----------------------------------------------------------------------------
# Words: instructions from plain stories, and whether a response honours them

# function words and TinyStories' boilerplate ("Once upon a time", "one day", "a little dog named"):
# never picked as a story's content words
STOPWORDS = frozenset("""
about above after again all also and any are around away back because been before being below both but
came can could did does doing done down each even ever every for from get got had has have her here hers
him his how into its just let like made make many more most much must not now off once one only onto
other our out over own said same say says see she should some such than that the their them then there
these they this those through too two under until upon very was way well went were what when where which
while who why will with would yes yet you your
time day little named
""".split())


def content_words(story: str) -> list[str]:
    """Distinct words of 3+ letters written in lower case somewhere in the story (names, always capitalised,
    are left out), not STOPWORDS, in order of first appearance."""
    words = re.findall(r"[A-Za-z]+(?:'[A-Za-z]+)?", story)
    return list(dict.fromkeys(w for w in words if w.isalpha() and w.islower() and len(w) >= 3
                              and w not in STOPWORDS))


def words_from_story(story: str, n: int) -> list[str]:
    """n of the story's content words, picked by a random.Random seeded with the story's text: the same
    story always gets the same words, whichever file or process reads it."""
    words = content_words(story)
    if len(words) < n:
        raise Skip(f"fewer than {n} content words")
    return random.Random(story).sample(words, n)


def words_record(story: str, n: int) -> list[dict]:
    return check_messages(story_record({"Words": ", ".join(words_from_story(story, n))}, story))


def requested_words(messages: list[dict]) -> list[str] | None:
    """The words a story record's Words: field asks for (lower case), or None when it has none."""
    user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
    try:
        words = parse_fields(user).get("Words")
    except InstructError:
        return None
    return re.findall(r"[a-z]+", words.lower()) if words else None


def word_forms(word: str) -> set[str]:
    """The bare words a response word may stand for: itself, or itself less -s, -es, -d, -ed or -ing,
    undoing a dropped final e (dancing), a doubled consonant (running) and y -> ie (tried, cries)."""
    forms = {word}
    for suffix in ("s", "es", "d", "ed", "ing"):
        if word.endswith(suffix) and len(word) > len(suffix) + 1:
            stem = word[:-len(suffix)]
            forms.add(stem)
            if suffix == "ing":
                forms.add(stem + "e")
            if suffix in ("ed", "ing") and stem[-1] == stem[-2]:
                forms.add(stem[:-1])
            if suffix in ("es", "ed") and stem.endswith("i"):
                forms.add(stem[:-1] + "y")
    return forms


def words_met(words: list[str], response: str) -> bool:
    """Every requested word appears in the response as a word, case-insensitive, or inflected (word_forms)."""
    used = set().union(*map(word_forms, re.findall(r"[a-z]+", response.lower())))
    return all(w in used for w in words)
