"""`vitune chat RUN_DIR`: talk to a trained model with the template it was trained with."""

from __future__ import annotations

from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from vitune.cli.app import app


@app.command(
    help=(
        "Chat with a trained run (or any model folder), streaming the answer.\n\n"
        "Example: vitune chat runs/quickstart --prompt \"Thủ đô của Việt Nam là gì?\""
    )
)
def chat(
    run_dir: str = typer.Argument(..., help="Run folder written by vitune train, or a model folder", show_default=False),
    prompt: Optional[str] = typer.Option(None, help="Answer this one question and exit", show_default=False),
    system: Optional[str] = typer.Option(None, help="System prompt", show_default=False),
    template: str = typer.Option("auto", help="auto = the template saved with the tokenizer"),
    temperature: float = typer.Option(0.0, help="0 = greedy decoding"),
    top_p: float = typer.Option(0.9, help="Nucleus sampling when temperature > 0"),
    max_new_tokens: int = typer.Option(256, help="Longest answer in tokens"),
    repetition_penalty: float = typer.Option(1.0, help="Above 1 (e.g. 1.2) discourages repeating earlier tokens; 1 = off"),
    base: Optional[str] = typer.Option(None, help="Base model of an adapter, if it moved", show_default=False),
    allow_pickle: bool = typer.Option(
        False, "--allow-pickle", help="Also load pickle weights (*.bin, *.pt): only from a source you trust, "
        "as loading pickle can run arbitrary code"
    ),
) -> None:
    from vitune.data.records import Message
    from vitune.infer.chat import check_sampling, load_chat_model

    check_sampling(temperature, top_p, repetition_penalty, max_new_tokens)
    console = Console(highlight=False)
    bot = load_chat_model(run_dir, template=template, base=base, allow_pickle=allow_pickle)
    settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                    repetition_penalty=repetition_penalty)
    if prompt is not None:
        for piece in bot.stream([Message("user", prompt)], system=system, **settings):
            console.print(piece, end="", markup=False)
        console.print()
        return
    console.print(f"[dim]chatting with {escape(run_dir)} (template {bot.template.name}); /reset clears, /exit quits[/]")
    if system and getattr(bot.template, "system_refused", None):
        console.print("[dim]the chat template takes no system prompt: --system goes before your first question[/]")
    history: list[Message] = []
    while True:
        try:
            question = console.input("[bold green]> [/]")
        except (EOFError, KeyboardInterrupt):
            console.print()
            return
        if question.strip() in ("/exit", "/quit"):
            return
        if question.strip() == "/reset":
            history = []
            continue
        if not question.strip():
            continue
        history.append(Message("user", question))
        pieces = []
        for piece in bot.stream(history, system=system, **settings):
            pieces.append(piece)
            console.print(piece, end="", markup=False)
        console.print()
        history.append(Message("assistant", "".join(pieces).strip()))
