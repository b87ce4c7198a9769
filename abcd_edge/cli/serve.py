"""The `serve` verb: one warm session behind an HTTP API with admission control (abcd_edge/service/).

``register(main)`` adds it to the `abcd-edge` group. fastapi and uvicorn are optional
(``pip install 'abcd-edge[serve]'``) and imported only when the command runs.
"""
from __future__ import annotations

import click

from abcd_edge.cli.options import device_options, session_options
from abcd_edge.errors import UserError


def _port(ctx, param, value):
    if not 1 <= value <= 65535:
        raise UserError(f"--port {value} must be in 1..65535")
    return value


def _queue(ctx, param, value):
    if value < 1:
        raise UserError(f"--queue {value} must be >= 1")
    return value


@click.command("serve")
@click.option("--port", default=8000, show_default=True, type=int, callback=_port)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface).")
@device_options
@session_options
@click.option("--queue", "queue_size", default=64, show_default=True, type=int, callback=_queue,
              help="Most requests waiting behind the one in progress; more are refused (503).")
def serve_command(port, host, artifact, backend, threads, power, profile, controller, queue_size) -> None:
    """Serve POST /generate {"budget": "150ms", ...} over HTTP: one warm session, one request at a time,
    and only requests whose deadline (counted from arrival) can still be met behind the queue."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise UserError(f"serve needs fastapi and uvicorn ({exc.name or exc} is not installed): "
                        "pip install 'abcd-edge[serve]'") from None
    from abcd_edge.runtime.session import AnytimeRuntime
    from abcd_edge.service.app import create_app

    with AnytimeRuntime.open(artifact, profile=profile, controller=controller, backend=backend, threads=threads,
                             power=power) as rt:
        for note in rt.notes:
            click.echo(f"note: {note}", err=True)
        click.echo(f"serving {rt.manifest.name} ({rt.backend}) on http://{host}:{port}: POST /generate, "
                   f"GET /health, /docs (queue {queue_size})", err=True)
        uvicorn.run(create_app(rt, queue=queue_size), host=host, port=port, log_level="warning", access_log=False)


def register(main: click.Group) -> None:
    """Add `serve` to the `abcd-edge` group."""
    main.add_command(serve_command)
