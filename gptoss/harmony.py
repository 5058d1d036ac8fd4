"""Harmony, gpt-oss's chat format: conversations rendered to token ids, generated ids parsed back into
messages (whole or as they stream).

OpenAI's openai-harmony (the Rust renderer and parser vLLM uses for gpt-oss) does the work; this module
gives it plain dataclasses, loads it offline and keeps its parser going on malformed output
(docs/notes/harmony.md says why and what is added):

  encode_chat(messages, ChatOptions(...))  the prompt, ending with <|start|>assistant
  StreamParser                             generated ids in, one Delta per id (text, channel, recipient)
  parse_assistant(ids)                     the whole reply: its messages (final, analysis, tool calls)

The prompt: a system message that ChatOptions describes (no conversation date unless it gives one, so
a prompt is the same ids on every run); a developer message with ChatOptions.instructions and the
function tools the model may call; then the messages, less the reasoning of finished turns.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from datetime import date

from .tokenizer import CALL, END, ENDOFTEXT, MESSAGE, RETURN, SHIPPED_VOCABULARY, START, TokenizerError

REASONING_EFFORTS = ("low", "medium", "high")
ROLES = ("developer", "user", "assistant", "tool")
DEFAULT_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
KNOWLEDGE_CUTOFF = "2024-06"
STOP_REASONS = {RETURN: "return", CALL: "call", ENDOFTEXT: "endoftext"}


@dataclass(frozen=True)
class Tool:
    """A function the model may call: it writes `to=functions.NAME` and the arguments as JSON."""

    name: str
    description: str = ""
    parameters: dict | None = None  # a JSON schema of the arguments object


@dataclass(frozen=True)
class ChatOptions:
    """What the system and developer messages say."""

    reasoning_effort: str = "medium"
    identity: str | None = DEFAULT_IDENTITY
    knowledge_cutoff: str | None = KNOWLEDGE_CUTOFF
    conversation_start_date: str | date | None = None  # "Current date: ..." (None: the line is left out)
    instructions: str | None = None                    # the developer message's instructions
    tools: tuple = ()                                  # Tool, ...

    def __post_init__(self):
        if self.reasoning_effort not in REASONING_EFFORTS:
            raise ValueError(f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)} "
                             f"(got {self.reasoning_effort!r})")
        if isinstance(self.conversation_start_date, date):
            object.__setattr__(self, "conversation_start_date", self.conversation_start_date.isoformat())
        object.__setattr__(self, "tools", tuple(self.tools))
        names = [t.name for t in self.tools]
        if len(set(names)) != len(names):
            raise ValueError(f"tool names repeat: {names}")


@dataclass(frozen=True)
class Message:
    """A chat message, given to encode_chat or parsed from a reply.

    role: "developer" (instructions), "user", "assistant" or "tool" (a tool's result, `name` says which
    tool, e.g. "functions.get_weather"). An assistant message is a final answer unless its channel says
    otherwise; one with a recipient ("functions.get_weather") is a tool call (channel commentary, its
    content the arguments; content_type "<|constrain|>json" when the model wrote it)."""

    role: str
    content: str
    channel: str | None = None
    recipient: str | None = None
    content_type: str | None = None
    name: str | None = None


@dataclass(frozen=True)
class ParsedReply:
    """An assistant reply: its messages in order and why it stopped: "return" (final answer done),
    "call" (a tool call), "endoftext", or "length" (it ran out). broken: how the reply broke the
    harmony format, the first time it did (StreamParser lists the ways); None for a well-formed reply."""

    messages: tuple = ()
    stop: str = "length"
    broken: str | None = None

    def channel_text(self, channel: str) -> str:
        return "\n".join(m.content for m in self.messages if m.channel == channel)

    @property
    def final(self) -> str:
        return self.channel_text("final")

    @property
    def analysis(self) -> str:
        return self.channel_text("analysis")

    @property
    def tool_calls(self) -> tuple:
        """The messages addressed to a tool (recipient "functions.NAME"; content: the arguments)."""
        return tuple(m for m in self.messages if m.recipient is not None)


# ---------------------------------------------------------------------------------------------------
# openai-harmony, loaded once from gptoss's own vocabulary.

_encoding = None
_encoding_lock = threading.Lock()


def openai_harmony():
    """The openai_harmony module (imported on first use: only the chat format needs it)."""
    try:
        import openai_harmony as oh
    except ImportError:
        raise TokenizerError("the harmony chat format needs openai-harmony: pip install openai-harmony "
                             "(generate, and getp with --input-format text or ids, do without)") from None
    return oh


def harmony_encoding():
    """openai-harmony's HarmonyGptOss encoding (o200k_harmony), built from gptoss/data without a download."""
    global _encoding
    with _encoding_lock:
        if _encoding is None:
            oh = openai_harmony()

            if not SHIPPED_VOCABULARY.is_file():
                raise TokenizerError(f"{SHIPPED_VOCABULARY} is missing: gptoss is installed without its "
                                     "package data; restore it (git checkout or pip install --force-reinstall)")
            # openai-harmony takes no path: it reads $TIKTOKEN_ENCODINGS_BASE/o200k_base.tiktoken (checking
            # its sha256), else downloads it. The user's value comes back after the load.
            saved = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
            os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(SHIPPED_VOCABULARY.parent)
            try:
                _encoding = oh.load_harmony_encoding(oh.HarmonyEncodingName.HARMONY_GPT_OSS)
            except oh.HarmonyError as e:
                raise TokenizerError(f"openai-harmony cannot read {SHIPPED_VOCABULARY} ({e}); restore it "
                                     "(git checkout or pip install --force-reinstall)") from None
            finally:
                if saved is None:
                    del os.environ["TIKTOKEN_ENCODINGS_BASE"]
                else:
                    os.environ["TIKTOKEN_ENCODINGS_BASE"] = saved
    return _encoding


