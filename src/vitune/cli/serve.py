"""`vitune serve RUN_OR_MODEL`: an OpenAI-compatible HTTP server over one model and its LoRA adapters."""

from __future__ import annotations

import os
from typing import Optional

import typer

from vitune.cli.app import app


@app.command(
    help=(
        "Serve a run folder, model folder, Hub id or .gguf over an OpenAI-compatible API (/v1/chat/completions, "
        "/v1/completions, /v1/models), batching concurrent requests.\n\n"
        "Example: vitune serve runs/tiny-llama --adapter vi=runs/quickstart --port 8000"
    )
)
def serve(
    run_or_model: str = typer.Argument(..., help="Run folder, model folder, Hub id or .gguf file", show_default=False),
    host: str = typer.Option("127.0.0.1", help="Address to bind (0.0.0.0 exposes it to the network)"),
    port: int = typer.Option(8000, help="TCP port"),
    api_key: Optional[str] = typer.Option(None, help="Require Authorization: Bearer KEY (default: $VITUNE_API_KEY)",
                                          show_default=False),
    adapter: list[str] = typer.Option([], help="NAME=RUN_DIR: another LoRA adapter on the same base, "
                                               "asked for by the request's model field (repeatable)"),
    name: Optional[str] = typer.Option(None, help="Served model name (default: the folder's name)", show_default=False),
    template: str = typer.Option("auto", help="auto = the template saved with the tokenizer"),
    max_batch: int = typer.Option(16, help="Most requests generated together in one batch"),
    max_queue: int = typer.Option(256, help="Most requests waiting for a batch slot; more get 429"),
    max_request_bytes: int = typer.Option(
        1048576, help="Largest request body in bytes; a larger one gets 413 before it is read (a prompt that "
                      "fits the context is far smaller: this keeps one client from filling the memory)"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Also load pickle weights (*.bin): trusted sources only"),
) -> None:
    import uvicorn

    from vitune.errors import UserError
    from vitune.infer.batching import Engine
    from vitune.infer.serve import build_app
    from vitune.infer.served import load_served_models

    if max_batch < 1 or max_queue < 1:
        raise UserError(f"--max-batch {max_batch} / --max-queue {max_queue}: use at least 1")
    if max_request_bytes < 1:
        raise UserError(f"--max-request-bytes {max_request_bytes}: use at least 1 (the default is 1048576, 1 MiB)")
    adapters = []
    for item in adapter:
        key, sep, folder = item.partition("=")
        if not sep or not key.strip() or not folder.strip():
            raise UserError(f"--adapter {item!r}: write it as NAME=RUN_DIR, e.g. --adapter vi=runs/my-sft")
        adapters.append((key.strip(), folder.strip()))
    check_port(host, port)  # before the model loads: seconds, not minutes, to learn it
    loaded = load_served_models(run_or_model, adapters, name=name, template=template, allow_pickle=allow_pickle)
    engine = Engine(loaded.model, loaded.tokenizer, max_batch=max_batch, max_queue=max_queue,
                    uses_adapters=loaded.uses_adapters)
    check_port(host, port)  # again: something may have taken it while the model loaded
    engine.start()
    key = api_key or os.environ.get("VITUNE_API_KEY") or None
    web = build_app(engine, loaded.models, api_key=key, context=loaded.context, max_request_bytes=max_request_bytes)
    typer.echo(f"serving {', '.join(m.name for m in loaded.models)} on http://{host}:{port}/v1", err=True)
    uvicorn.run(web, host=host, port=port, log_level="warning")
    engine.stop()


def check_port(host: str, port: int) -> None:
    """One line when the address cannot be bound (in use, or not this machine's)."""
    import socket

    from vitune.errors import UserError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a TIME_WAIT port is free
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port") from None

