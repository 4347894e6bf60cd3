"""``alignkit chat``: talk to a model in the terminal, or compare two of them.

    alignkit chat --model runs/quickstart/dpo            # one model, streaming answers
    alignkit chat --model A_DIR --compare B_DIR          # both answer every turn, labelled A and B
    alignkit chat --model A_DIR --compare B_DIR --web    # blind side-by-side page that saves picks

The conversation goes through the model's chat template, turn after turn, with an optional system
prompt. In ``--compare`` mode each model keeps its own history of its own answers (two parallel
conversations sharing the user's turns). Commands: ``/help``, ``/reset``, ``/system TEXT``,
``/history``, ``/prompt``, ``/quit`` (Ctrl-D works too). The web mode lives in
:mod:`alignkit.evals.chat_web`; docs/chat.md describes both.
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field

import torch

from alignkit.generation import encode_prompt, load_policy, stop_token_ids

HELP = """commands:
  /help          this text
  /reset         forget the conversation (the system prompt stays)
  /system TEXT   set the system prompt (empty TEXT removes it) and reset the conversation
  /history       how many messages each model's conversation holds
  /prompt        the exact text each model was given for its last answer
  /quit          leave (Ctrl-D works too)"""


@dataclass
class GenOptions:
    max_new_tokens: int = 256
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.95


@dataclass
class Bot:
    """One model, its tokenizer and its own side of the conversation (user + assistant messages)."""

    name: str
    tokenizer: object
    model: object
    history: list[dict] = field(default_factory=list)
    last_prompt: str = ""
    # the last answer's token counts and why it ended ("stop": a stop token, "length": max_new_tokens)
    last_usage: dict = field(default_factory=dict)

    @classmethod
    def load(cls, name: str) -> "Bot":
        """On CUDA when there is one (bf16/fp16), else fp32 on the CPU: :func:`alignkit.generation.load_policy`."""
        model, tok = load_policy(name)
        return cls(name=name, tokenizer=tok, model=model)

    def reply(self, messages: list[dict], opts: GenOptions, on_text=None) -> str:
        """The model's answer to ``messages`` (system + turns). ``on_text(piece)`` receives the text
        as it is generated (TextIteratorStreamer, generation in a thread); the full answer is returned.

        The prompt's token ids and the stop tokens are the ones every generator of alignkit uses
        (:mod:`alignkit.generation`); sampling is transformers' with the model's generation config
        (its top-k included), one prompt at a time and streamed, which ``generate`` does not do."""
        from transformers import TextIteratorStreamer

        tok = self.tokenizer
        # The text is what /prompt shows; encode_prompt renders the same template into the ids.
        self.last_prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        input_ids = torch.tensor([encode_prompt(tok, messages)], device=self.model.device)
        kwargs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                      max_new_tokens=opts.max_new_tokens, pad_token_id=tok.pad_token_id,
                      eos_token_id=stop_token_ids(self.model, tok))
        if opts.temperature > 0:
            kwargs.update(do_sample=True, temperature=opts.temperature, top_p=opts.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if on_text is None:
            with torch.no_grad():
                out = self.model.generate(**kwargs)
            self.note_usage(input_ids.shape[1], out[0, input_ids.shape[1]:], kwargs)
            return tok.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True).strip()

        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        failure: list[BaseException] = []

        def run():
            try:
                with torch.no_grad():
                    out = self.model.generate(**kwargs, streamer=streamer)
                self.note_usage(input_ids.shape[1], out[0, input_ids.shape[1]:], kwargs)
            except BaseException as e:  # re-raised in the caller's thread
                failure.append(e)
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        pieces = []
        for piece in streamer:
            if not pieces:
                piece = piece.lstrip()  # the answer is stripped: so is what is shown
                if not piece:
                    continue
            pieces.append(piece)
            on_text(piece)
        worker.join()
        if failure:
            raise failure[0]
        return "".join(pieces).strip()


    def note_usage(self, prompt_tokens: int, new_ids, kwargs: dict) -> None:
        ids = new_ids.tolist()
        ended = next((i for i, t in enumerate(ids) if t in kwargs["eos_token_id"]), None)  # padding may follow the stop token
        self.last_usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(ids) if ended is None else ended + 1,
                           "finish_reason": "length" if ended is None else "stop"}


def with_system(system: str | None, turns: list[dict]) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + turns


# --------------------------------------------------------------------------------------------
# Terminal loop


def terminal_chat(bots: dict[str, Bot], system: str | None, opts: GenOptions, stdin=None, out=None) -> int:
    """Read a line, answer with every bot (streamed, labelled when there are two), repeat."""
    stdin, out = stdin or sys.stdin, out or sys.stdout
    labelled = len(bots) > 1

    def say(text="", end="\n"):
        out.write(text + end)
        out.flush()

    say("type a message, /help for commands, /quit or Ctrl-D to leave")
    while True:
        say("you> ", end="")
        line = stdin.readline()
        if not line:  # EOF / Ctrl-D
            say()
            return 0
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.startswith("/"):
            cmd, _, arg = text.partition(" ")
            if cmd == "/quit" or cmd == "/exit":
                return 0
            if cmd == "/help":
                say(HELP)
            elif cmd == "/reset":
                for bot in bots.values():
                    bot.history.clear()
                say("conversation reset")
            elif cmd == "/system":
                system = arg.strip() or None
                for bot in bots.values():
                    bot.history.clear()
                say(f"system prompt {'set' if system else 'removed'}; conversation reset")
            elif cmd == "/history":
                say("history: " + ", ".join(f"{label + ' ' if labelled else ''}{len(b.history)} messages"
                                            for label, b in bots.items()))
            elif cmd == "/prompt":
                for label, bot in bots.items():
                    say(f"--- {label} ---" if labelled else "---")
                    say(bot.last_prompt or "(nothing generated yet)")
            else:
                say(f"unknown command {cmd}; /help lists them")
            continue
        for label, bot in bots.items():
            say(f"{label}> " if labelled else "bot> ", end="")
            turns = bot.history + [{"role": "user", "content": text}]
            answer = bot.reply(with_system(system, turns), opts, on_text=lambda piece: say(piece, end=""))
            say()
            bot.history[:] = turns + [{"role": "assistant", "content": answer}]