# ---------------------------------------------------------------------------------------------------
# Prompts.

def _text(s: str) -> str:
    """Lone surrogates (from a terminal's undecodable bytes) become U+FFFD, as tiktoken encodes them."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def channel_of(m: Message) -> str | None:
    """An assistant message without a channel is a final answer, or a tool call's commentary."""
    if m.role == "assistant" and m.channel is None:
        return "commentary" if m.recipient else "final"
    return m.channel


def kept_messages(messages) -> list:
    """The messages a prompt carries: an assistant analysis message before the last final answer is
    dropped (its turn is over); the turn in progress keeps its reasoning."""
    messages = list(messages)
    last_final = max((i for i, m in enumerate(messages) if m.role == "assistant" and channel_of(m) == "final"),
                     default=-1)
    return [m for i, m in enumerate(messages)
            if not (m.role == "assistant" and m.channel == "analysis" and i < last_final)]


def _system_message(options: ChatOptions):
    oh = openai_harmony()

    content = oh.SystemContent(model_identity=options.identity, knowledge_cutoff=options.knowledge_cutoff,
                               conversation_start_date=options.conversation_start_date,
                               reasoning_effort=oh.ReasoningEffort(options.reasoning_effort.capitalize()))
    return oh.Message.from_role_and_content(oh.Role.SYSTEM, content)


def _developer_message(instructions: str | None, tools=()):
    oh = openai_harmony()

    content = oh.DeveloperContent.new()
    if instructions:
        content = content.with_instructions(_text(instructions))
    if tools:
        content = content.with_function_tools(
            [oh.ToolDescription.new(t.name, _text(t.description), t.parameters) for t in tools])
    return oh.Message.from_role_and_content(oh.Role.DEVELOPER, content)


def _harmony_message(i: int, m: Message):
    oh = openai_harmony()

    if m.role not in ROLES:
        raise ValueError(f"message {i}: role must be one of {', '.join(ROLES)} (got {m.role!r}); the "
                         "system message is built from ChatOptions, and instructions go in a developer message")
    if m.role == "developer":
        return _developer_message(m.content)
    if m.role == "tool":
        if not m.name:
            raise ValueError(f"message {i}: a tool message needs the tool's name (e.g. functions.get_weather)")
        out = oh.Message.from_author_and_content(oh.Author.new(oh.Role.TOOL, m.name), _text(m.content))
        return out.with_recipient(m.recipient or "assistant").with_channel(m.channel or "commentary")
    out = oh.Message.from_role_and_content(oh.Role(m.role), _text(m.content))
    if channel_of(m):
        out = out.with_channel(channel_of(m))
    if m.recipient:
        out = out.with_recipient(m.recipient)
    if m.content_type:
        out = out.with_content_type(m.content_type)
    return out


