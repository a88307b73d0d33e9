"""The device daemon of the daemons-on-the-head arrangement: ``devd.py ADDRESS --head HEAD [--port P] [--private-tmp]``.

Runs inside a device's namespace (started by the cluster, not by MPI) and listens on the
device's address.  For each relay that connects (one per rank placed on the device) it starts
the rank with the environment PRRTE gave the relay, the PMIx server URI repointed at a local
listener whose connections are tunnelled back to the head's daemon, and carries the rank's
stdout/stderr, heartbeats and exit over the same connection (:mod:`tunnel`).  When the relay's
connection ends (the job ended, the link or the head died) the rank is killed: a rank cut off
from its daemon has no future.  It runs whatever a relay asks, so it accepts connections from the
head's address (``--head``) only.

Standard library only: it runs as a plain script, without mpicdc on the path.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from pathlib import Path

if __package__:
    from mpicdc.cluster import tunnel as t
else:  # a plain script: tunnel.py is beside it
    import tunnel as t


#: no frame from the relay for this long (its heartbeats come every second) means the device is cut off
CUT_OFF_S = 1.5 * t.HEARTBEAT_S


#: the folder a device does not share with the head (it has its own); ``/dev/shm`` is always private too
PRIVATE_ROOT = "/tmp"

#: run as ``sh -c ISOLATE sh CWD N PATH1..PATHN COMMAND...`` in a new mount namespace: a fresh tmpfs
#: (staged on /dev/shm) holding bind mounts of the N deployed paths becomes /tmp, another fresh
#: tmpfs becomes /dev/shm, and COMMAND runs in CWD looked up again, with neither of the head's
#: folders in sight
ISOLATE = r"""set -e
cwd=$1; n=$2; shift 2
mount -t tmpfs -o mode=1777 mpicdc-tmp /dev/shm
while [ "$n" -gt 0 ]; do
  p=$1; stage="/dev/shm${p#/tmp}"; shift; n=$((n - 1))
  if [ -d "$p" ]; then mkdir -p "$stage"; else mkdir -p "$(dirname "$stage")"; touch "$stage"; fi
  mount --bind "$p" "$stage"
