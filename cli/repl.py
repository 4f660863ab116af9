"""The terminal side of `parrot chat`: the interactive loop over a `parrot.inference.chat.ChatSession`,
and answers made safe to print (an answer's control characters never drive the terminal)."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

from parrot.errors import ParrotError
from parrot.inference.chat import ChatSession

HELP = "Commands: /image PATH (switch image; starts a new conversation), /clear (forget the conversation), " \
       "/exit (or Ctrl-D)."


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """`text` safe to show on a terminal: C0 and C1 control characters and DEL (but newline and tab) become
    their escape as visible text (ESC -> `\\x1b`), so an answer cannot drive the terminal. For display
    only: the answers the Python API returns are unchanged."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _write_stdout(text: str) -> None:
    sys.stdout.write(printable(text))
    sys.stdout.flush()


def _write_stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_repl(
    session: ChatSession,
    sampling: dict | None = None,
    read: Callable[[str], str] = input,
    write: Callable[[str], None] = _write_stdout,
    info: Callable[[str], None] = _write_stderr,
    verbose: bool = False,
) -> None:
    """The interactive loop: answers stream to `write` (by default stdout, control characters made visible),
    messages go to `info`. Ends at /exit or EOF."""
    sampling = sampling or {}
    while True:
        try:
            line = read(">> ")
        except EOFError:
            write("\n")
            return
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            cmd, _, arg = line.partition(" ")
            arg = arg.strip().strip("'\"")
            if cmd in ("/exit", "/quit"):
                return
            if cmd == "/clear":
                session.clear()
                info("Conversation cleared.")
            elif cmd == "/image" and arg:
                try:
                    session.set_image(Path(arg).expanduser())
                    info(f"Image: {arg} (new conversation).")
                except ParrotError as e:
                    info(f"Error: {e}")
            elif cmd == "/help":
                info(HELP)
            else:
                info(f"Unknown command {line!r}. {HELP}")
            continue
        stream = session.ask(line, **sampling)
        try:
            for piece in stream:
                write(piece)
        except KeyboardInterrupt:
            stream.close()
            write("\n")
            info("[answer interrupted; not kept in the history]")
            continue
        write("\n")
        if verbose:
            info(stream.result.summary())
