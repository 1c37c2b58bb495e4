"""`butterfly model ...` and `butterfly generate`.

Their torch-bound imports are made inside the commands: torch takes a second to import,
and every other command of the CLI (`status`, `infer`, `config`) starts without it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from butterfly.cli.paths import demo_model
from butterfly.cli.report import err, fail
from butterfly.partition.strategies import uniform_ranges
from butterfly.types.errors import ButterflyError
from butterfly.types.tasks import SamplingParams

app = typer.Typer(no_args_is_help=True)


@app.command("create-demo")
def create_demo_cmd(
    out: Annotated[Path, typer.Option(help="Directory to write the model into.")],
    size: Annotated[
        str, typer.Option(help="tiny (for tests) or small (~113M parameters, benchmarks).")
    ] = "tiny",
    seed: Annotated[
        int, typer.Option(min=0, max=2**63 - 1, help="Weights seed; same seed, same bytes.")
    ] = 0,
    force: Annotated[
        bool, typer.Option("--force", help="Replace the model a directory already holds.")
    ] = False,
) -> None:
    """Write a Llama-architecture demo model with seeded weights and a byte-level tokenizer."""
    from butterfly.runtime.demo import SIZES, create_demo

    if size not in SIZES:
        raise fail(ValueError(f"unknown size {size!r}; choose one of {sorted(SIZES)}"))
    if out.exists() and not out.is_dir():
        raise fail(ValueError(f"{out} is a file; give a directory to write the model into"))
    try:
        with err.status(f"writing the {size} demo model to {out}"):
            create_demo(out, size, seed, replace=force)
    except OSError as e:
        raise fail(e) from e
    err.print(f"wrote {out}")


def generate(
    prompt: Annotated[str, typer.Argument(help="Text to continue.")],
    model: Annotated[
        Path | None, typer.Option(help="Model directory (default: demo model).")
    ] = None,
    max_tokens: Annotated[int, typer.Option(help="New tokens to generate.")] = 32,
    stages: Annotated[int, typer.Option(help="Split the model into this many stages.")] = 1,
    temperature: Annotated[float, typer.Option(help="0 = greedy.")] = 0.0,
    top_k: Annotated[int, typer.Option()] = 0,
    top_p: Annotated[float, typer.Option()] = 1.0,
    seed: Annotated[int | None, typer.Option()] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print a JSON object.")] = False,
) -> None:
    """Generate text with the model split into in-process stages."""
    from butterfly.runtime.generate import Timings
    from butterfly.runtime.generate import generate as run_generation
    from butterfly.runtime.loader import load_stage, model_args, num_layers
    from butterfly.runtime.stage import cannot_generate
    from butterfly.runtime.tokenizer import TextCodec

    try:
        sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        if model is None:
            with err.status("creating the demo model (once)"):
                model = demo_model()
        if not model_args(model)[0].generates:
            raise fail(cannot_generate(str(model)))
        n = num_layers(model)
        with err.status(f"loading {n} layers as {stages} stage(s)"):
            pipeline = [load_stage(model, r) for r in uniform_ranges(n, stages)]
        codec = TextCodec.load(model)
        timings = Timings()
        prompt_ids = codec.encode(prompt)
        ids = list(
            run_generation(pipeline, prompt_ids, max_tokens, sampling, codec.eos_ids, timings)
        )
    except ButterflyError as e:
        raise fail(e) from e
    text = codec.continuation(prompt_ids, ids)
    if json_out:
        typer.echo(json.dumps({"output_ids": ids, "text": text}))
    else:
        typer.echo(text)
        if timings.decode_s:
            per_token = 1000 * sum(timings.decode_s) / len(timings.decode_s)
            err.print(
                f"[dim]{len(ids)} tokens, prefill {timings.prefill_s * 1000:.1f} ms, "
                f"{per_token:.2f} ms/token, {stages} stage(s)[/dim]"
            )