done
mount --move /dev/shm /tmp
mount -t tmpfs -o mode=1777 mpicdc-shm /dev/shm
cd "$cwd"
exec "$@"
"""


def deployed_paths(argv: list, cwd: str) -> list:
    """The head's files under ``/tmp`` a rank needs: the paths its command names (``--weights DIR``,
    ``--plan=FILE``, the interpreter), its working folder ``cwd``, and this package's install (the
    source tree and the venv devd runs from: a real device has its own install at the same path).
    A real device holds copies of them at the same paths, so with ``--private-tmp`` they are
    bind-mounted into the rank's own ``/tmp``.  Symbolic links are kept as named (a venv's
    ``bin/python`` links outside it).  Parents before children; a path inside another is dropped."""
    named = [cwd, sys.prefix, str(Path(__file__).resolve().parents[2])]
    named += [a.partition("=")[2] if a.startswith("-") else a for a in argv]
    found = {os.path.abspath(os.path.join(cwd, n)) for n in named if n}
    kept = sorted(p for p in found if p.startswith(PRIVATE_ROOT + "/") and os.path.lexists(p))
    return [p for i, p in enumerate(kept) if not any(p.startswith(q + "/") for q in kept[:i])]


def isolated(argv: list, cwd: str) -> list:
    """``argv`` to run in a mount namespace of its own with empty ``/tmp`` and ``/dev/shm`` (:data:`ISOLATE`)."""
    paths = deployed_paths(argv, cwd)
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", ISOLATE, "sh", cwd, str(len(paths)),
            *paths, *argv]


async def serve_rank(reader, writer, private_tmp: bool = False) -> None:
    """Start one rank for the relay at the other end of ``reader``/``writer`` and carry it until either ends."""
    link = t.Link(reader, writer)
    proc, cut_off = None, False
    locals_: dict = {}  # channel -> writer of a PMIx connection of the rank
    try:
        kind, _, payload = await link.recv()
        if kind != t.START:
            return
        start = json.loads(payload)
        next_channel = iter(range(3, 1 << 31))

        async def pmix_client(r, w):
            channel = next(next_channel)
            locals_[channel] = w
            await link.send(t.frame(t.OPEN, channel))
            await t.pump(r, link.send, t.DATA, channel)

        listener = await asyncio.start_server(pmix_client, "127.0.0.1", 0)
        port = listener.sockets[0].getsockname()[1]
        argv, cwd = start["argv"], start.get("cwd") or "/"
        if private_tmp:
            argv = isolated(argv, cwd)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, env=t.repoint_pmix(start["env"], port), cwd=cwd,
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                start_new_session=True)
        except OSError as exc:  # said through the relay, which exits 127 like a shell
            await link.send(t.frame(t.OUT, t.STDERR, f"mpicdc devd: cannot start {start['argv'][0]}: {exc}\n".encode()))
            await link.send(t.frame_json(t.EXIT, {"returncode": 127}))
            return
        beat = asyncio.ensure_future(link.heartbeat())
        outs = [asyncio.ensure_future(t.pump(proc.stdout, link.send, t.OUT, t.STDOUT)),
                asyncio.ensure_future(t.pump(proc.stderr, link.send, t.OUT, t.STDERR))]
        inbound = asyncio.ensure_future(_inbound(link, locals_))
        ended = asyncio.ensure_future(_rank_end(proc, outs))
        done, _ = await asyncio.wait({inbound, ended}, return_when=asyncio.FIRST_COMPLETED)
        cut_off = await _cut_off(link, inbound)
        if ended in done and not cut_off:
            await link.send(t.frame_json(t.EXIT, {"returncode": proc.returncode}))
        for task in (beat, inbound, ended):
            task.cancel()
        listener.close()
    except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError, OSError, ValueError):
        pass
    finally:
        if proc is not None and proc.returncode is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            await proc.wait()
        if cut_off:
            await _drop_queued_sends()
        for w in locals_.values():
            w.close()
        writer.close()


async def _cut_off(link: t.Link, inbound) -> bool:
    """Whether the device is cut off from the head now that the rank or the relay ended: the relay went
    silent, or the rank ended (its own watchdog: "lost the master") while nothing had been heard from the
    relay for longer than its heartbeats allow and nothing comes within ``SILENCE_S`` (a loop merely late
    on a loaded machine hears the next heartbeat)."""
    if inbound.done():
        return inbound.result() == "silent"
    if asyncio.get_running_loop().time() - link.heard <= CUT_OFF_S:
        return False
    heard = link.heard
    await asyncio.wait({inbound}, timeout=t.SILENCE_S)
    return link.heard == heard


async def _drop_queued_sends() -> None:
    """Abort the sockets a killed rank left with data queued (FIN-WAIT-1) in this namespace.

    A rank cut off from the head (link down) outlives the job's failure detector: it accuses the peer it
    watches of being dead, and that message waits in its socket.  Killed for its silence (or ended by
    its own watchdog), the rank is gone but the kernel keeps the socket; when the link comes back it
    would deliver the accusation and the job would lose a second, healthy rank (measured: link cut 4 s,
    then restored -> "rank 2 failed", exit 4).  ``ss -K`` (iproute2) aborts those sockets instead."""
    try:
        proc = await asyncio.create_subprocess_exec("ss", "-K", "-t", "state", "fin-wait-1",
                                                    stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=asyncio.subprocess.DEVNULL)
        await asyncio.wait_for(proc.wait(), 5.0)
    except (OSError, asyncio.TimeoutError):
        pass


async def _rank_end(proc, outs) -> None:
    await asyncio.gather(*outs)
    await proc.wait()


async def _inbound(link: t.Link, locals_: dict) -> str:
    """Frames from the relay: PMIx bytes for the rank, closes, heartbeats; returns why the relay is gone."""
    try:
        while True:
            kind, channel, payload = await link.recv()
            if kind == t.DATA:
                await t.deliver(locals_, channel, payload)
            elif kind == t.CLOSE and channel in locals_:
                locals_.pop(channel).close()
    except asyncio.TimeoutError:
        return "silent"  # nothing for SILENCE_S: the link or the head is gone
    except (asyncio.IncompleteReadError, ConnectionError, OSError):
        return "closed"  # the relay closed: the job ended


async def serve(address: str, port: int, head: str, private_tmp: bool) -> None:
    async def from_head(reader, writer):
        peer = writer.get_extra_info("peername")[0]
        if peer != head:
            print(f"mpicdc devd: refused a connection from {peer} (only the head, {head}, may start ranks)", flush=True)
            writer.close()
            return
        await serve_rank(reader, writer, private_tmp)

    server = await asyncio.start_server(from_head, address, port)
    print(f"mpicdc devd: listening on {address}:{port} for {head}"
          f"{' (each rank with its own /tmp and /dev/shm)' if private_tmp else ''}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list | None = None) -> None:
    p = argparse.ArgumentParser(prog="devd.py", description="start ranks for relays on the head (docs/deploy-pi.md)")
    p.add_argument("address", help="the device's address to listen on")
    p.add_argument("--head", required=True, metavar="ADDRESS",
                   help="the head's address: connections from anywhere else are refused (a relay can run any command)")
    p.add_argument("--port", type=int, default=t.PORT, help=f"port to listen on (default {t.PORT})")
    p.add_argument("--private-tmp", action="store_true",
                   help="emulation on one machine: every rank in a mount namespace with its own empty /tmp and "
                        "/dev/shm, holding only the head's files its command names (needs root and util-linux)")
    args = p.parse_args(argv)
    asyncio.run(serve(args.address, args.port, args.head, args.private_tmp))


if __name__ == "__main__":
    main()
