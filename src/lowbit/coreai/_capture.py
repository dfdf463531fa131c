"""The child process of Core AI calibration (``python -m lowbit.coreai._capture FD ASSET``): runs the capture asset
in Core AI's runtime on the feeds its parent sends over the connection at file descriptor ``FD`` and sums their
tapped activations (:class:`lowbit.calibration.MomentSums`) until its parent says stop, which it does once the child
answers that the outputs it has been given passed its byte budget.

Why a child: coreai-core 1.0.0b3's runtime keeps every output it returns (measured: an 8 MB output, 8 MB more per
call, after the arrays are dropped and the executable closed), and calibration's outputs are whole activations; a
child gives them back when it exits. It also keeps a runtime abort out of the caller's process.

Messages: parent -> child ``(taps, byte budget)``, then ``(feed index, {input: array})`` per feed, then ``None``;
child -> parent ``("ready", None)``, then ``("ok" | "full", None)`` per feed or ``("error", one-line reason)``, and
``("sums", feeds summed)`` and then each of its :class:`~lowbit.statistics.InputMoments` in the taps' order after
``None``.
"""

from __future__ import annotations

import asyncio
import sys
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from coreai.authoring import AIModelAsset
from coreai.runtime import NDArray

from lowbit.calibration import MomentSums
from lowbit.errors import one_line


async def serve(connection: Connection, path: Path) -> None:
    """Answer the parent's messages (see the module's docstring) with the asset at ``path``."""
    taps, budget = connection.recv()
    ready = False
    try:
        async with AIModelAsset.load(path).executable() as module:
            function = module.load_function("main")
            connection.send(("ready", None))
            ready = True
            sums = await _summed(connection, function, MomentSums(taps), budget)
    except Exception as err:  # the runtime's own exception types
        if ready:
            raise
        connection.send(("error", f"Core AI's runtime cannot load the calibration program: {one_line(err)}"))
        return
    if sums is not None:  # the count of feeds, then each accumulator alone (one pickle at a time in memory)
        connection.send(("sums", sums.feeds))
        for moments in sums.shared.values():
            connection.send(moments)


async def _summed(connection: Connection, function: Any, sums: MomentSums, budget: int) -> MomentSums | None:
    """``sums`` over the feeds the parent sends until ``None``; None when a feed failed (the parent is told why)."""
    given = 0
    while (message := connection.recv()) is not None:
        index, arrays = message
        try:
            outputs = await function({k: NDArray(v) for k, v in arrays.items()})
        except Exception as err:  # the runtime's own exception types
            reason = f"Core AI's runtime cannot run the program on calibration feed {index}: {one_line(err)}"
            connection.send(("error", reason))
            return None
        values = {k: v.numpy() for k, v in outputs.items()}  # the capture's outputs are the taps
        try:
            sums.add(values, index)
        except ValueError as err:
            connection.send(("error", str(err)))
            return None
        given += sum(v.nbytes for v in values.values())
        connection.send(("full" if given >= budget else "ok", None))
    return sums


if __name__ == "__main__":
    try:
        asyncio.run(serve(Connection(int(sys.argv[1])), Path(sys.argv[2])))
    except (EOFError, BrokenPipeError, KeyboardInterrupt):  # the parent stopped: a feed it refused, or Ctrl-C
        sys.exit(1)
