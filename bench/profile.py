"""`python -m bench.profile WHAT [SECONDS]`: record a py-spy flame graph of the agent under load.

WHAT is `register`, `lookup` or `status` (16 clients against an agent with the smoke-sized
image set), or `start` (start-up with a 100,000-record journal). Needs py-spy
(`.venv/bin/pip install py-spy`); writes .run/profile-WHAT.svg and a top-functions text file.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading

from . import b1_register, b2_lookup, b3_startup
from .harness import REPO, Bench, Sizes, child_env, drive


def main() -> int:
    what = sys.argv[1]
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 8.0
    py_spy = shutil.which("py-spy") or str(REPO / ".venv" / "bin" / "py-spy")
    out = REPO / ".run" / f"profile-{what}"
    out.parent.mkdir(exist_ok=True)
    sizes = Sizes(images=50, tags_per_image=4, entries=2000)
    bench = Bench(sizes, smoke=False)
    with bench.running():
        if what == "start":
            journal = bench.directory / "j" / "journal.jsonl"
            b3_startup.write_journal(bench, journal, 100_000)
            agent = bench.new_agent()
            agent.journal_path.parent.mkdir(parents=True)
            shutil.copyfile(journal, agent.journal_path)
            command = [py_spy, "record", "-r", "1000", "-f", "raw", "-o", f"{out}.txt", "--"]
            command += [sys.executable, "-m", "snapagentd", "--config", str(agent.config_path)]
            env = {**child_env(), "NOTIFY_SOCKET": agent.notify.path}
            spy = subprocess.Popen(command, cwd=agent.directory, env=env)
            try:
                agent.notify.wait_for(lambda line: line == "READY=1", timeout=60)
            finally:
                # py-spy writes its profile when the agent (its child) exits.
                children = subprocess.run(
                    ["pgrep", "-P", str(spy.pid)], capture_output=True, text=True, check=False
                ).stdout.split()
                for child in children:
                    os.kill(int(child), signal.SIGTERM)
                spy.wait()
            return 0
        if what == "lookup":
            agent = b2_lookup.populate(bench)
            requests = b2_lookup.lookups(sizes.entries)
        else:
            agent = bench.new_agent()
            bench.start_agent(agent)
            if what == "status":
                b2_lookup.populate  # noqa: B018 - status on an agent with the shared tags only
                requests = b2_lookup.STATUS
            else:
                requests = b1_register.bodies(bench.shared_tags())
        assert agent.process is not None
        pid = agent.process.pid
        load = threading.Thread(
            target=lambda: print(drive(agent.socket_path, requests, 16, seconds + 2, 0.5, pid))
        )
        load.start()
        for form, suffix in (("flamegraph", "svg"), ("raw", "txt")):
            subprocess.run(
                [py_spy, "record", "-p", str(pid), "-d", str(int(seconds / 2)), "-r", "200",
                 "-f", form, "-o", f"{out}.{suffix}"],
                check=True,
            )  # fmt: skip
        load.join()
        bench.stop_agent(agent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
