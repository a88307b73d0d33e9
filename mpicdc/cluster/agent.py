"""The launch agent ``mpirun`` calls instead of ``ssh`` (``--prtemca plm_ssh_agent``).

Called as ``agent.py STATE_DIR HOST COMMAND...`` (the cluster writes a two-line wrapper
that supplies STATE_DIR).  It looks HOST (a device's address) up in the cluster's
``hosts.json``, and starts COMMAND (PRRTE's daemon line, a shell line as ssh would run it)
inside that device's network namespace, in a UTS namespace of its own with the device's
hostname, detached (its own session, stdio to a log file), then returns 0 at once.

Detached on purpose (measured): when ``mpirun`` is the daemon's parent, a device killed
later shows up as a failed launch; without distinct hostnames the first message hangs.
Standard library only: it runs as a plain script, without mpicdc on the path.
"""
import json
import os
import subprocess
import sys


def main(argv) -> int:
    if len(argv) < 3:
        print("usage: agent.py STATE_DIR HOST COMMAND...", file=sys.stderr)
        return 2
    state, host, command = argv[0], argv[1], " ".join(argv[2:])
    with open(os.path.join(state, "hosts.json")) as f:
        hosts = json.load(f)
    if host not in hosts:
        print(f"mpicdc cluster agent: unknown host {host!r} (known: {', '.join(sorted(hosts))})", file=sys.stderr)
        return 255  # what ssh returns when it cannot connect
    netns, hostname = hosts[host]["netns"], hosts[host]["hostname"]
    with open(os.path.join(state, f"daemon-{hostname}.log"), "ab") as log:
        subprocess.Popen(["ip", "netns", "exec", netns, "unshare", "--uts", "sh", "-c",
                          'hostname "$0" && exec sh -c "$1"', hostname, command],
                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, close_fds=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
