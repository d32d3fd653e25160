"""The ``mllmkit chat`` read-eval-print loop: questions, streamed answers, ``:commands``.

Reads its input line by line (a terminal or a pipe). A line starting with ``:`` is a command (see
:data:`HELP`); any other non-empty line is a question, answered as it is generated. Mistakes (a
wrong image path, an image file that cannot be read, a bad ``:conf`` value) print an ``error:`` line
and the loop goes on; with piped input the command then exits with code 2.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

from mllmkit.chat.session import ChatSession
from mllmkit.errors import UserError
from mllmkit.generation_settings import GenerationSettings

__all__ = ["HELP", "run_repl"]

HELP = """\
Commands:
  :help, :h               show this help
  :quit, :q, :exit        leave
  :clear, :cl             clear the screen
  :clear-history, :clh    forget the conversation, keep the images (they go into the next question)
  :reset                  forget the conversation and the images
  :history, :his          show the conversation
  :img                    list the images
  :image PATH             add an image (it goes into the next question)
  :seed [N|none]          show or set the random seed used before each answer
  :conf [KEY=VALUE ...]   show or change generation settings ({names})
  :reset-conf             restore the generation settings the session started with
Anything else is a question."""


class _Repl:
    def __init__(self, session: ChatSession, out: TextIO, color: bool) -> None:
        self.session = session
        self.out = out
        self.color = color
        self.initial_settings = session.settings
        self.commands: dict[str, Callable[[str], bool]] = {}
        for names, handler in (
            (("help", "h"), self.help), (("quit", "q", "exit"), self.quit), (("clear", "cl"), self.clear_screen),
            (("clear-history", "clh"), self.clear_history), (("reset",), self.reset),
            (("history", "his"), self.history), (("img",), self.list_images), (("image",), self.add_image),
            (("seed",), self.seed), (("conf",), self.conf), (("reset-conf",), self.reset_conf),
        ):
            for name in names:
                self.commands[name] = handler

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def _label(self, text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.color else text

    # -- commands; each returns False to leave the loop --
    def help(self, arg: str) -> bool:
        self.say(HELP.format(names=", ".join(GenerationSettings.names())))
        return True

    def quit(self, arg: str) -> bool:
        return False

    def clear_screen(self, arg: str) -> bool:
        if self.color:
            self.out.write("\033[2J\033[H")
        self.say("(screen cleared)")
        return True

    def clear_history(self, arg: str) -> bool:
        self.session.clear_history()
        self.say(f"history cleared; {len(self.session.images)} image(s) kept")
        return True

    def reset(self, arg: str) -> bool:
        self.session.clear()
        self.say("history and images cleared")
        return True

    def history(self, arg: str) -> bool:
        if not self.session.history:
            self.say("(no history)")
        for i, (user, answer) in enumerate(self.session.history, 1):
            self.say(f"[{i}] User: {user}")
            self.say(f"[{i}] Assistant: {answer}")
        return True

    def list_images(self, arg: str) -> bool:
        if not self.session.images:
            self.say("(no images)")
        for i, source in enumerate(self.session.image_sources):
            note = " (goes into the next question)" if i in self.session.pending else ""
            self.say(f"[{i}] {source}{note}")
        return True

    def add_image(self, arg: str) -> bool:
        if not arg:
            raise UserError("usage: :image PATH")
        index = self.session.add_image(arg)
        self.say(f"image [{index}] added: {arg}")
        return True

    def seed(self, arg: str) -> bool:
        if arg:
            self.session.settings = self.session.settings.with_value("seed", arg)
        self.say(f"seed = {self.session.settings.seed}")
        return True

    def conf(self, arg: str) -> bool:
        settings = self.session.settings
        for pair in arg.split():
            key, sep, value = pair.partition("=")
            if not sep:
                raise UserError(f"expected KEY=VALUE, found {pair!r}")
            settings = settings.with_value(key.strip(), value)
        self.session.settings = settings
        for key, value in settings.to_dict().items():
            self.say(f"{key} = {value}")
        return True

    def reset_conf(self, arg: str) -> bool:
        self.session.settings = self.initial_settings
        self.say("generation settings restored")
        return True

    # -- the loop --
    def handle(self, line: str) -> bool:
        line = line.strip()
        if not line:
            return True
        if line.startswith(":"):
            name, _, arg = line[1:].partition(" ")
            handler = self.commands.get(name.strip())
            if handler is None:
                raise UserError(f"unknown command {line.split()[0]!r}; :help lists the commands")
            return handler(arg.strip())
        pieces = self.session.stream(line)
        first = next(pieces, "")  # errors (e.g. a question too long for the window) come before any output
        self.out.write(self._label("Assistant:", "1;34") + " " + first)
        self.out.flush()
        for piece in pieces:
            self.out.write(piece)
            self.out.flush()
        self.say()
        return True


def run_repl(session: ChatSession, stdin: TextIO | None = None, stdout: TextIO | None = None,
             images: tuple[str, ...] = ()) -> int:
    """Run the loop until ``:quit`` or end of input; ``images`` are added first.

    Returns 0, or 2 when input that is not a terminal (a pipe, a file) had a line that failed, so a
    script sees that a question went unanswered; at a terminal the person saw the error already."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    interactive = stdin.isatty() and stdout.isatty()
    repl = _Repl(session, stdout, color=interactive)
    failed = False
    for path in images:
        try:
            repl.add_image(path)
        except UserError as exc:
            repl.say(f"error: {exc}")
            failed = True
    if interactive:
        repl.say("Type a question, or :help for commands.")
    while True:
        if interactive:
            stdout.write(repl._label("User:", "1;32") + " ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            break
        try:
            if not repl.handle(line):
                break
        except UserError as exc:
            repl.say(f"error: {exc}")
            failed = True
    return 2 if failed and not interactive else 0
