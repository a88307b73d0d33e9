"""``python -m mpicdc.cluster up N [--rate R] [--prefix P] | down [--prefix P] | status``."""
from __future__ import annotations

import argparse
import json
import shlex
import sys

from mpicdc.cluster import ARRANGEMENTS, Cluster
from mpicdc.cluster.netns import (
    STATE_ROOT,
    ClusterUnavailable,
    known_prefixes,
    list_netns,
    netns_pids,
    teardown,
)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mpicdc.cluster",
                                description="Devices on one machine: a head namespace (mpirun, the master) and "
                                            "one network namespace per device on a private bridge, links shaped "
                                            "with tbf. Needs root. See docs/cluster.md.")
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="make a cluster of N devices and print how to run a job on it")
    up.add_argument("devices", type=int, metavar="N")
    up.add_argument("--rate", help="shape every link both ways, e.g. 20mbit (default: unshaped)")
    up.add_argument("--prefix", help="names of its namespaces and links (default: cdc<pid>)")
    up.add_argument("--daemons", choices=ARRANGEMENTS, default="device",
                    help="where Open MPI's daemons run: 'device' (one per device, started by mpirun through the "
                         "launch agent) or 'head' (all on the head; each device's rank behind a relay, so no "
                         "device's death ends the job). Default: device")
    down = sub.add_parser("down", help="remove a cluster (every one made here without --prefix)")
    down.add_argument("--prefix")
    sub.add_parser("status", help="list the clusters on this machine")
    args = p.parse_args(argv)
    try:
        if args.cmd == "up":
            return _up(args)
        if args.cmd == "down":
            for prefix in [args.prefix] if args.prefix else known_prefixes():
                removed = teardown(prefix)
                print(f"{prefix}: removed {len(removed)} namespaces and links")
            return 0
        return _status()
    except ClusterUnavailable as exc:
        print(f"mpicdc.cluster: cannot make namespaces here: {exc}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError) as exc:
        print(f"mpicdc.cluster: {exc}", file=sys.stderr)
        return 2


def _up(args) -> int:
    cluster = Cluster(args.devices, rate=args.rate, prefix=args.prefix, daemons=args.daemons)
    cluster.up()
    launch = ["python", "-m", "mpicdc.launch", *cluster.launcher_args(len(cluster.nodes)), "tiny", "--repeat", "20",
              "--check", *(["--link", args.rate] if args.rate else [])]
    print(f"cluster {cluster.prefix}: head {cluster.head.address} ({cluster.head.netns}) + {args.devices} devices "
          f"on {cluster.cidr}, links {'shaped at ' + args.rate if args.rate else 'unshaped'}, "
          f"daemons on {'the head (relays)' if args.daemons == 'head' else 'each device'}")
    print(f"hostfile: {cluster.hostfile}")
    print(f"run a job (master on the head):\n  ip netns exec {cluster.head.netns} {shlex.join(launch)}")
    print(f"remove it:\n  python -m mpicdc.cluster down --prefix {cluster.prefix}")
    return 0


def _status() -> int:
    prefixes = known_prefixes()
    if not prefixes:
        print("no cluster")
    spaces = list_netns()
    for prefix in prefixes:
        info = STATE_ROOT / prefix / "cluster.json"
        about = json.loads(info.read_text()) if info.exists() else {}
        mine = [ns for ns in spaces if ns.startswith(prefix + "-")]
        procs = sum(len(netns_pids(ns)) for ns in mine)
        print(f"{prefix}: {len(mine)} namespaces, subnet {about.get('subnet', '?')}, rate {about.get('rate') or '-'}, "
              f"{procs} processes inside{'' if about else ' (no state: remove with down)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
