"""The `supernet` command: one typer app; each part of the system registers its own sub-commands."""
from __future__ import annotations

import typer

from supernet.cli import (demo_cmd, model_cmds, placement_cmds, plot_cmd, serving_cmds, tasks_cmds, training_cmds,
                          vocab_cmds, weights_cmds)

app = typer.Typer(
    name="supernet",
    help="One checkpoint, many speeds: convert, train, place, serve and inspect supernets.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

for module in (model_cmds, training_cmds, plot_cmd, placement_cmds, serving_cmds, tasks_cmds, weights_cmds, vocab_cmds):
    module.register(app)
app.command()(demo_cmd.demo)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
