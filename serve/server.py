"""``moecoder serve``: the OpenAI-compatible server (uvicorn), one process or ``torchrun --ep N``.

    moecoder serve [--model DIR] [--host 127.0.0.1] [--port 8000] [--api-key KEY]
    torchrun --nproc-per-node 2 -m assistant.cli serve --ep 2      # experts sharded over 2 ranks

Rank 0 serves HTTP and drives the batch; the other ranks follow its steps. A rank that
dies or hangs ends the server with a one-line error (collectives time out after
``--ep-timeout`` seconds), never a hang.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

PROG = "moecoder serve"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Serve the model over the OpenAI HTTP API.")
    p.add_argument("--model", default=None, help="model directory (default: the shipped model)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("MOECODER_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $MOECODER_API_KEY)")
    p.add_argument("--name", default=None, help="the model id clients use (default: the model directory's name)")
    p.add_argument("--device", default=None, help="cpu or cuda (under torchrun: cuda:LOCAL_RANK; default: the config file's)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel ranks (= torchrun's --nproc-per-node)")
    p.add_argument("--ep-timeout", type=float, default=60.0, help="seconds before a silent rank counts as lost")
    p.add_argument("--max-batch", type=int, default=32,
                   help="requests decoded together at most (fewer where the GPU cannot hold their KV cache)")
    p.add_argument("--context", type=int, default=None,
                   help="context length of an open checkpoint (default: its own, at most 32768): "
                        "each concurrent request's KV cache is this long")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="time limit of every request (default: the config file's [serve] max_seconds, else 120)")
    p.add_argument("--max-tokens", type=int, default=256, help="default max_tokens of chat requests")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--log-level", default="warning", help="uvicorn log level")
    p.add_argument("--watermark-key", default=None,
                   help="watermark every generation with this key (default: the settings' [watermark] key, "
                        "[serve] watermark_key; docs/watermark.md)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def err(msg: object) -> int:
        print(f"{PROG}: error: {msg}", file=sys.stderr)
        return 2

    import importlib.util

    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        return err(f"{' and '.join(missing)} not installed: install the server extra, pip install 'moecoder[serve]'")
    if not 0 < args.port < 65536:
        return err("--port must be in 1..65535")
    if args.context is not None and args.context < 16:
        return err("--context must be at least 16")
    for name in ("max_batch", "max_tokens"):
        if getattr(args, name) < 1:
            return err(f"--{name.replace('_', '-')} must be at least 1")
    if (args.max_seconds is not None and args.max_seconds <= 0) or args.ep_timeout <= 0:
        return err("--max-seconds and --ep-timeout must be positive")
    from assistant.config import load_settings

    try:
        settings = load_settings().for_face("serve")  # model, device, max_seconds, [features], [max_tokens]
    except ValueError as e:
        return err(e)
    model_dir = args.model or settings.model
    device = args.device or settings.device
    max_seconds = args.max_seconds or (settings.max_seconds if settings.serve.max_seconds else None) or 120.0
    opts = settings.engine_options()
    opts.pop("default_max_seconds", None)
    from assistant.config import Settings

    watermark = opts.pop("watermark", None)
    try:
        if args.watermark_key is not None:
            watermark = Settings(watermark_key=args.watermark_key).watermark()
    except ValueError as e:
        return err(e)
    if args.threads is not None:
        if args.threads < 1:
            return err("--threads must be at least 1")
        import torch

        torch.set_num_threads(args.threads)
    from assistant.serving import Service, fatal_exit

    try:
        service = Service(model_dir, device, max_batch=args.max_batch, context=args.context, ep=args.ep,
                          ep_timeout=args.ep_timeout,
                          name=args.name, max_seconds=max_seconds, max_new_tokens=args.max_tokens,
                          on_fatal=fatal_exit, watermark=watermark, engine_options=opts)
    except ValueError as e:  # CheckpointError, bad --ep layout
        return err(e)
    if not service.is_leader:
        try:
            service.follow()
        except Exception as e:  # noqa: BLE001 - a lost peer ends this rank with one line
            fatal_exit(f"rank {service.dist.rank}: lost the expert-parallel group: {type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}")
        return 0
    import uvicorn

    from serve.app import create_app

    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"{PROG}: warning: listening on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    app = create_app(service, api_key=args.api_key)
    if service.scheduler is not None and service.scheduler.memory_note:
        print(f"{PROG}: {service.scheduler.memory_note}", file=sys.stderr)
    print(f"{PROG}: model {service.name} (context {service.context_length}, ep {service.ep}) on "
          f"http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level))
    try:
        server.run()
    finally:
        service.close()
    return 0 if server.started else err(f"could not listen on {args.host}:{args.port}")


if __name__ == "__main__":
    sys.exit(main())