def encode_chat(messages, options: ChatOptions | None = None) -> list[int]:
    """The harmony prompt of a conversation as token ids, ending with <|start|>assistant (the model
    writes the reply). Message text never becomes a special token: "<|end|>" in a message is text."""
    oh = openai_harmony()

    options = options or ChatOptions()
    conversation = [_system_message(options)]
    if options.instructions or options.tools:
        conversation.append(_developer_message(options.instructions, options.tools))
    conversation += [_harmony_message(i, m) for i, m in enumerate(kept_messages(messages))]
    return harmony_encoding().render_conversation_for_completion(
        oh.Conversation.from_messages(conversation), oh.Role.ASSISTANT,
        oh.RenderConversationConfig(auto_drop_analysis=False))  # kept_messages did it (harmony 0.0.8's
    # own rule keeps the reasoning of every finished turn after the first)


# ---------------------------------------------------------------------------------------------------
# Replies.

@dataclass(frozen=True)
class Delta:
    """What one generated id added to the message being read: its text (possibly ""), the message's
    channel and recipient, and whether the message started or ended with this id."""

    text: str
    channel: str | None
    recipient: str | None = None
    started: bool = False
    ended: bool = False


def _message(m) -> Message:
    return Message(m.author.role.value, "".join(getattr(c, "text", "") for c in m.content), m.channel,
                   m.recipient, m.content_type, m.author.name)


