"""The interactive chat loop's state, shared by the one-process chat and rank 0 of a
multi-process one: reads a line, keeps the history, fits it to the KV cache."""

from __future__ import annotations

import sys
from collections.abc import Callable

from llamadist.generation.generate import ContextLimitError, check_context, fit_history
from llamadist.generation.sampling import SamplingParams

Encode = Callable[[list[dict[str, str]]], list[int]]


class ChatSession:
    def __init__(self, system: str | None, encode_chat: Encode, max_seq_len: int):
        self.encode_chat = encode_chat
        self.max_seq_len = max_seq_len
        self.system = [{"role": "system", "content": system}] if system else []
        self.history: list[dict[str, str]] = []
        print("chat with the model; /reset clears the history, /quit or Ctrl-D exits",
              file=sys.stderr)

    def _read_line(self) -> str | None:
        """The next user message, handling /reset; None to leave."""
        while True:
            try:
                line = input("> ")
            except (EOFError, KeyboardInterrupt):
                print(file=sys.stderr)
                return None
            cmd = line.strip()
            if cmd in ("/quit", "/exit"):
                return None
            if cmd == "/reset":
                self.history = []
                print("(history cleared)", file=sys.stderr)
            elif cmd:
                return line

    def next_prompt(self, params: SamplingParams) -> list[int] | None:
        """Token ids of the conversation so far plus the next user message (oldest turns
        dropped until the reply fits), or None when the user leaves."""
        while (line := self._read_line()) is not None:
            self.history.append({"role": "user", "content": line})
            self.history = fit_history(self.encode_chat, self.system, self.history,
                                       params.max_new_tokens, self.max_seq_len)
            ids = self.encode_chat(self.system + self.history)
            try:
                check_context([ids], params.max_new_tokens, self.max_seq_len)
            except ContextLimitError as e:  # the session goes on without this message
                self.history.pop()
                print(f"llamadist: {e}; this message was not sent: write a shorter one "
                      f"(--max-new-tokens {params.max_new_tokens} of the "
                      f"{self.max_seq_len}-token KV cache are kept for the reply)",
                      file=sys.stderr)
                continue
            return ids
        return None

    def answered(self, reply: str) -> None:
        self.history.append({"role": "assistant", "content": reply})
