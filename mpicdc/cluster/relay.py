"""A rank's stand-in on the head: ``relay.py STATE_DIR COMMAND...`` (the daemons-on-the-head arrangement).

``mpirun`` runs in the head namespace with every PRRTE daemon there, and its executable for every
rank is this relay, an ordinary local child of the head's daemon.  Rank 0 (the master) simply
becomes COMMAND.  Rank r >= 1 belongs to device r-1 of the cluster (``STATE_DIR/cluster.json``):
the relay connects to that device's daemon (:mod:`devd`) over the device's own link, which starts
COMMAND there with the relay's environment, and then carries, over that one connection, the
rank's stdout/stderr, its PMIx connections to the head's daemon, heartbeats and its exit status.

When the device dies or goes silent (no frame for ``SILENCE_S``: power-off, cut link, killed
daemon) the relay SIGKILLs itself, so the runtime sees an ordinary local process die and ULFM
reports the rank failed; no daemon is ever lost, so no device's death can end the job.  When the
rank ends, the relay ends the same way (same exit code, or the same signal).

Standard library only: it runs as a plain script, without mpicdc on the path.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

if __package__:
    from mpicdc.cluster import tunnel as t
else:  # a plain script: tunnel.py is beside it
    import tunnel as t

CONNECT_S = 10.0


def device_of_rank(state: str, rank: int) -> dict | None:
    """The device (``{"address", "name", ...}``) rank ``rank`` runs on; None for the head (rank 0)."""
    with open(os.path.join(state, "cluster.json")) as f:
        devices = [n for n in json.load(f)["nodes"] if n["name"] != "head"]
    if rank == 0:
        return None
    if rank > len(devices):
        raise LookupError(f"rank {rank} has no device: the cluster has {len(devices)} devices for ranks 1..{len(devices)}")
    return devices[rank - 1]


def _die(rank: int, device: dict, why: str) -> None:
    """End this relay the way a crashed local rank ends, after saying why (once)."""
    print(f"mpicdc relay: rank {rank} on {device['name']} ({device['address']}): {why}; ending the rank",
          file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def _write(stream, data: bytes) -> None:
    """The rank's output to the relay's own stdio (PRRTE's pipes); dropped once the runtime closed them."""
    try:
        stream.write(data)
        stream.flush()
    except (BrokenPipeError, ValueError, OSError):
        pass


async def relay(rank: int, device: dict, argv: list) -> None:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(device["address"], t.PORT), CONNECT_S)
    except (OSError, asyncio.TimeoutError) as exc:
        _die(rank, device, f"cannot reach the device daemon at port {t.PORT} ({exc})")
    link = t.Link(reader, writer)
    head_pmix = t.pmix_port(dict(os.environ))
    await link.send(t.frame_json(t.START, {"argv": argv, "env": dict(os.environ), "cwd": os.getcwd()}))
    beat = asyncio.ensure_future(link.heartbeat())
    heads: dict = {}  # channel -> writer of the tunnelled PMIx connection on the head
    out = {t.STDOUT: sys.stdout.buffer, t.STDERR: sys.stderr.buffer}
    try:
        while True:
            kind, channel, payload = await link.recv()
            if kind == t.OUT:
                _write(out[channel], payload)
            elif kind == t.OPEN:
                try:
                    r, w = await asyncio.open_connection("127.0.0.1", head_pmix)
                except OSError:  # the head's daemon is gone (the job is ending): the rank sees a closed socket
                    await link.send(t.frame(t.CLOSE, channel))
                    continue
                heads[channel] = w
                asyncio.ensure_future(t.pump(r, link.send, t.DATA, channel))
            elif kind == t.DATA:
                await t.deliver(heads, channel, payload)
            elif kind == t.CLOSE and channel in heads:
                heads.pop(channel).close()
            elif kind == t.EXIT:
                beat.cancel()
                code = json.loads(payload)["returncode"]
                if code < 0:  # killed by a signal: so is the relay (as the runtime would have seen it)
                    os.kill(os.getpid(), -code)
                os._exit(code if code >= 0 else 128 - code)
    except asyncio.TimeoutError:
        _die(rank, device, f"device silent for {t.SILENCE_S:g} s")
    except (asyncio.IncompleteReadError, ConnectionError, OSError) as exc:
        _die(rank, device, f"device connection lost ({type(exc).__name__})")


def main(argv: list) -> int:
    if len(argv) < 2:
        print("usage: relay.py STATE_DIR COMMAND...", file=sys.stderr)
        return 2
    state, command = argv[0], argv[1:]
    rank = int(os.environ.get("PMIX_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))
    device = device_of_rank(state, rank)
    if device is None:
        os.execvp(command[0], command)
    asyncio.run(relay(rank, device, command))
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