class StreamParser:
    """Parses an assistant reply id by id (what follows the prompt's <|start|>assistant) with
    openai-harmony's StreamableParser, and never raises on what the model writes:
      - ids between messages that are not <|start|> (a stray <|return|> after <|end|>, text) are skipped;
      - <|start|> inside a header starts the header again; inside a message it ends the message first;
      - a header harmony cannot read (an empty channel, an unknown role, extra words) is dropped and the
        text after it is kept, as a message without a channel;
      - the reply stops at the first stop id (<|return|>, <|call|>, <|endoftext|>); ids after it are
        ignored; a reply cut short keeps what its last message said so far (finish()).
    Each of these but the last breaks the format, as does a reply that stops inside a header (a stop id
    before <|message|>: the header's text becomes the message, as openai-harmony reads it): `broken`
    says how, the first time (the server ends such a reply with finish reason "error").
    Concatenated, the deltas of a message are its content; UTF-8 characters are never split."""

    def __init__(self):
        self.messages: list[Message] = []  # the finished messages
        self.stop: str | None = None       # why the reply stopped; None while it goes on
        self.broken: str | None = None     # how the reply broke the harmony format first; None: it did not
        self._new_parser(assistant=True)

    def _new_parser(self, assistant: bool) -> None:
        oh = openai_harmony()

        self._parser = oh.StreamableParser(harmony_encoding(), oh.Role.ASSISTANT if assistant else None,
                                           strict=False)
        self._state = self._parser.state
        self._harvested = 0
        self._emitted = 0  # characters of the current message given out so far

    def _ended(self, before) -> Delta | None:
        """After the parser went back to waiting for <|start|>: the message it finished, if any."""
        oh = openai_harmony()

        self._state = oh.StreamState.EXPECT_START
        done = self._parser.messages[self._harvested:]
        self._harvested += len(done)
        if not done:
            return None
        message = _message(done[-1])
        self.messages += [_message(m) for m in done]
        text = message.content[self._emitted:]  # what harmony held back: an unfinished character
        self._emitted = 0
        return Delta(text, message.channel, message.recipient, started=before is not oh.StreamState.CONTENT,
                     ended=True)

    def _process(self, token: int) -> Delta | None:
        """One id into the parser, with the recoveries listed in the class docstring."""
        oh = openai_harmony()

        p, before = self._parser, self._state
        # the ids that can move harmony's parser to another state (it is asked for its state only then:
        # the answer carries every id of the message so far)
        changes_state = (token in (END, RETURN, CALL) or (token == MESSAGE and before is oh.StreamState.HEADER)
                         or (token == START and before is oh.StreamState.EXPECT_START))
        try:
            p.process(token)
        except oh.HarmonyError:
            if before is oh.StreamState.HEADER and token == MESSAGE:  # an unreadable header
                self._break("a message header that cannot be read")
                self._new_parser(assistant=True)
                return self._process(MESSAGE)
            self._break(f"id {token} where harmony allows none (a stray id between messages)")
            return None
        if not changes_state:
            delta = p.last_content_delta if before is oh.StreamState.CONTENT else None
            if not delta:
                return None
            self._emitted += len(delta)
            return Delta(delta, p.current_channel, p.current_recipient)
        state = p.state
        if state is oh.StreamState.EXPECT_START:
            return self._ended(before)
        self._state = state
        if state is oh.StreamState.CONTENT and before is not oh.StreamState.CONTENT:
            return Delta("", p.current_channel, p.current_recipient, started=True)
        return None

    def push(self, token: int) -> Delta | None:
        """Read one generated id; the Delta it makes, or None (header ids, skipped ids, after the stop)."""
        oh = openai_harmony()

        token = int(token)
        if self.stop is not None:
            return None
        ended = None
        if token == START and self._state is oh.StreamState.CONTENT:
            self._break("<|start|> inside a message")
            ended = self._process(END)
        elif token == START and self._state is oh.StreamState.HEADER:
            self._break("<|start|> inside a message header")
            self._new_parser(assistant=False)  # the header starts again
        if token == ENDOFTEXT:
            self.stop = STOP_REASONS[token]
            return self.finish()
        if token in (RETURN, CALL) and self._state is oh.StreamState.HEADER:
            self._break("the reply stopped inside a message header")
        delta = self._process(token)
        if token in STOP_REASONS:
            self.stop = STOP_REASONS[token]
        return ended or delta

    def _break(self, how: str) -> None:
        if self.broken is None:
            self.broken = how

    def finish(self, stopped: bool = False) -> Delta | None:
        """The end of the reply (a stop id or none: it ran out): a message cut short is kept as far as it
        went, an unfinished header is dropped. stopped: the reply ended on a stop id that was not pushed
        (an engine that drops it), so an unfinished header breaks the format, as one cut by length does
        not. Returns the cut message's last Delta, if there is one."""
        oh = openai_harmony()

        before = self._state
        if before is oh.StreamState.EXPECT_START:
            return None
        if before is oh.StreamState.HEADER:
            if not (stopped or self.stop is not None):  # cut by its length: nothing to keep
                self._new_parser(assistant=False)
                return None
            # a stop id inside a header: harmony reads the header's text as the message (text without a
            # header becomes a message without a channel), as it does when it is given the stop id
            self._break("the reply stopped inside a message header")
            return self._process(RETURN)
        self._parser.process_eos()
        return self._ended(before)

    def reply(self, stop_token: int | None = None) -> ParsedReply:
        """The reply as a whole (finished first, if it was not); stop_token: the stop id, when the engine
        reports it apart from the ids."""
        self.finish(stopped=stop_token is not None)
        stop = self.stop or STOP_REASONS.get(stop_token, "length")
        return ParsedReply(tuple(self.messages), stop, self.broken)


def parse_assistant(ids, stop_token: int | None = None) -> ParsedReply:
    """Split a whole generated reply (what follows the prompt's <|start|>assistant) into its messages;
    StreamParser says what it tolerates. stop_token: the stop id, when the engine dropped it from ids."""
    if stop_token is not None and stop_token not in STOP_REASONS:
        raise ValueError(f"stop_token {stop_token} is not a stop id ({sorted(STOP_REASONS)})")
    parser = StreamParser()
    for token in ids:
        parser.push(token)
        if parser.stop is not None:
            break
    return parser.reply(stop_token)
