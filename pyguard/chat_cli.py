"""``pyguard chat``: an interactive terminal chat with a guarded model. Answers stream as they are
decoded; after each one, a line shows what the guard decided (CASA score and action, CoCA's dual
steps and KL, CMRM on or off) and the speed.

Commands: ``/image PATH`` attaches an image to the next message (needs a vision model),
``/graft TEXT`` attaches grafted content (needs ``--graft``), ``/reset`` forgets the conversation,
``/quit`` (or end of input) leaves.
"""
from __future__ import annotations

import sys
from pathlib import Path

HELP = "commands: /image PATH or /graft TEXT (attach to the next message), /reset, /quit"


def decisions(report: dict) -> str:
    """One line about the guard's decisions in a ``pyguard`` report."""
    parts = []
    casa = report.get("casa")
    if casa:
        act = f", {casa['action']}" if casa.get("action") else ""
        parts.append(f"CASA {casa['score']:.3f} {'unsafe' if casa['unsafe'] else 'safe'}{act}")
    coca = report.get("coca")
    if coca:
        gated = ", gated off" if coca.get("gated") else ""
        parts.append(f"CoCA {coca['dual_steps']} dual steps, max KL {coca['kl_max']:.2f}{gated}")
    cmrm = report.get("cmrm")
    if cmrm is not None:
        parts.append(f"CMRM {'on' if cmrm.get('on') else 'off'}")
    t = report.get("timings") or {}
    if t.get("prefill_ms") is not None:
        speed = f", {1e3 / t['decode_ms_per_token']:.1f} tok/s" if t.get("decode_ms_per_token") else ""
        parts.append(f"TTFT {t['prefill_ms']:.0f} ms{speed}")
    return "; ".join(parts) or "no guard"


def run(g, max_tokens: int = 256, system: str | None = None, stdin=None, out=None) -> int:
    """The read-answer loop over an open guarded model ``g`` (``create_chat_completion(stream=True)``)."""
    stdin, out = stdin or sys.stdin, out or sys.stdout
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    image: str | None = None
    grafted: str | None = None
    tty = stdin.isatty()
    print(HELP, file=out)
    while True:
        if tty:
            print("you> ", end="", file=out, flush=True)
        line = stdin.readline()
        if not line:
            return 0
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return 0
        if line == "/reset":
            history, image, grafted = history[:1] if system else [], None, None
            print("(conversation reset)", file=out)
            continue
        if line.startswith("/image"):
            path = Path(line[len("/image"):].strip()).expanduser()
            if not path.is_file():
                print(f"error: no such image file: {path}", file=out)
            else:
                image = str(path)
                print(f"(image {path.name} attached to the next message)", file=out)
            continue
        if line.startswith("/graft"):
            grafted = line[len("/graft"):].strip() or None
            print("(grafted content attached to the next message)" if grafted else "error: /graft needs text", file=out)
            continue
        if line.startswith("/"):
            print(f"error: unknown command {line.split()[0]}; {HELP}", file=out)
            continue
        content = line if image is None else [{"type": "image_url", "image_url": {"url": image}},
                                              {"type": "text", "text": line}]
        if grafted is not None:
            content = [{"type": "graft", "text": grafted}, {"type": "text", "text": "\n" + line}]
        msgs = history + [{"role": "user", "content": content}]
        print("assistant> ", end="", file=out, flush=True)
        text, report = "", {}
        try:
            for ch in g.create_chat_completion(msgs, max_tokens=max_tokens, stream=True):
                piece = ch["choices"][0]["delta"].get("content") or ""
                text += piece
                print(piece, end="", file=out, flush=True)
                report = ch.get("pyguard", report)
        except ValueError as e:  # a bad request (e.g. an image for a text-only model): say so, keep chatting
            print(f"\nerror: {e}", file=out)
            image = grafted = None
            continue
        print(f"\n  [{decisions(report)}]", file=out, flush=True)
        history = msgs + [{"role": "assistant", "content": text}]
        image = grafted = None
